#!/usr/bin/perl

# Endpoint mode: hostile input.  Content types other than JSON and text
# are rejected, the \u0000 escape is rejected, and CR and LF in client
# values reach neither the headers of Stories requests nor error.log as
# line breaks.

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
my $WRITE_KEY = 'wk-beacon-3f8d';
my $EVENTS = '/v1/events/';
my $SUCCESS = '{"success":true}';

my $TRACK = '{"userId":"u1","event":"Signed Up"}';
my $TRACK_STORIES =
    '{"user_id":"u1","name":"Track","data":{"content":"Signed Up"}}';

my $t = StoriesTest->new();

$t->write_http_conf(<<"EOF");
    server {
        listen 127.0.0.1:%%PORT%%;

        location /v1/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
        }

        location /keys/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_write_key $WRITE_KEY;
        }

        location /_stories/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
        }
    }
EOF

$t->run();

# Client headers with the given Content-Type (none when undef) and headers
# that must not reach Stories.
sub headers_with_type {
    my ($type) = @_;
    my @headers;
    push @headers, ['Content-Type', $type] if defined $type;
    push @headers, ['Cookie', 'session=client-cookie-1'],
        ['X-Client-Id', 'client-header-1'];
    return \@headers;
}

sub forwards_ok {
    my ($name, $path, $body, $headers, $stories_body) = @_;

    my $r = $t->send_segment($path, $body, headers => $headers);
    $t->json_response_is($r, 200, $SUCCESS, $name);

    $t->wait_for_stories(1);
    sleep 0.1;
    my @records = $t->stories_requests();
    is(scalar @records, 1, "$name one stories request")
        or diag(join "\n", map { "$_->{uri} $_->{body}" } @records);
    $t->stories_request_is($records[0], $EVENTS, $stories_body, $KEY, $name);
    return $records[0];
}

sub rejected_ok {
    my ($name, $path, $body, $headers, $status, $message) = @_;

    my $r = $t->send_segment($path, $body, headers => $headers);
    $t->json_response_is($r, $status, error_body($message), $name);
    $t->nothing_forwarded($name, 0.2);
    return;
}

# Content types.

forwards_ok('json with charset', '/v1/track', $TRACK,
    headers_with_type('application/json; charset=utf-8'), $TRACK_STORIES);
forwards_ok('json upper case', '/v1/track', $TRACK,
    headers_with_type('APPLICATION/JSON'), $TRACK_STORIES);
forwards_ok('text plain', '/v1/track', $TRACK,
    headers_with_type('text/plain'), $TRACK_STORIES);
forwards_ok('no content type', '/v1/track', $TRACK,
    headers_with_type(undef), $TRACK_STORIES);

# navigator.sendBeacon() posts text/plain with the write key in the body.
forwards_ok('beacon with write key', '/keys/v1/t',
    qq({"writeKey":"$WRITE_KEY","userId":"u1","event":"Signed Up"}),
    headers_with_type('text/plain;charset=UTF-8'), $TRACK_STORIES);

my $unsupported = 'unsupported Content-Type; send application/json or '
    . 'text/plain';
for my $type ('application/x-www-form-urlencoded',
              'multipart/form-data; boundary=b1',
              'text/html', 'application/xml', 'application/jsonp',
              'text/plainx')
{
    rejected_ok("content type $type", '/v1/track', $TRACK,
        headers_with_type($type), 415, $unsupported);
}

# Case folding applies to letters only: byte 0x0f is not "/", although
# 0x0f | 0x20 is.
rejected_ok('content type with 0x0f for slash', '/v1/track', $TRACK,
    headers_with_type("application\x0fjson"), 415, $unsupported);
rejected_ok('text type with 0x0f for slash', '/v1/track', $TRACK,
    headers_with_type("text\x0fplain"), 415, $unsupported);

# A form post carrying a valid write key is still rejected.
rejected_ok('form post with write key', '/keys/v1/track',
    qq({"writeKey":"$WRITE_KEY","userId":"u1","event":"Signed Up"}),
    headers_with_type('application/x-www-form-urlencoded'), 415,
    $unsupported);

# The \u0000 escape, which would cut a string at the NUL.

my $nul = 'JSON strings with \u0000 are not supported';
rejected_ok('nul escape in userId', '/v1/track',
    '{"userId":"u1\u0000admin","event":"Signed Up"}',
    headers_with_type('application/json'), 400, $nul);
