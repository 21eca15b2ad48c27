#!/usr/bin/perl

# Endpoint mode: write keys (stories_write_key, stories_write_keys_file) and
# the Stories API key read from a file (stories_api_key_file).  A call
# without a valid write key gets 401 and reaches Stories in no form, and
# the API key reaches Stories only in its Authorization header.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Compress::Zlib;
use MIME::Base64 qw(encode_base64);
use Test::More;
use Time::HiRes qw(sleep);

use StoriesTest qw(error_body);

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $KEY = 'test-key-5f1c';
my $FILE_KEY = 'file-api-key-4e7b91';
my $EVENTS = '/v1/events/';
my $SUCCESS = '{"success":true}';

my $WRITE_KEY_1 = 'wk-first-7d2a';
my $WRITE_KEY_2 = 'wk-second-91bf';
my $FILE_WRITE_KEY = 'wk-file-a3c4';
my $CRLF_WRITE_KEY = 'wk-file-crlf-55e0';
my $LAST_WRITE_KEY = 'wk-file-last-0b9d';
my $SERVER_WRITE_KEY = 'wk-server-6c18';
my $LOCATION_WRITE_KEY = 'wk-location-e2f7';

my $TRACK = '{"userId":"u1","event":"Signed Up"}';
my $TRACK_STORIES =
    '{"user_id":"u1","name":"Track","data":{"content":"Signed Up"}}';

my $t = StoriesTest->new();

# The file has an empty line, a line with CRLF and a last line without a
# newline.
$t->write_file('write-keys.txt',
    "$FILE_WRITE_KEY\n\n$CRLF_WRITE_KEY\r\n   \n$LAST_WRITE_KEY");
$t->write_file('api-key.txt', "$FILE_KEY\n");

$t->write_http_conf(<<"EOF");
    server {
        listen 127.0.0.1:%%PORT%%;

        stories_write_key $SERVER_WRITE_KEY;

        location /keys/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_write_key $WRITE_KEY_1;
            stories_write_key $WRITE_KEY_2;
            stories_write_keys_file %%TESTDIR%%/write-keys.txt;
        }

        # Keys set in a location replace the keys of the server.
        location /inner/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_write_key $LOCATION_WRITE_KEY;
        }

        location /server/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
        }

        location /_stories/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
        }
    }

    server {
        listen 127.0.0.1:%%PORT%%;
        server_name open.test;

        location /open/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
        }

        location /filekey/ {
            stories_forward /_stories/;
            stories_api_key_file %%TESTDIR%%/api-key.txt;
        }

        location /_stories/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
        }
    }
EOF

$t->run();

sub basic {
    my ($credentials) = @_;
    return 'Basic ' . encode_base64($credentials, '');
}

# Client headers of a call: JSON content type, the given Authorization
# value (none when undef) and headers that must not reach Stories.
sub call_headers {
    my ($authorization, @extra) = @_;
    my @headers = (['Content-Type', 'application/json']);
    push @headers, ['Authorization', $authorization] if defined $authorization;
    push @headers, ['Cookie', 'session=client-cookie-1'],
        ['X-Client-Id', 'client-header-1'], @extra;
    return \@headers;
}

# Posts a call that must be rejected for its write key: 401 with the
# challenge, and nothing forwarded.
sub rejected_ok {
    my ($name, $path, $body, $headers) = @_;

    my $r = $t->send_segment($path, $body, headers => $headers);
    $t->json_response_is($r, 401, error_body('missing or invalid write key'),
        $name);
    is($r && $r->{headers}{'www-authenticate'}, 'Basic realm="stories"',
        "$name www-authenticate");
    $t->nothing_forwarded($name, 0.2);
    return;
}

# Posts a call that must be accepted: 200 and exactly one Stories request
# with the expected body, authorized with $key.
sub accepted_ok {
    my ($name, $path, $body, $headers, $stories_body, $key) = @_;

    my $r = $t->send_segment($path, $body, headers => $headers);
    $t->json_response_is($r, 200, $SUCCESS, $name);
    is($r && $r->{headers}{'www-authenticate'}, undef,
        "$name no www-authenticate");

    $t->wait_for_stories(1);
    sleep 0.1;
    my @records = $t->stories_requests();
    is(scalar @records, 1, "$name one stories request")
        or diag(join "\n", map { "$_->{uri} $_->{body}" } @records);
    $t->stories_request_is($records[0], $EVENTS, $stories_body,
        defined $key ? $key : $KEY, $name);
    return;
}

