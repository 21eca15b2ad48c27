#!/usr/bin/perl

# Endpoint calls whose client request nginx ends before Stories answers.
# The worker_shutdown_timeout of a worker left behind by a reload (HUP)
# closes the client connections, and the Stories requests go on until
# Stories answers.  A fast shutdown (TERM) ends them with the worker, which
# writes each to the dead-letter file ("the nginx worker exited first").

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use POSIX qw(WNOHANG);
use Test::More;
use Time::HiRes qw(sleep time);

use StoriesTest;

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $KEY = 'sk-secret-61d0b8a4';

my $t = StoriesTest->new(error_log_level => 'info');

# worker_shutdown_timeout belongs in the main context, which http_conf
# writes, so it is added to the generated text.
my $conf = $t->http_conf(<<"EOF");
    server {
        listen 127.0.0.1:%%PORT%%;

        location /v1/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_dead_letter %%TESTDIR%%/dead.jsonl;
        }

        location /_stories/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
        }
    }
EOF
$conf =~ s/^(events \{)/worker_shutdown_timeout 1s;\n\n$1/m
    or die "no events block in the generated configuration\n";
$t->write_conf($conf);

# Stories answers after 3 s or 5 s, long after the shutdown timeout.
$t->set_stories_rules(
    { body_contains => '"E-shutdown-fail"', delay => 3, status => 500 },
    { body_contains => '"E-shutdown-timeout"', delay => 3 },
    { delay => 5 },
);
$t->run();

my $master = $t->read_file('nginx.pid');
chomp $master;

# Starts a call in a forked client and returns its pid.  The response is
# not checked, because nginx closes the connection without sending one.
sub start_call {
    my ($id) = @_;
    my $pid = fork();
    die "fork: $!\n" unless defined $pid;
    if ($pid == 0) {
        $t->post_json('/v1/track',
            qq({"userId":"u1","event":"E-$id","messageId":"$id"}));
        POSIX::_exit(0);
    }
    return $pid;
}

sub wait_for_exit {
    my ($pid, $timeout) = @_;
    my $deadline = time() + $timeout;
    while (time() < $deadline) {
        return 1 if waitpid($pid, WNOHANG) == $pid;
        sleep 0.05;
    }
    kill 'KILL', $pid;
    waitpid($pid, 0);
    return 0;
}

sub dead_letter_is {
    my ($record, $id, $error, $name) = @_;
    $record ||= {};
    is($record->{messageId}, $id, "$name dead letter messageId");
    is($record->{status}, 0, "$name dead letter status");
    is($record->{error}, $error, "$name dead letter error");
    is($record->{path}, '/v1/events/', "$name dead letter path");
    is_deeply($record->{body},
        { user_id => 'u1', name => 'Track', data => { content => "E-$id" } },
        "$name dead letter body");
    return;
}

# A reload leaves the old worker waiting for the calls; after
# worker_shutdown_timeout it closes their connections.  Each Stories request
# goes on in its own carrier request and ends with Stories' answer: the one
# that Stories takes leaves no trace, the one that fails is logged and kept.

my $offset = $t->error_log_offset();
my $taken = start_call('shutdown-timeout');
my $failed = start_call('shutdown-fail');
my @records = $t->wait_for_stories(2);
is(scalar @records, 2, 'shutdown timeout calls reached Stories');

ok(kill('HUP', $master), 'HUP sent');
ok(wait_for_exit($taken, 10), 'shutdown timeout client ended');
ok(wait_for_exit($failed, 10), 'shutdown fail client ended');

my $log = $t->wait_for_log($offset, qr/\[notice\] \d+#\d+: exit$/m, 10);
like($log, qr/\[notice\] \d+#\d+: exit$/m, 'old worker exited');

my @lines = $t->wait_for_json_lines('dead.jsonl', 1, 0);
is(scalar @lines, 1, 'shutdown timeout dead letter line count');
is($lines[0]{messageId}, 'shutdown-fail', 'failed call dead letter messageId');
is($lines[0]{status}, 500, 'failed call dead letter status');
is($lines[0]{error}, 'Stories failed', 'failed call dead letter error');
is_deeply($lines[0]{body},
    { user_id => 'u1', name => 'Track',
      data => { content => 'E-shutdown-fail' } },
    'failed call dead letter body');

like($log, qr/\[error\][^\n]*failed with status 500, track call, messageId "shutdown-fail"/,
    'failed call error line');
unlike($log, qr/shutdown-timeout/, 'taken call not logged');
is(scalar $t->stories_requests(), 2, 'each call sent once');

my $r = $t->post_json('/v1/track', '{"userId":"u1","event":"E"}');
ok($r && $r->{status} == 200, 'new worker answers after the reload')
    or diag($r ? "status $r->{status}" : 'no response');

# A fast shutdown ends the Stories requests of both kinds at once: one whose
# client still waits in the new worker, and one in a worker left behind by
# a reload, whose client connection its shutdown timeout has closed.

$t->clear_stories();
$offset = $t->error_log_offset();
my $orphan = start_call('orphan-exit');
@records = $t->wait_for_stories(1);
is(scalar @records, 1, 'orphan call reached Stories');

ok(kill('HUP', $master), 'second HUP sent');
ok(wait_for_exit($orphan, 10), 'orphan client ended');

my $client = start_call('fast-shutdown');
@records = $t->wait_for_stories(2);
is(scalar @records, 2, 'fast shutdown call reached Stories');

ok(kill('TERM', $master), 'TERM sent');
ok(wait_for_exit($master, 10), 'nginx exited after TERM');
ok(wait_for_exit($client, 10), 'fast shutdown client ended');

for my $id (qw(orphan-exit fast-shutdown)) {
    @lines = grep { ($_->{messageId} || '') eq $id }
        $t->wait_for_json_lines('dead.jsonl', 3, 1);
    is(scalar @lines, 1, "$id dead letter line count");
    dead_letter_is($lines[0], $id, 'the nginx worker exited first', $id);
    my $exited = 'the nginx worker exited first, track call, '
        . qq(messageId "$id");
    like($t->read_file('error.log'), qr/\[error\][^\n]*\Q$exited\E/,
        "$id error line");
}

unlike($t->read_file('error.log'), qr/\Q$KEY\E/, 'key not in error.log');
unlike($t->read_file('dead.jsonl'), qr/\Q$KEY\E/, 'key not in dead.jsonl');

# nginx has exited and was reaped above, so stop() only ends the mocks
# and checks error.log.
$t->stop();

done_testing();
