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
        'cache-dir' => {
            description => "Host directory for the chunk index and snapshot metadata caches"
                . " (default: under the host state dir).",
            type => 'string',
            format => 'pve-storage-path',
        },
        'ct-restore' => {
            description => "Container restore mechanism offered to the host: tar (default)"
                . " or directory.",
            type => 'string',
            enum => ['tar', 'directory'],
        },
        's3-endpoint' => { description => "S3 endpoint URL.", type => 'string' },
        's3-bucket' => { description => "S3 bucket (instead of path).", type => 'string' },
        's3-prefix' => { description => "Key prefix in the bucket.", type => 'string' },
        's3-region' => { description => "S3 region.", type => 'string' },
        's3-path-style' => {
            description => "Path-style URLs (1) or virtual-host (0).",
            type => 'boolean',
        },
        's3-credentials' => {
            description => "File (mode 0600) with 'access-key = ...' and 'secret-key = ...'.",
            type => 'string',
            format => 'pve-storage-path',
        },
        's3-max-requests' => {
            description => "S3 requests in flight at once.",
            type => 'integer',
            minimum => 1,
            maximum => 256,
        },
    };
}

sub options {
    return {
        # Either path or s3-bucket (pvebackup checks that exactly one is set).
        path => { fixed => 1, optional => 1 },
        content => { optional => 1 },
        nodes => { optional => 1 },
        disable => { optional => 1 },
        shared => { optional => 1 },
        'prune-backups' => { optional => 1 },
        'encryption-key' => { optional => 1 },
        'encryption-passphrase-file' => { optional => 1 },
        'chunk-size' => { optional => 1 },
        'ct-restore' => { optional => 1 },
        'cache-dir' => { optional => 1 },
        'vm-mechanism' => { optional => 1 },
        's3-endpoint' => { optional => 1 },
        's3-bucket' => { fixed => 1, optional => 1 },
        's3-prefix' => { fixed => 1, optional => 1 },
        's3-region' => { optional => 1 },
        's3-path-style' => { optional => 1 },
        's3-credentials' => { optional => 1 },
        's3-max-requests' => { optional => 1 },
        is_mountpoint => { optional => 1 },
        'create-base-path' => { optional => 1 },
        mkdir => { optional => 1 },
    };
}

1;
