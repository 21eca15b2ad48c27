#!/usr/bin/perl

# Sends Stories requests over TLS, as the production example does: the
# internal location verifies the certificate of a TLS server that stands
# in for api.getstories.io, sends SNI, and keeps upstream connections
# alive.  The TLS server, another server of the same nginx, passes each
# request on to the mock Stories API.  Both modes are covered.

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);
use Test::More;

use lib dirname(abs_path(__FILE__)) . '/lib';
use StoriesTest;

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $KEY = 'tls-key-3d9e';
my $EVENT = '{"user_id":"u1","name":"Track","data":{"content":"Over TLS"}}';

my $t = StoriesTest->new();
my $dir = $t->dir;
my $tls_port = StoriesTest::free_port();

# a self-signed certificate for the name that SNI and verification use;
# openssl's progress dots on stderr go to a file
my $openssl = system('sh', '-c', 'openssl req -x509 -newkey rsa:2048 '
    . '-nodes -days 2 -subj /CN=api.getstories.io '
    . '-addext subjectAltName=DNS:api.getstories.io '
    . "-keyout $dir/stories.key -out $dir/stories.crt 2>$dir/openssl.log");
is($openssl >> 8, 0, 'test certificate created') or BAIL_OUT('no openssl');

$t->write_http_conf(<<"CONF");
    log_format  sni  '\$ssl_server_name';

    upstream stories_api {
        server     127.0.0.1:$tls_port;
        keepalive  4;
    }

    server {
        listen 127.0.0.1:%%PORT%%;

        location /v1/ {
            stories_forward  /_stories/;
            stories_api_key  $KEY;
        }

        location /front/ {
            stories_forward  /_stories/;
            stories_api_key  $KEY;
            proxy_pass       http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /_stories/ {
            internal;
            proxy_pass                     https://stories_api/;
            proxy_http_version             1.1;
            proxy_set_header               Connection "";
            proxy_set_header               Host api.getstories.io;
            proxy_ssl_server_name          on;
            proxy_ssl_name                 api.getstories.io;
            proxy_ssl_verify               on;
            proxy_ssl_trusted_certificate  %%TESTDIR%%/stories.crt;
            proxy_ssl_session_reuse        on;
            proxy_read_timeout             5s;
        }
    }

    server {
        listen 127.0.0.1:$tls_port ssl;
        server_name  api.getstories.io;

        ssl_certificate      %%TESTDIR%%/stories.crt;
        ssl_certificate_key  %%TESTDIR%%/stories.key;

        access_log  %%TESTDIR%%/sni.log  sni;

        location / {
            proxy_pass  http://127.0.0.1:%%STORIES_PORT%%;
        }
    }
CONF

$t->run();

my $r = $t->send_segment('/v1/track', '{"userId":"u1","event":"Over TLS"}');
$t->json_response_is($r, 200, '{"success":true}', 'endpoint over TLS');

my @sent = $t->stories_requests();
is(scalar @sent, 1, 'endpoint over TLS request count');
$t->stories_request_is($sent[0], '/v1/events/', $EVENT, $KEY,
    'endpoint over TLS');

$r = $t->send_segment('/front/v1/track',
    '{"userId":"u1","event":"Over TLS"}');
is($r->{status}, 200, 'front over TLS backend status');
is($t->wait_for_stories(1), 1, 'front over TLS request count');
@sent = $t->stories_requests();
$t->stories_request_is($sent[0], '/v1/events/', $EVENT, $KEY,
    'front over TLS');

my $sni = $t->read_file('sni.log');
like($sni, qr/\Aapi\.getstories\.io\n/, 'SNI names the API host');

$t->stop();

done_testing();
