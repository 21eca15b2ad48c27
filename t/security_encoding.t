#!/usr/bin/perl

# Endpoint mode: compressed bodies.  gzip (one member or several), x-gzip
# and deflate (zlib or raw) bodies are inflated and forwarded; a body that
# inflates past stories_max_batch_size, a corrupt or truncated stream and
# an unknown Content-Encoding are rejected with nothing forwarded, and the
# worker goes on serving calls with its memory bounded.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Compress::Zlib;
use Test::More;
use Time::HiRes qw(sleep time);

use StoriesTest qw(error_body);

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $KEY = 'test-key-5f1c';
my $EVENTS = '/v1/events/';
my $SUCCESS = '{"success":true}';
my $BATCH_MAX = 300;

my $TRACK = '{"userId":"u1","event":"Signed Up"}';
my $TRACK_STORIES =
    '{"user_id":"u1","name":"Track","data":{"content":"Signed Up"}}';

my $t = StoriesTest->new();

$t->write_http_conf(<<"EOF");
    server {
        listen 127.0.0.1:%%PORT%%;
        client_max_body_size 2m;

        location /v1/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
        }

        location /small/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_max_batch_size $BATCH_MAX;
        }

        location /file/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            client_body_buffer_size 1k;
            client_body_in_file_only on;
        }

        location /_stories/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
        }
    }
EOF

$t->run();

sub gzip_bytes {
    my ($data) = @_;
    return Compress::Zlib::memGzip($data);
}

sub zlib_bytes {
    my ($data) = @_;
    return Compress::Zlib::compress($data, Z_BEST_COMPRESSION);
}

sub raw_deflate_bytes {
    my ($data) = @_;
    my ($stream, $status) = deflateInit(-Level => Z_BEST_COMPRESSION,
        -WindowBits => -MAX_WBITS);
    die "deflateInit failed: $status\n" unless $stream;
    my ($out) = $stream->deflate($data);
    my ($end) = $stream->flush();
    return $out . $end;
}

# Compresses $total bytes of zeros, one 1 MiB piece at a time, so that the
# test never holds the inflated data.  $bits selects gzip (31) or zlib (15).
sub compressed_zeros {
    my ($bits, $total) = @_;
    my ($stream, $status) = deflateInit(-Level => Z_BEST_COMPRESSION,
        -WindowBits => $bits, -Strategy => Z_RLE);
    die "deflateInit failed: $status\n" unless $stream;
    my $piece = "\0" x (1 << 20);
    my $out = '';
    for (1 .. $total / length $piece) {
        my ($bytes) = $stream->deflate($piece);
        $out .= $bytes;
    }
    my ($end) = $stream->flush();
    return $out . $end;
}

sub headers_with {
    my (@pairs) = @_;
    return [['Content-Type', 'application/json'], @pairs,
        ['Cookie', 'session=client-cookie-1'],
        ['X-Client-Id', 'client-header-1']];
}

# Posts a body and checks 200 and exactly one Stories request.
sub forwards_ok {
    my ($name, $path, $body, $headers, $stories_body, %opts) = @_;

    my $r = $t->send_segment($path, $body, headers => $headers, %opts);
    $t->json_response_is($r, 200, $SUCCESS, $name);

    $t->wait_for_stories(1);
    sleep 0.1;
    my @records = $t->stories_requests();
    is(scalar @records, 1, "$name one stories request")
        or diag(join "\n", map { "$_->{uri} $_->{body}" } @records);
    $t->stories_request_is($records[0], $EVENTS, $stories_body, $KEY, $name);
    return;
}

sub rejected_ok {
    my ($name, $path, $body, $headers, $status, $message, %opts) = @_;

    my $r = $t->send_segment($path, $body, headers => $headers, %opts);
    $t->json_response_is($r, $status, error_body($message), $name);
    $t->nothing_forwarded($name, 0.2);
    return;
}

sub worker_serves_ok {
    my ($name) = @_;
    forwards_ok("$name then plain call", '/v1/track', $TRACK, headers_with(),
        $TRACK_STORIES);
    return;
}

