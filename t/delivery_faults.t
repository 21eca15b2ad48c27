#!/usr/bin/perl

# Delivery faults: how each way a Stories request can fail reaches the
# client, the error log and the dead-letter file, in endpoint mode and in
# front of a backend, with and without stories_dead_letter.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Fcntl qw(:flock);
use IO::Socket::INET;
use JSON::PP;
use POSIX ();
use Socket qw(SOL_SOCKET SO_LINGER);
use Test::More;
use Time::HiRes qw(sleep time);

use StoriesTest qw(error_body);

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

# A key that must never show up in error.log or a dead-letter file.
my $KEY = 'sk-secret-5c81f0e2';
my $EVENTS = '/v1/events/';
my $JSON = JSON::PP->new->utf8->canonical;

my $t = StoriesTest->new(error_log_level => 'info');
my $raw_port = StoriesTest::free_port();

############################################################################
# Raw mock
#
# The harness mock always sends a whole response.  This mock sends the
# bytes of a cut-off response and then closes the connection, with a FIN
# or, for "reset", with an RST (SO_LINGER with a zero timeout).  The first
# entry of @RAW_ANSWERS whose marker the request body contains picks the
# answer, so a marker comes before the markers it contains.  Without a
# marker the mock sends a complete 200.  Each request body is appended to
# raw.log, one per line.

my $HEAD_200 = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n";

my @RAW_ANSWERS = (
    ['cut-status-reset', "HTTP/1.1 20", 'reset'],
    ['cut-status',       "HTTP/1.1 20", 'close'],
    ['cut-headers-200',  "${HEAD_200}Content-Le", 'close'],
    ['cut-headers-500',
        "HTTP/1.1 500 Internal Server Error\r\n"
            . "Content-Type: application/json\r\nContent-Le",
        'close'],
    ['cut-body',
        "${HEAD_200}Content-Length: 100\r\n\r\n0123456789", 'close'],
);

sub start_raw_mock {
    my ($port, $log) = @_;

    my $listen = IO::Socket::INET->new(
        LocalAddr => '127.0.0.1',
        LocalPort => $port,
        Proto     => 'tcp',
        Listen    => 32,
        ReuseAddr => 1,
    ) or die "raw mock cannot listen on 127.0.0.1:$port: $!\n";

    my $pid = fork();
    die "fork: $!\n" unless defined $pid;
    if ($pid == 0) {
        # Own process group, so stop_raw_mock also ends connection
        # processes.
        setpgrp(0, 0);
        $SIG{CHLD} = 'IGNORE';
        while (1) {
            my $conn = $listen->accept or next;
            my $child = fork();
            if (defined $child && $child == 0) {
                close $listen;
                serve_raw_connection($conn, $log);
                POSIX::_exit(0);
            }
            close $conn;
        }
    }
    close $listen;
    return $pid;
}

sub serve_raw_connection {
    my ($conn, $log) = @_;

    my $buffer = '';
    while ($buffer !~ /\r\n\r\n/) {
        sysread($conn, $buffer, 65536, length $buffer) or return;
    }
    my $end = index($buffer, "\r\n\r\n") + 4;
    my ($length) = substr($buffer, 0, $end) =~ /^Content-Length:\s*(\d+)/mi;
    $length ||= 0;
    while (length($buffer) < $end + $length) {
        sysread($conn, $buffer, 65536, length $buffer) or return;
    }
    my $body = substr($buffer, $end, $length);

    open my $fh, '>>:raw', $log or die "open $log: $!\n";
    flock $fh, LOCK_EX;
    print {$fh} "$body\n";
    close $fh;

    my ($answer, $ending) = ("${HEAD_200}Content-Length: 2\r\n"
        . "Connection: close\r\n\r\n{}", 'close');
    for my $raw (@RAW_ANSWERS) {
        if (index($body, $raw->[0]) >= 0) {
            (undef, $answer, $ending) = @$raw;
            last;
        }
    }

    syswrite $conn, $answer;
    if ($ending eq 'reset') {
        # Give nginx a moment to read the partial status line, so that
        # the reset arrives after bytes of the response.
        sleep 0.1;
        setsockopt($conn, SOL_SOCKET, SO_LINGER, pack('ii', 1, 0));
    }
    close $conn;
    return;
}

sub stop_raw_mock {
    my ($pid) = @_;
    kill 'TERM', -$pid;
    kill 'TERM', $pid;
    waitpid($pid, 0);
    return;
}

sub raw_requests {
    my $text = $t->read_file('raw.log');
    return grep { $_ ne '' } split /\n/, $text;
}

