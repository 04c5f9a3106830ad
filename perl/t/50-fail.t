#!/usr/bin/perl
# Failures as Proxmox VE meets them, with the REAL Python helper: a missing NBD export
# makes backup_vm die with our message and vzdump's backup_cleanup(0, {error}) leaves no
# backup behind; a provider error on restore; a helper that dies mid-job; a helper that
# cannot start; backup_container without its prepare step.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib", "$FindBin::Bin/..";
use Test::More;

use PVE::Storage;
use PveBackupTest qw(setup_node);

my $node = setup_node();
my ($cfg, $tmp) = @$node{qw(cfg tmp)};
my $vmid = 100;
my $config = "memory: 512\nscsi0: local:100/vm-100-disk-0.qcow2,size=8M\n";
my @log;
my $log_function = sub { push @log, [@_] };

for my $storeid (qw(bdir bstore)) {
    # pve-manager PVE/VZDump.pm exec_backup_task and qemu-server
    # src/PVE/VZDump/QemuServer.pm archive_external, the export gone (QEMU died).
    my $provider = PVE::Storage::new_backup_provider($cfg, $storeid, $log_function);
    $provider->job_init(time());
    my $init = $provider->backup_init($vmid, 'qemu', time());
    $provider->backup_get_mechanism($vmid, 'qemu');
    my $mode = $provider->backup_vm_query_incremental($vmid, { 'drive-scsi0' => { size => 1 << 20 } });
    eval {
        $provider->backup_vm($vmid, $config, { 'drive-scsi0' => {
            size => 1 << 20, 'bitmap-mode' => 'none', 'nbd-path' => "$tmp/no-such.sock",
        } }, {});
    };
    my $err = $@;
    like($err, qr/\S/, "$storeid: backup_vm dies when the export is missing");
    like($err, qr/\n\z/, "$storeid: as a message line (no Perl location appended)");
    unlike($err, qr/Traceback|at \S+\.pm line/, "$storeid: our message, not a trace");
    note("$storeid: $err");
    # PVE/VZDump.pm exec_backup_task error branch.
    eval { $provider->backup_cleanup($vmid, 'qemu', 0, { error => $err }) };
    is($@, '', "$storeid: backup_cleanup after the failure works");
    eval { $provider->job_cleanup() };
    is($@, '', "$storeid: job_cleanup works");
    is_deeply(PVE::Storage::volume_list($cfg, $storeid, $vmid, 'backup'), [],
        "$storeid: the failed backup left no volume");

    # A provider error on restore: the volume does not exist.
    my $restore = PVE::Storage::new_backup_provider($cfg, $storeid, $log_function);
    eval { $restore->restore_get_mechanism('backup/vm-100-2020-01-01T00:00:00Z') };
    like($@, qr/2020-01-01T00:00:00Z/, "$storeid: missing backup: die naming it");
    undef $restore;
}

{
    # The helper dies mid-job (OOM killer, a bug): the next call says so.
    my $provider = PVE::Storage::new_backup_provider($cfg, 'bdir', $log_function);
    $provider->job_init(time());
    kill('KILL', $provider->{helper}->{pid});
    eval { $provider->backup_init($vmid, 'qemu', time()) };
    like($@, qr/helper ended while .*killed by signal 9/, 'killed helper: die says so');
    eval { $provider->job_cleanup() };
    pass('job_cleanup after a lost helper returns or dies, no hang');
}

{
    # backup_container in the forked child needs the token of backup_container_prepare.
    my $provider = PVE::Storage::new_backup_provider($cfg, 'bdir', $log_function);
    eval { $provider->backup_container(200, "unprivileged: 1\n", [], { directory => $tmp }) };
    like($@, qr/without backup_container_prepare/, 'backup_container without prepare refused');
}

{
    local @PVE::PveBackup::Bridge::HELPER = ("$tmp/no-such-python", '-m', 'pvebackup.bridge');
    my $provider = PVE::Storage::new_backup_provider($cfg, 'bdir', $log_function);
    eval { $provider->job_init(time()) };
    like($@, qr/pvebackup helper/, 'helper that cannot start: die naming the helper');
}

done_testing();
