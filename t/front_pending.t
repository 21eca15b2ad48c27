#!/usr/bin/perl

# stories_max_pending: in front of an existing endpoint, a worker keeps at
# most that many Stories requests unfinished.  A call that finds the limit
# reached still goes to the backend whole, and its Stories requests go to
# the error log and the dead-letter file instead of waiting.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use JSON::PP;
use Test::More;
use Time::HiRes qw(sleep);

use StoriesTest;

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $KEY = 'sk-pending-93d1c7';
my $EVENTS = '/v1/events/';
my $JSON = JSON::PP->new->utf8->canonical;

my $t = StoriesTest->new(error_log_level => 'info');

# /limited/ and /unlogged/ allow 2 pending requests, /wide/ the default.
# The three share the worker's count.

$t->write_http_conf(<<"EOF");
    server {
        listen 127.0.0.1:%%PORT%%;

        location /limited/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_max_pending 2;
            stories_dead_letter %%TESTDIR%%/dead.jsonl;
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /unlogged/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_max_pending 2;
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /wide/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /_stories/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
        }
    }
EOF

# Stories holds its answer to an event named "held-N" until the test
# creates the file release-N.
$t->set_stories_rules(
    { body_contains => '"held-1"', hold => 'release-1' },
    { body_contains => '"held-2"', hold => 'release-2' },
);
$t->write_file('dead.jsonl', '');

$t->run();

sub track {
    my ($user, $event, $id) = @_;
    return qq({"userId":"$user","event":"$event","messageId":"$id"});
}

sub track_event {
    my ($user, $event) = @_;
    return qq({"user_id":"$user","name":"Track",)
        . qq("data":{"content":"$event"}});
}

# POSTs a call and checks that the backend answered the client and got the
# body byte for byte.
sub send_call {
    my ($path, $body, $name) = @_;
    $t->clear_backend();
    my $r = $t->post_json($path, $body);
    is($r && $r->{status}, 200, "$name backend status");
    is($r && $r->{body}, '{"ok":true}', "$name backend body");
    my @backend = $t->wait_for_backend(1);
    is(scalar @backend, 1, "$name backend request count");
    is($backend[0] && $backend[0]{body}, $body, "$name backend got the body");
    return;
}

# Returns the Stories bodies the mock received, after waiting up to
# $timeout seconds for $count of them.
sub stories_bodies {
    my ($count, $timeout) = @_;
    return map { $_->{body} } $t->wait_for_stories($count, $timeout);
}

sub dead_lines {
    return grep { $_ ne '' } split /(?<=\n)/, $t->read_file('dead.jsonl');
}

my $REASON = 'stories_max_pending reached';

sub not_sent_line {
    my ($user, $id) = @_;
    return qq(stories request to "$EVENTS" was not delivered: $REASON, )
        . qq(track call, messageId "$id");
}

############################################################################
# A batch is taken whole, even past the limit.

my $batch = '{"batch":['
    . join(',', map {
        qq({"type":"track","userId":"u-b$_","event":"held-1",)
            . qq("messageId":"m-b$_"})
    } 1 .. 3)
    . ']}';
send_call('/limited/v1/batch', $batch, 'batch of 3');
is_deeply([sort(stories_bodies(3))],
    [sort map { track_event("u-b$_", 'held-1') } 1 .. 3],
    'batch of 3 all reach Stories');

############################################################################
# With 3 requests pending, calls under a limit of 2 are not sent.

my $offset = $t->error_log_offset();

my $body = track('u-shed-1', 'shed-1', 'm-shed-1');
send_call('/limited/v1/track', $body, 'over the limit');

my @dead = dead_lines();
is(scalar @dead, 1, 'over the limit: one dead-letter line');
my $record = eval { $JSON->decode($dead[0] // '') } || {};
is($record->{path}, $EVENTS, 'dead-letter path');
is($record->{status}, 0, 'dead-letter status');
is($record->{error}, $REASON, 'dead-letter error');
is($record->{messageId}, 'm-shed-1', 'dead-letter messageId');
ok(substr($dead[0] // '', -length(track_event('u-shed-1', 'shed-1')) - 2)
    eq track_event('u-shed-1', 'shed-1') . "}\n",
    'dead-letter body last and exact');

like($t->error_log_since($offset),
    qr/\[error\][^\n]*\Q${\ not_sent_line('u-shed-1', 'm-shed-1')}\E/,
    'over the limit: error line');

$body = track('u-shed-2', 'shed-2', 'm-shed-2');
send_call('/unlogged/v1/track', $body, 'over the limit, no dead letter');
like($t->error_log_since($offset),
    qr/\[error\][^\n]*\Q${\ not_sent_line('u-shed-2', 'm-shed-2')}\E/,
    'over the limit, no dead letter: error line');
is(scalar(dead_lines()), 1, 'no dead-letter file: no line written');

is(scalar(stories_bodies(4, 0.5)), 3, 'over the limit: nothing sent');

# A location with a higher limit still sends.

$body = track('u-wide', 'wide', 'm-wide');
send_call('/wide/v1/track', $body, 'default limit');
is_deeply([(stories_bodies(4))[3]], [track_event('u-wide', 'wide')],
    'default limit: sent while 3 are pending');

############################################################################
# Once Stories answers, the count falls and calls are sent again.

$t->write_file('release-1', '');

my $sent;
for my $try (1 .. 100) {
    $t->clear_stories();
    my $r = $t->post_json('/limited/v1/track',
        track("u-after-$try", 'after', "m-after-$try"));
    my @bodies = stories_bodies(1, 0.1);
    if (@bodies) {
        $sent = [$try, @bodies];
        last;
    }
}
ok($sent, 'a call is sent again after Stories answered');
note('calls tried until one was sent: ' . ($sent ? $sent->[0] : 'all'));
is_deeply($sent && [@$sent[1 .. $#$sent]],
    [track_event("u-after-$sent->[0]", 'after')],
    'the call sent again reaches Stories whole');

# The count is back at 0, not 1 or below: two calls are sent, the third
# is not.

$t->clear_stories();
my $dead_before = scalar dead_lines();
send_call('/limited/v1/track', track('u-h1', 'held-2', 'm-h1'), 'first');
send_call('/limited/v1/track', track('u-h2', 'held-2', 'm-h2'), 'second');
is_deeply([sort(stories_bodies(2))],
    [sort(track_event('u-h1', 'held-2'), track_event('u-h2', 'held-2'))],
    'two calls sent with the count back at 0');

send_call('/limited/v1/track', track('u-h3', 'third', 'm-h3'), 'third');
is(scalar(stories_bodies(3, 0.5)), 2, 'third call not sent');
@dead = dead_lines();
is(scalar @dead, $dead_before + 1, 'third call: one dead-letter line');
like($dead[-1] // '', qr/"messageId":"m-h3"/, 'third call dead-letter line');

$t->write_file('release-2', '');

############################################################################
# Bounds and secrets.

my ($status, $output) = $t->test_config($t->http_conf(<<"EOF"));
    server {
        listen 127.0.0.1:%%PORT%%;
        location /v1/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_max_pending 0;
        }
    }
EOF
isnt($status, 0, 'stories_max_pending 0 fails nginx -t');
like($output, qr/value must be between 1 and 1000000 in \S+test\.conf:\d+/,
    'nginx -t gives the bounds and the line');

unlike($t->read_file('error.log'), qr/\Q$KEY\E/, 'key not in error.log');
unlike($t->read_file('dead.jsonl'), qr/\Q$KEY\E/, 'key not in dead letter');

$t->stop();

done_testing();