# Write keys in an Authorization header.

rejected_ok('no key', '/keys/v1/track', $TRACK, call_headers(undef));
rejected_ok('wrong basic key', '/keys/v1/track', $TRACK,
    call_headers(basic('wk-wrong-0000:')));
rejected_ok('prefix of a key', '/keys/v1/track', $TRACK,
    call_headers(basic(substr($WRITE_KEY_1, 0, -1) . ':')));
rejected_ok('key with a byte added', '/keys/v1/track', $TRACK,
    call_headers(basic("${WRITE_KEY_1}x:")));
rejected_ok('key in upper case', '/keys/v1/track', $TRACK,
    call_headers(basic(uc($WRITE_KEY_1) . ':')));
rejected_ok('key as password', '/keys/v1/track', $TRACK,
    call_headers(basic(":$WRITE_KEY_1")));
rejected_ok('empty user name', '/keys/v1/track', $TRACK,
    call_headers(basic(':')));
rejected_ok('empty credentials', '/keys/v1/track', $TRACK,
    call_headers('Basic '));
rejected_ok('key with CR from file', '/keys/v1/track', $TRACK,
    call_headers(basic("$CRLF_WRITE_KEY\r:")));
rejected_ok('bearer scheme', '/keys/v1/track', $TRACK,
    call_headers("Bearer $WRITE_KEY_1"));
rejected_ok('key not in base64', '/keys/v1/track', $TRACK,
    call_headers("Basic $WRITE_KEY_1:"));
rejected_ok('invalid base64', '/keys/v1/track', $TRACK,
    call_headers('Basic !!!!'));
rejected_ok('server key replaced', '/inner/v1/track', $TRACK,
    call_headers(basic("$SERVER_WRITE_KEY:")));

accepted_ok('first key', '/keys/v1/track', $TRACK,
    call_headers(basic("$WRITE_KEY_1:")), $TRACK_STORIES);
accepted_ok('second key', '/keys/v1/track', $TRACK,
    call_headers(basic("$WRITE_KEY_2:")), $TRACK_STORIES);
accepted_ok('file key', '/keys/v1/track', $TRACK,
    call_headers(basic("$FILE_WRITE_KEY:")), $TRACK_STORIES);
accepted_ok('file key from CRLF line', '/keys/v1/track', $TRACK,
    call_headers(basic("$CRLF_WRITE_KEY:")), $TRACK_STORIES);
accepted_ok('file key without newline', '/keys/v1/track', $TRACK,
    call_headers(basic("$LAST_WRITE_KEY:")), $TRACK_STORIES);
accepted_ok('key with a password', '/keys/v1/track', $TRACK,
    call_headers(basic("$WRITE_KEY_2:not-empty")), $TRACK_STORIES);
accepted_ok('scheme in lower case', '/keys/v1/track', $TRACK,
    call_headers('basic ' . encode_base64("$WRITE_KEY_1:", '')),
    $TRACK_STORIES);
accepted_ok('location key', '/inner/v1/track', $TRACK,
    call_headers(basic("$LOCATION_WRITE_KEY:")), $TRACK_STORIES);
accepted_ok('server key inherited', '/server/v1/track', $TRACK,
    call_headers(basic("$SERVER_WRITE_KEY:")), $TRACK_STORIES);
rejected_ok('location key at server level', '/server/v1/track', $TRACK,
    call_headers(basic("$LOCATION_WRITE_KEY:")));

# Write keys in the body's writeKey field.

