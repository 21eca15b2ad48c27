#!/usr/bin/perl

# Stories answers with a body larger than subrequest_output_buffer_size of
# the forwarding location (4k by default on x86-64): nginx then stops
# reading that response.  The status line has arrived, so the module goes
# by it, and neither the client's request nor the worker is affected, in
# both modes.

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use Test::More;

use lib dirname(abs_path(__FILE__)) . '/lib';
use StoriesTest qw(error_body);

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $KEY = 'large-key-4b1d';
my $SUCCESS = '{"success":true}';

my $t = StoriesTest->new();

$t->write_http_conf(<<'CONF');
    server {
        listen 127.0.0.1:%%PORT%%;

        location /v1/ {
            stories_forward  /_stories/;
            stories_api_key  large-key-4b1d;
        }

        location /dl/v1/ {
            stories_forward      /_stories/;
            stories_api_key      large-key-4b1d;
            stories_dead_letter  %%TESTDIR%%/dead.jsonl;
        }

        location /front/ {
            stories_forward      /_stories/;
            stories_api_key      large-key-4b1d;
            stories_dead_letter  %%TESTDIR%%/dead.jsonl;
            proxy_pass           http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /_stories/ {
            internal;
            proxy_pass  http://127.0.0.1:%%STORIES_PORT%%/;
        }
    }
CONF

$t->run();

my $page = '<html>' . ('x' x 10000) . '</html>';
# larger than the proxy buffers too, so nginx spools it to a temp file
my $huge = 'y' x (256 * 1024);

for my $case ([ 200, $page, 'page' ], [ 200, $huge, 'huge' ],
              [ 502, $page, 'error page' ])
{
    my ($status, $body, $name) = @$case;

    $t->set_stories_rules({ status => $status, body => $body,
                            headers => [ [ 'Content-Type', 'text/html' ] ] });

    my $r = $t->send_segment('/v1/track', '{"userId":"u1","event":"E"}');

    if ($status == 200) {
        $t->json_response_is($r, 200, $SUCCESS, "$name endpoint");

    } else {
        $t->json_response_is($r, 502,
            error_body("Stories failed with status $status"),
            "$name endpoint");
    }

    $r = $t->send_segment('/v1/batch', '{"batch":['
        . '{"type":"track","userId":"u1","event":"A"},'
        . '{"type":"track","userId":"u2","event":"B"}]}');
    is($r->{status}, $status == 200 ? 200 : 502, "$name batch status");
    is($t->wait_for_stories(2), 2, "$name batch forwarded");

    $r = $t->send_segment('/front/v1/track',
        '{"userId":"u1","event":"F","messageId":"m-front"}');
    is($r->{status}, 200, "$name front backend status");
    is($t->wait_for_stories(1), 1, "$name front forwarded");
}

# the 502 case above is the only failure, once per mode with a file
$t->set_stories_rules({ status => 502, body => $page });
my $r = $t->send_segment('/dl/v1/track',
    '{"userId":"u1","event":"D","messageId":"m-dl"}');
$t->json_response_is($r, 200, $SUCCESS, 'error page kept endpoint');

$t->set_stories_rules();
$r = $t->send_segment('/v1/track', '{"userId":"u1","event":"after"}');
$t->json_response_is($r, 200, $SUCCESS, 'worker serves afterwards');

sleep 0.5;

my @lines = split /\n/, $t->read_file('dead.jsonl');
my @ids = sort map { /"messageId":"([^"]+)"/ ? $1 : 'none' } @lines;
is_deeply(\@ids, [ 'm-dl', 'm-front' ], 'dead letter lines');

$t->stop();

done_testing();
