#!/usr/bin/perl
# Container backups through the bridge as Proxmox VE drives them: the directory
# mechanism, backup_container_prepare as root, then backup_container in a forked child
# inside the container's user namespace (unshare(2), id map 0 -> 100000), exclude
# patterns; the restore with the provider's tar-path (or archive-directory) extracted by
# tar inside the user namespace. REAL Python helper, backup-dir and backup-store.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib", "$FindBin::Bin/..";
use Test::More;
use File::Find ();
use File::Path qw(make_path);
use Fcntl ();

use PVE::Storage;
use PVE::LXC::Namespaces;
use PveBackupTest qw(setup_node run_ok slurp spew);

plan skip_all => 'needs root (user namespace id maps, chown)' if $> != 0;

my $node = setup_node();
my ($cfg, $tmp) = @$node{qw(cfg tmp)};
# The container's root user (host uid 100000) must reach the trees below, as it reaches
# a mounted rootfs on a node.
chmod(0755, $tmp) or die;

my $vmid = 200;
my $id_map = [['u', 0, 100000, 65536], ['g', 0, 100000, 65536]];
my $guest_config = "arch: amd64\nhostname: ct200\nmemory: 512\n"
    . "rootfs: local:200/vm-200-disk-0.raw,size=1G\nunprivileged: 1\n";
my $firewall_config = "[OPTIONS]\nenable: 0\n";
# PVE/VZDump.pm new: the standard excludes (stdexcludes).
my $findexcl = ['/tmp/?*', '/var/tmp/?*', '/var/run/?*.pid'];

# The container's file system as the host sees it: ids shifted by 100000.
my $rootfs = "$tmp/rootfs";
make_path("$rootfs/etc", "$rootfs/home/user", "$rootfs/tmp", "$rootfs/var/run");
spew("$rootfs/etc/hostname", "ct200\n");
spew("$rootfs/home/user/notes.txt", "n\x{c3}\x{a4}me\n" x 100);
spew("$rootfs/tmp/junk", "excluded\n");
spew("$rootfs/var/run/sshd.pid", "42\n");
symlink('../etc/hostname', "$rootfs/home/link") or die;
chmod(0640, "$rootfs/home/user/notes.txt");
File::Find::find({ no_chdir => 1, wanted => sub { lchown(100000, 100000, $_) } }, $rootfs);
lchown(101000, 101000, "$rootfs/home/user", "$rootfs/home/user/notes.txt");

sub lchown {
    my ($uid, $gid, @paths) = @_;
    for my $p (@paths) {
        # Perl's chown follows symlinks; the symlink's own owner via the chown(1) -h.
        run_ok('chown', '-h', "$uid:$gid", $p);
    }
}

# What a tree holds: path -> type, mode, owner, content.
sub tree {
    my ($dir) = @_;
    my %res;
    File::Find::find({ no_chdir => 1, wanted => sub {
        my $rel = substr($_, length($dir)) || '/';
        my @st = lstat($_);
        my $what = -l _ ? 'l:' . readlink($_) : -d _ ? 'd' : 'f:' . slurp($_);
        $res{$rel} = sprintf('%s %o %d:%d', $what, $st[2] & 07777, $st[4], $st[5]);
    } }, $dir);
    return \%res;
}

my @log;
my $log_function = sub { push @log, [@_] };

