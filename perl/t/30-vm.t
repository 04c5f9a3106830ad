#!/usr/bin/perl
# VM backups through the bridge as Proxmox VE drives them: a full backup, a change, an
# incremental backup (dirty bitmap on a qemu-storage-daemon NBD export), restores of
# both with qemu-img from the provider's qemu-img-path, list and prune; on backup-dir
# and backup-store, with the REAL Python helper. Each step names the upstream caller.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib", "$FindBin::Bin/..";
use Test::More;
use File::Copy qw(copy);
use Fcntl qw(O_RDWR O_DIRECT);
use IO::File;
use IPC::Open3 qw(open3);
use POSIX ();
use Symbol qw(gensym);

use PVE::Storage;
use PveBackupTest qw(setup_node run_ok qsd_export qsd_stop slurp spew);

my $node = setup_node();
my ($cfg, $tmp) = @$node{qw(cfg tmp)};
my $vmid = 100;
my $dev = 'drive-scsi0';
my $size = 8 * 1024 * 1024;
my $guest_config = "# a n\x{c3}\x{a4}me in UTF-8 bytes\nmemory: 512\nscsi0: local:100/vm-100-disk-0.qcow2,size=8M\n";
my $firewall_config = "[OPTIONS]\nenable: 1\n";

# The guest's disk: a qcow2 whose persistent bitmap 'full' is dirty everywhere (written
# after the bitmap was added), as QEMU's new bitmap is for a first backup.
sub make_disk {
    my ($disk) = @_;
    run_ok('qemu-img', 'create', '-q', '-f', 'qcow2', $disk, $size);
    run_ok('qemu-img', 'bitmap', '--add', $disk, 'full');
    run_ok('qemu-io', '-f', 'qcow2', '-c', 'write -P 0x11 0 8M', '-c', 'write -P 0x33 2M 64k',
        $disk);
}

# qemu-server src/PVE/VZDump/QemuServer.pm virtual_file_backup_prepare: the export as a
# file through nbdfuse, opened O_RDWR|O_DIRECT, and next-dirty-region from nbdinfo's map
# of the bitmap (or the whole disk once without one). Returns ($fh, $next, $cleanup).
sub virtual_file {
    my ($socket, $size, $bitmap) = @_;
    my $uri = "nbd+unix:///${dev}?socket=$socket";
    my @pids;
    my $next;
    if ($bitmap) {
        my ($in, $info, $err) = (gensym, gensym, gensym);
        my $pid = open3($in, $info, $err, 'nbdinfo', $uri, "--map=qemu:dirty-bitmap:$bitmap");
        push @pids, $pid;
        $next = sub {
            my ($offset, $length, $type);
            do {
                my $line = <$info>;
                return if !$line;
                die "unexpected output from nbdinfo - $line\n"
                    if $line !~ m/^\s*(\d+)\s*(\d+)\s*(\d+)/;
                ($offset, $length, $type) = ($1, $2, $3);
            } while (($type & 0x1) == 0);
            return ($offset, $length);
        };
    } else {
        my $done = 0;
        $next = sub { return if $done; $done = 1; return (0, $size) };
    }
    my $mount = "$tmp/vf.$$." . int(rand(1e9));
    mkdir($mount) or die;
    my $file = "$mount/$dev";
    my $pidfile = "$mount.pid";
    spew($pidfile, '');
    my $cpid = fork() // die;
    if (!$cpid) {
        exec('nbdfuse', '--pidfile', $pidfile, $file, $uri) or POSIX::_exit(1);
    }
    push @pids, $cpid;
    for (1 .. 30) { last if -s $pidfile; select(undef, undef, undef, 0.1) }
    die "timeout setting up virtual file '$file'\n" if !-s $pidfile;
    my $fh = IO::File->new($file, O_RDWR | O_DIRECT)
        or die "unable to open backup source '$file' - $!\n";
    # cleanup_file_handles, cleanup_nbd_mounts, cleanup_child_processes.
    my $cleanup = sub {
        close($fh);
        system('fusermount', '-u', $mount);
        for my $pid (@pids) { kill('TERM', $pid); waitpid($pid, 0) }
    };
    return ($fh, $next, $cleanup);
}

