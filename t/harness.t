#!/usr/bin/perl

# Checks of t/lib/StoriesTest.pm itself against a stock nginx that proxies
# to the mocks, without loading the stories module.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use IO::Socket::INET;
use POSIX qw(WNOHANG);
use Test::More;
use Time::HiRes qw(time);

use StoriesTest;

my $t = StoriesTest->new(load_module => 0);

$t->write_http_conf(<<'EOF');
    upstream stories_keepalive {
        server 127.0.0.1:%%STORIES_PORT%%;
        keepalive 2;
    }

    server {
        listen 127.0.0.1:%%PORT%%;
        root %%TESTDIR%%/html;

        location /echo/ {
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
            proxy_read_timeout 1s;
        }

        location /keepalive/ {
            proxy_pass http://stories_keepalive/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }

        location /backend/ {
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%/;
        }

        location /closed/ {
            proxy_pass http://127.0.0.1:%%CLOSED_PORT%%/;
        }

        location /rewritten/ {
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
            sub_filter_types application/json;
            sub_filter 'ok' 'fine';
        }
    }
EOF

$t->write_file('html/static.txt', "static file\n");
$t->run();

# Proxied request: both the client and the mock side.

my $body = qq({"a":"caf\xc3\xa9","b":"\\n"});
my $r = $t->request('POST', '/echo/path?x=1', $body,
    [['Content-Type', 'application/json'], ['X-Mixed-Case', 'Value']]);

is($r->{status}, 200, 'proxy status');
is($r->{headers}{'content-type'}, 'application/json', 'proxy content type');
is($r->{body}, '{"ok":true}', 'proxy default mock body');

my @records = $t->wait_for_stories(1);
is(scalar @records, 1, 'mock record count');
is($records[0]{method}, 'POST', 'mock record method');
is($records[0]{uri}, '/path?x=1', 'mock record uri');
is($records[0]{body}, $body, 'mock record body bytes');
is($records[0]{seq}, 1, 'mock record seq');
is_deeply([StoriesTest::header_values($records[0], 'x-mixed-case')],
    ['Value'], 'mock header lookup ignores case');
ok((grep { $_->[0] eq 'X-Mixed-Case' } @{ $records[0]{headers} }),
    'mock header keeps case');
is_deeply([StoriesTest::header_values($records[0], 'Content-Length')],
    [length $body], 'mock content length');

# Rules.

$t->clear_stories();
$t->set_stories_rules(
    { body_contains => 'limit', status => 429,
      headers => [['Retry-After', '7']], body => '{"e":1}' },
    { uri_contains => '/slow', delay => 2 },
    { body_contains => 'hangup', close => 1 },
    { seq => 4, status => 500, body => 'seq four' },
);

$r = $t->request('POST', '/echo/x', '{"limit":1}');
is($r->{status}, 429, 'rule status');
is($r->{headers}{'retry-after'}, '7', 'rule extra header');
is($r->{body}, '{"e":1}', 'rule body');

my $start = time();
$r = $t->request('POST', '/echo/slow', '{}');
is($r->{status}, 504, 'rule delay past proxy_read_timeout');
cmp_ok(time() - $start, '>=', 0.9, 'rule delay waits');

$r = $t->request('POST', '/echo/x', 'hangup');
is($r->{status}, 502, 'rule close without answer');

$r = $t->request('POST', '/echo/x', 'fourth');
is($r->{status}, 500, 'rule by seq');
is($r->{body}, 'seq four', 'rule by seq body');

$r = $t->request('POST', '/echo/x', 'fifth');
is($r->{status}, 200, 'no rule matches');

is(scalar $t->stories_requests(), 5, 'records after rules');

# Rules changed between requests.
$t->set_stories_rules({ status => 503 });
$r = $t->request('POST', '/echo/x', 'sixth');
is($r->{status}, 503, 'rules reread per request');
$t->set_stories_rules();

# Client side: chunked request body, keepalive, chunked response.

$t->clear_stories();
my $big = 'x' x 5000;
$r = $t->request('POST', '/echo/chunked', $big, {}, chunked => 700);
is($r->{status}, 200, 'chunked request status');
@records = $t->wait_for_stories(1);
is($records[0]{body}, $big, 'chunked request body bytes');

my $sock = $t->connect();
my $first = $t->request_on($sock, 'POST', '/echo/one', 'one');
my $second = $t->request_on($sock, 'GET', '/static.txt');
my $third = $t->request_on($sock, 'POST', '/echo/three', 'three');
close $sock;
is($first->{status}, 200, 'keepalive first status');
is($second->{body}, "static file\n", 'keepalive second body');
is($third->{status}, 200, 'keepalive third status');

$r = $t->request('POST', '/rewritten/x', '{}');
is($r->{headers}{'transfer-encoding'}, 'chunked', 'response is chunked');
is($r->{body}, '{"fine":true}', 'chunked response decoded');

# Mock side: keepalive connections from nginx.

$t->clear_stories();
for my $n (1 .. 3) {
    $r = $t->request('POST', "/keepalive/$n", "body $n");
    is($r->{status}, 200, "upstream keepalive request $n");
}
@records = $t->wait_for_stories(3);
is(scalar @records, 3, 'upstream keepalive records');
is(scalar(keys %{{ map { $_->{connection} => 1 } @records }}), 1,
    'upstream keepalive one connection');
is_deeply([map { $_->{body} } @records], ['body 1', 'body 2', 'body 3'],
    'upstream keepalive bodies');

# Mock side: concurrent connections and the peak counter.

$t->clear_stories();
$t->set_stories_rules({ delay => 0.5 });
my @pids;
for my $n (1 .. 3) {
    my $pid = fork();
    die "fork: $!\n" unless defined $pid;
    if ($pid == 0) {
        my $response = $t->request('POST', "/echo/parallel$n", "p$n");
        POSIX::_exit($response && $response->{status} == 200 ? 0 : 1);
    }
    push @pids, $pid;
}
my @exit_codes = map { waitpid($_, 0); $? >> 8 } @pids;
is_deeply(\@exit_codes, [0, 0, 0], 'parallel requests succeed');
is($t->stories_peak(), 3, 'peak of parallel requests');
$t->set_stories_rules();

# Backend mock keeps its own records.

$t->clear_stories();
$r = $t->request('POST', '/backend/b', 'to backend');
is($r->{status}, 200, 'backend status');
@records = $t->wait_for_backend(1);
is($records[0]{body}, 'to backend', 'backend record body');
is(scalar $t->stories_requests(), 0, 'backend request not in stories');

# Closed port.

$r = $t->request('POST', '/closed/x', '{}');
is($r->{status}, 502, 'closed port refused');

# The kernel may hand out a port twice when binding port 0.  The harness
# must not: a server on CLOSED_PORT, or two servers on one port, would
# make tests pass or fail for the wrong reason.

my @ports = ($t->port, $t->stories_port, $t->backend_port, $t->closed_port,
    map { StoriesTest::free_port() } 1 .. 2000);
my %seen;
is(scalar(grep { $seen{$_}++ } @ports), 0, 'ports are never given twice');

my $taker = IO::Socket::INET->new(
    LocalAddr => '127.0.0.1',
    LocalPort => $t->closed_port,
    Proto     => 'tcp',
    Listen    => 1,
    ReuseAddr => 1,
);
ok(!$taker, 'closed port cannot be taken by a server');
$r = $t->request('POST', '/closed/x', '{}');
is($r->{status}, 502, 'closed port still refused');

# nginx -t on a broken config.

my ($rc, $output) = $t->test_config(
    $t->http_conf("    no_such_directive on;\n", load_module => 0));
isnt($rc, 0, 'config test exit status');
like($output, qr/unknown directive "no_such_directive"/,
    'config test output');

# Error log offset.

my $offset = $t->error_log_offset();
$t->request('GET', '/missing.txt');
like($t->error_log_since($offset), qr/missing\.txt/,
    'error log since offset');

$t->stop();

done_testing();
