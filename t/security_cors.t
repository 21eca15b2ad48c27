#!/usr/bin/perl

# Endpoint mode: CORS with stories_cors_origin.  Preflight requests from an
# allowed origin get 204 with the CORS headers, other origins get 403, and
# without stories_cors_origin OPTIONS gets 405.  Responses to POST carry
# Access-Control-Allow-Origin only for an allowed origin.

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
my $SHOP = 'https://shop.example.com';
my $APP = 'https://app.example.com';
my $WRITE_KEY = 'wk-cors-8b2e';

my $TRACK = '{"userId":"u1","event":"Signed Up"}';
my $TRACK_STORIES =
    '{"user_id":"u1","name":"Track","data":{"content":"Signed Up"}}';

my $t = StoriesTest->new();

$t->write_http_conf(<<"EOF");
    server {
        listen 127.0.0.1:%%PORT%%;

        location /cors/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_cors_origin $SHOP;
            stories_cors_origin $APP;
        }

        location /any/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_cors_origin *;
        }

        location /keys/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_cors_origin $SHOP;
            stories_write_key $WRITE_KEY;
        }

        location /none/ {
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

# Headers of a browser preflight from $origin (none when undef).
sub preflight_headers {
    my ($origin) = @_;
    my @headers;
    push @headers, ['Origin', $origin] if defined $origin;
    push @headers, ['Access-Control-Request-Method', 'POST'],
        ['Access-Control-Request-Headers', 'content-type'];
    return \@headers;
}

sub header_count {
    my ($r, $name) = @_;
    return scalar grep { lc $_->[0] eq lc $name }
        @{ $r ? $r->{header_list} : [] };
}

# Sends a preflight and checks the 204 with every CORS header.
sub preflight_ok {
    my ($name, $path, $origin, $allow_origin) = @_;

    $t->clear_stories();
    my $r = $t->request('OPTIONS', $path, undef, preflight_headers($origin));
    $r ||= { status => 'none', headers => {}, header_list => [], body => '' };

    is($r->{status}, 204, "$name status");
    is($r->{headers}{'access-control-allow-origin'}, $allow_origin,
        "$name allow origin");
    is(header_count($r, 'Access-Control-Allow-Origin'), 1,
        "$name one allow origin");
    is($r->{headers}{'access-control-allow-methods'}, 'POST, OPTIONS',
        "$name allow methods");
    is($r->{headers}{'access-control-allow-headers'},
        'Authorization, Content-Type, Content-Encoding, X-Retry-Count',
        "$name allow headers");
    is($r->{headers}{'access-control-max-age'}, '86400', "$name max age");
    is($r->{headers}{vary}, 'Origin', "$name vary");
    is($r->{headers}{'access-control-allow-credentials'}, undef,
        "$name no allow credentials");
    is($r->{body}, '', "$name no body");
    $t->nothing_forwarded($name, 0.1);
    return;
}

sub preflight_rejected_ok {
    my ($name, $path, $origin) = @_;

    $t->clear_stories();
    my $r = $t->request('OPTIONS', $path, undef, preflight_headers($origin));
    $t->json_response_is($r, 403, error_body('origin not allowed'), $name);
    is(header_count($r, 'Access-Control-Allow-Origin'), 0,
        "$name no allow origin");
    is(header_count($r, 'Access-Control-Allow-Methods'), 0,
        "$name no allow methods");
    $t->nothing_forwarded($name, 0.1);
    return;
}

# Posts a call with $origin (none when undef) and checks the response, its
# CORS headers and the one Stories request.
sub post_ok {
    my ($name, $path, $origin, $allow_origin) = @_;

    my @headers = (['Content-Type', 'application/json']);
    push @headers, ['Origin', $origin] if defined $origin;

    my $r = $t->send_segment($path, $TRACK, headers => \@headers);
    $t->json_response_is($r, 200, $SUCCESS, $name);
    is($r && $r->{headers}{'access-control-allow-origin'}, $allow_origin,
        "$name allow origin");
    is(header_count($r, 'Access-Control-Allow-Origin'),
        defined $allow_origin ? 1 : 0, "$name allow origin count");
    if (defined $allow_origin) {
        is($r && $r->{headers}{vary}, 'Origin', "$name vary");
    }

    $t->wait_for_stories(1);
    sleep 0.1;
    my @records = $t->stories_requests();
    is(scalar @records, 1, "$name one stories request");
    $t->stories_request_is($records[0], $EVENTS, $TRACK_STORIES, $KEY, $name);
    is_deeply([StoriesTest::header_values($records[0], 'Origin')], [],
        "$name no origin at stories");
    return;
}

# Preflight.

preflight_ok('preflight first origin', '/cors/v1/track', $SHOP, $SHOP);
preflight_ok('preflight second origin', '/cors/v1/batch', $APP, $APP);
preflight_ok('preflight short path', '/cors/v1/t', $SHOP, $SHOP);
preflight_ok('preflight any origin', '/any/v1/track',
    'https://other.example.net', '*');

preflight_rejected_ok('preflight other origin', '/cors/v1/track',
    'https://evil.example.net');
preflight_rejected_ok('preflight origin with a suffix', '/cors/v1/track',
    "$SHOP.evil.example.net");
preflight_rejected_ok('preflight origin prefix', '/cors/v1/track',
    substr($SHOP, 0, -1));
preflight_rejected_ok('preflight origin with a port', '/cors/v1/track',
    "$SHOP:8443");
preflight_rejected_ok('preflight origin over http', '/cors/v1/track',
    'http://shop.example.com');
preflight_rejected_ok('preflight null origin', '/cors/v1/track', 'null');
preflight_rejected_ok('preflight without origin', '/cors/v1/track', undef);

# Without stories_cors_origin, OPTIONS is a method the endpoint rejects.

$t->clear_stories();
my $r = $t->request('OPTIONS', '/none/v1/track', undef,
    preflight_headers($SHOP));
$t->json_response_is($r, 405, error_body('method not allowed; use POST'),
    'preflight without cors');
is($r && $r->{headers}{allow}, 'POST', 'preflight without cors allow');
is(header_count($r, 'Access-Control-Allow-Origin'), 0,
    'preflight without cors no allow origin');
$t->nothing_forwarded('preflight without cors', 0.1);

# Simple POST requests.

post_ok('post allowed origin', '/cors/v1/track', $SHOP, $SHOP);
post_ok('post second origin', '/cors/v1/track', $APP, $APP);
post_ok('post any origin', '/any/v1/track', 'https://other.example.net', '*');
post_ok('post other origin', '/cors/v1/track', 'https://evil.example.net',
    undef);
post_ok('post origin with a suffix', '/cors/v1/track',
    "$SHOP.evil.example.net", undef);
post_ok('post without origin', '/cors/v1/track', undef, undef);
post_ok('post without cors', '/none/v1/track', $SHOP, undef);

# Error responses to an allowed origin carry the header too, so the page
# can read the error.

$r = $t->send_segment('/cors/v1/track', '{"userId":"u1"}',
    headers => [['Content-Type', 'application/json'], ['Origin', $SHOP]]);
$t->json_response_is($r, 400, error_body('missing event'),
    'error allowed origin');
is($r && $r->{headers}{'access-control-allow-origin'}, $SHOP,
    'error allowed origin allow origin');
is($r && $r->{headers}{vary}, 'Origin', 'error allowed origin vary');
$t->nothing_forwarded('error allowed origin', 0.1);

$r = $t->send_segment('/cors/v1/track', '{"userId":"u1"}',
    headers => [['Content-Type', 'application/json'],
                ['Origin', 'https://evil.example.net']]);
$t->json_response_is($r, 400, error_body('missing event'),
    'error other origin');
is(header_count($r, 'Access-Control-Allow-Origin'), 0,
    'error other origin no allow origin');

# Browsers send no credentials with a preflight, so it needs no write key.
# A POST without the key gets 401 with the CORS header, so the page can
# read the error.

preflight_ok('preflight with write keys', '/keys/v1/track', $SHOP, $SHOP);

$r = $t->send_segment('/keys/v1/track', $TRACK,
    headers => [['Content-Type', 'application/json'], ['Origin', $SHOP]]);
$t->json_response_is($r, 401, error_body('missing or invalid write key'),
    'post without write key');
is($r && $r->{headers}{'access-control-allow-origin'}, $SHOP,
    'post without write key allow origin');
is($r && $r->{headers}{'www-authenticate'}, 'Basic realm="stories"',
    'post without write key www-authenticate');
$t->nothing_forwarded('post without write key', 0.1);

$t->stop();

done_testing();
