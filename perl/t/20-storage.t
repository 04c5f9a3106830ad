#!/usr/bin/perl
# The storage plugins as Proxmox VE loads and calls them: loaded from
# PVE/Storage/Custom/ with the api() check, the backup-provider feature, a schema that
# does not clash with upstream's property names and says what pvebackup's storage.cfg
# parser accepts, strict volume names, the command line's errors as die.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib", "$FindBin::Bin/..";
use Test::More;
use JSON::PP;

use PVE::Storage;
use PveBackupTest qw(setup_node);

my $node = setup_node();
my $cfg = $node->{cfg};

my %plugin = map { ($_ => PVE::Storage::Plugin->lookup($_)) } qw(backup-dir backup-store);
is($plugin{'backup-dir'}, 'PVE::Storage::Custom::PveBackupDirPlugin', 'backup-dir registered');
is($plugin{'backup-store'}, 'PVE::Storage::Custom::PveBackupStorePlugin', 'backup-store registered');
ok(PVE::Storage::storage_has_feature($cfg, $_, 'backup-provider'), "$_: backup-provider feature")
    for qw(bdir bstore);
for my $class (values %plugin) {
    is_deeply($class->plugindata()->{'sensitive-properties'}, {},
        "$class: no sensitive properties (encryption-key is a path and must reach storage.cfg)");
}
isa_ok(PVE::Storage::new_backup_provider($cfg, 'bdir', sub {}), 'PVE::BackupProvider::Plugin::Base');

# PVE's storage schema is one namespace: a property two plugins define kills the load.
my %upstream = map { ($_ => 1) } @PVE::Storage::Plugin::UPSTREAM_PROPERTIES;
my %ours;
for my $class (values %plugin) {
    for my $prop (keys %{ $class->properties() }) {
        ok(!$upstream{$prop}, "$class: property '$prop' not defined upstream already");
        ok(!$ours{$prop}++, "property '$prop' defined once");
    }
}

# Every option must be a property pvebackup's own parser accepts for that type, or the
# helper and the command line refuse the section PVE wrote.
my $python = $PVE::PveBackup::Bridge::HELPER[0];
my $accepted = decode_json(qx{$python -c 'import json
from pvebackup.providers.directory.settings import PROPERTIES as D
from pvebackup.providers.store.settings import PROPERTIES as S
print(json.dumps({"backup-dir": sorted(D), "backup-store": sorted(S)}))'});
for my $type (sort keys %plugin) {
    my %py = map { ($_ => 1) } @{ $accepted->{$type} };
    my @unknown = grep { !$py{$_} } sort keys %{ $plugin{$type}->options() };
    is_deeply(\@unknown, [], "$type: every option is a pvebackup property");
    my @missing = grep { !exists $plugin{$type}->options()->{$_} } sort keys %py;
    is_deeply(\@missing, [], "$type: every pvebackup property is an option");
}

# Volume names come from API paths and from storage: hostile input, one spelling only.
my $good = 'backup/vm-100-2026-12-01T20:52:27Z';
is_deeply([($plugin{'backup-dir'}->parse_volname($good))[0, 1, 2, 6]],
    ['backup', 'vm-100-2026-12-01T20:52:27Z', 100, 'pvebackup-vm'], 'parse_volname');
for my $bad ('backup/../../etc/passwd', 'backup/vm-0100-2026-12-01T20:52:27Z',
    "backup/vm-100-2026-12-01T20:52:27Z\n", 'backup/vm-100-2026-12-01T20:52:27Z/../x',
    'images/vm-100-2026-12-01T20:52:27Z', 'backup/xx-100-2026-12-01T20:52:27Z') {
    eval { $plugin{'backup-dir'}->parse_volname($bad) };
    like($@, qr/unable to parse/, "parse_volname refuses " . ($bad =~ s/\n/\\n/r));
}
like((PVE::Storage::path($cfg, "bdir:$good"))[0], qr!^pvebackup://bdir/!,
    'path is no file a caller could open');
eval { $plugin{'backup-dir'}->filesystem_path($cfg->{ids}->{bdir}, $good) };
like($@, qr/no file system path/, 'filesystem_path refused');

is_deeply(PVE::Storage::volume_list($cfg, 'bstore', undef, 'backup'), [], 'empty store lists nothing');
is_deeply(PVE::Storage::volume_list($cfg, 'bstore', undef, 'images'), [], 'no images content');

# The command line's own message comes back as the die message.
$cfg->{ids}->{ghost} = { type => 'backup-dir', path => "$node->{tmp}/bdir", content => { backup => 1 } };
eval { PVE::Storage::volume_list($cfg, 'ghost', undef, 'backup') };
like($@, qr/ghost/, 'unknown storage: the command line error names it');
unlike($@, qr/Traceback/, 'no Python traceback');

# No job runs this backup: nothing is spooled, the command line says it is missing.
eval { PVE::Storage::update_volume_attribute($cfg, "bdir:$good", 'protected', 1) };
like($@, qr/2026-12-01T20:52:27Z/, 'protecting a missing backup dies naming it');
eval { PVE::Storage::update_volume_attribute($cfg, "bdir:$good", 'notes', 'x') };
like($@, qr/2026-12-01T20:52:27Z/, 'notes on a missing backup die naming it');
# A record left by a job that died (its pid gone) does not swallow attributes either.
{
    local $PVE::PveBackup::Bridge::RUN_DIR = "$node->{tmp}/run";
    PVE::PveBackup::Bridge::announce_volume("bdir:$good");
    my $pid = fork() // die;
    if (!$pid) { POSIX::_exit(0) }
    waitpid($pid, 0);
    my $path = PVE::PveBackup::Bridge::_spool_path("bdir:$good");
    PVE::PveBackup::Bridge::_write_spool("bdir:$good", { owner => $pid, attributes => [] });
    eval { PVE::Storage::update_volume_attribute($cfg, "bdir:$good", 'protected', 1) };
    like($@, qr/2026-12-01T20:52:27Z/, 'stale in-flight record: not swallowed');
}
eval { PVE::Storage::update_volume_attribute($cfg, "bdir:$good", 'owner', 1) };
like($@, qr/not supported/, 'unknown attribute refused');

done_testing();
