#!/usr/bin/perl

# The dead-letter file across signals to the nginx master: USR1 reopens it
# after a rename, and a reload (HUP) and a reopen (USR1) in the middle of a
# stream of calls lose no event that a client saw answered with 200.

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

my $KEY = 'sk-secret-3fa7e2c9';
my $JSON = JSON::PP->new->utf8->canonical;

my $t = StoriesTest->new(error_log_level => 'info');

$t->write_http_conf(<<"EOF");
    server {
        listen 127.0.0.1:%%PORT%%;

        location /rotate/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_dead_letter %%TESTDIR%%/rotate.jsonl;
        }

        location /load/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_dead_letter %%TESTDIR%%/load.jsonl;
        }

        location /_stories/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
        }
    }
EOF

$t->set_stories_rules({ body_contains => '"fail-', status => 503 });
$t->run();

# Returns the pid of the nginx master.  The harness starts nginx with
# "daemon off", so this is the process that the harness forked.
sub master_pid {
    my $pid = $t->read_file('nginx.pid');
    chomp $pid;
    return $pid;
}

sub lines_of {
    my ($name) = @_;
    return grep { $_ ne '' } split /\n/, $t->read_file($name);
}

sub message_ids {
    my (@lines) = @_;
    return map {
        my $record = eval { $JSON->decode($_) };
        $record ? $record->{messageId} : "invalid line: $_";
    } @lines;
}

sub track_body {
    my ($event, $id) = @_;
    return qq({"userId":"u1","event":"$event","messageId":"$id"});
}

# Waits up to $timeout seconds for $count lines matching $re in error.log
# after $offset.  Returns the number found.
sub wait_for_log_lines {
    my ($offset, $re, $count, $timeout) = @_;
    my $deadline = time() + $timeout;
    while (1) {
        my @found = grep { $_ =~ $re } split /\n/,
            $t->error_log_since($offset);
        return scalar @found if @found >= $count || time() >= $deadline;
        sleep 0.05;
    }
}

my $master = master_pid();
like($master, qr/^\d+$/, 'master pid read from nginx.pid');

############################################################################
# USR1 reopens the dead-letter file.

for my $n (1 .. 3) {
    my $r = $t->send_segment('/rotate/v1/track',
        track_body("fail-$n", "rotate-$n"));
    $t->json_response_is($r, 200, '{"success":true}', "before USR1 call $n");
}
is_deeply([message_ids(lines_of('rotate.jsonl'))],
    [map { "rotate-$_" } 1 .. 3], 'before USR1 lines');

my $rotated = $t->dir() . '/rotate.jsonl.1';
ok(rename($t->dir() . '/rotate.jsonl', $rotated), 'dead letter renamed')
    or diag("rename: $!");

my $offset = $t->error_log_offset();
ok(kill('USR1', $master), 'USR1 sent to the master');

