#!/usr/bin/perl

# Front mode on a keepalive client connection: several calls on one
# connection while Stories answers at once, late or never.  The test checks
# both sides of every request and prints how long the second request on a
# connection took, which shows whether the Stories requests of the first
# call hold the connection.  It asserts no timing thresholds.
#
# FRONT_KEEPALIVE_RUNS sets how many connections each case measures
# (default 3), and the printed numbers are the medians.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use Time::HiRes qw(sleep time);

use StoriesTest;

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $KEY = 'sk-keepalive-93c2';
my $EVENTS = '/v1/events/';
my $RUNS = $ENV{FRONT_KEEPALIVE_RUNS} || 3;

my $BACKEND_STATUS = 202;
my $BACKEND_BODY = 'accepted by backend 7';

# Delay in seconds of the Stories mock in the silent cases, longer than the
# internal location's proxy_read_timeout of 1 s.
my $NO_ANSWER_DELAY = 5;

my $t = StoriesTest->new(error_log_level => 'info');

$t->write_http_conf(<<"EOF");
    server {
        listen 127.0.0.1:%%PORT%%;

        location /v1/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /_stories/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
            proxy_connect_timeout 1s;
            proxy_send_timeout 1s;
            proxy_read_timeout 1s;
        }
    }
EOF

$t->set_backend_rules({
    status  => $BACKEND_STATUS,
    headers => [['X-Backend-Id', 'backend-7']],
    body    => $BACKEND_BODY,
});

$t->run();

my @CLIENT = $t->client_headers();

sub track {
    my ($user) = @_;
    return qq({"userId":"$user","event":"E","messageId":"m-$user"});
}

sub track_event {
    my ($user) = @_;
    return qq({"user_id":"$user","name":"Track","data":{"content":"E"}});
}

sub median {
    my @sorted = sort { $a <=> $b } @_;
    my $middle = int(@sorted / 2);
    return @sorted % 2 ? $sorted[$middle]
        : ($sorted[$middle - 1] + $sorted[$middle]) / 2;
}

# Checks that the client got the backend's answer on a keepalive
# connection (4 tests).
sub backend_response_is {
    my ($response, $name) = @_;
    $response ||= { status => 'none', headers => {}, body => undef };
    is($response->{status}, $BACKEND_STATUS, "$name client status");
    is($response->{headers}{connection}, 'keep-alive',
        "$name client connection");
    is($response->{headers}{'x-backend-id'}, 'backend-7',
        "$name client backend header");
    is($response->{body}, $BACKEND_BODY, "$name client body");
    return;
}

# Checks that the backend and Stories each got exactly these users' calls,
# in any order (4 tests).
sub both_sides_are {
    my ($users, $name) = @_;
    my $count = scalar @$users;

    my @backend = $t->wait_for_backend($count);
    is_deeply([sort map { $_->{body} } @backend],
        [sort map { track($_) } @$users], "$name backend bodies");
    is_deeply([map { $_->{uri} } @backend], [('/v1/track') x $count],
        "$name backend uris");

    my @stories = $t->wait_for_stories($count);
    is_deeply([sort map { $_->{body} } @stories],
        [sort map { track_event($_) } @$users], "$name stories bodies");
    is(scalar(grep {
            $_->{uri} eq $EVENTS
                && join('|', StoriesTest::header_values($_, 'Authorization'))
                    eq "Bearer $KEY"
        } @stories), $count, "$name stories paths and authorization");
    return;
}

# Polls error.log from $offset until $done returns true for its text, or
# for 10 seconds.  Returns the text read last.
sub wait_for_log {
    my ($offset, $done) = @_;
    my $deadline = time() + 10;
    while (1) {
        my $log = $t->error_log_since($offset);
        return $log if $done->($log) || time() >= $deadline;
        sleep 0.05;
    }
}

# Sends two track calls on one keepalive connection and returns the two
# responses, the seconds until the first response and the seconds the
# second request took, counted from its sending.
sub measure_connection {
    my ($first_user, $second_user) = @_;

    my $sock = $t->connect();

    my $start = time();
    my $first = $t->request_on($sock, 'POST', '/v1/track',
        track($first_user), \@CLIENT);
    my $first_time = time() - $start;

    $start = time();
    my $second = $t->request_on($sock, 'POST', '/v1/track',
        track($second_user), \@CLIENT);
    my $second_time = time() - $start;

    close $sock;
    return ($first, $second, $first_time, $second_time);
}

# Runs measure_connection $RUNS times with the Stories mock answering after
# $delay seconds, checks both sides of every run and prints the medians.
# Returns the median wait of the second request.
sub measure_case {
    my ($label, $tag, $delay) = @_;

    $t->set_stories_rules($delay ? { delay => $delay } : ());

    my (@first_times, @second_times);
    for my $run (1 .. $RUNS) {
        my @users = ("u-$tag-$run-1", "u-$tag-$run-2");
        $t->clear_backend();
        $t->clear_stories();
        my $offset = $t->error_log_offset();

        my ($first, $second, $first_time, $second_time)
            = measure_connection(@users);
        backend_response_is($first, "$label run $run first");
        backend_response_is($second, "$label run $run second");
        both_sides_are(\@users, "$label run $run");

        push @first_times, $first_time;
        push @second_times, $second_time;
        note(sprintf '%s run %d: first response %.3f s, '
            . 'second request %.3f s', $label, $run, $first_time,
            $second_time);

        next unless $delay && $delay > 1;

        # The Stories requests of both calls time out, the second one
        # after the client has closed the connection.
        my $log = wait_for_log($offset, sub {
            my ($text) = @_;
            return !grep { $text !~ /messageId "m-\Q$_\E"/ } @users;
        });
        for my $user (@users) {
            like($log,
                qr/\[error\][^\n]*stories request to "\/v1\/events\/" timed out, track call, messageId "m-\Q$user\E"/,
                "$label run $run $user timed out in error.log");
        }
    }

    my $first_median = median(@first_times);
    my $second_median = median(@second_times);
    diag(sprintf '%-28s first response %.3f s, second request %.3f s '
        . '(median of %d)', "$label:", $first_median, $second_median,
        $RUNS);
    return $second_median;
}

