#!/usr/bin/perl

# Endpoint mode: how Stories answers and failures become client responses,
# and how many Stories requests run at once.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use Time::HiRes qw(sleep time);

use StoriesTest qw(error_body);

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

# A key that must never show up in error.log.
my $KEY = 'sk-secret-7d3e9a51';
my $EVENTS = '/v1/events/';
my $USERS = '/v1/users';

my $t = StoriesTest->new(error_log_level => 'info');

$t->write_http_conf(<<"EOF");
    server {
        listen 127.0.0.1:%%PORT%%;

        location /v1/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
        }

        location /sync/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_sync_users on;
        }

        location /slow/ {
            stories_forward /_slow/;
            stories_api_key $KEY;
        }

        location /refused/ {
            stories_forward /_refused/;
            stories_api_key $KEY;
        }

        location /limited/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_concurrency 2;
        }

        location /_stories/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
        }

        location /_slow/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
            proxy_read_timeout 1s;
        }

        location /_refused/ {
            internal;
            proxy_pass http://127.0.0.1:%%CLOSED_PORT%%/;
        }
    }
EOF

# The mock picks its answer by a marker in the userId of each message.
$t->set_stories_rules(
    { body_contains => '"u-429"', status => 429,
      headers => [['Retry-After', '30']], body => '{"error":"slow down"}' },
    { body_contains => '"u-429-bare"', status => 429 },
    { body_contains => '"u-401"', status => 401,
      body => '{"error":"bad key"}' },
    { body_contains => '"u-403"', status => 403 },
    { body_contains => '"u-400"', status => 400 },
    { body_contains => '"u-404"', status => 404 },
    { body_contains => '"u-422"', status => 422 },
    { body_contains => '"u-408"', status => 408 },
    { body_contains => '"u-500"', status => 500 },
    { body_contains => '"u-502"', status => 502 },
    { body_contains => '"u-503"', status => 503 },
    { body_contains => '"u-201"', status => 201 },
    { body_contains => '"u-202"', status => 202, body => '' },
    { body_contains => '"u-slow"', delay => 3 },
    # identify of "u-users-*" succeeds and only its users request fails.
    { uri_contains => '/v1/users', body_contains => '"u-users-400"',
      status => 400 },
    { uri_contains => '/v1/users', body_contains => '"u-users-429"',
      status => 429, headers => [['Retry-After', '5']] },
    { uri_contains => '/v1/users', body_contains => '"u-users-401"',
      status => 401 },
);

$t->run();

sub track {
    my ($user) = @_;
    return qq({"userId":"$user","event":"E"});
}

sub track_event {
    my ($user) = @_;
    return qq({"user_id":"$user","name":"Track","data":{"content":"E"}});
}

sub batch {
    return '{"batch":['
        . join(',', map { qq({"type":"track","userId":"$_","event":"E"}) }
            @_)
        . ']}';
}

my $RATE_LIMIT = error_body('Stories rate limit reached, retry later');
my $TIMED_OUT = error_body('Stories timed out');
my $UNREACHABLE = error_body('Stories is unreachable');
my $KEY_REJECTED = error_body('Stories rejected the API key');

# Success statuses other than 200.

for my $status (201, 202) {
    my $r = $t->send_segment('/v1/track', track("u-$status"));
    $t->json_response_is($r, 200, '{"success":true}', "stories $status");
    my @records = $t->wait_for_stories(1);
    $t->stories_request_is($records[0], $EVENTS, track_event("u-$status"),
        $KEY, "stories $status");
}

# 429

my $r = $t->send_segment('/v1/track', track('u-429'));
$t->json_response_is($r, 429, $RATE_LIMIT, 'stories 429');
is($r && $r->{headers}{'retry-after'}, '30', 'stories 429 retry-after');
my @records = $t->wait_for_stories(1);
$t->stories_request_is($records[0], $EVENTS, track_event('u-429'), $KEY,
    'stories 429');

$r = $t->send_segment('/v1/track', track('u-429-bare'));
$t->json_response_is($r, 429, $RATE_LIMIT, 'stories 429 bare');
ok($r && !exists $r->{headers}{'retry-after'},
    'stories 429 bare no retry-after');

# Timeouts: proxy_read_timeout and 408.  The mock would answer 200 after
# 3 s, so a 504 shows that the 1 s read timeout ended the request.

$r = $t->send_segment('/slow/v1/track', track('u-slow'));
$t->json_response_is($r, 504, $TIMED_OUT, 'stories timeout');
@records = $t->wait_for_stories(1);
$t->stories_request_is($records[0], $EVENTS, track_event('u-slow'), $KEY,
    'stories timeout');

$r = $t->send_segment('/v1/track', track('u-408'));
$t->json_response_is($r, 504, $TIMED_OUT, 'stories 408');

# Connection refused.

$r = $t->send_segment('/refused/v1/track', track('u1'));
$t->json_response_is($r, 502, $UNREACHABLE, 'stories refused');

# 5xx

for my $status (500, 502, 503) {
    $r = $t->send_segment('/v1/track', track("u-$status"));
    $t->json_response_is($r, 502,
        error_body("Stories failed with status $status"),
        "stories $status");
}

# 401 and 403: 503, an error line, and no key in error.log.

for my $status (401, 403) {
    my $offset = $t->error_log_offset();
    $r = $t->send_segment('/v1/track', track("u-$status"));
    $t->json_response_is($r, 503, $KEY_REJECTED, "stories $status");
    my $log = $t->error_log_since($offset);
    like($log, qr/\[error\][^\n]*API key rejected/,
        "stories $status error line");
    unlike($log, qr/\Q$KEY\E/, "stories $status key not logged");
}