############################################################################
# Configuration
#
# Each location is /MODE/TARGET/.  MODE is endpoint or front (with
# proxy_pass to the backend mock), each with and without a dead-letter
# file.  TARGET names the internal location that reaches Stories: the
# harness mock, the same mock with a 1 s read timeout, the closed port,
# or the raw mock.

my %MODES = (
    'endpoint'    => { front => 0, dead_letter => undef },
    'endpoint-dl' => { front => 0, dead_letter => 'endpoint-dead.jsonl' },
    'front'       => { front => 1, dead_letter => undef },
    'front-dl'    => { front => 1, dead_letter => 'front-dead.jsonl' },
);

my %TARGETS = (
    stories => 'proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;',
    slow    => "proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;\n"
        . "            proxy_read_timeout 1s;",
    refused => 'proxy_pass http://127.0.0.1:%%CLOSED_PORT%%/;',
    raw     => "proxy_pass http://127.0.0.1:$raw_port/;",
);

my $locations = '';
for my $target (sort keys %TARGETS) {
    $locations .= <<"EOF";
        location /_$target/ {
            internal;
            $TARGETS{$target}
        }

EOF
    for my $mode (sort keys %MODES) {
        my $conf = $MODES{$mode};
        my $extra = '';
        $extra .= "            stories_dead_letter %%TESTDIR%%/"
            . "$conf->{dead_letter};\n" if $conf->{dead_letter};
        $extra .= "            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;\n"
            if $conf->{front};
        $locations .= <<"EOF";
        location /$mode/$target/ {
            stories_forward /_$target/;
            stories_api_key $KEY;
$extra        }

EOF
    }
}

$t->write_http_conf(<<"EOF");
    server {
        listen 127.0.0.1:%%PORT%%;

        location /ok/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
        }

$locations    }
EOF

# The harness mock picks its answer by a marker in the event name.
$t->set_stories_rules(
    { body_contains => '"fault-500"', status => 500,
      body => '{"error":"internal"}' },
    { body_contains => '"fault-503"', status => 503 },
    { body_contains => '"fault-429"', status => 429,
      headers => [['Retry-After', '7']], body => '{"error":"slow down"}' },
    { body_contains => '"fault-401"', status => 401,
      body => '{"error":"bad key"}' },
    { body_contains => '"fault-slow"', delay => 3 },
);

$t->write_file('raw.log', '');
my $raw_pid = start_raw_mock($raw_port, $t->dir() . '/raw.log');

$t->run();

############################################################################
# Helpers

# Returns the lines added to a dead-letter file after byte $offset, after
# waiting up to $timeout seconds for at least $count of them.
sub dead_letter_lines {
    my ($name, $offset, $count, $timeout) = @_;
    my $deadline = time() + $timeout;
    while (1) {
        my $text = substr($t->read_file($name), $offset);
        my @lines = grep { $_ ne '' } split /(?<=\n)/, $text;
        return @lines if @lines >= $count || time() >= $deadline;
        sleep 0.05;
    }
}

# Checks one dead-letter line field by field, and that the body is the
# last field and byte for byte the Stories body.
sub dead_letter_line_is {
    my ($line, $expected, $name) = @_;
    $line = '' unless defined $line;

    like($line, qr/\n\z/, "$name dead letter ends with a newline");
    my $record = eval { $JSON->decode($line) };
    ok($record, "$name dead letter is JSON") or diag("line: $line");
    $record ||= {};

    is_deeply([sort keys %$record],
        [qw(body error messageId path status time)],
        "$name dead letter fields");
    like($record->{time} // '', qr/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/,
        "$name dead letter time");
    is($record->{path}, $EVENTS, "$name dead letter path");
    is($record->{status}, $expected->{status}, "$name dead letter status");
    is($record->{error}, $expected->{error}, "$name dead letter error");
    is($record->{messageId}, $expected->{message_id},
        "$name dead letter messageId");
    like($line, qr/^\{"time":"[^"]*","path":/,
        "$name dead letter time first");
    ok(substr($line, -length($expected->{body}) - 2)
        eq "$expected->{body}}\n", "$name dead letter body last and exact")
        or diag("line: $line");
    unlike($line, qr/\Q$KEY\E/, "$name dead letter has no key");
    return;
}

sub normal_call_works {
    my ($name) = @_;
    my $r = $t->send_segment('/ok/v1/track',
        '{"userId":"u-ok","event":"E"}');
    $t->json_response_is($r, 200, '{"success":true}', "$name then ok");
    return;
}

############################################################################
# Fault matrix

