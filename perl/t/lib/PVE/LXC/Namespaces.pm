package PVE::LXC::Namespaces;

# Test stand-in for pve-container's src/PVE/LXC/Namespaces.pm run_in_userns: fork, the
# child unshares a user (and mount) namespace, the parent writes its id map, the child
# becomes the namespace's root and runs the code. Written for these tests (with the
# unshare(2) system call and /proc/PID/[ug]id_map as root instead of newuidmap); not
# upstream's code.

use strict;
use warnings;

use POSIX ();
use Socket;

use constant { CLONE_NEWNS => 0x00020000, CLONE_NEWUSER => 0x10000000, SYS_unshare => 272 };

sub _write_map {
    my ($pid, $which, $id_map) = @_;
    my $text = join('', map { "$_->[1] $_->[2] $_->[3]\n" } grep { $_->[0] eq $which } @$id_map);
    open(my $fh, '>', "/proc/$pid/${which}id_map") or die "open ${which}id_map: $!\n";
    print $fh $text or die "write ${which}id_map: $!\n";
    close($fh) or die "write ${which}id_map: $!\n";
}

# Dies with the child's error, as PVE::Tools::run_fork passes it back.
sub run_in_userns {
    my ($code, $id_map) = @_;

    socketpair(my $sp, my $sc, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die "socketpair: $!\n";
    pipe(my $err_r, my $err_w) or die "pipe: $!\n";
    my $pid = fork() // die "fork: $!\n";
    if (!$pid) {
        close($sp);
        my $ok = eval {
            syscall(SYS_unshare, CLONE_NEWUSER | CLONE_NEWNS) == 0
                or die "unshare(NEWUSER|NEWNS): $!\n";
            syswrite($sc, "1\n");
            my $go = <$sc>;
            die "sync failed\n" if ($go // '') ne "2\n";
            close($sc);
            $! = 0;
            ($(, $)) = (0, "0 0");
            ($<, $>) = (0, 0);
            $code->();
            1;
        };
        if (!$ok) {
            syswrite($err_w, $@);
            POSIX::_exit(1);
        }
        POSIX::_exit(0);
    }
    close($err_w);
    close($sc);
    my $ready = <$sp>;
    die "userns child failed to unshare\n" if ($ready // '') ne "1\n";
    _write_map($pid, 'u', $id_map);
    _write_map($pid, 'g', $id_map);
    syswrite($sp, "2\n");
    close($sp);
    my $err = do { local $/; <$err_r> } // '';
    waitpid($pid, 0);
    die($err || "child in the user namespace failed (status $?)\n") if $?;
    return;
}

1;
