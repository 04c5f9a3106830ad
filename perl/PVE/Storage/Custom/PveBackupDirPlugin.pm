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
        is_mountpoint => { optional => 1 },
        'create-base-path' => { optional => 1 },
        mkdir => { optional => 1 },
        'create-subdirs' => { optional => 1 },
    };
}

1;