# Peak resident memory of the nginx worker in kB, from /proc.
sub worker_peak_kb {
    my $master = $t->{nginx_pid};
    for my $stat (glob '/proc/[0-9]*/stat') {
        open my $fh, '<', $stat or next;
        my $line = <$fh>;
        close $fh;
        next unless defined $line;
        my ($pid, $ppid) = $line =~ /^(\d+) \(.*\) \S+ (\d+)/ or next;
        next unless $ppid == $master;

        open $fh, '<', "/proc/$pid/status" or next;
        my ($peak) = map { /^VmHWM:\s+(\d+) kB/ ? $1 : () } <$fh>;
        close $fh;
        return $peak if defined $peak;
    }
    return undef;
}

# Encodings that are inflated.

forwards_ok('gzip', '/v1/track', gzip_bytes($TRACK),
    headers_with(['Content-Encoding', 'gzip']), $TRACK_STORIES);
forwards_ok('x-gzip', '/v1/track', gzip_bytes($TRACK),
    headers_with(['Content-Encoding', 'x-gzip']), $TRACK_STORIES);
forwards_ok('gzip mixed case', '/v1/track', gzip_bytes($TRACK),
    headers_with(['Content-Encoding', 'GZip']), $TRACK_STORIES);
forwards_ok('zlib deflate', '/v1/track', zlib_bytes($TRACK),
    headers_with(['Content-Encoding', 'deflate']), $TRACK_STORIES);
forwards_ok('raw deflate', '/v1/track', raw_deflate_bytes($TRACK),
    headers_with(['Content-Encoding', 'deflate']), $TRACK_STORIES);
forwards_ok('identity', '/v1/track', $TRACK,
    headers_with(['Content-Encoding', 'identity']), $TRACK_STORIES);
forwards_ok('gzip batch', '/v1/batch',
    gzip_bytes('{"batch":[{"type":"track","userId":"u1",'
        . '"event":"Signed Up"}]}'),
    headers_with(['Content-Encoding', 'gzip']), $TRACK_STORIES);
forwards_ok('gzip chunked', '/v1/track', gzip_bytes($TRACK),
    headers_with(['Content-Encoding', 'gzip']), $TRACK_STORIES,
    chunked => 7);

# A gzip body of two members (RFC 1952, section 2.2) inflates to their
# concatenation.  The split falls inside a JSON string.
forwards_ok('gzip two members', '/v1/track',
    gzip_bytes(substr($TRACK, 0, 20)) . gzip_bytes(substr($TRACK, 20)),
    headers_with(['Content-Encoding', 'gzip']), $TRACK_STORIES);

# A gzip body larger than client_body_buffer_size, read from a temporary
# file.  The random event compresses poorly, so the body stays large.
my $event = join '', map { chr(97 + int rand 26) } 1 .. 6000;
my $large = gzip_bytes(qq({"userId":"u1","event":"$event"}));
ok(length $large > 2048, 'large gzip body is over 2 KB');
forwards_ok('gzip in temp file', '/file/v1/track', $large,
    headers_with(['Content-Encoding', 'gzip']),
    qq({"user_id":"u1","name":"Track","data":{"content":"$event"}}));

# stories_max_batch_size bounds the inflated body: exactly at the limit is
# accepted, one byte more is rejected.

my $small = '{"batch":[{"type":"track","userId":"u1","event":"Signed Up"}';
my $at_limit = $small . (' ' x ($BATCH_MAX - length($small) - 2)) . ']}';
is(length $at_limit, $BATCH_MAX, 'inflated batch at the limit is 300 bytes');
forwards_ok('gzip inflating to the limit', '/small/v1/batch',
    gzip_bytes($at_limit), headers_with(['Content-Encoding', 'gzip']),
    $TRACK_STORIES);
rejected_ok('gzip inflating one past the limit', '/small/v1/batch',
    gzip_bytes($at_limit . ' '), headers_with(['Content-Encoding', 'gzip']),
    413, "body inflates to more than stories_max_batch_size $BATCH_MAX bytes");
rejected_ok('gzip members inflating one past the limit', '/small/v1/batch',
    gzip_bytes(substr($at_limit, 0, 150)) . gzip_bytes(substr($at_limit, 150))
        . gzip_bytes(' '),
    headers_with(['Content-Encoding', 'gzip']),
    413, "body inflates to more than stories_max_batch_size $BATCH_MAX bytes");