# Other 4xx: 422 for a single call.

for my $status (400, 404, 422) {
    $r = $t->send_segment('/v1/track', track("u-$status"));
    $t->json_response_is($r, 422,
        error_body("Stories rejected the event with status $status"),
        "stories $status");
}

$r = $t->send_segment('/sync/v1/identify',
    '{"userId":"u-users-400","traits":{"email":"a@b.c"}}');
$t->json_response_is($r, 422,
    error_body('Stories rejected the user with status 400'),
    'users 400');
@records = sort { $a->{connection} <=> $b->{connection} }
    $t->wait_for_stories(2);
is_deeply([map { $_->{uri} } @records], [$EVENTS, $USERS],
    'users 400 both sent');

# Several failures in one call: 503 beats 429 beats 504 beats 502.

$r = $t->send_segment('/sync/v1/identify',
    '{"userId":"u-users-429","traits":{}}');
$t->json_response_is($r, 429, $RATE_LIMIT, 'users 429');
is($r && $r->{headers}{'retry-after'}, '5', 'users 429 retry-after');

$r = $t->send_segment('/sync/v1/identify',
    '{"userId":"u-users-401","traits":{}}');
$t->json_response_is($r, 503, $KEY_REJECTED, 'users 401');

my @priority = (
    ['batch 401 429', ['u-429', 'u-401'], 503, $KEY_REJECTED],
    ['batch 403 500', ['u-500', 'u-403'], 503, $KEY_REJECTED],
    ['batch 429 500', ['u-500', 'u-429'], 429, $RATE_LIMIT],
    ['batch 429 408', ['u-408', 'u-429'], 429, $RATE_LIMIT],
    ['batch 408 500', ['u-500', 'u-408'], 504, $TIMED_OUT],
    ['batch 500 ok', ['u1', 'u-500', 'u2'], 502,
        error_body('Stories failed with status 500')],
    ['batch 400 500', ['u-400', 'u-500'], 502,
        error_body('Stories failed with status 500')],
    ['batch 400 429', ['u-400', 'u-429'], 429, $RATE_LIMIT],
);

for my $case (@priority) {
    my ($name, $users, $status, $body) = @$case;
    $r = $t->send_segment('/v1/batch', batch(@$users));
    $t->json_response_is($r, $status, $body, $name);
    @records = $t->wait_for_stories(scalar @$users);
    is(scalar @records, scalar @$users, "$name all sent");
}

$r = $t->send_segment('/v1/batch', batch('u1', 'u-429'));
is($r && $r->{headers}{'retry-after'}, '30', 'batch 429 retry-after');

# Other 4xx in a batch: listed in "rejected", with invalid messages.

$r = $t->send_segment('/v1/batch',
    '{"batch":[{"type":"track","userId":"u-400","event":"E"},'
        . '{"type":"track","userId":"u1"},'
        . '{"type":"track","userId":"u-404","event":"E"},'
        . '{"type":"track","userId":"u2","event":"E"},'
        . '{"type":"track","userId":"u-422","event":"E"}]}');
$t->json_response_is($r, 200,
    '{"success":true,"rejected":['
        . '{"index":0,"error":"Stories rejected the event with status 400"},'
        . '{"index":1,"error":"missing event"},'
        . '{"index":2,"error":"Stories rejected the event with status 404"},'
        . '{"index":4,"error":"Stories rejected the event with status 422"}'
        . ']}',
    'batch 4xx rejected');
@records = $t->wait_for_stories(4);
is(scalar @records, 4, 'batch 4xx all sent');

$r = $t->send_segment('/sync/v1/batch',
    '{"batch":[{"type":"track","userId":"u1","event":"E"},'
        . '{"type":"identify","userId":"u-users-400","traits":{}}]}');
$t->json_response_is($r, 200,
    '{"success":true,"rejected":['
        . '{"index":1,"error":"Stories rejected the user with status 400"}'
        . ']}',
    'batch users 400');

# Concurrency: at most stories_concurrency requests in flight.

my @users = map { "u-wait-$_" } 1 .. 12;
$t->set_stories_rules({ delay => 0.5 });

$r = $t->send_segment('/v1/batch', batch(@users));
$t->json_response_is($r, 200, '{"success":true}', 'default concurrency');
is(scalar $t->stories_requests(), 12, 'default concurrency all sent');
is($t->stories_peak(), 8, 'default concurrency peak');

my $start = time();
$r = $t->send_segment('/limited/v1/batch', batch(@users[0 .. 5]));
my $elapsed = time() - $start;
$t->json_response_is($r, 200, '{"success":true}', 'concurrency 2');
is(scalar $t->stories_requests(), 6, 'concurrency 2 all sent');
is($t->stories_peak(), 2, 'concurrency 2 peak');
cmp_ok($elapsed, '>=', 1.4, 'concurrency 2 takes three rounds');

$r = $t->send_segment('/sync/v1/identify',
    '{"userId":"u1","traits":{"name":"N"}}');
$t->json_response_is($r, 200, '{"success":true}', 'sync delayed');
is(scalar $t->stories_requests(), 2, 'sync delayed both sent');

$t->set_stories_rules();

unlike($t->read_file('error.log'), qr/\Q$KEY\E/, 'key not in error.log');

$t->stop();

done_testing();
