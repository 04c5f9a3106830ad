package PVE::PveBackup::Bridge;

# The Perl end of the pvebackup bridge (docs/bridge-protocol.md): starts one Python
# helper per job or restore and talks JSON lines with it over its stdin/stdout, and runs
# the pvebackup command line for the storage methods (list, prune, remove).
#
# Nothing secret goes into argv or the environment: the helper gets the storage section
# and any secret in its first request, over the pipe.

use strict;
use warnings;

use IO::Handle;
use IPC::Open3 qw(open3);
use JSON::PP;
use POSIX ();
use Symbol qw(gensym);

# How to start the helper and the command line. Packagers keep the defaults (the .deb
# installs the Python package into the system Python); tests point them at a checkout.
our @HELPER = ('/usr/bin/python3', '-m', 'pvebackup.bridge');
our @CLI = ('/usr/bin/pvebackup');
# The node root the command line reads etc/pve/storage.cfg under.
our $ROOT = '/';
# Where the helper keeps host state (bitmap records); undef: the helper's default.
our $STATE_DIR;
# Where a running backup announces its volume id, so that notes and protection set
# before its backup_cleanup (vzdump's order) wait for it.
our $RUN_DIR = '/run/pvebackup/bridge';
# What backup_get_mechanism answers for VMs: undef (the helper's default, nbd) or
# 'file-handle' (qemu-server then reads the export through nbdfuse).
our $VM_MECHANISM;

# The helper refuses longer lines too (protocol: max line 16 MiB).
use constant MAX_LINE => 16 * 1024 * 1024;

my $json = JSON::PP->new->utf8->canonical->allow_nonref;

# Storage.cfg values as strings, our property names: PVE hands a parsed section
# (content as a hash, flags as 1), the helper reads the file's spelling.
sub scfg_to_strings {
    my ($scfg) = @_;
    my $res = {};
    for my $key (sort keys %$scfg) {
        my $value = $scfg->{$key};
        next if !defined($value) || $key eq 'digest';
        if (ref($value) eq 'HASH') {
            $value = join(',', sort grep { $value->{$_} } keys %$value);
        } elsif (ref($value)) {
            die "storage property '$key' has an unexpected value\n";
        }
        $res->{$key} = "$value";
    }
    return $res;
}

