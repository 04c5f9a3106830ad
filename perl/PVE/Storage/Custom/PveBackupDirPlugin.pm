package PVE::Storage::Custom::PveBackupDirPlugin;

# storage.cfg type 'backup-dir': pvebackup's plain directory provider (qcow2 images with
# incremental chains, containers as zstd tar or a directory tree).

use strict;
use warnings;

use base qw(PVE::PveBackup::StoragePlugin);

sub type { return 'backup-dir' }

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

sub properties {
    return {
        bitmap => {
            description => "Incremental VM backups with dirty bitmaps (default yes).",
            type => 'boolean',
        },
        'ct-format' => {
            description => "How containers are stored: tar (zstd tar, default) or directory.",
            type => 'string',
            enum => ['tar', 'directory'],
        },
        'max-chain-length' => {
            description => "Most incremental VM backups on top of a full one; the next is"
                . " full and starts a new chain (default 6; 0: no limit).",
            type => 'integer',
            minimum => 0,
            maximum => 1000,
        },
        # Shared by both types (defined once: PVE's storage schema is one namespace).
        'vm-mechanism' => {
            description => "How vzdump hands VM disks to the provider: nbd (default) or"
                . " file-handle (through nbdfuse).",
            type => 'string',
            enum => ['nbd', 'file-handle'],
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
        bitmap => { optional => 1 },
        'ct-format' => { optional => 1 },
        'max-chain-length' => { optional => 1 },
        'vm-mechanism' => { optional => 1 },
        is_mountpoint => { optional => 1 },
        'create-base-path' => { optional => 1 },
        mkdir => { optional => 1 },
        'create-subdirs' => { optional => 1 },
    };
}

1;