rejected_ok('deflate inflating one past the limit', '/small/v1/batch',
    zlib_bytes($at_limit . ' '),
    headers_with(['Content-Encoding', 'deflate']),
    413, "body inflates to more than stories_max_batch_size $BATCH_MAX bytes");

# Bodies of about 260 KB that inflate to 256 MiB of zeros.

worker_serves_ok('before bombs');
my $peak_before = worker_peak_kb();
ok(defined $peak_before, 'worker memory readable');

my $bomb_size = 256 << 20;
for my $case (['gzip bomb', 31, 'gzip'], ['deflate bomb', 15, 'deflate']) {
    my ($name, $bits, $encoding) = @$case;
    my $bomb = compressed_zeros($bits, $bomb_size);
    ok(length $bomb < 300_000, "$name is under 300 KB");

    my $started = time();
    rejected_ok($name, '/v1/track', $bomb,
        headers_with(['Content-Encoding', $encoding]), 413,
        'body inflates to more than stories_max_batch_size 512000 bytes');
    diag(sprintf '%s answered in %.3f s', $name, time() - $started);
    worker_serves_ok($name);
}

# Inflation stops at 512000 bytes of output, so the worker's peak memory
# grows by far less than the 256 MiB the bombs inflate to.
my $peak_after = worker_peak_kb();
ok(defined $peak_after && defined $peak_before
    && $peak_after - $peak_before < 64 * 1024,
    'worker peak memory grew by less than 64 MB')
    or diag('peak before: ' . ($peak_before // 'none') . ' kB, after: '
        . ($peak_after // 'none') . ' kB');

# Corrupt and truncated streams.

my $gzip = gzip_bytes($TRACK);

my $bad_crc = $gzip;
substr($bad_crc, -8, 1) = chr(ord(substr($bad_crc, -8, 1)) ^ 1);
rejected_ok('gzip with wrong crc', '/v1/track', $bad_crc,
    headers_with(['Content-Encoding', 'gzip']), 400, 'invalid gzip body');

rejected_ok('gzip truncated', '/v1/track', substr($gzip, 0, -6),
    headers_with(['Content-Encoding', 'gzip']), 400, 'invalid gzip body');
rejected_ok('gzip header only', '/v1/track', substr($gzip, 0, 10),
    headers_with(['Content-Encoding', 'gzip']), 400, 'invalid gzip body');
rejected_ok('gzip with trailing bytes', '/v1/track', $gzip . 'junk',
    headers_with(['Content-Encoding', 'gzip']), 400, 'invalid gzip body');
rejected_ok('gzip members with trailing zero bytes', '/v1/track',
    $gzip . $gzip . ("\0" x 8),
    headers_with(['Content-Encoding', 'gzip']), 400, 'invalid gzip body');
rejected_ok('gzip second member truncated', '/v1/track',
    $gzip . substr($gzip, 0, -6),
    headers_with(['Content-Encoding', 'gzip']), 400, 'invalid gzip body');
rejected_ok('plain json as gzip', '/v1/track', $TRACK,
    headers_with(['Content-Encoding', 'gzip']), 400, 'invalid gzip body');
rejected_ok('empty gzip body', '/v1/track', '',
    headers_with(['Content-Encoding', 'gzip']), 400, 'invalid gzip body');
rejected_ok('zlib deflate truncated', '/v1/track',
    substr(zlib_bytes($TRACK), 0, -3),
    headers_with(['Content-Encoding', 'deflate']), 400,
    'invalid deflate body');
rejected_ok('plain json as deflate', '/v1/track', $TRACK,
    headers_with(['Content-Encoding', 'deflate']), 400,
    'invalid deflate body');
worker_serves_ok('corrupt streams');

# Encodings the module does not decode.

my $unsupported = 'unsupported Content-Encoding; send gzip, deflate or none';
for my $encoding ('br', 'compress', 'zstd', 'gzip, br', 'gzip, gzip') {
    rejected_ok("encoding $encoding", '/v1/track', gzip_bytes($TRACK),
        headers_with(['Content-Encoding', $encoding]), 415, $unsupported);
}

# The same body sent uncompressed gets the error for a plain body.
rejected_ok('plain body past the limit', '/small/v1/batch', $at_limit . ' ',
    headers_with(), 413,
    "body is larger than stories_max_batch_size $BATCH_MAX bytes");

$t->stop();

done_testing();
