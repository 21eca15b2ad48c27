#!/usr/bin/perl

# Endpoint mode: batch calls with valid, invalid and skipped messages.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use Time::HiRes qw(sleep);

use StoriesTest;

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $KEY = 'test-key-5f1c';
my $EVENTS = '/v1/events/';
my $USERS = '/v1/users';

my $t = StoriesTest->new();

$t->write_http_conf(<<"EOF");
    server {
        listen 127.0.0.1:%%PORT%%;

        location /v1/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
        }

        location /sync/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
            stories_sync_users on;
        }

        location /_stories/ {
            internal;
            proxy_pass http://127.0.0.1:%%STORIES_PORT%%/;
        }
    }
EOF

$t->run();

# Posts a batch and checks the response and the Stories requests.  Batch
# messages may be forwarded in any order, so records are compared sorted by
# path and body.
sub batch_ok {
    my ($name, $path, $body, $response_body, $expected) = @_;

    my $r = $t->send_segment($path, $body);
    $t->json_response_is($r, 200, $response_body, $name);

    $t->wait_for_stories(scalar @$expected);
    sleep 0.2;
    my @records = sort { $a->{uri} cmp $b->{uri} || $a->{body} cmp $b->{body} }
        $t->stories_requests();
    my @sorted = sort { $a->[0] cmp $b->[0] || $a->[1] cmp $b->[1] }
        @$expected;

    is(scalar @records, scalar @sorted, "$name request count")
        or diag(join "\n", map { "$_->{uri} $_->{body}" } @records);
    for my $i (0 .. $#sorted) {
        $t->stories_request_is($records[$i], $sorted[$i][0], $sorted[$i][1],
            $KEY, "$name #$i");
    }
    return;
}

my @messages = (
    '{"type":"track","userId":"u0","event":"A"}',
    '{"type":"track","userId":"u1"}',
    '5',
    '{"userId":"u3","event":"C"}',
    '{"type":"foo","userId":"u4"}',
    '{"type":"identify","userId":"u5","traits":{"a":1}}',
    '{"type":"page","userId":"u6","name":"Home"}',
    '{"type":"screen","userId":7,"name":"S"}',
    '{"type":"group","userId":"u8","groupId":"g8"}',
    '{"type":"alias","userId":"u9","previousId":"p9"}',
    '{"type":"track","anonymousId":"a10","event":"E"}',
    '{"type":"track","userId":"u11","event":"E",'
        . '"integrations":{"Stories":false}}',
    '{"type":"track","userId":true,"event":"E"}',
    '{"type":"identify","userId":"u13","traits":[]}',
    '{"type":"track","event":"E"}',
    '{"type":"page","userId":"u15"}',
    '"text"',
    '{"type":"track","userId":"u17","event":"E",'
        . '"integrations":{"All":false,"Stories":true}}',
    '{"type":"track","userId":"u18","event":7}',
);

my $rejected = join ',',
    '{"index":1,"error":"missing event"}',
    '{"index":2,"error":"message is not an object"}',
    '{"index":3,"error":"missing type"}',
    '{"index":4,"error":"unknown type \"foo\""}',
    '{"index":12,"error":"userId is not a string or number"}',
    '{"index":13,"error":"traits is not an object"}',
    '{"index":14,"error":"missing userId and anonymousId"}',
    '{"index":16,"error":"message is not an object"}',
    '{"index":18,"error":"event is not a string"}';

batch_ok('batch mixed', '/v1/batch',
    '{"batch":[' . join(',', @messages) . ']}',
    qq({"success":true,"rejected":[$rejected]}),
    [[$EVENTS, '{"user_id":"u0","name":"Track","data":{"content":"A"}}'],
     [$EVENTS, '{"user_id":"u5","name":"Identify","data":'
        . '{"traits":{"a":1}}}'],
     [$EVENTS, '{"user_id":"u6","name":"Page","data":{"content":"Home"}}'],
     [$EVENTS, '{"user_id":"7","name":"Screen","data":{"content":"S"}}'],
     [$EVENTS, '{"user_id":"u15","name":"Page","data":{}}'],
     [$EVENTS, '{"user_id":"u17","name":"Track","data":{"content":"E"}}']]);

# A type that is not a string: its message is either rejected as "missing
# type" or as an unknown type.  Only its index is pinned here.
my $r = $t->send_segment('/v1/batch',
    '{"batch":[{"type":5,"userId":"u1"}]}');
like($r && $r->{body},
    qr/^\{"success":true,"rejected":\[\{"index":0,"error":"[^"]/,
    'batch type number rejected');

batch_ok('batch empty', '/v1/batch', '{"batch":[]}', '{"success":true}',
    []);

batch_ok('batch only skipped', '/v1/batch',
    '{"batch":[{"type":"group","userId":"u1","groupId":"g"},'
        . '{"type":"track","anonymousId":"a1","event":"E"}]}',
    '{"success":true}', []);

batch_ok('batch all invalid', '/v1/b',
    '{"batch":[1,{"type":"track","userId":"u1"}]}',
    '{"success":true,"rejected":[{"index":0,"error":"message is not an '
        . 'object"},{"index":1,"error":"missing event"}]}',
    []);

batch_ok('batch import', '/v1/import',
    '{"batch":[{"type":"track","userId":"u1","event":"E"},{}]}',
    '{"success":true,"rejected":[{"index":1,"error":"missing type"}]}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":{"content":"E"}}']]);

batch_ok('batch extra keys', '/v1/batch',
    '{"batch":[{"type":"track","userId":"u1","event":"E"}],'
        . '"context":{"library":{"name":"x"}},"sentAt":"2024-01-01"}',
    '{"success":true}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":{"content":"E"}}']]);

batch_ok('batch sync users', '/sync/v1/batch',
    '{"batch":[{"type":"identify","userId":"u1",'
        . '"traits":{"firstName":"Ann","email":"a@b.c"}},'
        . '{"type":"track","userId":"u2","event":"E"}]}',
    '{"success":true}',
    [[$EVENTS, '{"user_id":"u1","name":"Identify","data":'
        . '{"traits":{"firstName":"Ann","email":"a@b.c"}}}'],
     [$EVENTS, '{"user_id":"u2","name":"Track","data":{"content":"E"}}'],
     [$USERS, '{"user_id":"u1","name":"Ann","email":"a@b.c","attributes":'
        . '{"firstName":"Ann","email":"a@b.c"}}']]);

my @many = map { qq({"type":"track","userId":"u$_","event":"E$_"}) }
    0 .. 29;
batch_ok('batch of 30', '/v1/batch',
    '{"batch":[' . join(',', @many) . ']}',
    '{"success":true}',
    [map { [$EVENTS, qq({"user_id":"u$_","name":"Track","data":)
        . qq({"content":"E$_"}})] } 0 .. 29]);

$t->stop();

done_testing();