my $batch_body = qq({"writeKey":"$WRITE_KEY_2","batch":[)
    . '{"type":"track","userId":"u1","event":"Signed Up"}]}';

accepted_ok('body key single call', '/keys/v1/track',
    qq({"writeKey":"$WRITE_KEY_1","userId":"u1","event":"Signed Up"}),
    call_headers(undef), $TRACK_STORIES);
accepted_ok('body key batch', '/keys/v1/batch', $batch_body,
    call_headers(undef), $TRACK_STORIES);
accepted_ok('body key from file', '/keys/v1/t',
    qq({"userId":"u1","event":"Signed Up","writeKey":"$FILE_WRITE_KEY"}),
    call_headers(undef), $TRACK_STORIES);
accepted_ok('wrong basic key, body key', '/keys/v1/track',
    qq({"writeKey":"$WRITE_KEY_1","userId":"u1","event":"Signed Up"}),
    call_headers(basic('wk-wrong-0000:')), $TRACK_STORIES);

# The key is read from the inflated body.
accepted_ok('body key in gzip body', '/keys/v1/track',
    Compress::Zlib::memGzip(
        qq({"writeKey":"$WRITE_KEY_1","userId":"u1","event":"Signed Up"})),
    call_headers(undef, ['Content-Encoding', 'gzip']), $TRACK_STORIES);
rejected_ok('wrong body key in gzip body', '/keys/v1/track',
    Compress::Zlib::memGzip(
        '{"writeKey":"wk-wrong-0000","userId":"u1","event":"Signed Up"}'),
    call_headers(undef, ['Content-Encoding', 'gzip']));

rejected_ok('wrong body key', '/keys/v1/track',
    '{"writeKey":"wk-wrong-0000","userId":"u1","event":"Signed Up"}',
    call_headers(undef));
rejected_ok('body key prefix', '/keys/v1/track',
    '{"writeKey":"' . substr($WRITE_KEY_1, 0, -1)
        . '","userId":"u1","event":"Signed Up"}',
    call_headers(undef));
rejected_ok('body key with a byte added', '/keys/v1/track',
    qq({"writeKey":"${WRITE_KEY_1}x","userId":"u1","event":"Signed Up"}),
    call_headers(undef));
rejected_ok('empty body key', '/keys/v1/track',
    '{"writeKey":"","userId":"u1","event":"Signed Up"}',
    call_headers(undef));
rejected_ok('body key not a string', '/keys/v1/track',
    '{"writeKey":["' . $WRITE_KEY_1 . '"],"userId":"u1","event":"Signed Up"}',
    call_headers(undef));
rejected_ok('body key in a batch message only', '/keys/v1/batch',
    '{"batch":[{"type":"track","writeKey":"' . $WRITE_KEY_1
        . '","userId":"u1","event":"Signed Up"}]}',
    call_headers(undef));
rejected_ok('wrong body key in batch', '/keys/v1/batch',
    '{"writeKey":"wk-wrong-0000","batch":[{"type":"track","userId":"u1",'
        . '"event":"Signed Up"}]}',
    call_headers(undef));

# Without a configured write key, calls need none.

$t->clear_stories();
my $r = $t->request('POST', '/open/v1/track', $TRACK,
    call_headers(undef, ['Host', 'open.test']));
$t->json_response_is($r, 200, $SUCCESS, 'no key configured');
my @records = $t->wait_for_stories(1);
is(scalar @records, 1, 'no key configured one stories request');
$t->stories_request_is($records[0], $EVENTS, $TRACK_STORIES, $KEY,
    'no key configured');

# The API key from a file, with its trailing newline stripped.

$t->clear_stories();
$r = $t->request('POST', '/filekey/v1/track', $TRACK,
    call_headers(basic('someone:'), ['Host', 'open.test']));
$t->json_response_is($r, 200, $SUCCESS, 'api key file');
my @key_file_responses = ($r);
@records = $t->wait_for_stories(1);
sleep 0.1;
@records = $t->stories_requests();
is(scalar @records, 1, 'api key file one stories request');
$t->stories_request_is($records[0], $EVENTS, $TRACK_STORIES, $FILE_KEY,
    'api key file');
is_deeply([StoriesTest::header_values($records[0], 'Authorization')],
    ["Bearer $FILE_KEY"], 'api key file exact authorization');

# A Stories 401 makes the module report a rejected key; the key itself
# appears in no response and no log line.

$t->set_stories_rules({ status => 401, body => '{"error":"unauthorized"}' });
$t->clear_stories();
$r = $t->request('POST', '/filekey/v1/track', $TRACK,
    call_headers(undef, ['Host', 'open.test']));
$t->json_response_is($r, 503, error_body('Stories rejected the API key'),
    'api key file rejected by stories');
$t->set_stories_rules();
push @key_file_responses, $r;

for my $i (0 .. $#key_file_responses) {
    my $response = $key_file_responses[$i];
    my $text = join "\n", map { "$_->[0]: $_->[1]" }
        @{ $response ? $response->{header_list} : [] };
    $text .= "\n\n" . ($response ? $response->{body} : '');
    unlike($text, qr/\Q$FILE_KEY\E/, "api key not in response #$i");
}

$t->stop();

my $log = $t->read_file('error.log');
like($log, qr/API key rejected/, 'error.log reports the rejected key');
for my $secret ($FILE_KEY, $KEY, $WRITE_KEY_1, $WRITE_KEY_2, $FILE_WRITE_KEY,
                $CRLF_WRITE_KEY, $LAST_WRITE_KEY, $LOCATION_WRITE_KEY,
                $SERVER_WRITE_KEY)
{
    unlike($log, qr/\Q$secret\E/, "error.log does not contain $secret");
}

# nginx -t on API key files that cannot give a key.

my $conf_template = <<'EOF';
    server {
        listen 127.0.0.1:%%PORT%%;

        location /v1/ {
            stories_forward /_stories/;
            stories_api_key_file %%KEY_FILE%%;
        }

        location /_stories/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
        }
    }
EOF

sub test_key_file {
    my ($file) = @_;
    my $path = $t->dir() . "/$file";
    (my $http = $conf_template) =~ s/%%KEY_FILE%%/$path/;
    my ($status, $output) = $t->test_config($t->http_conf($http),
        "$file.conf");
    return ($status, $output, $path);
}

my ($status, $output, $path) = test_key_file('no-such-key.txt');
isnt($status, 0, 'missing api key file fails nginx -t');
like($output, qr/open\(\) "\Q$path\E" failed/,
    'missing api key file message names the path');

$t->write_file('empty-key.txt', '');
($status, $output, $path) = test_key_file('empty-key.txt');
isnt($status, 0, 'empty api key file fails nginx -t');
like($output, qr/API key file "\Q$path\E" is empty/,
    'empty api key file message names the path');

$t->write_file('newline-key.txt', "\n");
($status, $output, $path) = test_key_file('newline-key.txt');
isnt($status, 0, 'api key file of a newline fails nginx -t');
like($output, qr/API key file "\Q$path\E" is empty/,
    'api key file of a newline message names the path');

$t->write_file('crlf-key.txt', "$FILE_KEY\r\n");
($status, $output, $path) = test_key_file('crlf-key.txt');
is($status, 0, 'api key file with CRLF passes nginx -t')
    or diag($output);

my $spaced_key = 'spaced-secret-9a0c';
$t->write_file('spaced-key.txt', "$spaced_key tail\n");
($status, $output, $path) = test_key_file('spaced-key.txt');
isnt($status, 0, 'api key file with a space fails nginx -t');
like($output, qr/contains a space or a control character/,
    'api key file with a space message');
unlike($output, qr/\Q$spaced_key\E/,
    'api key file with a space message hides the key');

# A write keys file of empty lines only holds no key.

$t->write_file('no-write-keys.txt', "\n\r\n  \n");
my $keys_path = $t->dir() . '/no-write-keys.txt';
($status, $output) = $t->test_config($t->http_conf(<<"EOF"), 'wk.conf');
    server {
        listen 127.0.0.1:%%PORT%%;

        location /v1/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_write_keys_file $keys_path;
        }
    }
EOF
isnt($status, 0, 'write keys file without keys fails nginx -t');
like($output, qr/write keys file "\Q$keys_path\E" has no keys/,
    'write keys file without keys message names the path');

($status, $output) = $t->test_config($t->http_conf(<<"EOF"), 'wk2.conf');
    server {
        listen 127.0.0.1:%%PORT%%;

        location /v1/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_write_keys_file %%TESTDIR%%/no-such-keys.txt;
        }
    }
EOF
isnt($status, 0, 'missing write keys file fails nginx -t');
like($output, qr/open\(\) "[^"]*no-such-keys\.txt" failed/,
    'missing write keys file message names the path');

done_testing();
