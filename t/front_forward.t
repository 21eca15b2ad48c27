#!/usr/bin/perl

# Front mode: the module in a location with proxy_pass.  Each case checks
# the exact bytes on both sides: what the backend received and what the
# client got back, and what reached Stories (or that nothing did).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use IO::Compress::Gzip qw(gzip $GzipError);
use MIME::Base64 qw(encode_base64);
use Test::More;
use Time::HiRes qw(sleep time);

use StoriesTest;

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $KEY = 'sk-front-4b8e21';
my $WRITE_KEY = 'wk-front-1';
my $EVENTS = '/v1/events/';
my $USERS = '/v1/users';

# Response of the backend mock to every request.
my $BACKEND_STATUS = 202;
my $BACKEND_ID = 'backend-7';
my $BACKEND_BODY = 'accepted by backend 7';

my $STATIC_BODY = "<p>static index</p>\n";

my $t = StoriesTest->new(error_log_level => 'info');

# The harness provides one nginx port.  The second server, with
# stories_forward at server level, listens on a port picked here.
my $SERVER_PORT = StoriesTest::free_port();

$t->write_file('html/index.html', $STATIC_BODY);

$t->write_http_conf(<<"EOF");
    server {
        listen 127.0.0.1:%%PORT%%;
        client_max_body_size 1m;

        location /v1/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /refused/ {
            stories_forward /_refused/;
            stories_api_key $KEY;
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /spooled/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            client_body_buffer_size 1k;
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /keys/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_write_key $WRITE_KEY;
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /dead/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_dead_letter %%TESTDIR%%/dead-letter.jsonl;
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /_stories/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
        }

        location /_refused/ {
            internal;
            proxy_pass http://127.0.0.1:%%CLOSED_PORT%%/;
        }
    }

    server {
        listen 127.0.0.1:$SERVER_PORT;

        stories_forward /_stories/;
        stories_api_key $KEY;
        root %%TESTDIR%%/html;

        location / {
        }

        location /api/ {
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /v1/ {
            stories_sync_users on;
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /off/ {
            stories_forward off;
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        # A call path reached by an internal redirect.  The module leaves
        # the request alone because /_collector/ is internal.
        location /rewritten/ {
            rewrite ^/rewritten/(.*)\$ /_collector/\$1 last;
        }

        location /_collector/ {
            internal;
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /_stories/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
        }
    }
EOF

$t->set_backend_rules({
    status  => $BACKEND_STATUS,
    headers => [['X-Backend-Id', $BACKEND_ID]],
    body    => $BACKEND_BODY,
});

$t->set_stories_rules(
    { body_contains => '"u-500"', status => 500 },
    { body_contains => '"u-503', status => 503 },
);

$t->run();

my @CLIENT = $t->client_headers();
my $BACKEND_HOST = '127.0.0.1:' . $t->backend_port();

############################################################################
# Helpers

sub track {
    my ($user, $message_id) = @_;
    my $id = defined $message_id ? qq(,"messageId":"$message_id") : '';
    return qq({"userId":"$user","event":"E"$id});
}

sub track_event {
    my ($user) = @_;
    return qq({"user_id":"$user","name":"Track","data":{"content":"E"}});
}

# Forgets what both mocks recorded, then sends one request on a new
# connection with "Connection: close".
sub send_front {
    my ($method, $path, $body, $headers, %opts) = @_;
    $t->clear_stories();
    $t->clear_backend();
    return $t->request($method, $path, $body, $headers || \@CLIENT, %opts);
}

# Returns the header pairs that proxy_pass sends to the backend for a
# request with these client headers.  proxy_pass puts its own Host,
# Connection and Content-Length first, then the client's headers in their
# order without Host and Connection.
sub proxied_headers {
    my ($body_length, @pairs) = @_;
    my @expected = (['Host', $BACKEND_HOST], ['Connection', 'close']);
    push @expected, ['Content-Length', $body_length]
        if defined $body_length;
    push @expected, grep { $_->[0] !~ /^(?:Host|Connection)$/i } @pairs;
    return \@expected;
}

# Waits until the backend has recorded one request, then checks its
# method, URI, exact header list and exact body bytes (6 tests).
sub backend_request_is {
    my ($method, $uri, $body, $pairs, $name) = @_;
    my @records = $t->wait_for_backend(1);
    is(scalar @records, 1, "$name backend got one request");
    my $record = $records[0] || { headers => [] };
    is($record->{method}, $method, "$name backend method");
    is($record->{uri}, $uri, "$name backend uri");
    is($record->{version}, 'HTTP/1.0', "$name backend version");
    is_deeply($record->{headers},
        proxied_headers(defined $body ? length $body : undef, @$pairs),
        "$name backend headers");
    StoriesTest::bytes_are($record->{body}, defined $body ? $body : '',
        "$name backend body");
    return;
}

# Checks that the client got the backend's answer unchanged: status,
# header names in order, header values and body (6 tests).
sub backend_response_is {
    my ($response, $connection, $name) = @_;
    $response ||= { status => 'none', headers => {}, header_list => [],
                    body => undef };
    is($response->{status}, $BACKEND_STATUS, "$name client status");
    is_deeply([map { $_->[0] } @{ $response->{header_list} }],
        [qw(Server Date Content-Type Content-Length Connection
            X-Backend-Id)],
        "$name client header names");
    is($response->{headers}{'content-type'}, 'application/json',
        "$name client content type");
    is($response->{headers}{connection}, $connection,
        "$name client connection");
    is($response->{headers}{'x-backend-id'}, $BACKEND_ID,
        "$name client backend header");
    is($response->{body}, $BACKEND_BODY, "$name client body");
    return;
}

# Returns the Stories records sorted by body, for batches whose requests
# run in parallel and arrive in any order.
sub stories_by_body {
    my (@records) = @_;
    return sort { $a->{body} cmp $b->{body} } @records;
}

############################################################################
# Track call passed on: both sides get their bytes.

my $body = track('u1', 'm-pass-1');
my $r = send_front('POST', '/v1/track', $body);
backend_response_is($r, 'close', 'track');
backend_request_is('POST', '/v1/track', $body, \@CLIENT, 'track');
my @records = $t->wait_for_stories(1);
is(scalar @records, 1, 'track one stories request');
$t->stories_request_is($records[0], $EVENTS, track_event('u1'), $KEY,
    'track');
is_deeply([StoriesTest::header_values($records[0], 'Authorization')],
    ["Bearer $KEY"], 'track no client authorization at stories');

# A request that is not POST passes on untouched.

$r = send_front('GET', '/v1/track', undef);
backend_response_is($r, 'close', 'get track');
backend_request_is('GET', '/v1/track', undef, \@CLIENT, 'get track');
$t->nothing_forwarded('get track');

############################################################################
# Bodies the module rejects still reach the backend.

my $offset = $t->error_log_offset();
$body = '{bad';
$r = send_front('POST', '/v1/track', $body);
backend_response_is($r, 'close', 'invalid json');
backend_request_is('POST', '/v1/track', $body, \@CLIENT, 'invalid json');
$t->nothing_forwarded('invalid json');
like($t->wait_for_log($offset, qr/not forwarded/),
    qr/\[info\][^\n]*stories: track call not forwarded: invalid JSON/,
    'invalid json info line');

$offset = $t->error_log_offset();
my @html_headers = (['Content-Type', 'text/html'], @CLIENT[1 .. $#CLIENT]);
$body = track('u1');
$r = send_front('POST', '/v1/track', $body, \@html_headers);
backend_response_is($r, 'close', 'content type html');
backend_request_is('POST', '/v1/track', $body, \@html_headers,
    'content type html');
$t->nothing_forwarded('content type html');
like($t->wait_for_log($offset, qr/not forwarded/),
    qr/\[info\][^\n]*stories: track call not forwarded: unsupported Content-Type; send application\/json or text\/plain/,
    'content type html info line');

$offset = $t->error_log_offset();
$body = '{"userId":"u1"}';
$r = send_front('POST', '/v1/track', $body);
backend_response_is($r, 'close', 'missing event');
backend_request_is('POST', '/v1/track', $body, \@CLIENT, 'missing event');
$t->nothing_forwarded('missing event');
like($t->wait_for_log($offset, qr/not forwarded/),
    qr/\[info\][^\n]*stories: track call not forwarded: missing event/,
    'missing event info line');

############################################################################
# Stories failures: the client still gets the backend's answer.

$offset = $t->error_log_offset();
$body = track('u1', 'm-refused');
my $start = time();
$r = send_front('POST', '/refused/v1/track', $body);
my $elapsed = time() - $start;
ok(defined $r, 'stories refused response arrived');
note(sprintf 'stories refused: client response after %.3f s', $elapsed);
backend_response_is($r, 'close', 'stories refused');
backend_request_is('POST', '/refused/v1/track', $body, \@CLIENT,
    'stories refused');
like($t->wait_for_log($offset, qr/Stories is unreachable/),
    qr/\[error\][^\n]*stories request to "\/v1\/events\/" failed: Stories is unreachable, track call, messageId "m-refused"/,
    'stories refused error line');

$offset = $t->error_log_offset();
$body = track('u-500', 'm-500');
$start = time();
$r = send_front('POST', '/v1/track', $body);
$elapsed = time() - $start;
ok(defined $r, 'stories 500 response arrived');
note(sprintf 'stories 500: client response after %.3f s', $elapsed);
backend_response_is($r, 'close', 'stories 500');
backend_request_is('POST', '/v1/track', $body, \@CLIENT, 'stories 500');
@records = $t->wait_for_stories(1);
$t->stories_request_is($records[0], $EVENTS, track_event('u-500'), $KEY,
    'stories 500');
like($t->wait_for_log($offset, qr/failed with status 500/),
    qr/\[error\][^\n]*stories request to "\/v1\/events\/" failed with status 500, track call, messageId "m-500"/,
    'stories 500 error line');

############################################################################
# Server-level stories_forward.

my %SERVER = (port => $SERVER_PORT);

$r = send_front('GET', '/index.html', undef, \@CLIENT, %SERVER);
is($r && $r->{status}, 200, 'static file status');
is($r && $r->{headers}{'content-type'}, 'text/html',
    'static file content type');
is($r && $r->{body}, $STATIC_BODY, 'static file body');
is(scalar $t->backend_requests(), 0, 'static file backend got nothing');
$t->nothing_forwarded('static file');

$body = '{"orderId":"o-1","userId":"u1","event":"E"}';
$r = send_front('POST', '/api/orders', $body, \@CLIENT, %SERVER);
backend_response_is($r, 'close', 'not a call path');
backend_request_is('POST', '/api/orders', $body, \@CLIENT,
    'not a call path');
$t->nothing_forwarded('not a call path');

$body = track('u1', 'm-server');
$r = send_front('POST', '/v1/track', $body, \@CLIENT, %SERVER);
backend_response_is($r, 'close', 'server level track');
backend_request_is('POST', '/v1/track', $body, \@CLIENT,
    'server level track');
@records = $t->wait_for_stories(1);
$t->stories_request_is($records[0], $EVENTS, track_event('u1'), $KEY,
    'server level track');
sleep 0.3;
is(scalar $t->stories_requests(), 1,
    'server level track exactly one stories request');

# stories_forward off in one location of the server.

$body = track('u1');
$r = send_front('POST', '/off/v1/track', $body, \@CLIENT, %SERVER);
backend_response_is($r, 'close', 'forward off');
backend_request_is('POST', '/off/v1/track', $body, \@CLIENT,
    'forward off');
$t->nothing_forwarded('forward off');

############################################################################
# Internal locations are never translated.

# The Stories location gets only the mapped requests: identify with
# stories_sync_users makes exactly one events and one users request, and a
# POST to /_stories/v1/users is not taken for a call by the module.

$offset = $t->error_log_offset();
$body = '{"userId":"u1","traits":{"email":"a@b.c"}}';
$r = send_front('POST', '/v1/identify', $body, \@CLIENT, %SERVER);
backend_response_is($r, 'close', 'sync identify');
backend_request_is('POST', '/v1/identify', $body, \@CLIENT,
    'sync identify');
@records = sort { $a->{uri} cmp $b->{uri} } $t->wait_for_stories(2);
sleep 0.5;
is(scalar $t->stories_requests(), 2,
    'sync identify exactly two stories requests');
$t->stories_request_is($records[0], $EVENTS,
    '{"user_id":"u1","name":"Identify","data":{"traits":{"email":"a@b.c"}}}',
    $KEY, 'sync identify events');
$t->stories_request_is($records[1], $USERS,
    '{"user_id":"u1","email":"a@b.c","attributes":{"email":"a@b.c"}}',
    $KEY, 'sync identify users');
is(scalar $t->backend_requests(), 1, 'sync identify one backend request');
unlike($t->error_log_since($offset), qr/unknown call|not forwarded/,
    'sync identify subrequests not taken for calls');

# A main request that an internal redirect sent to an internal location
# with a call path.

$body = track('u1');
$r = send_front('POST', '/rewritten/v1/track', $body, \@CLIENT, %SERVER);
backend_response_is($r, 'close', 'internal location');
backend_request_is('POST', '/_collector/v1/track', $body, \@CLIENT,
    'internal location');
$t->nothing_forwarded('internal location');

############################################################################
# A large batch spooled to a temporary file, with at most 8 Stories
# requests at once.

my $pad = 'p' x 200;
my @users = map { sprintf 'u-big-%03d', $_ } 1 .. 300;
$body = '{"batch":['
    . join(',', map {
        qq({"type":"track","userId":"$_","event":"E",)
            . qq("properties":{"pad":"$pad"},"messageId":"m-$_"})
    } @users)
    . ']}';
cmp_ok(length $body, '>', 65536, 'large batch body is over 64 KB');

# A short delay makes the requests overlap, so the peak shows the limit.
$t->set_stories_rules({ delay => 0.02 });
$offset = $t->error_log_offset();
$r = send_front('POST', '/spooled/v1/batch', $body);
backend_response_is($r, 'close', 'large batch');
backend_request_is('POST', '/spooled/v1/batch', $body, \@CLIENT,
    'large batch');
like($t->error_log_since($offset),
    qr/a client request body is buffered to a temporary file/,
    'large batch body spooled to a file');

@records = $t->wait_for_stories(300, 30);
is(scalar @records, 300, 'large batch all stories requests');
is_deeply([map { $_->{body} } stories_by_body(@records)],
    [map { track_event($_) } @users], 'large batch stories bodies');
is_deeply([sort { $a cmp $b } map { $_->{uri} } @records],
    [($EVENTS) x 300], 'large batch stories paths');
is(scalar(grep {
        join('|', StoriesTest::header_values($_, 'Authorization'))
            eq "Bearer $KEY"
    } @records), 300, 'large batch stories authorization');
my $peak = $t->stories_peak();
cmp_ok($peak, '<=', 8, 'large batch at most 8 in flight');
cmp_ok($peak, '>=', 2, 'large batch requests overlap');
$t->set_stories_rules(
    { body_contains => '"u-500"', status => 500 },
    { body_contains => '"u-503', status => 503 },
);

############################################################################
# A chunked request body.

$body = '{"batch":[{"type":"track","userId":"u-c1","event":"E"},'
    . '{"type":"page","userId":"u-c2","name":"Home"}]}';
$r = send_front('POST', '/v1/batch', $body, \@CLIENT, chunked => 7);
backend_response_is($r, 'close', 'chunked');
backend_request_is('POST', '/v1/batch', $body, \@CLIENT, 'chunked');
@records = stories_by_body($t->wait_for_stories(2));
is(scalar @records, 2, 'chunked two stories requests');
$t->stories_request_is($records[0], $EVENTS, track_event('u-c1'), $KEY,
    'chunked track');
$t->stories_request_is($records[1], $EVENTS,
    '{"user_id":"u-c2","name":"Page","data":{"content":"Home"}}', $KEY,
    'chunked page');

############################################################################
# A gzip body: the backend gets the compressed bytes.

my $plain = track('u-gz', 'm-gz');
my $compressed;
gzip(\$plain => \$compressed) or die "gzip failed: $GzipError\n";
my @gzip_headers = (@CLIENT, ['Content-Encoding', 'gzip']);
$r = send_front('POST', '/v1/track', $compressed, \@gzip_headers);
backend_response_is($r, 'close', 'gzip');
backend_request_is('POST', '/v1/track', $compressed, \@gzip_headers,
    'gzip');
@records = $t->wait_for_stories(1);
$t->stories_request_is($records[0], $EVENTS, track_event('u-gz'), $KEY,
    'gzip');

############################################################################
# Write keys: a call without a valid key reaches the backend only.

my @no_auth = grep { $_->[0] ne 'Authorization' } @CLIENT;
my @key_auth = (@no_auth,
    ['Authorization', 'Basic ' . encode_base64("$WRITE_KEY:", '')]);

for my $case (['no key', \@no_auth], ['client basic', \@CLIENT]) {
    my ($name, $headers) = @$case;
    $offset = $t->error_log_offset();
    $body = track('u1');
    $r = send_front('POST', '/keys/v1/track', $body, $headers);
    backend_response_is($r, 'close', "write key $name");
    backend_request_is('POST', '/keys/v1/track', $body, $headers,
        "write key $name");
    $t->nothing_forwarded("write key $name");
    like($t->wait_for_log($offset, qr/not forwarded/),
        qr/\[info\][^\n]*stories: track call not forwarded: missing or invalid write key/,
        "write key $name info line");
}

$body = track('u1');
$r = send_front('POST', '/keys/v1/track', $body, \@key_auth);
backend_response_is($r, 'close', 'write key basic');
backend_request_is('POST', '/keys/v1/track', $body, \@key_auth,
    'write key basic');
@records = $t->wait_for_stories(1);
$t->stories_request_is($records[0], $EVENTS, track_event('u1'), $KEY,
    'write key basic');

$body = qq({"userId":"u1","event":"E","writeKey":"$WRITE_KEY"});
$r = send_front('POST', '/keys/v1/track', $body, \@no_auth);
backend_response_is($r, 'close', 'write key in body');
backend_request_is('POST', '/keys/v1/track', $body, \@no_auth,
    'write key in body');
@records = $t->wait_for_stories(1);
$t->stories_request_is($records[0], $EVENTS, track_event('u1'), $KEY,
    'write key in body');

############################################################################
# Dead-letter file: every failed Stories request is written.

$offset = $t->error_log_offset();
$body = '{"batch":['
    . '{"type":"track","userId":"u-503-a","event":"E","messageId":"d-1"},'
    . '{"type":"track","userId":"u-ok","event":"E","messageId":"d-2"},'
    . '{"type":"track","userId":"u-503-b","event":"E"}]}';
$r = send_front('POST', '/dead/v1/batch', $body);
backend_response_is($r, 'close', 'dead letter');
backend_request_is('POST', '/dead/v1/batch', $body, \@CLIENT,
    'dead letter');
@records = $t->wait_for_stories(3);
is(scalar @records, 3, 'dead letter all stories requests');

my @lines;
my $deadline = time() + 5;
while (1) {
    @lines = split /\n/, $t->read_file('dead-letter.jsonl');
    last if @lines >= 2 || time() >= $deadline;
    sleep 0.05;
}
sleep 0.3;
@lines = sort { $a cmp $b } split /\n/, $t->read_file('dead-letter.jsonl');
is(scalar @lines, 2, 'dead letter two lines');

my $TIME = qr/\{"time":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",/;
like($lines[0] || '',
    qr/^$TIME"path":"\/v1\/events\/","status":503,"error":"Stories failed","messageId":"d-1","body":\{"user_id":"u-503-a","name":"Track","data":\{"content":"E"\}\}\}$/,
    'dead letter line with messageId');
like($lines[1] || '',
    qr/^$TIME"path":"\/v1\/events\/","status":503,"error":"Stories failed","messageId":null,"body":\{"user_id":"u-503-b","name":"Track","data":\{"content":"E"\}\}\}$/,
    'dead letter line without messageId');

my $log = $t->wait_for_log($offset, qr/messageId none/);
like($log,
    qr/\[error\][^\n]*stories request to "\/v1\/events\/" failed with status 503, track call, messageId "d-1"/,
    'dead letter error line with messageId');
like($log,
    qr/\[error\][^\n]*stories request to "\/v1\/events\/" failed with status 503, track call, messageId none/,
    'dead letter error line without messageId');

############################################################################

unlike($t->read_file('error.log'), qr/\Q$KEY\E/, 'key not in error.log');

$t->stop();

done_testing();
