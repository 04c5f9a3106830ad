#!/usr/bin/perl
# The bridge transport against a fake helper (t/fake-helper.pl): requests, log lines,
# errors as die with the helper's message, a crashing or lying helper, secrets only on
# the pipe, file handles through /proc.
use strict;
use warnings;
use FindBin;
use lib "$FindBin::Bin/lib", "$FindBin::Bin/..";
use Test::More;
use File::Temp qw(tempdir);

use PVE::PveBackup::Bridge;

@PVE::PveBackup::Bridge::HELPER = ($^X, "$FindBin::Bin/fake-helper.pl");

my @logs;
my $log = sub { push @logs, [@_] };
my $tmp = tempdir(CLEANUP => 1);

sub start {
    my (%scfg) = @_;
    return PVE::PveBackup::Bridge->start(
        { storeid => 'st', scfg => { type => 'backup-dir', %scfg },
          secrets => { passphrase => 'hunter2' } }, $log);
}

{
    # The secret goes in hello on the pipe: argv shows nothing of it (the fake prints argv
    # to stderr, which we capture).
    open(my $saved, '>&', \*STDERR) or die;
    my $errfile = "$tmp/stderr";
    open(STDERR, '>', $errfile) or die;
    my $h = start();
    my $res = $h->call('echo', { a => [1, 'x'], 'b-c' => undef });
    $h->finish();
    open(STDERR, '>&', $saved) or die;
    is_deeply($res, { a => [1, 'x'], 'b-c' => undef }, 'request params come back');
    is_deeply(\@logs, [['warn', 'echoing']], 'log lines go to the log function');
    open(my $fh, '<', $errfile) or die;
    my $err = do { local $/; <$fh> };
    like($err, qr/fake: argv=\s*$/m, 'helper argv holds nothing');
    unlike($err, qr/hunter2/, 'secret not in argv');
    ok(!$h->alive(), 'helper gone after bye');
}

{
    my $h = start();
    eval { $h->call('fail', { why => 'disk full' }) };
    is($@, "it broke: disk full\n", 'provider error -> die with its message');
    ok($h->alive(), 'helper still usable after an error');
    eval { $h->call('crash') };
    like($@, qr/helper ended while waiting for the answer to 'crash' \(exit status 3\)/,
        'crashing helper -> die naming the exit status');
    eval { $h->call('echo') };
    like($@, qr/not running/, 'no call after the helper ended');
}

{
    my $h = start();
    eval { $h->call('wrong-id') };
    like($@, qr/answered request '\d+', expected/, 'mismatched answer id refused');
    $h->abort();
    $h = start();
    eval { $h->call('garbage') };
    like($@, qr/not JSON/, 'non-JSON line refused');
    $h->abort();
}

{
    eval { start('fake-protocol' => 2) };
    like($@, qr/speaks protocol '2', not 1/, 'other protocol versions refused');
}

{
    # file-handle mechanism: the helper opens /proc/<our pid>/fd/<n>.
    open(my $w, '>', "$tmp/data") or die;
    print $w "snapshot bytes";
    close($w);
    open(my $r, '<', "$tmp/data") or die;
    my $h = start();
    my $res = $h->call('read-fd', { 'file-handle-path' => "/proc/$$/fd/" . fileno($r) });
    is($res->{data}, 'snapshot bytes', 'helper reads our descriptor through /proc');
    $h->finish();
}

{
    # A forked child holds a copy of the object: its DESTROY must not end our helper.
    my $h = start();
    my $pid = fork() // die;
    if (!$pid) { undef $h; POSIX::_exit(0); }
    waitpid($pid, 0);
    is($h->call('echo', { still => 1 })->{still}, 1, 'child exit leaves the job helper alone');
    $h->finish();
}

{
    my $s = PVE::PveBackup::Bridge::scfg_to_strings(
        { type => 'backup-dir', content => { backup => 1, images => 0 }, shared => 1,
          digest => 'abc', path => '/x', bitmap => 0 });
    is_deeply($s, { type => 'backup-dir', content => 'backup', shared => '1', path => '/x',
        bitmap => '0' }, 'scfg sent as storage.cfg strings, content joined, digest dropped');
}

done_testing();
