#!/usr/bin/perl

# Endpoint mode: stories_max_message_size, stories_max_batch_size and
# stories_max_depth at their limit and one past it, with small configured
# limits and with the defaults.  A call over a limit reaches Stories in no
# form, and the worker goes on serving calls.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use Time::HiRes qw(sleep);

use StoriesTest qw(error_body);

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $KEY = 'test-key-5f1c';
my $EVENTS = '/v1/events/';
my $SUCCESS = '{"success":true}';

my $MESSAGE_MAX = 100;
my $BATCH_MAX = 300;
my $DEPTH_MAX = 4;

my $t = StoriesTest->new();

$t->write_http_conf(<<"EOF");
    server {
        listen 127.0.0.1:%%PORT%%;
        client_max_body_size 2m;

        location /small/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_max_message_size $MESSAGE_MAX;
            stories_max_batch_size $BATCH_MAX;
            stories_max_depth $DEPTH_MAX;
        }

        location /v1/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
        }

        location /_stories/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
        }
    }
EOF

$t->run();

sub track_stories {
    my ($user, $event) = @_;
    return qq({"user_id":"$user","name":"Track","data":{"content":"$event"}});
}

# Returns a track message for $user whose text is exactly $size bytes,
# with an event of repeated "e" (and "type" first when $typed).
sub track_of_size {
    my ($size, $user, $typed) = @_;
    my $type = $typed ? '"type":"track",' : '';
    my $empty = qq({$type"userId":"$user","event":""});
    my $pad = $size - length $empty;
    die "message of $size bytes is too small\n" if $pad < 1;
    return (qq({$type"userId":"$user","event":") . ('e' x $pad) . '"}',
        'e' x $pad);
}

# Posts a call and checks the response and the exact Stories requests,
# compared sorted by body.
sub forwards_ok {
    my ($name, $path, $body, $response_body, @expected) = @_;

    my $r = $t->send_segment($path, $body);
    $t->json_response_is($r, 200, $response_body, $name);

    $t->wait_for_stories(scalar @expected);
    sleep 0.1;
    my @records = sort { $a->{body} cmp $b->{body} } $t->stories_requests();
    my @sorted = sort @expected;

    is(scalar @records, scalar @sorted, "$name request count")
        or diag(join "\n", map { "$_->{uri} $_->{body}" } @records);
    for my $i (0 .. $#sorted) {
        $t->stories_request_is($records[$i], $EVENTS, $sorted[$i], $KEY,
            "$name #$i");
    }
    return;
}

sub rejected_ok {
    my ($name, $path, $body, $status, $message) = @_;

    my $r = $t->send_segment($path, $body);
    $t->json_response_is($r, $status, error_body($message), $name);
    $t->nothing_forwarded($name, 0.2);
    return;
}

# A normal call after a rejected one, to show the worker still serves.
sub worker_serves_ok {
    my ($name) = @_;
    forwards_ok("$name then normal call", '/small/v1/track',
        '{"userId":"u9","event":"After"}', $SUCCESS,
        track_stories('u9', 'After'));
    return;
}

# stories_max_message_size: the whole body of a single call.

my ($body, $event) = track_of_size($MESSAGE_MAX, 'u1');
is(length $body, $MESSAGE_MAX, 'single call at the limit is 100 bytes');
forwards_ok('single call at message limit', '/small/v1/track', $body,
    $SUCCESS, track_stories('u1', $event));

($body) = track_of_size($MESSAGE_MAX + 1, 'u1');
rejected_ok('single call one past message limit', '/small/v1/track', $body,
    413, "message is larger than stories_max_message_size $MESSAGE_MAX bytes");
worker_serves_ok('message limit');

# Whitespace counts in a single call, since the limit is on the body.
$body = '{"userId":"u1","event":"E"}' . (' ' x ($MESSAGE_MAX - 26));
is(length $body, $MESSAGE_MAX + 1, 'padded single call is 101 bytes');
rejected_ok('padded single call past message limit', '/small/v1/track',
    $body, 413,
    "message is larger than stories_max_message_size $MESSAGE_MAX bytes");

# In a batch, each message is measured as compact JSON: one of exactly
# 100 bytes is forwarded, one of 101 bytes is listed in "rejected".

my ($at_limit, $event_at) = track_of_size($MESSAGE_MAX, 'u0', 1);
my ($past_limit) = track_of_size($MESSAGE_MAX + 1, 'u1', 1);
my $small = '{"type":"track","userId":"u2","event":"Small"}';

# Spaces inside the first message make its text longer than the limit, but
# its compact JSON is exactly at the limit.
(my $spaced_at_limit = $at_limit) =~ s/,/ , /g;

$body = "{\"batch\":[$spaced_at_limit,$past_limit,$small]}";
ok(length $body <= $BATCH_MAX, 'batch with a large message fits the batch');
forwards_ok('batch message past message limit', '/small/v1/batch', $body,
    '{"success":true,"rejected":[{"index":1,"error":"message is larger '
        . "than stories_max_message_size $MESSAGE_MAX bytes\"}]}",
    track_stories('u0', $event_at), track_stories('u2', 'Small'));
worker_serves_ok('batch message limit');

# stories_max_batch_size: the whole body, padded with spaces between the
# JSON tokens.

sub batch_of_size {
    my ($size) = @_;
    my $head = '{"batch":[' . $small;
    my $tail = ']}';
    my $pad = $size - length($head) - length($tail);
    return $head . (' ' x $pad) . $tail;
}

$body = batch_of_size($BATCH_MAX);
is(length $body, $BATCH_MAX, 'batch at the limit is 300 bytes');
forwards_ok('batch at batch limit', '/small/v1/batch', $body, $SUCCESS,
    track_stories('u2', 'Small'));

$body = batch_of_size($BATCH_MAX + 1);
rejected_ok('batch one past batch limit', '/small/v1/batch', $body, 413,
    "body is larger than stories_max_batch_size $BATCH_MAX bytes");
worker_serves_ok('batch limit');

# A single call is limited by the batch size too.
$body = '{"userId":"u1","event":"E"}' . (' ' x ($BATCH_MAX - 26));
rejected_ok('single call past batch limit', '/small/v1/track', $body, 413,
    "body is larger than stories_max_batch_size $BATCH_MAX bytes");

# stories_max_depth: objects and arrays both count as a level.

forwards_ok('object depth at limit', '/small/v1/track',
    '{"userId":"u1","event":"E","properties":{"a":{"b":{}}}}', $SUCCESS,
    track_stories('u1', 'E'));
rejected_ok('object depth past limit', '/small/v1/track',
    '{"userId":"u1","event":"E","properties":{"a":{"b":{"c":{}}}}}', 400,
    "JSON nesting is deeper than stories_max_depth $DEPTH_MAX");
worker_serves_ok('depth limit');

forwards_ok('array depth at limit', '/small/v1/track',
    '{"userId":"u1","event":"E","properties":{"a":[[]]}}', $SUCCESS,
    track_stories('u1', 'E'));
rejected_ok('array depth past limit', '/small/v1/track',
    '{"userId":"u1","event":"E","properties":{"a":[[[]]]}}', 400,
    "JSON nesting is deeper than stories_max_depth $DEPTH_MAX");

forwards_ok('batch depth at limit', '/small/v1/batch',
    '{"batch":[{"type":"track","userId":"u1","event":"E",'
        . '"properties":{}}]}',
    $SUCCESS, track_stories('u1', 'E'));
rejected_ok('batch depth past limit', '/small/v1/batch',
    '{"batch":[{"type":"track","userId":"u1","event":"E",'
        . '"properties":{"a":{}}}]}',
    400, "JSON nesting is deeper than stories_max_depth $DEPTH_MAX");

# Brackets inside strings are no nesting, and an escaped backslash at the
# end of a string does not hide the brackets after it.

forwards_ok('brackets in a string', '/small/v1/track',
    '{"userId":"u1","event":"[[[{{{\\"{{{"}', $SUCCESS,
    track_stories('u1', '[[[{{{\\"{{{'));
rejected_ok('brackets after an escaped backslash', '/small/v1/track',
    '{"userId":"u1","event":"x\\\\","p":{"a":{"b":{"c":{}}}}}', 400,
    "JSON nesting is deeper than stories_max_depth $DEPTH_MAX");
worker_serves_ok('string brackets');

# The defaults: 32k message, 500k batch, depth 64.

($body, $event) = track_of_size(32768, 'u1');
forwards_ok('single call at default message limit', '/v1/track', $body,
    $SUCCESS, track_stories('u1', $event));
($body) = track_of_size(32769, 'u1');
rejected_ok('single call past default message limit', '/v1/track', $body,
    413, 'message is larger than stories_max_message_size 32768 bytes');

sub nested {
    my ($levels) = @_;
    return ('[' x $levels) . (']' x $levels);
}

# The root object is the first level.
forwards_ok('default depth at limit', '/v1/track',
    '{"userId":"u1","event":"E","p":' . nested(63) . '}', $SUCCESS,
    track_stories('u1', 'E'));
rejected_ok('default depth past limit', '/v1/track',
    '{"userId":"u1","event":"E","p":' . nested(64) . '}', 400,
    'JSON nesting is deeper than stories_max_depth 64');

# 100000 levels would overflow a recursive parser's stack.
rejected_ok('100000 levels', '/v1/batch',
    '{"batch":[' . nested(100000) . ']}', 400,
    'JSON nesting is deeper than stories_max_depth 64');

$body = '{"batch":[' . $small . (' ' x (512000 - 12 - length $small)) . ']}';
is(length $body, 512000, 'batch at the default limit is 512000 bytes');
forwards_ok('batch at default batch limit', '/v1/batch', $body, $SUCCESS,
    track_stories('u2', 'Small'));
rejected_ok('batch past default batch limit', '/v1/batch', $body . ' ', 413,
    'body is larger than stories_max_batch_size 512000 bytes');

worker_serves_ok('defaults');

$t->stop();

done_testing();
