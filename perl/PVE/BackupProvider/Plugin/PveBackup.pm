package PVE::BackupProvider::Plugin::PveBackup;

# The backup provider of pvebackup's storages for Proxmox VE's backup provider API
# (PVE::BackupProvider::Plugin::Base). Every method forwards to the Python helper over
# the bridge protocol (docs/bridge-protocol.md); the helper runs our providers. One
# helper per job or restore, started on the first call; errors come back as die with
# our message, log lines go to the log function PVE gave us.

use strict;
use warnings;

use base qw(PVE::BackupProvider::Plugin::Base);

use PVE::PveBackup::Bridge;

sub new {
    my ($class, $storage_plugin, $scfg, $storeid, $log_function) = @_;

    die "no storage id\n" if !defined($storeid);
    my $self = bless {
        storage_plugin => $storage_plugin,
        scfg => $scfg,
        storeid => $storeid,
        log_function => $log_function // sub { print STDERR "$_[0]: $_[1]\n" },
    }, $class;
    return $self;
}

sub _hello {
    my ($self, %extra) = @_;
    return {
        storeid => $self->{storeid},
        scfg => PVE::PveBackup::Bridge::scfg_to_strings($self->{scfg}),
        'plugin-type' => $self->{scfg}->{type},
        %extra,
    };
}

# The job's (or restore's) helper; in a forked child this is never the parent's.
sub _helper {
    my ($self) = @_;
    my $helper = $self->{helper};
    return $helper if $helper && $helper->alive();
    $self->{helper} = PVE::PveBackup::Bridge->start($self->_hello(), $self->{log_function});
    return $self->{helper};
}

sub _call {
    my ($self, $method, $params) = @_;
    return $self->_helper()->call($method, $params);
}

# Raw data (guest and firewall configs) is bytes in PVE; JSON carries characters.
sub _text_in {
    my ($bytes) = @_;
    return undef if !defined($bytes);
    my $copy = "$bytes";
    utf8::decode($copy);
    return $copy;
}

sub _bytes_out {
    my ($text) = @_;
    return undef if !defined($text);
    utf8::encode($text) if utf8::is_utf8($text);
    return $text;
}