my @log;
my $log_function = sub { push @log, [@_] };

# One vzdump job of one VM, in the order of PVE::VZDump::exec_backup and
# exec_backup_task (pve-manager PVE/VZDump.pm) and PVE::VZDump::QemuServer::archive_external
# (qemu-server src/PVE/VZDump/QemuServer.pm). $snap is the "snapshot access" image,
# $bitmaps maps the provider's answer to the bitmap QEMU would export.
sub vzdump_vm {
    my ($storeid, $snap, $bitmaps, $prune, $protect) = @_;
    my $job = {};

    # PVE/VZDump.pm storage_info: the provider, made once per job.
    my $provider = PVE::Storage::new_backup_provider($cfg, $storeid, $log_function);
    my $starttime = time();
    # PVE/VZDump.pm exec_backup: job_init before the first guest.
    $provider->job_init($starttime);
    eval {
        # PVE/VZDump.pm exec_backup_task, $backup_provider_init (snapshot mode).
        my $init = $provider->backup_init($vmid, 'qemu', $starttime);
        die "no archive name\n" if ref($init) ne 'HASH' || !$init->{'archive-name'};
        my $archive = $init->{'archive-name'};
        die "illegal characters in archive name '$archive'\n"
            if $archive !~ m!^(${PVE::Storage::SAFE_CHAR_CLASS_RE}|/|:)+$!;
        $job->{archive} = $archive;
        # PVE/VZDump.pm exec_backup_task: 'creating <provider_name> archive'.
        $job->{provider_name} = $provider->provider_name();

        # PVE/VZDump/QemuServer.pm archive_external.
        my $mechanism = $provider->backup_get_mechanism($vmid, 'qemu');
        die "mechanism '$mechanism' not supported for VMs\n"
            if $mechanism ne 'file-handle' && $mechanism ne 'nbd';
        $job->{mechanism} = $mechanism;
        # qemu-server: nbdfuse is needed for file-handle.
        die "need 'nbdfuse' binary from package libnbd-bin\n"
            if $mechanism eq 'file-handle' && !-e '/usr/bin/nbdfuse';
        my $devices = { $dev => { size => $size } };
        my $incremental = $provider->backup_vm_query_incremental($vmid, $devices) // {};
        my $mode = $incremental->{$dev};
        die "invalid incremental mode '$mode'\n"
            if defined($mode) && $mode !~ m/^(?:new|use|none)$/;
        $job->{query} = $mode // 'absent';

        # What QEMU's backup-access-setup makes of it (bitmap_action_to_status): 'new' ->
        # new, 'use' with the bitmap there -> reuse, nothing -> none.
        my ($status, $bitmap) = ('none', undef);
        if (defined($mode) && $mode ne 'none') {
            $bitmap = $bitmaps->{$mode} // $bitmaps->{new};
            $status = $mode eq 'use' && $bitmaps->{use} ? 'reuse' : 'new';
        }
        $job->{status} = $status;
        my $export = qsd_export($tmp, $snap, $dev, $bitmap);
        my $vf_cleanup;
        eval {
            # backup_access_to_volume_info, per mechanism.
            my $volumes = { $dev => { size => $size, 'bitmap-mode' => $status } };
            if ($mechanism eq 'file-handle') {
                my ($fh, $next);
                ($fh, $next, $vf_cleanup) = virtual_file($export->{socket}, $size, $bitmap);
                $volumes->{$dev}->{'file-handle'} = $fh;
                $volumes->{$dev}->{'next-dirty-region'} = $next;
            } else {
                $volumes->{$dev}->{'nbd-path'} = $export->{socket};
                $volumes->{$dev}->{'bitmap-name'} = $bitmap;
            }
            my $param = { 'firewall-config' => $firewall_config, 'bandwidth-limit' => 0 };
            $provider->backup_vm($vmid, $guest_config, $volumes, $param);
        };
        my $err = $@;
        # PVE::VZDump::QemuServer::cleanup, after the backup.
        $vf_cleanup->() if $vf_cleanup;
        qsd_stop($export);
        die $err if $err;

        # PVE/VZDump.pm exec_backup_task: --notes-template (a failure is a warning
        # there), then --protected (a failure dies), before backup_cleanup.
        eval {
            PVE::Storage::update_volume_attribute($cfg, "$storeid:backup/$archive", 'notes',
                "-vm $vmid, n\x{c3}\x{a4}me\nsecond line");
        };
        $job->{notes_error} = $@;
        PVE::Storage::update_volume_attribute($cfg, "$storeid:backup/$archive", 'protected', 1)
            if $protect;

        # PVE/VZDump.pm exec_backup_task with --remove 1: prune_backups BEFORE
        # backup_cleanup, while the job's helper still holds the new backup open.
        if (my $keep = $prune) {
            my $list = PVE::Storage::prune_backups($cfg, $storeid, $keep, $vmid, 'qemu', 0,
                sub { push @log, [@_] });
            $job->{pruned} = scalar(grep { $_->{mark} eq 'remove' } @$list);
        }

        # PVE/VZDump.pm exec_backup_task: backup_cleanup on success, size from stats.
        my $res = $provider->backup_cleanup($vmid, 'qemu', 1, {});
        $job->{size} = $res->{stats}->{'archive-size'};
    };
    if (my $err = $@) {
        $job->{error} = $err;
        eval { $provider->backup_cleanup($vmid, 'qemu', 0, { error => $err }) };
        $job->{cleanup_error} = $@;
    }
    # PVE/VZDump.pm exec_backup_task: the task log, after backup_cleanup.
    my $tasklog = "$tmp/task-$vmid.log";
    spew($tasklog, "INFO: starting new backup job\n");
    eval { $provider->backup_handle_log_file($vmid, $tasklog) };
    $job->{log_error} = $@;
    # PVE/VZDump.pm exec_backup: job_cleanup after the last guest.
    $provider->job_cleanup();
    return $job;
}

