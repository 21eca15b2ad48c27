#!/usr/bin/perl

# Endpoint mode: request bodies in memory, in temp files and chunked, the
# body size limit, keepalive client connections, and the config check for
# a missing stories_api_key.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use Time::HiRes qw(sleep);

use StoriesTest;

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $KEY = 'test-key-5f1c';
my $EVENTS = '/v1/events/';
my $SUCCESS = '{"success":true}';

my $t = StoriesTest->new();

$t->write_http_conf(<<"EOF");
    server {
        listen 127.0.0.1:%%PORT%%;
        client_max_body_size 256k;

        location /v1/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
        }

        location /small-buffer/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            client_body_buffer_size 1k;
        }

        location /in-file/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            client_body_in_file_only on;
        }

        location /unlimited/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_max_message_size 0;
        }

        location /limit/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            client_max_body_size 2k;
        }

        location /_stories/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
        }
    }
EOF

$t->run();

# Returns an identify call whose traits hold a string of $size bytes, and
# the Stories body it maps to.  The string mixes ASCII, two-byte UTF-8 and
# escapes so that a byte lost or doubled at a buffer boundary shows.
sub identify_of_size {
    my ($size, $user) = @_;
    my $unit = "abc\xc3\xa9\\n\\\"xyz0123456789 ";
    my $text = substr($unit x (int($size / length $unit) + 1), 0, $size);
    $text =~ s/\\+$//;
    $text =~ s/[\xc3]$//;
    my $traits = qq({"text":"$text","size":$size});
    return (
        qq({"userId":"$user","traits":$traits}),
        qq({"user_id":"$user","name":"Identify","data":{"traits":$traits}}),
    );
}

# Posts $body and checks the response and the single Stories request.
sub body_ok {
    my ($name, $path, $body, $stories_body, %opts) = @_;

    my $r = $t->send_segment($path, $body, %opts);
    $t->json_response_is($r, 200, $SUCCESS, $name);
    my @records = $t->wait_for_stories(1);
    sleep 0.1;
    is(scalar $t->stories_requests(), 1, "$name request count");
    $t->stories_request_is($records[0], $EVENTS, $stories_body, $KEY,
        $name);
    return;
}

my ($body, $stories_body) = identify_of_size(100, 'u-small');
body_ok('small body', '/v1/identify', $body, $stories_body);

($body, $stories_body) = identify_of_size(20000, 'u-20k');
body_ok('20k body', '/v1/identify', $body, $stories_body);

# stories_max_message_size (default 32k) limits one message; 0 turns the
# limit off.
($body, $stories_body) = identify_of_size(200000, 'u-200k');
body_ok('200k body', '/unlimited/v1/identify', $body, $stories_body);

($body) = identify_of_size(40000, 'u-40k');
my $r = $t->send_segment('/v1/identify', $body);
$t->json_response_is($r, 413, '{"success":false,"error":"message is larger '
    . 'than stories_max_message_size 32768 bytes"}', 'message over limit');
$t->nothing_forwarded('message over limit');

