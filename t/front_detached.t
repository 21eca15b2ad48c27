#!/usr/bin/perl

# In front of an existing endpoint the Stories requests belong to a
# request of the module's own, so they outlive the client's request: a
# client that disconnects and a graceful shutdown of nginx both leave the
# delivery to finish.  Stories answers 500 after a second, so the error
# line proves that nginx waited for that answer.

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use Test::More;
use Time::HiRes qw(sleep);

use lib dirname(abs_path(__FILE__)) . '/lib';
use StoriesTest;

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $KEY = 'detached-key-71c2';

my $t = StoriesTest->new();

$t->write_http_conf(<<'CONF');
    server {
        listen 127.0.0.1:%%PORT%%;

        stories_forward  /_stories/;
        stories_api_key  detached-key-71c2;

        location / {
            proxy_pass  http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /_stories/ {
            internal;
            proxy_pass          http://127.0.0.1:%%STORIES_PORT%%/;
            proxy_read_timeout  5s;
        }
    }
CONF

$t->run();

# Stories answers after a second; the client leaves at once.

$t->set_stories_rules({ delay => 1, status => 500 });

my $call = '{"userId":"gone","event":"Left early","messageId":"m-gone"}';
my $sock = $t->connect();
$t->send_raw($sock, "POST /v1/track HTTP/1.1\r\nHost: localhost\r\n"
    . "Content-Type: application/json\r\n"
    . 'Content-Length: ' . length($call) . "\r\n\r\n$call");
close $sock;

is($t->wait_for_stories(1, 5), 1, 'client gone: event sent');
ok(wait_for_log(qr{\[error\][^\n]*stories request to "/v1/events/" }
    . qr{failed with status 500, track call, messageId "m-gone"}),
    'client gone: Stories answer read');
my @sent = $t->stories_requests();
$t->stories_request_is($sent[0], '/v1/events/',
    '{"user_id":"gone","name":"Track","data":{"content":"Left early"}}',
    $KEY, 'client gone');

# A graceful shutdown waits for the Stories request in flight.

$t->clear_stories();
$t->set_stories_rules({ delay => 1, status => 500 });

my $r = $t->request('POST', '/v1/track',
    '{"userId":"quit","event":"During shutdown","messageId":"m-quit"}',
    { 'Content-Type' => 'application/json' });
is($r->{status}, 200, 'shutdown: backend answered');

kill 'QUIT', $t->{nginx_pid};

is($t->wait_for_stories(1, 5), 1, 'shutdown: event sent');
ok(wait_for_log(qr{\[error\][^\n]*stories request to "/v1/events/" }
    . qr{failed with status 500, track call, messageId "m-quit"}),
    'shutdown: Stories answer read');
@sent = $t->stories_requests();
$t->stories_request_is($sent[0], '/v1/events/',
    '{"user_id":"quit","name":"Track","data":{"content":"During shutdown"}}',
    $KEY, 'shutdown');

$t->stop();

done_testing();


# Polls error.log for up to 5 seconds.
sub wait_for_log {
    my ($pattern) = @_;

    for (1 .. 50) {
        return 1 if $t->read_file('error.log') =~ $pattern;
        sleep 0.1;
    }

    return 0;
}