# Starts a helper and says hello. $hello holds the hello params beyond 'protocol'.
sub start {
    my ($class, $hello, $log_function) = @_;

    my ($in, $out) = (gensym, gensym);
    # stderr stays ours: the helper writes diagnostics there, the task log gets them.
    my $pid = eval { open3($in, $out, '>&STDERR', @HELPER) };
    die "unable to start pvebackup helper '$HELPER[0]' - $@\n" if !$pid;
    $in->autoflush(1);

    my $self = bless {
        pid => $pid,
        owner => $$,
        in => $in,
        out => $out,
        next_id => 1,
        log_function => $log_function,
    }, $class;
    my $res = $self->call('hello', {
        protocol => 1,
        (defined($STATE_DIR) ? ('state-dir' => $STATE_DIR) : ()),
        (defined($VM_MECHANISM) ? ('vm-mechanism' => $VM_MECHANISM) : ()),
        %$hello,
    });
    die "pvebackup helper speaks protocol '" . ($res->{protocol} // '?') . "', not 1\n"
        if ref($res) ne 'HASH' || ($res->{protocol} // 0) != 1;
    $self->{'helper-version'} = $res->{'helper-version'};
    return $self;
}

sub alive {
    my ($self) = @_;
    return defined($self->{pid}) && $self->{owner} == $$;
}

sub _log {
    my ($self, $level, $message) = @_;
    my $log = $self->{log_function};
    if ($log) {
        $log->($level, $message);
    } else {
        print STDERR "$level: $message\n";
    }
}

# One request, its log lines, its response. Dies with the helper's message on an error.
sub call {
    my ($self, $method, $params) = @_;

    die "pvebackup helper is not running (method '$method')\n" if !$self->alive();

    my $id = $self->{next_id}++;
    my $line = $json->encode({ id => $id, method => $method, params => $params // {} });
    {
        local $SIG{PIPE} = 'IGNORE';
        print { $self->{in} } "$line\n"
            or die $self->_lost("sending '$method'");
    }

    my $out = $self->{out};
    while (1) {
        my $reply = <$out>;
        die $self->_lost("waiting for the answer to '$method'") if !defined($reply);
        # The helper is ours but may be broken: a runaway line must not eat the memory
        # of the node's task worker.
        die "pvebackup helper sent an over-long line\n" if length($reply) > MAX_LINE;
        my $msg = eval { $json->decode($reply) };
        die "pvebackup helper sent something that is not JSON: $@" if !defined($msg) && $@;
        die "pvebackup helper sent a line that is not an object\n" if ref($msg) ne 'HASH';

        if (my $log = $msg->{log}) {
            my $level = $log->{level} // 'info';
            $level = 'info' if $level !~ m/^(?:info|warn|err)$/;
            $self->_log($level, $log->{message} // '');
            next;
        }
        my $got = $msg->{id} // '';
        die "pvebackup helper answered request '$got', expected '$id'\n" if $got ne $id;
        if (my $err = $msg->{error}) {
            my $text = ref($err) eq 'HASH' ? $err->{message} : "$err";
            $text = 'unknown error' if !defined($text) || $text eq '';
            chomp $text;
            die "$text\n";
        }
        return $msg->{result};
    }
}

sub _lost {
    my ($self, $doing) = @_;
    my $pid = delete $self->{pid};
    close($self->{in});
    close($self->{out});
    waitpid($pid, 0);
    my $status = $? >> 8;
    my $signal = $? & 127;
    my $how = $signal ? "killed by signal $signal" : "exit status $status";
    return "pvebackup helper ended while $doing ($how)\n";
}

# The last request: the helper exits 0 after it.
sub finish {
    my ($self) = @_;
    return if !$self->alive();
    my $err;
    eval { $self->call('bye', {}) };
    $err = $@;
    if (defined(my $pid = delete $self->{pid})) {
        close($self->{in});
        close($self->{out});
        waitpid($pid, 0);
        $err ||= "pvebackup helper exited with status " . ($? >> 8) . "\n" if $?;
    }
    die $err if $err;
}

# EOF on its stdin means "abort what is open" to the helper (protocol).
sub abort {
    my ($self) = @_;
    return if !$self->alive();
    my $pid = delete $self->{pid};
    close($self->{in});
    close($self->{out});
    waitpid($pid, 0);
}

sub DESTROY {
    my ($self) = @_;
    # A forked child (the container backup's user namespace step) holds a copy of the
    # job's pipes: it must neither say bye nor close the job's helper.
    local ($@, $?);
    $self->abort() if $self->alive();
}

# The in-flight record of a backup: $RUN_DIR/<volid, hex>.json holds the attributes
# set on it before it committed. Only the job that runs the backup makes one, so an
# attribute for any other volume id is not swallowed.
sub _spool_path {
    my ($volid) = @_;
    return "$RUN_DIR/" . unpack('H*', $volid) . '.json';
}

sub announce_volume {
    my ($volid) = @_;
    require File::Path;
    File::Path::make_path($RUN_DIR, { mode => 0700 });
    _write_spool($volid, { owner => $$, attributes => [] });
}

sub _write_spool {
    my ($volid, $doc) = @_;
    my $path = _spool_path($volid);
    open(my $fh, '>', "$path.tmp.$$") or die "unable to write '$path' - $!\n";
    print $fh $json->encode($doc);
    close($fh) or die "unable to write '$path' - $!\n";
    rename("$path.tmp.$$", $path) or die "unable to write '$path' - $!\n";
}

sub _read_spool {
    my ($volid) = @_;
    my $path = _spool_path($volid);
    open(my $fh, '<', $path) or return undef;
    local $/;
    my $doc = eval { $json->decode(<$fh> // '') };
    return ref($doc) eq 'HASH' ? $doc : undef;
}

# Records the attribute for an announced backup; false when none is running.
sub spool_attribute {
    my ($volid, $attribute, $value) = @_;
    my $doc = _read_spool($volid) // return 0;
    # A record left by a job that died: not ours to wait for.
    return 0 if !$doc->{owner} || !kill(0, $doc->{owner});
    push @{ $doc->{attributes} }, [$attribute, $value];
    _write_spool($volid, $doc);
    return 1;
}

# Ends the record; returns the attributes spooled meanwhile, in order.
sub finish_volume {
    my ($volid) = @_;
    my $doc = _read_spool($volid);
    unlink(_spool_path($volid));
    return @{ ($doc // {})->{attributes} // [] };
}

# Runs the command line with --output json; returns the decoded document.
sub run_cli {
    my ($class, @args) = @_;

    my @cmd = (@CLI, '--root', $ROOT, @args, '--output', 'json');
    my ($in, $out, $err) = (gensym, gensym, gensym);
    my $pid = eval { open3($in, $out, $err, @cmd) };
    die "unable to run pvebackup - $@\n" if !$pid;
    close($in);

    # Read stdout and stderr together: slurping one first would hang on a full pipe of
    # the other.
    my ($stdout, $stderr) = ('', '');
    my %open = (fileno($out) => [$out, \$stdout], fileno($err) => [$err, \$stderr]);
    while (%open) {
        my $rbits = '';
        vec($rbits, $_, 1) = 1 for keys %open;
        my $n = select(my $rout = $rbits, undef, undef, undef);
        next if $n < 0 && $!{EINTR};
        die "select failed - $!\n" if $n < 0;
        for my $fd (keys %open) {
            next if !vec($rout, $fd, 1);
            my ($fh, $buf) = $open{$fd}->@*;
            my $got = sysread($fh, $$buf, 65536, length($$buf));
            delete $open{$fd} if !$got;
        }
    }
    waitpid($pid, 0);
    my $status = $? >> 8;
    if ($?) {
        # The command line's own message: its last 'error: ...' line.
        my @lines = grep { m/\S/ } split(/\n/, $stderr);
        my ($msg) = reverse grep { m/^error: / } @lines;
        $msg //= $lines[-1] // "pvebackup @args failed with exit status $status";
        $msg =~ s/^error: //;
        die "$msg\n";
    }
    my $doc = eval { $json->decode($stdout) };
    die "pvebackup @args printed no JSON - $@" if $@;
    return wantarray ? ($doc, $stderr) : $doc;
}

1;