# The worker logs "reopening logs" before it reopens its files, and it
# handles no request in between.
is(wait_for_log_lines($offset,
        qr/\[notice\] (?!\Q$master\E#)\d+#\d+: reopening logs$/, 1, 5),
    1, 'worker reopened its files');
ok(-e $t->dir() . '/rotate.jsonl', 'USR1 created a new dead-letter file');

for my $n (4 .. 5) {
    my $r = $t->send_segment('/rotate/v1/track',
        track_body("fail-$n", "rotate-$n"));
    $t->json_response_is($r, 200, '{"success":true}', "after USR1 call $n");
}

is_deeply([message_ids(lines_of('rotate.jsonl'))],
    ['rotate-4', 'rotate-5'], 'after USR1 new lines in the new file');
is_deeply([message_ids(lines_of('rotate.jsonl.1'))],
    [map { "rotate-$_" } 1 .. 3], 'after USR1 old lines in the renamed file');

is(master_pid(), $master, 'USR1 kept the master');

############################################################################
# Reload and reopen under load.
#
# CLIENTS forked clients send CALLS track calls in all, each on its own
# keepalive connection, each call with a unique event name and messageId.
# Stories answers 503 for every 5th call and 200 for the others, each
# after a short delay that spreads the stream over a few seconds.  The
# parent sends HUP and, after renaming the dead-letter file, USR1 while
# calls are running.  Every call answered 200 must then have its event
# either taken by Stories or in one of the two dead-letter files.

my $CALLS = 200;
my $CLIENTS = 4;
my $ATTEMPTS = 3;
my $DEADLINE = time() + 30;

$t->set_stories_rules(
    { body_contains => '"load-fail-', status => 503, delay => 0.05 },
    { delay => 0.05 },
);
$t->clear_stories();

sub load_event {
    my ($i) = @_;
    return $i % 5 == 0 ? "load-fail-$i" : "load-$i";
}

sub stories_body_of {
    my ($i) = @_;
    my $event = load_event($i);
    return qq({"user_id":"u1","name":"Track","data":{"content":"$event"}});
}

# Sends the calls with numbers $first, $first + CLIENTS, ... and writes
# "NUMBER STATUS ATTEMPTS" lines to $file, STATUS "none" when no attempt
# got a response.  A call is tried again on a new connection when nginx closed
# the connection without a response, as it may do to an idle keepalive
# connection of a worker that is shutting down after a reload.
sub run_client {
    my ($first, $file) = @_;

    open my $out, '>', $file or die "open $file: $!\n";
    $out->autoflush(1);

    my $sock;
    for (my $i = $first; $i <= $CALLS; $i += $CLIENTS) {
        my $status = 'none';
        my $attempts = 0;
        for my $attempt (1 .. $ATTEMPTS) {
            $attempts = $attempt;
            last if time() >= $DEADLINE;
            $sock ||= eval { $t->connect() };
            if (!$sock) {
                sleep 0.1;
                next;
            }
            my $r = $t->request_on($sock, 'POST', '/load/v1/track',
                track_body(load_event($i), "load-m-$i"),
                [['Content-Type', 'application/json']]);
            if (!$r) {
                close $sock;
                undef $sock;
                next;
            }
            $status = $r->{status};
            if (lc($r->{headers}{connection} || '') eq 'close') {
                close $sock;
                undef $sock;
            }
            last;
        }
        print {$out} "$i $status $attempts\n";
    }
    close $out;
    return;
}

my %clients;
for my $k (1 .. $CLIENTS) {
    my $file = $t->dir() . "/client-$k.txt";
    my $pid = fork();
    die "fork: $!\n" unless defined $pid;
    if ($pid == 0) {
        run_client($k, $file);
        POSIX::_exit(0);
    }
    $clients{$pid} = $file;
}

# Signals go out once Stories has seen about a third and two thirds of the
# calls, so that calls are running before, between and after them.
my $log_offset = $t->error_log_offset();
my @signals = (
    [int($CALLS / 3), sub { kill 'HUP', $master }, 'HUP'],
    [int(2 * $CALLS / 3), sub {
        rename $t->dir() . '/load.jsonl', $t->dir() . '/load.jsonl.1'
            or die "rename load.jsonl: $!\n";
        kill 'USR1', $master;
    }, 'USR1'],
);
my %sent;

while (%clients && time() < $DEADLINE) {
    my $seen = scalar $t->stories_requests();
    while (@signals && $seen >= $signals[0][0]) {
        my ($at, $send, $name) = @{ shift @signals };
        $sent{$name} = $send->() ? 1 : 0;
    }
    for my $pid (keys %clients) {
        delete $clients{$pid} if waitpid($pid, WNOHANG) == $pid;
    }
    sleep 0.05;
}

# Clients still running at the deadline are stopped, and the test fails.
for my $pid (keys %clients) {
    kill 'TERM', $pid;
    waitpid($pid, 0);
}
is(scalar keys %clients, 0, 'load clients ended before the deadline');
ok($sent{HUP}, 'HUP sent during the load');
ok($sent{USR1}, 'USR1 sent during the load');

like($t->error_log_since($log_offset),
    qr/\(SIGHUP\) received[^\n]*reconfiguring/, 'master reloaded');

# What the clients saw.

my (%status_of, $retried);
for my $k (1 .. $CLIENTS) {
    for my $line (lines_of("client-$k.txt")) {
        my ($i, $status, $attempts) = split / /, $line;
        $status_of{$i} = $status;
        $retried++ if $attempts > 1;
    }
}
is(scalar keys %status_of, $CALLS, 'load every call has a result');
my @answered = grep { $status_of{$_} eq '200' } sort { $a <=> $b }
    keys %status_of;
is(scalar @answered, $CALLS, 'load every call answered 200')
    or diag(join ', ', map { "$_: $status_of{$_}" }
        grep { $status_of{$_} ne '200' } sort { $a <=> $b } keys %status_of);

# Where the events went.

my %taken;
for my $record ($t->stories_requests()) {
    $taken{ $record->{body} } = 1 if index($record->{body}, '"load-fail-') < 0;
}

my (%dead, @invalid);
my @dead_lines = (lines_of('load.jsonl.1'), lines_of('load.jsonl'));
for my $line (@dead_lines) {
    my $record = eval { $JSON->decode($line) };
    if (!$record || !defined $record->{messageId}) {
        push @invalid, $line;
        next;
    }
    my ($body) = $line =~ /,"body":(.*)\}\z/;
    $dead{ $record->{messageId} } = $body;
}
is_deeply(\@invalid, [], 'load dead-letter lines are whole JSON lines');
cmp_ok(scalar(lines_of('load.jsonl.1')), '>', 0,
    'load renamed file has lines');

my @lost = grep {
    !$taken{ stories_body_of($_) }
        && !(defined $dead{"load-m-$_"}
             && $dead{"load-m-$_"} eq stories_body_of($_))
} @answered;
is_deeply(\@lost, [], 'load no event answered 200 is lost');

my @failed = grep { $_ % 5 == 0 } 1 .. $CALLS;
my @missing = grep { !defined $dead{"load-m-$_"} } @failed;
is_deeply(\@missing, [], 'load every 503 is in a dead-letter file');

diag(sprintf 'load: %d calls tried again, %d events taken by Stories, '
    . '%d dead-letter lines (%d in the renamed file)', $retried || 0,
    scalar keys %taken, scalar @dead_lines, scalar lines_of('load.jsonl.1'));

# nginx still serves after the signals.

is(master_pid(), $master, 'reload kept the master');
my $r = $t->send_segment('/load/v1/track', track_body('after', 'after-1'));
$t->json_response_is($r, 200, '{"success":true}', 'after reload');
my @records = $t->wait_for_stories(1);
is($records[0] && $records[0]{body},
    '{"user_id":"u1","name":"Track","data":{"content":"after"}}',
    'after reload forwarded');

for my $name (qw(error.log rotate.jsonl rotate.jsonl.1 load.jsonl
                 load.jsonl.1)) {
    unlike($t->read_file($name), qr/\Q$KEY\E/, "key not in $name");
}

$t->stop();

done_testing();