# A 200k batch of messages under the message limit.
my (@calls, @events);
for my $n (1 .. 10) {
    my ($call, $event) = identify_of_size(19000, "u-batch-$n");
    $call =~ s/^\{/{"type":"identify",/;
    push @calls, $call;
    push @events, $event;
}
$r = $t->send_segment('/v1/batch', '{"batch":[' . join(',', @calls) . ']}');
$t->json_response_is($r, 200, $SUCCESS, '200k batch');
my @sent = sort map { $_->{body} } $t->wait_for_stories(10);
is(scalar @sent, 10, '200k batch request count');
ok(join("\n", @sent) eq join("\n", sort @events), '200k batch bodies');

# A body larger than client_body_buffer_size goes to a temp file.

my $offset = $t->error_log_offset();
($body, $stories_body) = identify_of_size(6000, 'u-buffered');
body_ok('buffered to file', '/small-buffer/v1/identify', $body,
    $stories_body);
like($t->error_log_since($offset),
    qr/client request body is buffered to a temporary file/,
    'buffered to file log line');

($body, $stories_body) = identify_of_size(300, 'u-in-file');
body_ok('in file small', '/in-file/v1/identify', $body, $stories_body);

($body, $stories_body) = identify_of_size(30000, 'u-in-file-big');
body_ok('in file large', '/in-file/v1/identify', $body, $stories_body);

body_ok('in file batch', '/in-file/v1/batch',
    '{"batch":[{"type":"track","userId":"u1","event":"E"}]}',
    '{"user_id":"u1","name":"Track","data":{"content":"E"}}');

# Chunked request bodies.

($body, $stories_body) = identify_of_size(3000, 'u-chunked');
body_ok('chunked', '/v1/identify', $body, $stories_body, chunked => 500);

body_ok('chunked one piece', '/v1/track',
    '{"userId":"u1","event":"E"}',
    '{"user_id":"u1","name":"Track","data":{"content":"E"}}',
    chunked => 1000);

body_ok('chunked bytewise', '/v1/track',
    qq({"userId":"u1","event":"caf\xc3\xa9"}),
    qq({"user_id":"u1","name":"Track","data":{"content":"caf\xc3\xa9"}}),
    chunked => 1);

($body, $stories_body) = identify_of_size(6000, 'u-chunked-file');
body_ok('chunked to file', '/small-buffer/v1/identify', $body,
    $stories_body, chunked => 700);

($body, $stories_body) = identify_of_size(5000, 'u-chunked-in-file');
body_ok('chunked in file only', '/in-file/v1/identify', $body,
    $stories_body, chunked => 1024);

$r = $t->send_segment('/v1/track', '', chunked => 100);
$t->json_response_is($r, 400, '{"success":false,"error":"empty body"}',
    'chunked empty');
$t->nothing_forwarded('chunked empty', 0.1);

# client_max_body_size

($body, $stories_body) = identify_of_size(1900, 'u-limit');
cmp_ok(length $body, '<=', 2048, 'body under limit size');
body_ok('body under limit', '/limit/v1/identify', $body, $stories_body);

($body) = identify_of_size(4000, 'u-over');
$r = $t->send_segment('/limit/v1/identify', $body);
is($r && $r->{status}, 413, 'body over limit status');
$t->nothing_forwarded('body over limit');

$r = $t->send_segment('/limit/v1/identify', $body, chunked => 512);
is($r && $r->{status}, 413, 'chunked over limit status');
$t->nothing_forwarded('chunked over limit');

# Keepalive: several calls on one client connection.

$t->clear_stories();
my $sock = $t->connect();
my @pairs = $t->client_headers();
my @responses = (
    $t->request_on($sock, 'POST', '/v1/track',
        '{"userId":"ka1","event":"E"}', \@pairs),
    $t->request_on($sock, 'POST', '/v1/track', '{"userId":', \@pairs),
    $t->request_on($sock, 'POST', '/v1/group',
        '{"userId":"ka2","groupId":"g"}', \@pairs),
    $t->request_on($sock, 'GET', '/v1/track'),
    $t->request_on($sock, 'POST', '/small-buffer/v1/identify',
        (identify_of_size(3000, 'ka3'))[0], \@pairs),
    $t->request_on($sock, 'POST', '/v1/track',
        '{"userId":"ka4","event":"E"}', \@pairs, chunked => 7),
);
close $sock;

my @expected = (
    [200, $SUCCESS],
    [400, '{"success":false,"error":"invalid JSON"}'],
    [200, $SUCCESS],
    [405, '{"success":false,"error":"method not allowed; use POST"}'],
    [200, $SUCCESS],
    [200, $SUCCESS],
);
for my $i (0 .. $#expected) {
    $t->json_response_is($responses[$i], @{ $expected[$i] },
        "keepalive #$i");
}
my @records = $t->wait_for_stories(3);
sleep 0.1;
is_deeply([sort map { /"user_id":"(ka\d)"/ ? $1 : $_ }
        map { $_->{body} } $t->stories_requests()],
    ['ka1', 'ka3', 'ka4'], 'keepalive forwarded users');

# Pipelined: two calls written at once, answered in order.

$t->clear_stories();
$sock = $t->connect();
my $pipelined = '';
for my $user ('pipe1', 'pipe2') {
    my $call = qq({"userId":"$user","event":"E"});
    $pipelined .= "POST /v1/track HTTP/1.1\r\nHost: localhost\r\n"
        . "Content-Type: application/json\r\n"
        . 'Content-Length: ' . length($call) . "\r\n\r\n$call";
}
$t->send_raw($sock, $pipelined);
for my $i (1, 2) {
    $r = $t->read_response($sock, 'POST');
    $t->json_response_is($r, 200, $SUCCESS, "pipelined #$i");
}
close $sock;
is(scalar $t->wait_for_stories(2), 2, 'pipelined forwarded');

# A client that closes its connection while Stories has not answered yet.
# nginx must keep serving; stop() checks error.log for alerts.

$t->clear_stories();
$t->set_stories_rules({ delay => 1 });
$sock = $t->connect();
my $call = '{"userId":"gone","event":"E"}';
$t->send_raw($sock, "POST /v1/track HTTP/1.1\r\nHost: localhost\r\n"
    . 'Content-Length: ' . length($call) . "\r\n\r\n$call");
$t->wait_for_stories(1);
close $sock;
sleep 1.5;
$t->set_stories_rules();
$r = $t->send_segment('/v1/track', '{"userId":"after","event":"E"}');
$t->json_response_is($r, 200, $SUCCESS, 'after client close');

# nginx -t: stories_forward needs stories_api_key.

my ($status, $output) = $t->test_config($t->http_conf(<<'EOF'));
    server {
        listen 127.0.0.1:%%PORT%%;
        location /v1/ {
            stories_forward /_stories/;
        }
    }
EOF
isnt($status, 0, 'missing key config test fails');
like($output, qr/stories_api_key/, 'missing key message');

($status, $output) = $t->test_config($t->http_conf(<<'EOF'));
    stories_api_key inherited-key;
    server {
        listen 127.0.0.1:%%PORT%%;
        location /v1/ {
            stories_forward /_stories/;
        }
    }
EOF
is($status, 0, 'inherited key config test passes')
    or diag($output);

($status, $output) = $t->test_config($t->http_conf(<<'EOF'));
    server {
        listen 127.0.0.1:%%PORT%%;
        location /v1/ {
            stories_forward off;
        }
    }
EOF
is($status, 0, 'forward off without key passes')
    or diag($output);

$t->stop();

done_testing();
