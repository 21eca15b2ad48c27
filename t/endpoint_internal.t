#!/usr/bin/perl

# A location marked internal is never translated, even when a request
# reaches it through an internal redirect and it has no content handler
# of its own: here error_page sends a POST to /hidden/v1/track.

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use Test::More;

use lib dirname(abs_path(__FILE__)) . '/lib';
use StoriesTest;

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $t = StoriesTest->new();

$t->write_http_conf(<<'CONF');
    server {
        listen 127.0.0.1:%%PORT%%;

        stories_forward  /_stories/;
        stories_api_key  internal-key-0c5e;

        location /v1/ {
            error_page  418 = /hidden/v1/track;
            return      418;
        }

        location /hidden/ {
            internal;
            root  %%TESTDIR%%;
        }

        location /_stories/ {
            internal;
            proxy_pass  http://127.0.0.1:%%STORIES_PORT%%/;
        }
    }
CONF

$t->run();

my $r = $t->send_segment('/v1/track', '{"userId":"u1","event":"E"}');
isnt($r->{headers}{'content-type'} // '', 'application/json',
    'internal location answered by nginx');
is($r->{status}, 404, 'internal location status');

sleep 0.3;
is(scalar $t->stories_requests(), 0, 'internal location forwards nothing');

$t->stop();

done_testing();
