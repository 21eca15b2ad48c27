#!/usr/bin/perl

# Endpoint mode: invalid Segment calls (400), wrong methods (405) and
# unknown calls.  None of them may reach Stories.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;

use StoriesTest qw(error_body);

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $KEY = 'test-key-5f1c';

my $t = StoriesTest->new();

$t->write_http_conf(<<"EOF");
    server {
        listen 127.0.0.1:%%PORT%%;

        location / {
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

# Each case: test name, path, request body, error message.
my @bad_requests = (
    ['empty body', '/v1/track', '', 'empty body'],
    ['empty body identify', '/v1/identify', '', 'empty body'],
    ['empty body batch', '/v1/batch', '', 'empty body'],

    ['truncated json', '/v1/track', '{"userId":', 'invalid JSON'],
    ['bare word', '/v1/track', 'userId', 'invalid JSON'],
    ['trailing word', '/v1/track', '{"userId":"u1","event":"E"} x',
        'invalid JSON'],
    ['trailing object', '/v1/track', '{"userId":"u1","event":"E"}{}',
        'invalid JSON'],
    ['single quotes', '/v1/track', "{'userId':'u1','event':'E'}",
        'invalid JSON'],
    ['invalid json batch', '/v1/batch', '{"batch":[', 'invalid JSON'],

    ['array body', '/v1/track', '[{"userId":"u1","event":"E"}]',
        'body is not a JSON object'],
    ['string body', '/v1/track', '"text"', 'body is not a JSON object'],
    ['number body', '/v1/page', '42', 'body is not a JSON object'],
    ['null body', '/v1/identify', 'null', 'body is not a JSON object'],
    ['array body batch', '/v1/batch',
        '[{"type":"track","userId":"u1","event":"E"}]',
        'body is not a JSON object'],

    ['missing batch', '/v1/batch', '{}', 'missing batch'],
    ['missing batch other key', '/v1/batch', '{"messages":[]}',
        'missing batch'],
    ['missing batch import', '/v1/import', '{"userId":"u1"}',
        'missing batch'],
    ['batch object', '/v1/batch', '{"batch":{}}', 'batch is not an array'],
    ['batch string', '/v1/b', '{"batch":"x"}', 'batch is not an array'],
    # A null batch counts as missing, as null traits count as missing.
    ['batch null', '/v1/batch', '{"batch":null}', 'missing batch'],

    ['track no ids', '/v1/track', '{"event":"E"}',
        'missing userId and anonymousId'],
    ['identify no ids', '/v1/identify', '{"traits":{"a":1}}',
        'missing userId and anonymousId'],
    ['page no ids', '/v1/page', '{}', 'missing userId and anonymousId'],
    ['screen no ids', '/v1/s', '{"name":"S"}',
        'missing userId and anonymousId'],

    ['missing event', '/v1/track', '{"userId":"u1"}', 'missing event'],
    ['missing event short path', '/v1/t', '{"userId":"u1"}',
        'missing event'],

    ['userId true', '/v1/track', '{"userId":true,"event":"E"}',
        'userId is not a string or number'],
    ['userId object', '/v1/identify', '{"userId":{"id":1}}',
        'userId is not a string or number'],
    ['userId array', '/v1/page', '{"userId":["u1"]}',
        'userId is not a string or number'],

    ['event number', '/v1/track', '{"userId":"u1","event":5}',
        'event is not a string'],
    ['event object', '/v1/track', '{"userId":"u1","event":{"a":1}}',
        'event is not a string'],

    ['page name number', '/v1/page', '{"userId":"u1","name":5}',
        'name is not a string'],
    ['screen name array', '/v1/screen', '{"userId":"u1","name":["S"]}',
        'name is not a string'],

    ['traits array', '/v1/identify', '{"userId":"u1","traits":[1]}',
        'traits is not an object'],
    ['traits string', '/v1/identify', '{"userId":"u1","traits":"x"}',
        'traits is not an object'],
    ['traits number', '/v1/i', '{"userId":"u1","traits":5}',
        'traits is not an object'],

    ['integrations true', '/v1/track',
        '{"userId":"u1","event":"E","integrations":true}',
        'integrations is not an object'],
    ['integrations array', '/v1/identify',
        '{"userId":"u1","integrations":["Stories"]}',
        'integrations is not an object'],
);

for my $case (@bad_requests) {
    my ($name, $path, $body, $message) = @$case;
    my $r = $t->send_segment($path, $body);
    $t->json_response_is($r, 400, error_body($message), $name);
    $t->nothing_forwarded($name, 0.1);
}

# POST without any body or Content-Length header.
$t->clear_stories();
my $r = $t->request('POST', '/v1/track', undef,
    [['Content-Type', 'application/json']]);
$t->json_response_is($r, 400, error_body('empty body'), 'no body');
$t->nothing_forwarded('no body', 0.1);

# Methods other than POST on recognised paths.

my $not_allowed = error_body('method not allowed; use POST');
for my $case (['GET', '/v1/track'], ['GET', '/v1/t'],
              ['PUT', '/v1/identify'], ['DELETE', '/v1/batch'],
              ['GET', '/v1/import'], ['GET', '/v1/group'],
              ['OPTIONS', '/v1/page'], ['GET', '/segment/v1/screen'],
              ['PATCH', '/segment/v1/a'])
{
    my ($method, $path) = @$case;
    my $name = "$method $path";
    $t->clear_stories();
    $r = $t->request($method, $path,
        $method eq 'GET' ? undef : '{"userId":"u1","event":"E"}',
        [['Content-Type', 'application/json']]);
    $t->json_response_is($r, 405, $not_allowed, $name);
    is($r && $r->{headers}{allow}, 'POST', "$name allow header");
    $t->nothing_forwarded($name, 0.1);
}

$t->clear_stories();
$r = $t->request('HEAD', '/v1/track');
is($r && $r->{status}, 405, 'HEAD status');
is($r && $r->{headers}{allow}, 'POST', 'HEAD allow header');
is($r && $r->{headers}{'content-type'}, 'application/json',
    'HEAD content type');
is($r && $r->{body}, '', 'HEAD no body');

# POST to an unknown name after v1.

my $unknown = error_body('unknown call; expected identify, track, page, '
    . 'screen, group, alias or batch');
for my $path ('/v1/foo', '/v1/trackx', '/segment/v1/events') {
    my $r = $t->send_segment($path, '{"userId":"u1","event":"E"}');
    $t->json_response_is($r, 400, $unknown, "unknown $path");
    $t->nothing_forwarded("unknown $path", 0.1);
}

$t->stop();

done_testing();