# pve-container passes the storage id as an extra argument to several restore methods
# (src/PVE/LXC/Create.pm: restore_get_mechanism($volname, $storeid), ...); qemu-server
# does not. Both shapes are accepted.
sub _restore_args {
    my (@args) = @_;
    my $storeid;
    $storeid = shift @args if @args && defined($args[0]) && !ref($args[0]);
    return ($storeid, $args[0] // {});
}

# The request params of a restore method: volname, and the storage id when the caller
# passed one (the helper checks that it is its own).
sub _restore_params {
    my ($volname, @rest) = @_;
    my ($storeid, $info) = _restore_args(@rest);
    return {
        volname => $volname,
        (defined($storeid) ? (storeid => $storeid) : ()),
        (@rest && ref($rest[-1]) eq 'HASH' ? (info => $info) : ()),
    };
}

sub provider_name {
    my ($self) = @_;
    return $self->{provider_name} //= $self->_call('provider_name', {}) // 'pvebackup';
}

sub job_init {
    my ($self, $start_time) = @_;
    $self->_call('job_init', { start_time => $start_time + 0 });
    return;
}

sub job_cleanup {
    my ($self) = @_;
    my $helper = $self->{helper};
    return if !$helper || !$helper->alive();
    eval { $helper->call('job_cleanup', {}) };
    my $err = $@;
    delete $self->{helper};
    eval { $helper->finish() };
    $err ||= $@;
    die $err if $err;
    return;
}

sub backup_init {
    my ($self, $vmid, $vmtype, $start_time) = @_;
    my $res = $self->_call(
        'backup_init', { vmid => $vmid + 0, vmtype => $vmtype, start_time => $start_time + 0 },
    );
    # vzdump makes the volume id "$storeid:backup/$archive_name" (PVE/VZDump.pm
    # exec_backup_task): our providers' targets are volume names, backup/ included.
    $res->{'archive-name'} =~ s!^backup/!! if ref($res) eq 'HASH' && defined($res->{'archive-name'});
    if (ref($res) eq 'HASH' && defined(my $archive = $res->{'archive-name'})) {
        my $volid = "$self->{storeid}:backup/$archive";
        PVE::PveBackup::Bridge::announce_volume($volid);
        $self->{running}->{$vmid} = $volid;
    }
    return $res;
}

sub backup_cleanup {
    my ($self, $vmid, $vmtype, $success, $info) = @_;
    my $params = {
        vmid => defined($vmid) ? $vmid + 0 : undef,
        vmtype => $vmtype,
        success => $success ? JSON::PP::true : JSON::PP::false,
        info => { defined($info->{error}) ? (error => "$info->{error}") : () },
    };
    my $res = eval { $self->_call('backup_cleanup', $params) // {} };
    my $err = $@;
    my $volid = defined($vmid) ? delete $self->{running}->{$vmid} : undef;
    my @attributes = defined($volid) ? PVE::PveBackup::Bridge::finish_volume($volid) : ();
    die $err if $err;
    # Notes and protection vzdump set before this call, now that the backup exists,
    # with vzdump's consequences: notes that fail are a warning, protection that fails
    # fails the guest's backup.
    for my $attr ($success ? @attributes : ()) {
        my ($name, $value) = @$attr;
        eval { $self->{storage_plugin}->set_attribute($volid, $name, $value) };
        next if !$@;
        die "unable to set protected flag - $@" if $name eq 'protected';
        $self->{log_function}->('warn', "unable to add notes - $@");
    }
    return $res;
}

sub backup_get_mechanism {
    my ($self, $vmid, $vmtype) = @_;
    return $self->_call('backup_get_mechanism', { vmid => $vmid + 0, vmtype => $vmtype });
}

sub backup_handle_log_file {
    my ($self, $vmid, $filename) = @_;
    # The helper runs as the same user and opens the task log itself.
    $self->_call('backup_handle_log_file', { vmid => $vmid + 0, filename => "$filename" });
    return;
}

sub backup_vm_query_incremental {
    my ($self, $vmid, $volumes) = @_;
    my $vols = {};
    for my $dev (keys %$volumes) {
        $vols->{$dev} = { size => $volumes->{$dev}->{size} + 0 };
    }
    return $self->_call('backup_vm_query_incremental', { vmid => $vmid + 0, volumes => $vols });
}

sub backup_vm {
    my ($self, $vmid, $guest_config, $volumes, $info) = @_;

    my $vols = {};
    for my $dev (sort keys %$volumes) {
        my $v = $volumes->{$dev};
        my $out = { size => $v->{size} + 0, 'bitmap-mode' => $v->{'bitmap-mode'} // 'none' };
        if (defined(my $fh = $v->{'file-handle'})) {
            # The helper runs as our user and opens our descriptor through /proc: no
            # descriptor passing needed (protocol: file-handle mechanism).
            my $fd = fileno($fh);
            die "file handle of '$dev' is not open\n" if !defined($fd);
            $out->{'file-handle-path'} = "/proc/$$/fd/$fd";
            # next-dirty-region is a closure: its regions travel as a list.
            if (my $next = $v->{'next-dirty-region'}) {
                my $regions = [];
                while (my ($offset, $length) = $next->()) {
                    last if !defined($offset);
                    push @$regions, [$offset + 0, $length + 0];
                }
                $out->{'dirty-regions'} = $regions;
            }
        } else {
            $out->{'nbd-path'} = $v->{'nbd-path'} if defined($v->{'nbd-path'});
            $out->{'bitmap-name'} = $v->{'bitmap-name'} if defined($v->{'bitmap-name'});
        }
        $vols->{$dev} = $out;
    }
    my $params = {
        vmid => $vmid + 0,
        guest_config => _text_in($guest_config),
        volumes => $vols,
        info => _info_in($info),
    };
    $self->_call('backup_vm', $params);
    return;
}

sub _info_in {
    my ($info) = @_;
    my $res = {};
    for my $key (keys %{ $info // {} }) {
        my $value = $info->{$key};
        next if !defined($value);
        if ($key eq 'firewall-config') {
            $value = _text_in($value);
        } elsif ($key eq 'bandwidth-limit' || $key eq 'backup-user-id') {
            $value += 0;
        }
        $res->{$key} = $value;
    }
    return $res;
}

sub backup_container_prepare {
    my ($self, $vmid, $info) = @_;
    my $res = $self->_call('backup_container_prepare', { vmid => $vmid + 0, info => _info_in($info) });
    # Kept in $self before vzdump forks: the child in the user namespace needs it.
    $self->{attach} = ref($res) eq 'HASH' ? $res->{attach} : undef;
    return;
}

# Called in a forked child that entered the container's user namespace (or, for a
# privileged container, in the job's process). Either way it starts its own helper,
# attached to the job's by the token backup_container_prepare returned, so that the
# container's files are read inside the namespace.
sub backup_container {
    my ($self, $vmid, $guest_config, $exclude_patterns, $info) = @_;

    die "backup_container called without backup_container_prepare\n"
        if !defined($self->{attach});
    my $helper = PVE::PveBackup::Bridge->start(
        $self->_hello(attach => $self->{attach}), $self->{log_function},
    );
    eval {
        $helper->call('backup_container', {
            vmid => $vmid + 0,
            guest_config => _text_in($guest_config),
            exclude_patterns => [map { "$_" } @{ $exclude_patterns // [] }],
            info => _info_in($info),
        });
    };
    my $err = $@;
    if ($err) {
        $helper->abort();
        die $err;
    }
    $helper->finish();
    return;
}

sub restore_get_mechanism {
    my ($self, $volname, @rest) = @_;
    my $res = $self->_call('restore_get_mechanism', _restore_params($volname, @rest));
    return ($res->{mechanism}, $res->{vmtype}) if ref($res) eq 'HASH';
    return @$res if ref($res) eq 'ARRAY';
    die "pvebackup helper returned no restore mechanism\n";
}

sub archive_get_guest_config {
    my ($self, $volname, @rest) = @_;
    my $params = _restore_params($volname, @rest);
    return _bytes_out($self->_call('archive_get_guest_config', $params));
}

sub archive_get_firewall_config {
    my ($self, $volname, @rest) = @_;
    my $params = _restore_params($volname, @rest);
    return _bytes_out($self->_call('archive_get_firewall_config', $params));
}

sub restore_vm_init {
    my ($self, $volname) = @_;
    return $self->_call('restore_vm_init', { volname => $volname });
}

sub restore_vm_cleanup {
    my ($self, $volname) = @_;
    $self->_call('restore_vm_cleanup', { volname => $volname });
    return;
}

sub restore_vm_volume_init {
    my ($self, $volname, $device_name, $info) = @_;
    return $self->_call(
        'restore_vm_volume_init',
        { volname => $volname, device_name => $device_name, info => $info // {} },
    );
}

sub restore_vm_volume_cleanup {
    my ($self, $volname, $device_name, $info) = @_;
    $self->_call(
        'restore_vm_volume_cleanup',
        { volname => $volname, device_name => $device_name, info => $info // {} },
    );
    return;
}

sub restore_container_init {
    my ($self, $volname, @rest) = @_;
    return $self->_call('restore_container_init', _restore_params($volname, @rest));
}

sub restore_container_cleanup {
    my ($self, $volname, @rest) = @_;
    $self->_call('restore_container_cleanup', _restore_params($volname, @rest));
    return;
}

# A restore has no job_cleanup: the helper ends with the provider object.
sub DESTROY {
    my ($self) = @_;
    local ($@, $?);
    my $helper = delete $self->{helper};
    eval { $helper->finish() } if $helper && $helper->alive();
}

1;