# qemu-server src/PVE/QemuServer.pm restore_external_archive, provider made as in
# src/PVE/API2/Qemu.pm ($check_archive / create_vm).
sub qmrestore {
    my ($storeid, $volname, $target) = @_;
    my $provider = PVE::Storage::new_backup_provider($cfg, $storeid, $log_function);
    my ($mechanism, $vmtype) = $provider->restore_get_mechanism($volname);
    die "mechanism '$mechanism' not supported for VMs\n" if $mechanism ne 'qemu-img';
    die "cannot restore non-VM guest of type '$vmtype'\n" if $vmtype ne 'qemu';
    my $res = {};
    eval {
        $res->{devinfo} = $provider->restore_vm_init($volname);
        $res->{config} = $provider->archive_get_guest_config($volname)
            or die "backup provider failed to extract guest configuration\n";
        $res->{firewall} = $provider->archive_get_firewall_config($volname);
        for my $devname (sort keys %{ $res->{devinfo} }) {
            my $info = $provider->restore_vm_volume_init($volname, $devname, {});
            my $source = $info->{'qemu-img-path'}
                or die "did not get source image path from backup provider\n";
            eval {
                # PVE::Storage::file_size_info($source, undef, 'raw', 1), then
                # PVE::QemuServer::QemuImage::convert with source format raw.
                run_ok('qemu-img', 'info', '-f', 'raw', '--output', 'json', $source);
                run_ok('qemu-img', 'convert', '-q', '-f', 'raw', '-O', 'raw', $source,
                    "$target-$devname.raw");
            };
            my $err = $@;
            eval { $provider->restore_vm_volume_cleanup($volname, $devname, {}) };
            die $@ if $@ && !$err;
            die $err if $err;
        }
    };
    my $err = $@;
    eval { $provider->restore_vm_cleanup($volname) };
    warn "backup provider cleanup after restore failed - $@" if $@;
    die $err if $err;
    return $res;
}