############################################################################
# Stories answering at once: three calls on one connection.

my $sock = $t->connect();
my @users = map { "u-prompt-$_" } 1 .. 3;
$t->clear_backend();
$t->clear_stories();
for my $user (@users) {
    my $response = $t->request_on($sock, 'POST', '/v1/track', track($user),
        \@CLIENT);
    backend_response_is($response, "prompt $user");
}
close $sock;
both_sides_are(\@users, 'prompt three calls');

############################################################################
# The wait of the second request on a connection, by Stories delay.

measure_case('stories answers at once', 'now', 0);
measure_case('stories answers after 0.5 s', 'half', 0.5);
measure_case('stories answers after 1 s', 'slow', 1);
measure_case("stories silent, read timeout 1 s", 'silent',
    $NO_ANSWER_DELAY);

# A batch with more messages than stories_concurrency (8) sends its Stories
# requests in rounds of at most 8, and with a silent Stories each round
# lasts one read timeout.  17 messages make 3 rounds.

my $BATCH_SIZE = 17;
my @round_times;
for my $run (1 .. $RUNS) {
    my @batch_users = map { "u-round-$run-$_" } 1 .. $BATCH_SIZE;
    my $batch = '{"batch":['
        . join(',', map { qq({"type":"track","userId":"$_","event":"E"}) }
            @batch_users)
        . ']}';

    $t->set_stories_rules({ delay => $NO_ANSWER_DELAY });
    $t->clear_backend();
    $t->clear_stories();
    my $offset = $t->error_log_offset();

    $sock = $t->connect();
    my $response = $t->request_on($sock, 'POST', '/v1/batch', $batch,
        \@CLIENT);
    backend_response_is($response, "silent batch run $run first");
    my $start = time();
    my $second_user = "u-round-$run-after";
    $response = $t->request_on($sock, 'POST', '/v1/track',
        track($second_user), \@CLIENT);
    my $elapsed = time() - $start;
    backend_response_is($response, "silent batch run $run second");
    close $sock;
    push @round_times, $elapsed;
    note(sprintf 'silent batch run %d: second request %.3f s', $run,
        $elapsed);

    my @backend = $t->wait_for_backend(2);
    is_deeply([map { $_->{body} } @backend], [$batch, track($second_user)],
        "silent batch run $run backend bodies");
    my @stories = $t->wait_for_stories($BATCH_SIZE + 1, 10);
    is_deeply([sort map { $_->{body} } @stories],
        [sort map { track_event($_) } @batch_users, $second_user],
        "silent batch run $run stories bodies");

    my $timed_out = qr/\[error\][^\n]*stories request to "\/v1\/events\/" timed out, track call, messageId none/;
    my $log = wait_for_log($offset, sub {
        my ($text) = @_;
        my @lines = $text =~ /$timed_out/g;
        return @lines >= $BATCH_SIZE
            && $text =~ /messageId "m-\Q$second_user\E"/;
    });
    my @lines = $log =~ /$timed_out/g;
    is(scalar @lines, $BATCH_SIZE,
        "silent batch run $run every message timed out in error.log");
    like($log,
        qr/\[error\][^\n]*stories request to "\/v1\/events\/" timed out, track call, messageId "m-\Q$second_user\E"/,
        "silent batch run $run second call timed out in error.log");
}
diag(sprintf '%-28s second request %.3f s (median of %d)',
    "silent, batch of $BATCH_SIZE:", median(@round_times), $RUNS);

# A request on a new connection does not wait for the Stories requests of
# another connection.

$t->set_stories_rules({ delay => $NO_ANSWER_DELAY });
$t->clear_backend();
$t->clear_stories();
$sock = $t->connect();
my $first = $t->request_on($sock, 'POST', '/v1/track',
    track('u-other-1'), \@CLIENT);
backend_response_is($first, 'other connection first');
my $start = time();
my $other = $t->request('POST', '/v1/track', track('u-other-2'), \@CLIENT);
my $other_time = time() - $start;
is($other && $other->{status}, $BACKEND_STATUS,
    'other connection client status');
is($other && $other->{body}, $BACKEND_BODY, 'other connection client body');
close $sock;
both_sides_are(['u-other-1', 'u-other-2'], 'other connection');
diag(sprintf '%-28s response %.3f s', 'new connection meanwhile:',
    $other_time);

$t->set_stories_rules();

unlike($t->read_file('error.log'), qr/\Q$KEY\E/, 'key not in error.log');

$t->stop();

done_testing();
