#!/usr/bin/perl
# A test-only fake of the Python helper, for the transport tests (t/10-bridge.t): it
# speaks protocol v1 and answers by method name. The real helper is driven by the
# other tests.
use strict;
use warnings;
use JSON::PP;
my $json = JSON::PP->new->utf8->canonical;
$| = 1;
my $seen = 0;
while (my $line = <STDIN>) {
    my $req = $json->decode($line);
    my ($id, $m, $p) = @$req{qw(id method params)};
    my $reply = sub { print $json->encode({ id => $id, @_ }), "\n" };
    if ($m eq 'hello') {
        $seen = 1;
        print STDERR "fake: argv=@ARGV\n";
        $reply->(result => { protocol => $p->{scfg}->{'fake-protocol'} // 1,
            'helper-version' => 'fake', echo => $p });
    } elsif ($m eq 'echo') {
        print $json->encode({ log => { level => 'warn', message => 'echoing' } }), "\n";
        $reply->(result => $p);
    } elsif ($m eq 'fail') {
        $reply->(error => { type => 'BackupError', message => "it broke: $p->{why}", exit => 4 });
    } elsif ($m eq 'crash') {
        exit 3;
    } elsif ($m eq 'wrong-id') {
        print $json->encode({ id => $id + 7, result => {} }), "\n";
    } elsif ($m eq 'garbage') {
        print "this is not json\n";
    } elsif ($m eq 'read-fd') {
        open(my $fh, '<', $p->{'file-handle-path'}) or do {
            $reply->(error => { message => "open: $!" }); next };
        local $/;
        $reply->(result => { data => scalar(<$fh>) });
    } elsif ($m eq 'bye') {
        $reply->(result => {});
        exit 0;
    } else {
        $reply->(error => { type => 'UnsupportedError', message => "no method $m", exit => 4 });
    }
}
# EOF: what a real helper treats as abort.
exit 0;