my $RATE_LIMIT = error_body('Stories rate limit reached, retry later');
my $TIMED_OUT = error_body('Stories timed out');
my $UNREACHABLE = error_body('Stories is unreachable');
my $KEY_REJECTED = error_body('Stories rejected the API key');

# Each fault: the internal location, the event marker, the endpoint
# response without a dead-letter file, the dead-letter status and error,
# the error.log line (with %ID% for the quoted messageId), whether the
# harness or raw mock receives the request, and extra response headers.
# A fault with "delivered" is one that the module counts as delivered.
my @FAULTS = (
    {   name => 'refused', target => 'refused', event => 'fault-refused',
        status => 502, body => $UNREACHABLE,
        dead_status => 0, dead_error => 'Stories is unreachable',
        log => 'stories request to "/v1/events/" failed: '
            . 'Stories is unreachable, track call, messageId %ID%',
        mock => undef },
    {   name => 'timeout', target => 'slow', event => 'fault-slow',
        status => 504, body => $TIMED_OUT,
        dead_status => 0, dead_error => 'Stories timed out',
        log => 'stories request to "/v1/events/" timed out, track call, '
            . 'messageId %ID%',
        mock => 'stories' },
    {   name => '500', target => 'stories', event => 'fault-500',
        status => 502, body => error_body('Stories failed with status 500'),
        dead_status => 500, dead_error => 'Stories failed',
        log => 'stories request to "/v1/events/" failed with status 500, '
            . 'track call, messageId %ID%',
        mock => 'stories' },
    {   name => '503', target => 'stories', event => 'fault-503',
        status => 502, body => error_body('Stories failed with status 503'),
        dead_status => 503, dead_error => 'Stories failed',
        log => 'stories request to "/v1/events/" failed with status 503, '
            . 'track call, messageId %ID%',
        mock => 'stories' },
    {   name => '429', target => 'stories', event => 'fault-429',
        status => 429, body => $RATE_LIMIT, retry_after => '7',
        dead_status => 429, dead_error => 'Stories rate limit reached',
        log => 'stories request to "/v1/events/" failed with status 429, '
            . 'track call, messageId %ID%',
        mock => 'stories' },
    {   name => '401', target => 'stories', event => 'fault-401',
        status => 503, body => $KEY_REJECTED,
        dead_status => 401, dead_error => 'Stories rejected the API key',
        log => 'stories API key rejected with status 401, '
            . 'check stories_api_key',
        mock => 'stories' },

    # nginx reads no complete status line: it logs "upstream prematurely
    # closed connection" and the module sees no status at all.
    {   name => 'reset in status line', target => 'raw',
        event => 'cut-status-reset',
        status => 502, body => $UNREACHABLE,
        dead_status => 0, dead_error => 'Stories is unreachable',
        log => 'stories request to "/v1/events/" failed: '
            . 'Stories is unreachable, track call, messageId %ID%',
        mock => 'raw' },
    {   name => 'close in status line', target => 'raw',
        event => 'cut-status',
        status => 502, body => $UNREACHABLE,
        dead_status => 0, dead_error => 'Stories is unreachable',
        log => 'stories request to "/v1/events/" failed: '
            . 'Stories is unreachable, track call, messageId %ID%',
        mock => 'raw' },

    # The status line of a 500 arrived before the close, so the request
    # failed with that status.
    {   name => 'close in 500 headers', target => 'raw',
        event => 'cut-headers-500',
        status => 502, body => error_body('Stories failed with status 500'),
        dead_status => 500, dead_error => 'Stories failed',
        log => 'stories request to "/v1/events/" failed with status 500, '
            . 'track call, messageId %ID%',
        mock => 'raw' },

    # A 2xx status line arrived before the close: Stories took the event,
    # so the module counts the request as delivered even though nginx
    # ends the subrequest with "upstream prematurely closed connection".
    # Writing it to the dead-letter file would make a replay send the
    # event twice.
    {   name => 'close in 200 headers', target => 'raw',
        event => 'cut-headers-200', delivered => 1, mock => 'raw' },
    {   name => 'close in 200 body', target => 'raw',
        event => 'cut-body', delivered => 1, mock => 'raw' },
);

my $serial = 0;

