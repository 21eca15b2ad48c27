#!/usr/bin/perl

# Worker memory for large calls.  In front of an existing endpoint, a body
# over stories_max_batch_size is passed on without being copied into
# memory.  A batch of many small messages, in both modes: nginx frees the
# memory of a subrequest only with its parent's pool, so each Stories
# request runs under a parent of its own that is freed when it ends.  With
# all of them under one parent, the 10000 messages below took about 110 MB
# of worker memory until the call ended.  Stories is a second server in
# the same nginx, so that the test does not wait for a slow mock.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use Time::HiRes qw(sleep time);

use StoriesTest;

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $KEY = 'sk-memory-70e2a9';
my $MESSAGES = 10000;

# The worker may grow by this much for the batch: the body, its parsed
# tree and the Stories bodies take about 5 MB.
my $GROWTH_LIMIT_KB = 32 * 1024;

my $t = StoriesTest->new(error_log_level => 'info');
my $sink_port = StoriesTest::free_port();

# The sink's access log counts the Stories requests without the cost of
# the harness mock.
$t->write_http_conf(<<"EOF");
    log_format sink \$request_uri;
    client_max_body_size 1m;
    client_body_buffer_size 1m;

    server {
        listen 127.0.0.1:%%PORT%%;

        location /endpoint/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
        }

        location /front/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_max_pending 1000;
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /big/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            client_max_body_size 50m;
            client_body_buffer_size 16k;
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /_stories/ {
            internal;
            proxy_pass http://127.0.0.1:$sink_port/;
        }
    }

    server {
        listen 127.0.0.1:$sink_port;
        access_log %%TESTDIR%%/sink.log sink;

        location / {
            return 200 '{}';
        }
    }
EOF

$t->run();

my $batch = '{"batch":['
    . join(',', ('{"type":"track","userId":"u","event":"e"}') x $MESSAGES)
    . ']}';

# Returns the worker's peak resident memory in kB.
sub worker_peak_kb {
    my $master = $t->read_file('nginx.pid');
    chomp $master;
    my ($worker) = grep { /^\d+$/ }
        split ' ', `ps -o pid= --ppid $master`;
    open my $fh, '<', "/proc/$worker/status" or return undef;
    my ($peak) = join('', <$fh>) =~ /^VmHWM:\s+(\d+) kB/m;
    close $fh;
    return $peak;
}

sub sink_requests {
    return scalar grep { $_ eq '/v1/events/' }
        split /\n/, $t->read_file('sink.log');
}

sub wait_for_sink {
    my ($count, $timeout) = @_;
    my $deadline = time() + $timeout;
    sleep 0.05 while sink_requests() < $count && time() < $deadline;
    return sink_requests();
}

# Warms the worker up, so that the first call's allocations do not count.
my $r = $t->post_json('/endpoint/v1/track', '{"userId":"u","event":"e"}');
is($r && $r->{status}, 200, 'warm-up call status');

# A body of 8 MB, spooled to a temporary file, to a call path.

my $big = '{"batch":[' . ('{"type":"track","userId":"u","event":"e"},' x 200000)
    . '{"type":"track","userId":"u","event":"e"}]}';
my $before = worker_peak_kb();
my $offset = $t->error_log_offset();

$r = $t->post_json('/big/v1/import', $big);
is($r && $r->{status}, 200, 'big body backend status');
my @backend = $t->wait_for_backend(1);
ok(@backend && $backend[0]{body} eq $big, 'big body reached the backend whole');
like($t->error_log_since($offset),
    qr/batch call not forwarded: body is larger than stories_max_batch_size 512000 bytes/,
    'big body info line');
is(sink_requests(), 1, 'big body sent nothing to Stories');

my $big_after = worker_peak_kb();
note("worker peak memory: $before kB before the big body, $big_after kB after");

SKIP: {
    skip 'sanitizer builds keep freed memory in quarantine', 1
        if StoriesTest::module_is_static();

    cmp_ok($big_after - $before, '<', 4 * 1024,
        'big body not copied into memory');
}

$t->clear_backend();
$before = $big_after;

$r = $t->post_json('/endpoint/v1/batch', $batch);
is($r && $r->{status}, 200, 'endpoint batch status');
is($r && $r->{body}, '{"success":true}', 'endpoint batch body');
is(wait_for_sink($MESSAGES + 1, 30), $MESSAGES + 1,
    'endpoint batch reached Stories');

$r = $t->post_json('/front/v1/batch', $batch);
is($r && $r->{status}, 200, 'front batch backend status');
is(wait_for_sink(2 * $MESSAGES + 1, 30), 2 * $MESSAGES + 1,
    'front batch reached Stories');
@backend = $t->wait_for_backend(1);
is($backend[0] && $backend[0]{body}, $batch, 'front batch backend body');

my $after = worker_peak_kb();
note("worker peak memory: $before kB before, $after kB after");

SKIP: {
    skip 'sanitizer builds keep freed memory in quarantine', 1
        if StoriesTest::module_is_static();

    cmp_ok($after - $before, '<', $GROWTH_LIMIT_KB,
        'worker memory stays bounded');
}

$t->stop();

done_testing();