rejected_ok('nul escape in event', '/v1/track',
    '{"userId":"u1","event":"\u0000"}',
    headers_with_type('application/json'), 400, $nul);
rejected_ok('nul escape in trait name', '/v1/identify',
    '{"userId":"u1","traits":{"a\u0000b":1}}',
    headers_with_type('application/json'), 400, $nul);
rejected_ok('nul escape in batch', '/v1/batch',
    '{"batch":[{"type":"track","userId":"u1","event":"A"},'
        . '{"type":"track","userId":"u2\u0000","event":"B"}]}',
    headers_with_type('application/json'), 400, $nul);

# An escaped backslash followed by "u0000" is six ordinary characters.
forwards_ok('escaped backslash before u0000', '/v1/track',
    '{"userId":"u1","event":"a\\\\u0000"}',
    headers_with_type('application/json'),
    '{"user_id":"u1","name":"Track","data":{"content":"a\\\\u0000"}}');

# CR and LF in values reach Stories only JSON-escaped inside the body, and
# the Stories request carries exactly the module's headers.

my $record = forwards_ok('crlf in values', '/v1/track',
    '{"userId":"u1\r\nX-Injected: 1","event":"E\r\n\r\nGET / HTTP/1.1"}',
    headers_with_type('application/json'),
    '{"user_id":"u1\r\nX-Injected: 1","name":"Track",'
        . '"data":{"content":"E\r\n\r\nGET / HTTP/1.1"}}');

my @names = sort map { lc $_->[0] } @{ $record ? $record->{headers} : [] };
is_deeply(\@names,
    [qw(authorization connection content-length content-type host)],
    'crlf in values stories header names');
is_deeply([StoriesTest::header_values($record, 'Host')],
    ['127.0.0.1:' . $t->stories_port()], 'crlf in values stories host');
is_deeply([StoriesTest::header_values($record, 'Connection')], ['close'],
    'crlf in values stories connection');
is_deeply([StoriesTest::header_values($record, 'X-Injected')], [],
    'crlf in values no injected header');
unlike($record ? $record->{body} : '', qr/[\r\n]/,
    'crlf in values body has no raw CR or LF');

is(scalar(() = $t->requests('stories')), 1,
    'crlf in values no second stories request');

# Unescaped CR and LF inside a string are invalid JSON.  Whether the call
# is rejected or forwarded, no raw CR or LF may reach Stories.
$t->send_segment('/v1/track', qq({"userId":"u1\r\nX-Raw: 1","event":"E"}),
    headers => headers_with_type('application/json'));
sleep 0.3;
for my $raw ($t->stories_requests()) {
    is_deeply([StoriesTest::header_values($raw, 'X-Raw')], [],
        'raw crlf no injected header');
    unlike($raw->{body}, qr/[\r\n]/, 'raw crlf body has no raw CR or LF');
}

# Values copied into error.log become printable ASCII, so a messageId
# cannot start a forged log line, and long ones are cut to 64 bytes.

$t->set_stories_rules({ status => 500 });
my $offset = $t->error_log_offset();

my $r = $t->send_segment('/v1/track',
    '{"userId":"u1","event":"E","messageId":"m1\n2026/01/01 00:00:00 '
        . '[warn] 1#1: forged \"line\""}',
    headers => headers_with_type('application/json'));
$t->json_response_is($r, 502,
    error_body('Stories failed with status 500'), 'forged log line');

$r = $t->send_segment('/v1/track',
    '{"userId":"u1","event":"E","messageId":"' . ('x' x 300) . '"}',
    headers => headers_with_type('application/json'));
$t->json_response_is($r, 502,
    error_body('Stories failed with status 500'), 'long message id');

$t->set_stories_rules();
sleep 0.2;

my $log = $t->error_log_since($offset);
unlike($log, qr/^2026\/01\/01 00:00:00 \[warn\]/m,
    'forged log line does not start a line');
like($log, qr/messageId "m1\?2026\/01\/01 00:00:00 \[warn\] 1#1: forged \?line\?"/,
    'forged log line message id made printable');
like($log, qr/messageId "x{64}"/, 'long message id cut to 64 bytes');

$t->stop();

done_testing();
