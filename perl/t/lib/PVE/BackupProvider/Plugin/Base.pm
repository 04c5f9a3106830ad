package PVE::BackupProvider::Plugin::Base;

# Test stand-in for pve-storage's src/PVE/BackupProvider/Plugin/Base.pm: the method
# names and signatures of the merged backup provider API, every one "implement me".
# Written for these tests; not upstream's code.

use strict;
use warnings;

for my $method (qw(
    new provider_name job_init job_cleanup backup_init backup_cleanup backup_get_mechanism
    backup_handle_log_file backup_vm_query_incremental backup_vm backup_container_prepare
    backup_container restore_get_mechanism archive_get_guest_config
    archive_get_firewall_config restore_vm_init restore_vm_cleanup restore_vm_volume_init
    restore_vm_volume_cleanup restore_container_init restore_container_cleanup
)) {
    no strict 'refs';
    *{$method} = sub { die "implement me in subclass\n" };
}

1;
