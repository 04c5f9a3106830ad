package PveBackupTest;

# Test machinery (not a PVE stand-in): a node root with a storage.cfg holding one
# backup-dir and one backup-store storage, the real Python helper and command line from
# this checkout, and real exports: qemu-storage-daemon NBD exports of qcow2 images with
# dirty bitmaps, started and stopped by PID.

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use File::Path qw(make_path);
use File::Temp qw(tempdir);
use Exporter qw(import);
use POSIX ();

use PVE::Storage;
use PVE::PveBackup::Bridge;

our @EXPORT_OK = qw(setup_node run_ok qsd_export qsd_stop slurp spew);

my $PERL_DIR = abs_path(dirname(__FILE__) . '/../..');
my $REPO = abs_path("$PERL_DIR/..");
my $PYTHON = $ENV{PVEBACKUP_TEST_PYTHON}
    // (-x '/work/main/.venv/bin/python' ? '/work/main/.venv/bin/python' : "$REPO/.venv/bin/python");

sub slurp {
    my ($path) = @_;
    open(my $fh, '<', $path) or die "open $path: $!\n";
    local $/;
    return scalar(<$fh>);
}

sub spew {
    my ($path, $data) = @_;
    open(my $fh, '>', $path) or die "open $path: $!\n";
    print $fh $data;
    close($fh) or die "write $path: $!\n";
}

# Runs a command, its stdout discarded (qemu-io's progress lines are not TAP).
sub run_ok {
    my (@cmd) = @_;
    my $pid = fork() // die "fork: $!\n";
    if (!$pid) {
        open(STDOUT, '>', '/dev/null');
        exec(@cmd) or POSIX::_exit(127);
    }
    waitpid($pid, 0);
    die "command failed (" . ($? >> 8) . "): @cmd\n" if $?;
}

my $loaded;

# Returns { root, tmp, cfg } with $cfg as PVE::Storage would parse storage.cfg.
sub setup_node {
    my (%opt) = @_;
    my $tmp = tempdir('pvebackup-perl-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    my $root = "$tmp/root";
    make_path("$root/etc/pve", "$tmp/bdir", "$tmp/bstore", "$tmp/state");
    my $dir_extra = $opt{dir_extra} // '';
    spew("$root/etc/pve/storage.cfg", <<"CFG");
backup-dir: bdir
	path $tmp/bdir
	content backup
$dir_extra
backup-store: bstore
	path $tmp/bstore
	content backup

CFG
    my $cfg = { ids => {
        bdir => { type => 'backup-dir', path => "$tmp/bdir", content => { backup => 1 },
            map { split(/\s+/, $_, 2) } grep { m/\S/ } map { s/^\s+//r } split(/\n/, $dir_extra) },
        bstore => { type => 'backup-store', path => "$tmp/bstore", content => { backup => 1 } },
    } };

    # The real helper and command line from this checkout.
    $ENV{PYTHONPATH} = "$REPO/src";
    @PVE::PveBackup::Bridge::HELPER = ($PYTHON, '-m', 'pvebackup.bridge');
    @PVE::PveBackup::Bridge::CLI = ($PYTHON, '-m', 'pvebackup');
    $PVE::PveBackup::Bridge::ROOT = $root;
    $PVE::PveBackup::Bridge::STATE_DIR = "$tmp/state";
    $PVE::PveBackup::Bridge::RUN_DIR = "$tmp/run";

    PVE::Storage::load_custom_plugins($PERL_DIR) if !$loaded++;
    return { root => $root, tmp => $tmp, cfg => $cfg };
}

# Exports $image (qcow2) over NBD as $name on a unix socket, writable (for discards),
# with $bitmap attached when given. Returns { pid, socket }.
sub qsd_export {
    my ($dir, $image, $name, $bitmap) = @_;
    my $socket = "$dir/$name.sock";
    my $pidfile = "$dir/$name.pid";
    unlink($socket, $pidfile);
    my @cmd = (
        'qemu-storage-daemon',
        '--blockdev', "driver=file,node-name=file0,filename=$image",
        '--blockdev', 'driver=qcow2,node-name=fmt0,file=file0',
        '--nbd-server', "addr.type=unix,addr.path=$socket",
        '--export', "type=nbd,id=exp0,node-name=fmt0,name=$name,writable=on"
            . (defined($bitmap) ? ",bitmaps.0=$bitmap" : ''),
        '--pidfile', $pidfile,
    );
    my $pid = fork() // die "fork: $!\n";
    if (!$pid) {
        open(STDIN, '<', '/dev/null');
        exec(@cmd) or POSIX::_exit(127);
    }
    for (1 .. 100) {
        last if -S $socket && -s $pidfile;
        die "qemu-storage-daemon exited\n" if waitpid($pid, POSIX::WNOHANG()) == $pid;
        select(undef, undef, undef, 0.05);
    }
    die "qemu-storage-daemon did not start\n" if !-S $socket;
    return { pid => $pid, socket => $socket };
}

sub qsd_stop {
    my ($export) = @_;
    kill('TERM', $export->{pid});
    waitpid($export->{pid}, 0);
}

1;
