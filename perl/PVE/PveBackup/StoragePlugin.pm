package PVE::PveBackup::StoragePlugin;

# What the two pvebackup storage types share: the storage methods Proxmox VE calls on a
# backup storage (list, prune, remove, size, notes, protection) run the pvebackup command
# line with --output json, and new_backup_provider hands out the bridge provider.
# Not in PVE/Storage/Custom/: PVE registers every module found there as a storage type.

use strict;
use warnings;

use base qw(PVE::Storage::Plugin);

use PVE::BackupProvider::Plugin::PveBackup;
use PVE::PveBackup::Bridge;

# Storage API versions this was written against: the backup provider API came with 11
# (Proxmox VE 8.4); 15 is the newest checked (pve-storage 9.1).
use constant { MIN_APIVER => 11, MAX_APIVER => 15 };

sub api {
    my $have = eval { PVE::Storage::APIVER() } // MAX_APIVER;
    return $have < MIN_APIVER ? MIN_APIVER : $have > MAX_APIVER ? MAX_APIVER : $have;
}

# Our volume names (pvebackup.kit.volname): backup/vm-100-2026-12-01T20:52:27Z.
my $VOLNAME_RE = qr!^backup/((vm|ct)-([1-9][0-9]{0,8})-([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z))\z!;
my $KIND_TYPE = { vm => 'qemu', ct => 'lxc' };

sub parse_volname {
    my ($class, $volname) = @_;
    # Volume names come from users (API paths) and from storage: one strict spelling.
    if ($volname =~ $VOLNAME_RE) {
        return ('backup', $1, $3, undef, undef, undef, "pvebackup-$2");
    }
    die "unable to parse pvebackup volume name '$volname'\n";
}

sub path {
    my ($class, $scfg, $volname, $storeid, $snapname) = @_;
    die "volume snapshot is not possible on pvebackup volume\n" if $snapname;
    my ($vtype, undef, $vmid) = $class->parse_volname($volname);
    # Not a file: a backup is read through the provider (restore), never by path.
    return ("pvebackup://$storeid/$volname", $vmid, $vtype);
}

sub filesystem_path {
    my ($class, $scfg, $volname, $snapname) = @_;
    die "pvebackup volumes have no file system path, restore them through the provider\n";
}

sub new_backup_provider {
    my ($class, $scfg, $storeid, $log_function) = @_;
    return PVE::BackupProvider::Plugin::PveBackup->new($class, $scfg, $storeid, $log_function);
}

sub activate_storage {
    my ($class, $storeid, $scfg, $cache) = @_;
    # An S3 backup-store has no local directory; pvebackup reaches the bucket itself.
    return 1 if defined($scfg->{'s3-bucket'});
    my $path = $scfg->{path};
    die "storage '$storeid' has no path\n" if !defined($path);
    if (!-d $path) {
        # Like Proxmox VE's directory storages: create the path only when allowed.
        my $create = $scfg->{'create-base-path'} // $scfg->{mkdir} // 1;
        die "unable to activate storage '$storeid' - directory '$path' does not exist\n"
            if !$create || $scfg->{is_mountpoint};
        require File::Path;
        File::Path::make_path($path);
    }
    return 1;
}

sub deactivate_storage { return 1 }
sub activate_volume { return 1 }
sub deactivate_volume { return 1 }

sub check_connection {
    my ($class, $storeid, $scfg) = @_;
    return 1 if defined($scfg->{'s3-bucket'});
    return defined($scfg->{path}) && -d $scfg->{path} ? 1 : 0;
}

sub status {
    my ($class, $storeid, $scfg, $cache) = @_;
    # S3: no size to report, but active (PVE hides inactive storages from the GUI).
    return (0, 0, 0, 1) if defined($scfg->{'s3-bucket'});
    my $path = $scfg->{path};
    return undef if !defined($path) || !-d $path;
    # df of the directory; statvfs is not in core Perl, df is in coreutils.
    open(my $df, '-|', 'df', '-P', '-B1', '--', $path) or return undef;
    my @lines = <$df>;
    close($df);
    my (undef, $total, $used, $avail) = split(/\s+/, $lines[-1] // '');
    return undef if !defined($avail) || $avail !~ m/^\d+$/;
    return ($total, $avail, $used, 1);
}

sub _list {
    my ($class, $storeid) = @_;
    my $list = PVE::PveBackup::Bridge->run_cli('list', $storeid);
    die "pvebackup list printed no list\n" if ref($list) ne 'ARRAY';
    return $list;
}

sub _volname_of {
    my ($storeid, $volid) = @_;
    # The command line prints STOREID:VOLNAME; anything else is not ours to show.
    return undef if !defined($volid) || index($volid, "$storeid:") != 0;
    my $volname = substr($volid, length($storeid) + 1);
    return $volname =~ $VOLNAME_RE ? $volname : undef;
}

sub list_volumes {
    my ($class, $storeid, $scfg, $vmid, $content_types) = @_;

    return [] if !grep { $_ eq 'backup' } @{ $content_types // [] };
    my $res = [];
    for my $vol (@{ $class->_list($storeid) }) {
        my $volname = _volname_of($storeid, $vol->{volid}) // next;
        next if defined($vmid) && $vol->{vmid} ne $vmid;
        my ($kind) = $volname =~ m!^backup/(vm|ct)-!;
        push @$res, {
            volid => $vol->{volid},
            content => 'backup',
            format => "pvebackup-$kind",
            subtype => $vol->{vmtype},
            vmid => $vol->{vmid},
            ctime => $vol->{ctime},
            size => $vol->{size} // 0,
            (length($vol->{notes} // '') ? (notes => $vol->{notes}) : ()),
            protected => $vol->{protected} ? 1 : 0,
        };
    }
    return $res;
}

sub volume_size_info {
    my ($class, $scfg, $storeid, $volname, $timeout) = @_;
    $class->parse_volname($volname);
    for my $vol (@{ $class->_list($storeid) }) {
        next if ($vol->{volid} // '') ne "$storeid:$volname";
        my $size = $vol->{size} // 0;
        return wantarray ? ($size, "pvebackup", $size, undef) : $size;
    }
    die "volume '$storeid:$volname' does not exist\n";
}

sub free_image {
    my ($class, $storeid, $scfg, $volname, $isBase, $format) = @_;
    $class->parse_volname($volname);
    PVE::PveBackup::Bridge->run_cli('remove', "$storeid:$volname");
    return undef;
}

sub get_volume_attribute {
    my ($class, $scfg, $storeid, $volname, $attribute) = @_;
    $class->parse_volname($volname);
    if ($attribute eq 'notes') {
        my $doc = PVE::PveBackup::Bridge->run_cli('notes', "$storeid:$volname");
        return $doc->{notes} // '';
    }
    if ($attribute eq 'protected') {
        for my $vol (@{ $class->_list($storeid) }) {
            return $vol->{protected} ? 1 : 0 if ($vol->{volid} // '') eq "$storeid:$volname";
        }
        die "volume '$storeid:$volname' does not exist\n";
    }
    return undef;
}

# Sets one attribute through the command line.
sub set_attribute {
    my ($class, $volid, $attribute, $value) = @_;
    if ($attribute eq 'notes') {
        # argv carries bytes: UTF-8, whatever Perl's internal form of the string is.
        my $text = $value // '';
        utf8::encode($text) if utf8::is_utf8($text);
        # --set=TEXT: notes starting with '-' must not read as an option.
        PVE::PveBackup::Bridge->run_cli('notes', $volid, "--set=$text");
    } elsif ($attribute eq 'protected') {
        PVE::PveBackup::Bridge->run_cli($value ? 'protect' : 'unprotect', $volid);
    } else {
        die "attribute '$attribute' is not supported by pvebackup\n";
    }
    return;
}

sub update_volume_attribute {
    my ($class, $scfg, $storeid, $volname, $attribute, $value) = @_;
    $class->parse_volname($volname);
    die "attribute '$attribute' is not supported by pvebackup\n"
        if $attribute ne 'notes' && $attribute ne 'protected';
    # vzdump sets notes and protection before backup_cleanup (PVE/VZDump.pm
    # exec_backup_task), when our backup is not committed yet: the provider of that
    # running backup applies them after it committed (PveBackup::backup_cleanup).
    if ($attribute eq 'notes' && defined($value) && !utf8::is_utf8($value)) {
        # PVE's notes are UTF-8 bytes; the spool is JSON, which holds characters.
        $value = "$value";
        utf8::decode($value);
    }
    return if PVE::PveBackup::Bridge::spool_attribute("$storeid:$volname", $attribute, $value);
    $class->set_attribute("$storeid:$volname", $attribute, $value);
    return;
}

my @KEEP_OPTIONS = qw(keep-last keep-hourly keep-daily keep-weekly keep-monthly keep-yearly);

sub prune_backups {
    my ($class, $scfg, $storeid, $keep, $vmid, $type, $dryrun, $logfunc) = @_;

    $logfunc //= sub { print "$_[1]\n" };
    $keep //= {};
    my $keep_all = $keep->{'keep-all'} || !grep { $keep->{$_} } @KEEP_OPTIONS;
    my @keep_args = map { ("--$_", $keep->{$_}) } grep { $keep->{$_} } @KEEP_OPTIONS;

    # keep-all (or no option) keeps everything; our command line would apply the storage's
    # prune-backups instead, so it only lists here.
    my @vmids = defined($vmid) ? ($vmid) : (undef);
    if (!defined($vmid) && defined($type)) {
        # The command line prunes per guest: prune the guests of that type one by one.
        my %seen;
        @vmids = grep { !$seen{$_}++ }
            map { $_->{vmid} } grep { $_->{vmtype} eq $type } @{ $class->_list($storeid) };
        return [] if !@vmids;
    }

    my $res = [];
    my $failed;
    for my $id (@vmids) {
        my @args = ('prune', $storeid, (defined($id) ? ('--vmid', $id) : ()));
        my $doc;
        if ($keep_all || $dryrun) {
            $doc = PVE::PveBackup::Bridge->run_cli(@args, '--dry-run', @keep_args)
                if !$keep_all;
            $doc //= { volumes => [map { { %$_, mark => 'keep' } }
                grep { !defined($id) || $_->{vmid} eq $id } @{ $class->_list($storeid) }] };
        } else {
            $doc = eval { PVE::PveBackup::Bridge->run_cli(@args, @keep_args) };
            if (my $err = $@) {
                $logfunc->('err', "error when pruning backups on '$storeid' - $err");
                $failed = 1;
                next;
            }
        }
        for my $vol (@{ $doc->{volumes} // [] }) {
            next if defined($type) && $vol->{vmtype} ne $type;
            next if !defined(_volname_of($storeid, $vol->{volid}));
            if ($vol->{removed}) {
                $logfunc->('info', "removing backup '$vol->{volid}'");
            } elsif (($vol->{mark} // '') eq 'remove' && !$dryrun) {
                my $why = $vol->{reason} || 'not removed';
                $logfunc->('warn', "backup '$vol->{volid}' kept - $why");
            }
            push @$res, {
                volid => $vol->{volid},
                type => $vol->{vmtype},
                vmid => $vol->{vmid},
                ctime => $vol->{ctime},
                mark => $vol->{mark},
            };
        }
    }
    die "error pruning backups - check log\n" if $failed;
    return $res;
}

1;
