package PVE::Storage;

# Test stand-in for pve-storage's src/PVE/Storage.pm: loads PVE/Storage/Custom/*.pm the
# way upstream does (api() range check, then register), and the wrappers vzdump,
# qemu-server and pve-container call, reduced to the dispatch to the plugin. Written for
# these tests; not upstream's code.

use strict;
use warnings;

use PVE::Storage::Plugin;

use constant APIVER => 15;
use constant APIAGE => 6;

our $SAFE_CHAR_CLASS_RE = qr/[a-zA-Z0-9\-\.\+\=\_]/;

sub load_custom_plugins {
    my ($dir) = @_;
    my @loaded;
    opendir(my $dh, "$dir/PVE/Storage/Custom") or die "no custom plugin dir under $dir\n";
    for my $file (sort grep { m/\.pm$/ } readdir($dh)) {
        my $modname = "PVE::Storage::Custom::$file";
        $modname =~ s/\.pm$//;
        require "PVE/Storage/Custom/$file";
        die "$modname: not derived from PVE::Storage::Plugin\n"
            if !$modname->isa('PVE::Storage::Plugin');
        my $version = $modname->api();
        die "$modname: API version $version out of range\n"
            if $version > APIVER || $version < APIVER - APIAGE;
        $modname->register();
        push @loaded, $modname;
    }
    return @loaded;
}

sub parse_volume_id {
    my ($volid, $noerr) = @_;
    return ($1, $2) if $volid =~ m/^([a-z][a-z0-9\-\_\.]*[a-z0-9]):(.+)$/i;
    return if $noerr;
    die "unable to parse volume ID '$volid'\n";
}

sub storage_config {
    my ($cfg, $storeid) = @_;
    return $cfg->{ids}->{$storeid} // die "storage '$storeid' does not exist\n";
}

sub _plugin {
    my ($cfg, $storeid) = @_;
    my $scfg = storage_config($cfg, $storeid);
    return ($scfg, PVE::Storage::Plugin->lookup($scfg->{type}));
}

sub storage_has_feature {
    my ($cfg, $storeid, $feature) = @_;
    my ($scfg, $plugin) = _plugin($cfg, $storeid);
    return $plugin->plugindata()->{features}->{$feature} ? 1 : 0;
}

sub new_backup_provider {
    my ($cfg, $storeid, $log_function) = @_;
    my ($scfg, $plugin) = _plugin($cfg, $storeid);
    return $plugin->new_backup_provider($scfg, $storeid, $log_function);
}

sub activate_storage {
    my ($cfg, $storeid) = @_;
    my ($scfg, $plugin) = _plugin($cfg, $storeid);
    $plugin->activate_storage($storeid, $scfg, {});
}

sub volume_list {
    my ($cfg, $storeid, $vmid, $content) = @_;
    my ($scfg, $plugin) = _plugin($cfg, $storeid);
    activate_storage($cfg, $storeid);
    my $res = $plugin->list_volumes($storeid, $scfg, $vmid, [$content // 'backup']);
    return [sort { $a->{volid} cmp $b->{volid} } @$res];
}

sub prune_backups {
    my ($cfg, $storeid, $keep, $vmid, $type, $dryrun, $logfunc) = @_;
    my ($scfg, $plugin) = _plugin($cfg, $storeid);
    activate_storage($cfg, $storeid);
    return $plugin->prune_backups($scfg, $storeid, $keep, $vmid, $type, $dryrun, $logfunc);
}

sub get_volume_attribute {
    my ($cfg, $volid, $attribute) = @_;
    my ($storeid, $volname) = parse_volume_id($volid);
    my ($scfg, $plugin) = _plugin($cfg, $storeid);
    return $plugin->get_volume_attribute($scfg, $storeid, $volname, $attribute);
}

sub update_volume_attribute {
    my ($cfg, $volid, $attribute, $value) = @_;
    my ($storeid, $volname) = parse_volume_id($volid);
    my ($scfg, $plugin) = _plugin($cfg, $storeid);
    return $plugin->update_volume_attribute($scfg, $storeid, $volname, $attribute, $value);
}

sub volume_size_info {
    my ($cfg, $volid) = @_;
    my ($storeid, $volname) = parse_volume_id($volid);
    my ($scfg, $plugin) = _plugin($cfg, $storeid);
    return $plugin->volume_size_info($scfg, $storeid, $volname, 5);
}

sub vdisk_free {
    my ($cfg, $volid) = @_;
    my ($storeid, $volname) = parse_volume_id($volid);
    my ($scfg, $plugin) = _plugin($cfg, $storeid);
    return $plugin->free_image($storeid, $scfg, $volname, 0, undef);
}

sub path {
    my ($cfg, $volid) = @_;
    my ($storeid, $volname) = parse_volume_id($volid);
    my ($scfg, $plugin) = _plugin($cfg, $storeid);
    return $plugin->path($scfg, $volname, $storeid);
}

1;