# pve-manager PVE/VZDump.pm exec_backup / exec_backup_task and pve-container
# src/PVE/VZDump/LXC.pm archive (backup provider branch), snapshot mode.
sub vzdump_ct {
    my ($storeid) = @_;
    my $job = {};
    my $provider = PVE::Storage::new_backup_provider($cfg, $storeid, $log_function);
    my $starttime = time();
    $provider->job_init($starttime);
    eval {
        my $init = $provider->backup_init($vmid, 'lxc', $starttime);
        $job->{archive} = $init->{'archive-name'} or die "no archive name\n";
        $provider->provider_name();
        # src/PVE/VZDump/LXC.pm archive.
        my $mechanism = $provider->backup_get_mechanism($vmid, 'lxc');
        die "mechanism '$mechanism' not supported for containers\n" if $mechanism ne 'directory';
        my $info = {
            directory => $rootfs,
            sources => ['.'],
            'backup-user-id' => 100000,
            'firewall-config' => $firewall_config,
        };
        $provider->backup_container_prepare($vmid, $info);
        # PVE::LXC::Namespaces::run_in_userns: the forked child as the container's root.
        PVE::LXC::Namespaces::run_in_userns(
            sub { $provider->backup_container($vmid, $guest_config, $findexcl, $info) },
            $id_map,
        );
        my $res = $provider->backup_cleanup($vmid, 'lxc', 1, {});
        $job->{size} = $res->{stats}->{'archive-size'};
    };
    if (my $err = $@) {
        $job->{error} = $err;
        eval { $provider->backup_cleanup($vmid, 'lxc', 0, { error => $err }) };
    }
    $provider->job_cleanup();
    return $job;
}

# PVE::Storage::Plugin::COMMON_TAR_FLAGS (pve-storage src/PVE/Storage/Plugin.pm).
my @COMMON_TAR_FLAGS = qw(
    --sparse --numeric-owner --acls --xattrs --xattrs-include=user.*
    --xattrs-include=security.capability --warning=no-file-ignored
    --warning=no-xattr-write --one-file-system
);

# src/PVE/LXC/Create.pm restore_tar_archive_command: tar x in the user namespace
# (lxc-usernsexec there), the archive opened as root on stdin.
sub userns_tar_x {
    my ($input_fh, $compression, $rootdir) = @_;
    my @cmd = ('tar', 'xpf', '-', ($compression ? ($compression) : ()), '--totals',
        @COMMON_TAR_FLAGS, '-C', $rootdir, '--skip-old-files', '--anchored',
        '--exclude', './dev/*');
    PVE::LXC::Namespaces::run_in_userns(sub {
        open(STDIN, '<&', $input_fh) or die "stdin: $!\n";
        open(STDOUT, '>', '/dev/null');
        exec(@cmd) or die "exec tar: $!\n";
    }, $id_map);
}

# pve-container src/PVE/LXC/Create.pm restore_archive -> restore_external_archive.
sub pct_restore {
    my ($storeid, $volname, $rootdir) = @_;
    my $conf = { unprivileged => 1 };
    my $provider = PVE::Storage::new_backup_provider($cfg, $storeid, $log_function);
    die "refusing to restore privileged container backup from external source\n"
        if !$conf->{unprivileged};
    my ($mechanism, $vmtype) = $provider->restore_get_mechanism($volname, $storeid);
    die "cannot restore non-LXC guest of type '$vmtype'\n" if $vmtype ne 'lxc';
    my $info = $provider->restore_container_init($volname, $storeid, {});
    eval {
        if ($mechanism eq 'tar') {
            my $tar_path = $info->{'tar-path'}
                or die "did not get path to tar file from backup provider\n";
            die "not a regular file '$tar_path'" if !-f $tar_path;
            # restore_tar_archive: tar_compression_option by name, opened as root.
            my $compression = $tar_path =~ m/\.zst$/ ? '--zstd' : $tar_path =~ m/\.gz$/ ? '-z' : undef;
            if (!$compression) {
                # Not named by extension: what `file` would say; zstd magic.
                open(my $peek, '<', $tar_path) or die;
                read($peek, my $magic, 4);
                $compression = '--zstd' if $magic eq "\x28\xb5\x2f\xfd";
            }
            # restore_tar_archive with $untrusted: check_tar_archive lists it first
            # (a second read of the same path).
            run_ok('tar', '-t', ($compression ? ($compression) : ()), '-f', $tar_path);
            sysopen(my $fh, $tar_path, Fcntl::O_RDONLY()) or die "failed to open '$tar_path': $!\n";
            userns_tar_x($fh, $compression, $rootdir);
        } elsif ($mechanism eq 'directory') {
            my $directory = $info->{'archive-directory'}
                or die "did not get path to archive directory from backup provider\n";
            die "not a directory '$directory'" if !-d $directory;
            my @flags = grep { $_ ne '--one-file-system' } @COMMON_TAR_FLAGS;
            open(my $create, '-|', 'tar', 'cpf', '-', @flags, "--directory=$directory", '.')
                or die "tar c: $!\n";
            userns_tar_x($create, undef, $rootdir);
            close($create) or die "tar c failed\n";
        } else {
            die "mechanism '$mechanism' requested by backup provider is not supported for LXCs\n";
        }
    };
    my $err = $@;
    eval { $provider->restore_container_cleanup($volname, $storeid, {}) };
    die $@ if $@ && !$err;
    die $err if $err;
    # restore_configuration_from_external_backup / PVE::Storage::extract_vzdump_config.
    return {
        mechanism => $mechanism,
        config => $provider->archive_get_guest_config($volname, $storeid),
        firewall => $provider->archive_get_firewall_config($volname, $storeid),
    };
}