sub same_image {
    my ($raw, $qcow2) = @_;
    return system('qemu-img', 'compare', '-q', '-f', 'raw', '-F', 'qcow2', $raw, $qcow2) == 0;
}

for my $case (['bdir', undef], ['bstore', undef], ['bdir', 'file-handle']) {
    my ($storeid, $want_mechanism) = @$case;
    local $PVE::PveBackup::Bridge::VM_MECHANISM = $want_mechanism;
    note("storage $storeid, mechanism " . ($want_mechanism // 'default'));
    if ($want_mechanism) {
        # A fresh storage for this pass: the name stays (it is the storage id).
        system('rm', '-rf', "$tmp/$storeid");
        mkdir("$tmp/$storeid") or die;
    }
    # The helper's host state (bitmap records) per pass, as on a fresh node.
    local $PVE::PveBackup::Bridge::STATE_DIR = "$tmp/state-" . ($want_mechanism // 'nbd') . "-$storeid";
    @log = ();
    my $pass = $storeid . ($want_mechanism ? "-$want_mechanism" : '');
    my $disk = "$tmp/$pass-disk.qcow2";
    make_disk($disk);
    # Backup 1: the snapshot access is a copy taken now; QEMU then tracks new writes in a
    # fresh bitmap 'inc' on the guest's disk.
    # The provider discards what it read (the export is writable for that): compare
    # restores with a copy kept aside.
    my $snap1 = "$tmp/$pass-snap1.qcow2";
    copy($disk, $snap1) or die;
    copy($disk, "$snap1.orig") or die;
    my $job1 = vzdump_vm($storeid, $snap1, { new => 'full' }, undef, 1);
    is($job1->{error}, undef, "$storeid: full backup ok") or diag(explain(\@log));
    is($job1->{mechanism}, $want_mechanism // 'nbd', "$storeid: mechanism as configured");
    is($job1->{query}, 'new', "$storeid: first backup asks for a new bitmap");
    like($job1->{archive}, qr/^vm-100-\d{4}-/, "$storeid: archive name of our scheme");
    ok($job1->{size} && $job1->{size} > 0, "$storeid: archive-size in stats");
    is($job1->{notes_error}, '', "$storeid: notes accepted during the job");
    my $volid1 = "$storeid:backup/$job1->{archive}";
    my $notes = PVE::Storage::get_volume_attribute($cfg, $volid1, 'notes');
    utf8::encode($notes) if utf8::is_utf8($notes);
    is($notes, "-vm $vmid, n\x{c3}\x{a4}me\nsecond line", "$storeid: notes stored after backup_cleanup");
    is(PVE::Storage::get_volume_attribute($cfg, $volid1, 'protected'), 1,
        "$storeid: --protected applied after backup_cleanup");
    is($job1->{log_error}, '', "$storeid: task log handed over");
    ok(scalar(grep { $_->[0] =~ /^(info|warn|err)$/ } @log), "$storeid: helper logs reached log_function");

    run_ok('qemu-img', 'bitmap', '--remove', $disk, 'full');
    run_ok('qemu-img', 'bitmap', '--add', $disk, 'inc');
    run_ok('qemu-io', '-f', 'qcow2', '-c', 'write -P 0x22 1M 64k', '-c', 'write -P 0x44 7M 4k', $disk);

    sleep(1);    # our volume names have seconds: a second backup in the same second fails
    my $snap2 = "$tmp/$pass-snap2.qcow2";
    copy($disk, $snap2) or die;
    my $job2 = vzdump_vm($storeid, $snap2, { new => 'inc', use => 'inc' }, { 'keep-last' => 5 });
    is($job2->{error}, undef, "$storeid: incremental backup ok") or diag(explain(\@log));
    is($job2->{pruned}, 0, "$storeid: prune inside the job (vzdump --remove) works, keeps all");
    is($job2->{query}, 'use', "$storeid: second backup reuses the bitmap");
    is($job2->{status}, 'reuse', "$storeid: bitmap-mode reuse");
    # backup-dir stores the dirty clusters only; a chunk store's sizes are compressed
    # new chunks, too small here to compare.
    ok($job2->{size} < $job1->{size}, "bdir: incremental stored less ($job2->{size} < $job1->{size})")
        if $storeid eq 'bdir';

    # PVE::Storage::volume_list (pvesm list / the GUI's backup view): list_volumes.
    my $list = PVE::Storage::volume_list($cfg, $storeid, $vmid, 'backup');
    is_deeply([map { $_->{volid} } @$list],
        ["$storeid:backup/$job1->{archive}", "$storeid:backup/$job2->{archive}"],
        "$storeid: list_volumes shows both backups");
    is($list->[0]->{subtype}, 'qemu', "$storeid: subtype qemu");
    is_deeply(PVE::Storage::volume_list($cfg, $storeid, 999, 'backup'), [],
        "$storeid: vmid filter");

    for my $case ([$job1, "$snap1.orig", 'full'], [$job2, $disk, 'incremental']) {
        my ($job, $expect, $what) = @$case;
        # qemu-server reads qemu-img-path as raw (restore_external_archive: source
        # format 'raw'), so a qcow2 path would restore qcow2 bytes: the compare fails.
        my $target = "$tmp/$pass-restore-$what";
        my $res = eval { qmrestore($storeid, "backup/$job->{archive}", $target) };
        is($@, '', "$storeid: restore of the $what backup ok");
        is($res->{config}, $guest_config, "$storeid: guest config restored byte for byte");
        is($res->{firewall}, $firewall_config, "$storeid: firewall config restored");
        is($res->{devinfo}->{$dev}->{size}, $size, "$storeid: restore_vm_init gives the size");
        ok(same_image("$target-$dev.raw", $expect), "$storeid: $what restore equals the disk");
    }

    is($list->[0]->{protected}, 1, "$storeid: list_volumes shows it protected");
    my @plog0;
    my $kept = PVE::Storage::prune_backups($cfg, $storeid, { 'keep-last' => 1 }, $vmid,
        'qemu', 1, sub { push @plog0, [@_] });
    is((grep { $_->{volid} eq $volid1 } @$kept)[0]->{mark}, 'protected',
        "$storeid: prune dry run: the protected backup is marked so");
    # The API's "unprotect" outside a job: straight to the command line.
    PVE::Storage::update_volume_attribute($cfg, $volid1, 'protected', 0);
    is(PVE::Storage::get_volume_attribute($cfg, $volid1, 'protected'), 0,
        "$storeid: unprotected");

    # PVE/VZDump.pm exec_backup_task with --remove: PVE::Storage::prune_backups with
    # the type, not a dry run.
    my @plog;
    my $pruned = PVE::Storage::prune_backups($cfg, $storeid, { 'keep-last' => 1 }, $vmid,
        'qemu', 0, sub { push @plog, [@_] });
    my %mark = map { ($_->{volid} => $_->{mark}) } @$pruned;
    is($mark{"$storeid:backup/$job2->{archive}"}, 'keep', "$storeid: prune keeps the newest");
    is($mark{"$storeid:backup/$job1->{archive}"}, 'remove', "$storeid: prune marks the older");
    my $left = PVE::Storage::volume_list($cfg, $storeid, $vmid, 'backup');
    if ($storeid eq 'bdir') {
        # backup-dir: the incremental's base stays, and the log says why.
        is(scalar(@$left), 2, 'bdir: the chain base is kept');
        ok(scalar(grep { $_->[0] eq 'warn' && $_->[1] =~ /kept/ } @plog), 'bdir: and said why');
    } else {
        is(scalar(@$left), 1, 'bstore: the older backup is removed');
        ok(scalar(grep { $_->[1] =~ /removing backup/ } @plog), 'bstore: removal logged');
    }
}

done_testing();
