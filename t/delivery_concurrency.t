#!/usr/bin/perl

# stories_concurrency: how many Stories requests one client request has in
# flight, and that a large batch delivers each event exactly once, in
# endpoint mode and in front of a backend.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use Time::HiRes qw(sleep);

use StoriesTest;

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $KEY = 'sk-secret-90b4c6d1';
my $MESSAGES = 100;

# 100 requests at 0.2 s each take about 7 s with 3 in flight.
my $t = StoriesTest->new(error_log_level => 'info', timeout => 30);

$t->write_http_conf(<<"EOF");
    server {
        listen 127.0.0.1:%%PORT%%;

        location /default/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
        }

        location /three/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_concurrency 3;
        }

        location /front-default/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /front-three/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_concurrency 3;
            proxy_pass http://127.0.0.1:%%BACKEND_PORT%%;
        }

        location /_stories/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
        }
    }
EOF

$t->set_stories_rules({ delay => 0.2 });
$t->run();

sub batch_body {
    my ($tag) = @_;
    return '{"batch":['
        . join(',', map {
            qq({"type":"track","userId":"u-$tag-$_","event":"E-$_",)
                . qq("messageId":"m-$tag-$_"})
        } 1 .. $MESSAGES)
        . ']}';
}

sub expected_bodies {
    my ($tag) = @_;
    return sort map {
        qq({"user_id":"u-$tag-$_","name":"Track","data":{"content":"E-$_"}})
    } 1 .. $MESSAGES;
}

# Checks that the mock received each event of the batch exactly once
# (3 tests).
sub delivered_once {
    my ($tag, $name) = @_;
    my @records = $t->wait_for_stories($MESSAGES, 30);

    # A request sent after the last expected one would be a duplicate.
    sleep 0.5;
    @records = $t->stories_requests();

    is(scalar @records, $MESSAGES, "$name request count");
    my %seen;
    $seen{ $_->{body} }++ for @records;
    is(scalar keys %seen, $MESSAGES, "$name distinct bodies");
    is_deeply([sort keys %seen], [expected_bodies($tag)],
        "$name every event delivered");
    return;
}

my @CASES = (
    ['endpoint default',    '/default/v1/batch',       0, undef],
    ['endpoint 3',          '/three/v1/batch',         0, 3],
    ['front default',       '/front-default/v1/batch', 1, undef],
    ['front 3',             '/front-three/v1/batch',   1, 3],
);

for my $case (@CASES) {
    my ($name, $path, $front, $concurrency) = @$case;
    (my $tag = $name) =~ s/ /-/g;

    $t->clear_backend();
    my $r = $t->send_segment($path, batch_body($tag));

    if ($front) {
        is($r && $r->{status}, 200, "$name backend status");
        is($r && $r->{body}, '{"ok":true}', "$name backend body");
    } else {
        $t->json_response_is($r, 200, '{"success":true}', $name);
    }

    delivered_once($tag, $name);

    my $peak = $t->stories_peak();
    if (defined $concurrency) {
        is($peak, $concurrency, "$name peak");
    } else {
        cmp_ok($peak, '<=', 8, "$name peak at most 8");
        cmp_ok($peak, '>', 1, "$name requests overlap");
    }
}

unlike($t->read_file('error.log'), qr/\[error\][^\n]*stories/,
    'no stories error line');
unlike($t->read_file('error.log'), qr/\Q$KEY\E/, 'key not in error.log');

$t->stop();

done_testing();