for my $fault (@FAULTS) {
    for my $mode (qw(endpoint endpoint-dl front front-dl)) {
        my $conf = $MODES{$mode};
        my $name = "$fault->{name} $mode";
        my $id = sprintf 'm-%03d', ++$serial;
        my $user = "u-$serial";
        my $body = qq({"userId":"$user","event":"$fault->{event}",)
            . qq("messageId":"$id"});
        my $stories_body = qq({"user_id":"$user","name":"Track",)
            . qq("data":{"content":"$fault->{event}"}});

        my $dead = $conf->{dead_letter};
        my $dead_offset = $dead ? length $t->read_file($dead) : 0;
        my $log_offset = $t->error_log_offset();
        my $raw_before = raw_requests();
        $t->clear_backend();

        my $r = $t->send_segment("/$mode/$fault->{target}/v1/track", $body);

        # The client's response.

        if ($conf->{front}) {
            is($r && $r->{status}, 200, "$name backend status");
            is($r && $r->{body}, '{"ok":true}', "$name backend body");
            my @backend = $t->wait_for_backend(1);
            is(scalar @backend, 1, "$name backend request count");
            is($backend[0] && $backend[0]{body}, $body,
                "$name backend got the body");
        } elsif ($fault->{delivered} || $dead) {
            $t->json_response_is($r, 200, '{"success":true}', $name);
            ok($r && !exists $r->{headers}{'retry-after'},
                "$name no retry-after");
        } else {
            $t->json_response_is($r, $fault->{status}, $fault->{body},
                $name);
            is($r && $r->{headers}{'retry-after'}, $fault->{retry_after},
                "$name retry-after");
        }

        # The dead-letter file: written before the endpoint responds, and
        # in the background in front mode.

        if ($dead) {
            my $expected = $fault->{delivered} ? 0 : 1;
            my @lines = dead_letter_lines($dead, $dead_offset, $expected,
                $conf->{front} ? 5 : 0);
            if ($conf->{front} || $fault->{delivered}) {
                # Catches a line written late or a second line.
                sleep 0.3;
                @lines = dead_letter_lines($dead, $dead_offset, 0, 0);
            }
            is(scalar @lines, $expected, "$name dead letter line count")
                or diag(join '', @lines);
            if (!$fault->{delivered}) {
                dead_letter_line_is($lines[0], {
                    status     => $fault->{dead_status},
                    error      => $fault->{dead_error},
                    message_id => $id,
                    body       => $stories_body,
                }, $name);
            }
        }

        # The error log.

        if ($fault->{delivered}) {
            sleep 0.3 if $conf->{front};
            my $log = $t->error_log_since($log_offset);
            unlike($log, qr/\[error\][^\n]*stories (?:request|API key)/,
                "$name no stories error line");
        } else {
            my $line = $fault->{log};
            $line =~ s/%ID%/"$id"/;
            my $log = $t->wait_for_log($log_offset, qr/\Q$line\E/,
                $conf->{front} ? 5 : 0);
            like($log, qr/\[error\][^\n]*\Q$line\E/, "$name error line");
            unlike($log, qr/\Q$KEY\E/, "$name key not in error.log");
        }

        # What Stories received.

        if (!defined $fault->{mock}) {
            is(scalar $t->stories_requests(), 0, "$name nothing at mock");
        } elsif ($fault->{mock} eq 'stories') {
            my @records = $t->wait_for_stories(1);
            is(scalar @records, 1, "$name mock request count");
            is($records[0] && $records[0]{body}, $stories_body,
                "$name mock body");
        } else {
            my @raw = raw_requests();
            is(scalar(@raw) - $raw_before, 1, "$name raw mock request count");
            is($raw[-1], $stories_body, "$name raw mock body");
        }

        normal_call_works($name);
    }
}

############################################################################
# The dead-letter file must be openable when the configuration is read.

my $missing = $t->dir() . '/missing-directory/dead.jsonl';
my ($status, $output) = $t->test_config($t->http_conf(<<"EOF"));
    server {
        listen 127.0.0.1:%%PORT%%;
        location /v1/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_dead_letter $missing;
        }
    }
EOF
isnt($status, 0, 'dead letter in missing directory fails nginx -t');
like($output, qr/\Q"$missing"\E/, 'nginx -t output names the path');
like($output, qr/\Q"$missing" failed\E/, 'nginx -t output says failed');

my $present = $t->dir() . '/dead-present.jsonl';
($status, $output) = $t->test_config($t->http_conf(<<"EOF"));
    server {
        listen 127.0.0.1:%%PORT%%;
        location /v1/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_dead_letter $present;
        }
    }
EOF
is($status, 0, 'dead letter in existing directory passes nginx -t')
    or diag($output);

############################################################################
# The key never reaches a log or a dead-letter file.

my $all = $t->read_file('error.log');
unlike($all, qr/\Q$KEY\E/, 'key not in error.log');
for my $conf (values %MODES) {
    next unless $conf->{dead_letter};
    unlike($t->read_file($conf->{dead_letter}), qr/\Q$KEY\E/,
        "key not in $conf->{dead_letter}");
}

$t->stop();
stop_raw_mock($raw_pid);

done_testing();
