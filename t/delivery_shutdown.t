#!/usr/bin/perl

# Stories requests that nginx ends before Stories answers: the endpoint
# writes each of them to the dead-letter file.  Two ways nginx ends them
# are checked: the worker_shutdown_timeout of a worker left behind by a
# reload (HUP), which closes the client's request ("the client request
# ended first"), and a fast shutdown (TERM), which ends the worker ("the
# nginx worker exited first").

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use JSON::PP;
use POSIX qw(WNOHANG);
use Test::More;
use Time::HiRes qw(sleep time);

use StoriesTest;

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $KEY = 'sk-secret-61d0b8a4';
my $JSON = JSON::PP->new->utf8->canonical;

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

# Stories answers after 5 s, long after the shutdown timeout.
$t->set_stories_rules({ delay => 5 });
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

# Returns the decoded dead-letter lines after waiting up to $timeout
# seconds for $count of them.
sub dead_letters {
    my ($count, $timeout) = @_;
    my $deadline = time() + $timeout;
    while (1) {
        my @lines = grep { $_ ne '' } split /\n/, $t->read_file('dead.jsonl');
        if (@lines >= $count || time() >= $deadline) {
            return map { eval { $JSON->decode($_) } || { line => $_ } }
                @lines;
        }
        sleep 0.05;
    }
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

# A reload leaves the old worker waiting for the call; after
# worker_shutdown_timeout it closes the connection and ends the call.

my $offset = $t->error_log_offset();
my $client = start_call('shutdown-timeout');
my @records = $t->wait_for_stories(1);
is(scalar @records, 1, 'shutdown timeout call reached Stories');

ok(kill('HUP', $master), 'HUP sent');
my @lines = dead_letters(1, 5);
is(scalar @lines, 1, 'shutdown timeout dead letter line count');
dead_letter_is($lines[0], 'shutdown-timeout',
    'the client request ended first', 'shutdown timeout');
my $ended = 'the client request ended first, track call, '
    . 'messageId "shutdown-timeout"';
like($t->error_log_since($offset), qr/\[error\][^\n]*\Q$ended\E/,
    'shutdown timeout error line');
ok(wait_for_exit($client, 10), 'shutdown timeout client ended');

my $r = $t->post_json('/v1/track', '{"userId":"u1","event":"E"}');
ok($r && $r->{status} == 200, 'new worker answers after the reload')
    or diag($r ? "status $r->{status}" : 'no response');

# A fast shutdown ends the call at once.

$t->clear_stories();
$client = start_call('fast-shutdown');
@records = $t->wait_for_stories(1);
is(scalar @records, 1, 'fast shutdown call reached Stories');

ok(kill('TERM', $master), 'TERM sent');
ok(wait_for_exit($master, 10), 'nginx exited after TERM');
ok(wait_for_exit($client, 10), 'fast shutdown client ended');

@lines = grep { ($_->{messageId} || '') eq 'fast-shutdown' }
    dead_letters(2, 1);
is(scalar @lines, 1, 'fast shutdown dead letter line count');
dead_letter_is($lines[0], 'fast-shutdown', 'the nginx worker exited first',
    'fast shutdown');
my $exited = 'the nginx worker exited first, track call, '
    . 'messageId "fast-shutdown"';
like($t->read_file('error.log'), qr/\[error\][^\n]*\Q$exited\E/,
    'fast shutdown error line');

unlike($t->read_file('error.log'), qr/\Q$KEY\E/, 'key not in error.log');
unlike($t->read_file('dead.jsonl'), qr/\Q$KEY\E/, 'key not in dead.jsonl');

# nginx has exited and was reaped above, so stop() only ends the mocks
# and checks error.log.
$t->stop();

done_testing();