my $want = tree($rootfs);
delete @$want{'/tmp/junk', '/var/run/sshd.pid'};

for my $storeid (qw(bdir bstore)) {
    @log = ();
    my $job = vzdump_ct($storeid);
    is($job->{error}, undef, "$storeid: container backup in the user namespace ok")
        or diag(explain(\@log));
    like($job->{archive} // '', qr/^ct-200-/, "$storeid: archive name");

    my $rootdir = "$tmp/$storeid-restored";
    mkdir($rootdir) or die;
    chown(100000, 100000, $rootdir);
    # PVE demands a regular file at tar-path (Create.pm: die "not a regular file") and
    # reads it twice; backup-store's helper hands out a FIFO so far.
    local $TODO = $storeid eq 'bstore' ? 'helper: backup-store tar-path is a FIFO' : undef;
    my $res = eval { pct_restore($storeid, "backup/$job->{archive}", $rootdir) };
    is($@, '', "$storeid: pct restore ok") or diag(explain(\@log));
    note("$storeid: restore mechanism " . ($res->{mechanism} // '?'));
    is($res->{config}, $guest_config, "$storeid: container config restored");
    is($res->{firewall}, $firewall_config, "$storeid: firewall config restored");
    is_deeply(tree($rootdir), $want,
        "$storeid: files, modes, host owners (via the id map) restored; excludes left out");
}

{
    # The container step fails inside the namespace (its directory vanished): the
    # message of our provider reaches the parent, as PVE::Tools::run_fork passes it.
    my $provider = PVE::Storage::new_backup_provider($cfg, 'bdir', $log_function);
    $provider->job_init(time());
    $provider->backup_init($vmid, 'lxc', time());
    $provider->backup_get_mechanism($vmid, 'lxc');
    my $info = { directory => "$tmp/gone", sources => ['.'], 'backup-user-id' => 100000 };
    $provider->backup_container_prepare($vmid, $info);
    eval {
        PVE::LXC::Namespaces::run_in_userns(
            sub { $provider->backup_container($vmid, $guest_config, $findexcl, $info) },
            $id_map);
    };
    my $err = $@;
    like($err, qr/gone/, 'failure in the user namespace: die naming the directory');
    unlike($err, qr/Traceback/, 'our message, not a trace');
    eval { $provider->backup_cleanup($vmid, 'lxc', 0, { error => $err }) };
    is($@, '', 'backup_cleanup after it works');
    $provider->job_cleanup();
    is(scalar(@{ PVE::Storage::volume_list($cfg, 'bdir', $vmid, 'backup') }), 1,
        'no second container backup appeared');
}

done_testing();
