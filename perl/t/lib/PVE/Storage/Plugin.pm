package PVE::Storage::Plugin;

# Test stand-in for pve-storage's src/PVE/Storage/Plugin.pm: the registry the custom
# plugins join (register, lookup) and the schema methods they override. The property
# names upstream's plugins define are listed so that a test can check ours do not clash
# (PVE's storage schema is one namespace). Written for these tests; not upstream's code.

use strict;
use warnings;

our @UPSTREAM_PROPERTIES = qw(
    type storage nodes content disable prune-backups max-protected-backups shared subdir
    format preallocation content-dirs options port snapshot-as-volume-chain
    authsupported base blocksize bwlimit comstar_hg comstar_tg create-base-path
    create-subdirs data-pool datastore domain encryption-key export fingerprint fs-name
    fuse is_mountpoint iscsiprovider keyring krbd lio_tpg master-pubkey mkdir monhost
    mountpoint namespace nocow nowritecache password path pool portal saferemove
    saferemove-stepsize saferemove_throughput server share skip-cert-verification
    smbversion sparse tagged_only target thinpool username vgname zfs-base-path
);

my %registry;

sub api { die "implement me\n" }
sub type { die "implement me\n" }
sub plugindata { return {} }
sub properties { return {} }
sub options { return {} }

sub register {
    my ($class) = @_;
    my $type = $class->type();
    die "storage type '$type' registered twice\n" if $registry{$type};
    $registry{$type} = $class;
}

sub lookup {
    my ($class, $type) = @_;
    return $registry{$type} // die "unknown storage type '$type'\n";
}

sub new_backup_provider {
    die "implement me if enabling the feature 'backup-provider' in plugindata()->{features}\n";
}

1;
