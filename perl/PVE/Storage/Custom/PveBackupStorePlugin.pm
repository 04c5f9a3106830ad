package PVE::Storage::Custom::PveBackupStorePlugin;

# storage.cfg type 'backup-store': pvebackup's deduplicating, optionally encrypted chunk
# store. Same type and property names as pvebackup's own storage.cfg, so one section
# serves the node and the pvebackup command line.

use strict;
use warnings;

use base qw(PVE::PveBackup::StoragePlugin);

sub type { return 'backup-store' }

sub plugindata {
    return {
        content => [{ backup => 1 }, { backup => 1 }],
        features => { 'backup-provider' => 1 },
        # Declared (empty): without it PVE's storage API treats encryption-key (a key
        # file path here, not a secret) as PBS's sensitive key and keeps it out of
        # storage.cfg (PVE::Storage::Plugin::sensitive_properties' fallback list).
        'sensitive-properties' => {},
    };
}

# Only properties no Proxmox VE plugin defines: PVE's storage schema is one namespace.
sub properties {
    return {
        'encryption-passphrase-file' => {
            description => "File holding the passphrase of a protected encryption key file.",
            type => 'string',
            format => 'pve-storage-path',
        },
        'chunk-size' => {
            description => "Chunk size of new disk indexes: a power of two, 64K..16M.",
            type => 'string',
        },
    };
}

sub options {
    return {
        path => { fixed => 1 },
        content => { optional => 1 },
        nodes => { optional => 1 },
        disable => { optional => 1 },
        shared => { optional => 1 },
        'prune-backups' => { optional => 1 },
        'encryption-key' => { optional => 1 },
        'encryption-passphrase-file' => { optional => 1 },
        'chunk-size' => { optional => 1 },
        is_mountpoint => { optional => 1 },
        'create-base-path' => { optional => 1 },
        mkdir => { optional => 1 },
    };
}

1;
