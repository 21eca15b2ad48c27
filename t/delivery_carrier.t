#!/usr/bin/perl

# Each Stories request runs as the subrequest of a request of the module's
# own, on a connection without a socket.  Modules in the internal location
# that act on the connection of a subrequest must work there: an unbuffered
# proxy, which sets TCP_NODELAY and a send_timeout timer, and limit_req,
# which delays a request with a timer on its connection.  And an endpoint
# call whose client goes away ends: its running Stories requests finish on
# their own, the others go to the dead-letter file.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use IO::Socket::INET;
use Test::More;
use Time::HiRes qw(sleep);

use StoriesTest;

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $KEY = 'sk-carrier-3b7d19';

my $t = StoriesTest->new(error_log_level => 'info');

$t->write_http_conf(<<"EOF");
    limit_req_zone \$server_port zone=stories:1m rate=10r/s;

    server {
        listen 127.0.0.1:%%PORT%%;

        location /unbuffered/ {
            stories_forward /_unbuffered/;
            stories_api_key $KEY;
        }

        location /front-unbuffered/ {
            stories_forward /_unbuffered/;
            stories_api_key $KEY;
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /limited/ {
            stories_forward /_limited/;
            stories_api_key $KEY;
        }

        location /front-limited/ {
            stories_forward /_limited/;
            stories_api_key $KEY;
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /gone/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_concurrency 2;
            stories_dead_letter %%TESTDIR%%/dead.jsonl;
        }

        location /_unbuffered/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
            proxy_buffering off;
            send_timeout 1s;
        }

        location /_limited/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
            limit_req zone=stories burst=50;
        }

        location /_stories/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
        }
    }
EOF

# Stories holds its answer to "held" events until the test creates the
# file release.
$t->set_stories_rules({ body_contains => '"held"', hold => 'release' });
$t->write_file('dead.jsonl', '');

$t->run();

sub batch {
    my ($count, $event) = @_;
    return '{"batch":[' . join(',', map {
        qq({"type":"track","userId":"u$_","event":"$event",)
            . qq("messageId":"m$_"})
    } 1 .. $count) . ']}';
}

sub events {
    my ($count, $event) = @_;
    return sort map {
        qq({"user_id":"u$_","name":"Track","data":{"content":"$event"}})
    } 1 .. $count;
}

sub stories_bodies {
    my ($count, $timeout) = @_;
    return sort map { $_->{body} } $t->wait_for_stories($count, $timeout);
}

############################################################################
# An unbuffered proxy in the internal location.

my $r = $t->send_segment('/unbuffered/v1/batch', batch(3, 'unbuffered'));
$t->json_response_is($r, 200, '{"success":true}', 'unbuffered endpoint');
is_deeply([stories_bodies(3)], [events(3, 'unbuffered')],
    'unbuffered endpoint reached Stories');

$t->clear_stories();
$r = $t->post_json('/front-unbuffered/v1/batch', batch(3, 'front'));
is($r && $r->{status}, 200, 'unbuffered front backend status');
is_deeply([stories_bodies(3)], [events(3, 'front')],
    'unbuffered front reached Stories');

# A send_timeout timer left on a freed connection would fire now.
sleep 1.5;
$r = $t->send_segment('/unbuffered/v1/track',
    '{"userId":"u1","event":"after"}');
$t->json_response_is($r, 200, '{"success":true}',
    'unbuffered endpoint after send_timeout');

############################################################################
# limit_req delays each Stories request: 10 per second after the first.

$r = $t->send_segment('/limited/v1/batch', batch(9, 'limited'));
$t->json_response_is($r, 200, '{"success":true}', 'limit_req endpoint');
is_deeply([stories_bodies(9)], [events(9, 'limited')],
    'limit_req endpoint reached Stories');

$t->clear_stories();
$r = $t->post_json('/front-limited/v1/batch', batch(9, 'front-limited'));
is($r && $r->{status}, 200, 'limit_req front backend status');
is_deeply([stories_bodies(9, 10)], [events(9, 'front-limited')],
    'limit_req front reached Stories');

############################################################################
# A client that goes away while Stories holds its first two requests.

$t->clear_stories();
my $offset = $t->error_log_offset();
my $body = batch(5, 'held');
my $client = IO::Socket::INET->new(
    PeerAddr => '127.0.0.1',
    PeerPort => $t->port,
    Proto    => 'tcp',
) or die "connect: $!\n";
print {$client} "POST /gone/v1/batch HTTP/1.1\r\nHost: localhost\r\n"
    . "Content-Type: application/json\r\n"
    . 'Content-Length: ' . length($body) . "\r\n\r\n$body";
is(scalar $t->wait_for_stories(2), 2, 'gone client: two requests running');
close $client;

my @lines = $t->wait_for_json_lines('dead.jsonl', 3, 5);
is(scalar @lines, 3, 'gone client: three requests not started');
is_deeply([sort map { $_->{messageId} // '' } @lines], [qw(m3 m4 m5)],
    'gone client: the requests not started are kept');
is_deeply([map { $_->{error} // '' } @lines],
    [('the client request ended first') x 3],
    'gone client: dead-letter error');
like($t->error_log_since($offset), qr/client prematurely closed connection/,
    'gone client: nginx saw the client go');

$t->write_file('release', '');
sleep 0.5;
is(scalar $t->stories_requests(), 2, 'gone client: nothing more sent');
is(scalar($t->wait_for_json_lines('dead.jsonl', 4, 1)), 3,
    'gone client: running requests delivered, not kept');
unlike($t->error_log_since($offset), qr/\[error\][^\n]*"m[12]"/,
    'gone client: running requests not logged as failed');

unlike($t->read_file('error.log'), qr/\Q$KEY\E/, 'key not in error.log');

$t->stop();

done_testing();
