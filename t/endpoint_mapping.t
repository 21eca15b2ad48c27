#!/usr/bin/perl

# Endpoint mode: how Segment calls map to Stories requests, which calls are
# skipped, and which paths the module recognises.

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
my $SUCCESS = '{"success":true}';

my $t = StoriesTest->new();

$t->write_http_conf(<<"EOF");
    server {
        listen 127.0.0.1:%%PORT%%;
        root %%TESTDIR%%/html;

        location /v1/ {
            stories_forward /_stories/;
            stories_api_key $KEY;
        }

        # URI without a trailing slash gives the same subrequest paths.
        location /segment/ {
            stories_forward /_stories;
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

$t->write_file('html/v1/docs/readme.txt', "plain file\n");
$t->run();

# Posts $body to $path and checks a 200 {"success":true} response and the
# exact Stories requests: each entry of $expected is [path, body].
sub forwards_ok {
    my ($name, $path, $body, $expected, %opts) = @_;

    my $r = $t->send_segment($path, $body, %opts);
    $t->json_response_is($r, 200, $SUCCESS, $name);

    $t->wait_for_stories(scalar @$expected);
    sleep 0.2;
    # Order by connection: each Stories request opens its own connection,
    # in the order the module sends them.
    my @records = sort { $a->{connection} <=> $b->{connection} }
        $t->stories_requests();
    is(scalar @records, scalar @$expected, "$name request count")
        or diag(join "\n", map { "$_->{uri} $_->{body}" } @records);

    for my $i (0 .. $#$expected) {
        my ($uri, $stories_body) = @{ $expected->[$i] };
        $t->stories_request_is($records[$i], $uri, $stories_body, $KEY,
            "$name #$i");
    }
    return;
}

# Posts $body to $path and checks a 200 {"success":true} response, no
# Stories request and a new info line in error.log.
sub skips_ok {
    my ($name, $path, $body) = @_;

    my $offset = $t->error_log_offset();
    my $r = $t->send_segment($path, $body);
    $t->json_response_is($r, 200, $SUCCESS, $name);
    $t->nothing_forwarded($name);

    my @info = grep { /\[info\]/ && !/keepalive connection/ }
        split /\n/, $t->error_log_since($offset);
    ok(scalar @info, "$name info log line");
    return;
}

# identify

forwards_ok('identify traits', '/v1/identify',
    '{"userId":"u1","traits":{"name":"Ann","plan":"pro","age":30,'
        . '"tags":["a","b"],"nested":{"x":null,"y":true,"z":false}}}',
    [[$EVENTS, '{"user_id":"u1","name":"Identify","data":{"traits":'
        . '{"name":"Ann","plan":"pro","age":30,"tags":["a","b"],'
        . '"nested":{"x":null,"y":true,"z":false}}}}']]);

forwards_ok('identify spaced input', '/v1/identify',
    qq({\n  "userId" : "u1",\n  "traits" : { "a" : [ 1 , 2 ] }\n}\n),
    [[$EVENTS, '{"user_id":"u1","name":"Identify","data":{"traits":'
        . '{"a":[1,2]}}}']]);

# cJSON alone would send 1.2345678901234567e+19, 1.5 and 100.
my $numbers = '{"id":12345678901234567890,"price":1.50,"exp":1e2,'
    . '"list":[-0,2.0E-3]}';
forwards_ok('identify numbers kept exact', '/sync/v1/identify',
    qq({"userId":"u1","traits":$numbers}),
    [[$EVENTS, qq({"user_id":"u1","name":"Identify","data":)
        . qq({"traits":$numbers}})],
     [$USERS, qq({"user_id":"u1","attributes":$numbers})]]);

forwards_ok('identify null traits', '/v1/identify',
    '{"userId":"u1","traits":null}',
    [[$EVENTS, '{"user_id":"u1","name":"Identify","data":{"traits":{}}}']]);

forwards_ok('identify missing traits', '/v1/identify',
    '{"userId":"u1"}',
    [[$EVENTS, '{"user_id":"u1","name":"Identify","data":{"traits":{}}}']]);

forwards_ok('identify empty traits', '/v1/identify',
    '{"userId":"u1","traits":{}}',
    [[$EVENTS, '{"user_id":"u1","name":"Identify","data":{"traits":{}}}']]);

# track, page, screen

forwards_ok('track', '/v1/track',
    '{"userId":"u1","event":"Signed Up","properties":{"plan":"pro"}}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":'
        . '{"content":"Signed Up"}}']]);

forwards_ok('track with anonymousId', '/v1/track',
    '{"anonymousId":"anon-1","userId":"u1","event":"E"}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":{"content":"E"}}']]);

forwards_ok('page with name', '/v1/page',
    '{"userId":"u1","name":"Home","properties":{"path":"/"}}',
    [[$EVENTS, '{"user_id":"u1","name":"Page","data":{"content":"Home"}}']]);

forwards_ok('page without name', '/v1/page',
    '{"userId":"u1","properties":{"path":"/"}}',
    [[$EVENTS, '{"user_id":"u1","name":"Page","data":{}}']]);

forwards_ok('screen with name', '/v1/screen',
    '{"userId":"u1","name":"Settings"}',
    [[$EVENTS, '{"user_id":"u1","name":"Screen","data":'
        . '{"content":"Settings"}}']]);

forwards_ok('screen without name', '/v1/screen',
    '{"userId":"u1"}',
    [[$EVENTS, '{"user_id":"u1","name":"Screen","data":{}}']]);

forwards_ok('path type beats body type', '/v1/track',
    '{"type":"identify","userId":"u1","event":"E","traits":{"a":1}}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":{"content":"E"}}']]);

# userId values

forwards_ok('integer userId', '/v1/track',
    '{"userId":42,"event":"E"}',
    [[$EVENTS, '{"user_id":"42","name":"Track","data":{"content":"E"}}']]);

forwards_ok('fractional userId', '/v1/track',
    '{"userId":4.5,"event":"E"}',
    [[$EVENTS, '{"user_id":"4.5","name":"Track","data":{"content":"E"}}']]);

# Strings: UTF-8 bytes pass unchanged, escapes follow JSON's minimum.

forwards_ok('utf-8 bytes kept', '/v1/track',
    qq({"userId":"us\xc3\xa9r-1","event":"Caf\xc3\xa9 \xe2\x98\x95 )
        . qq(\xe6\x97\xa5\xe6\x9c\xac \xf0\x9f\x98\x80"}),
    [[$EVENTS, qq({"user_id":"us\xc3\xa9r-1","name":"Track","data":)
        . qq({"content":"Caf\xc3\xa9 \xe2\x98\x95 \xe6\x97\xa5\xe6\x9c\xac )
        . qq(\xf0\x9f\x98\x80"}})]]);

forwards_ok('unicode escape decoded', '/v1/track',
    '{"userId":"u1","event":"caf\u00e9"}',
    [[$EVENTS, qq({"user_id":"u1","name":"Track","data":)
        . qq({"content":"caf\xc3\xa9"}})]]);

forwards_ok('surrogate pair decoded', '/v1/track',
    '{"userId":"u1","event":"\ud83d\ude00"}',
    [[$EVENTS, qq({"user_id":"u1","name":"Track","data":)
        . qq({"content":"\xf0\x9f\x98\x80"}})]]);

forwards_ok('json escapes kept', '/v1/track',
    '{"userId":"u1","event":"q\"b\\\\n\nr\rt\tb\bf\f"}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":'
        . '{"content":"q\"b\\\\n\nr\rt\tb\bf\f"}}']]);

forwards_ok('control chars escaped', '/v1/track',
    '{"userId":"u1","event":"a\u0001b\u001fc"}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":'
        . '{"content":"a\u0001b\u001fc"}}']]);

forwards_ok('solidus unescaped', '/v1/track',
    '{"userId":"u1","event":"a\/b"}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":'
        . '{"content":"a/b"}}']]);

forwards_ok('utf-8 in traits keys', '/v1/identify',
    qq({"userId":"u1","traits":{"n\xc3\xa4me":"J\xc3\xbcrgen"}}),
    [[$EVENTS, qq({"user_id":"u1","name":"Identify","data":)
        . qq({"traits":{"n\xc3\xa4me":"J\xc3\xbcrgen"}}})]]);

# A client Content-Type other than application/json is accepted, and Stories
# still gets application/json.

forwards_ok('client text/plain', '/v1/track',
    '{"userId":"u1","event":"E"}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":{"content":"E"}}']],
    headers => [['Content-Type', 'text/plain;charset=UTF-8'],
                ['Cookie', 'session=client-cookie-1'],
                ['X-Client-Id', 'client-header-1']]);

# stories_sync_users on: events first, then users.

my $traits = '{"name":"Ann Lee","email":"ann@example.com",'
    . '"phone":"+15550100","plan":"pro"}';
forwards_ok('sync users full', '/sync/v1/identify',
    qq({"userId":"u1","traits":$traits}),
    [[$EVENTS, qq({"user_id":"u1","name":"Identify","data":)
        . qq({"traits":$traits}})],
     [$USERS, '{"user_id":"u1","name":"Ann Lee","email":"ann@example.com",'
        . qq("phone":"+15550100","attributes":$traits})]]);

$traits = '{"firstName":"Ann","lastName":"Lee","email":"ann@example.com"}';
forwards_ok('sync users first last', '/sync/v1/identify',
    qq({"userId":"u2","traits":$traits}),
    [[$EVENTS, qq({"user_id":"u2","name":"Identify","data":)
        . qq({"traits":$traits}})],
     [$USERS, '{"user_id":"u2","name":"Ann Lee","email":"ann@example.com",'
        . qq("attributes":$traits})]]);

$traits = '{"firstName":"Ann"}';
forwards_ok('sync users first only', '/sync/v1/identify',
    qq({"userId":"u3","traits":$traits}),
    [[$EVENTS, qq({"user_id":"u3","name":"Identify","data":)
        . qq({"traits":$traits}})],
     [$USERS, qq({"user_id":"u3","name":"Ann","attributes":$traits})]]);

$traits = '{"lastName":"Lee","phone":"+15550100"}';
forwards_ok('sync users last only', '/sync/v1/identify',
    qq({"userId":"u4","traits":$traits}),
    [[$EVENTS, qq({"user_id":"u4","name":"Identify","data":)
        . qq({"traits":$traits}})],
     [$USERS, '{"user_id":"u4","name":"Lee","phone":"+15550100",'
        . qq("attributes":$traits})]]);

$traits = '{"lastName":"Lee","name":"Full Name","firstName":"Ann"}';
forwards_ok('sync users name first', '/sync/v1/identify',
    qq({"userId":"u5","traits":$traits}),
    [[$EVENTS, qq({"user_id":"u5","name":"Identify","data":)
        . qq({"traits":$traits}})],
     [$USERS, qq({"user_id":"u5","name":"Full Name","attributes":$traits})]]);

$traits = '{"plan":"pro"}';
forwards_ok('sync users no contact', '/sync/v1/identify',
    qq({"userId":"u6","traits":$traits}),
    [[$EVENTS, qq({"user_id":"u6","name":"Identify","data":)
        . qq({"traits":$traits}})],
     [$USERS, qq({"user_id":"u6","attributes":$traits})]]);

forwards_ok('sync users null traits', '/sync/v1/identify',
    '{"userId":7,"traits":null}',
    [[$EVENTS, '{"user_id":"7","name":"Identify","data":{"traits":{}}}'],
     [$USERS, '{"user_id":"7","attributes":{}}']]);

forwards_ok('sync users track', '/sync/v1/track',
    '{"userId":"u1","event":"E"}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":{"content":"E"}}']]);

forwards_ok('sync users short path', '/sync/v1/i',
    '{"userId":"u1","traits":{"email":"a@b.c"}}',
    [[$EVENTS, '{"user_id":"u1","name":"Identify","data":'
        . '{"traits":{"email":"a@b.c"}}}'],
     [$USERS, '{"user_id":"u1","email":"a@b.c","attributes":'
        . '{"email":"a@b.c"}}']]);

# Calls answered with success and not forwarded.

skips_ok('anonymousId only', '/v1/track',
    '{"anonymousId":"anon-1","event":"E"}');
skips_ok('anonymousId only identify', '/v1/identify',
    '{"anonymousId":"anon-1","traits":{"a":1}}');
skips_ok('group', '/v1/group', '{"userId":"u1","groupId":"g1"}');
skips_ok('alias', '/v1/alias', '{"userId":"u1","previousId":"p1"}');
skips_ok('group short path', '/v1/g', '{"userId":"u1","groupId":"g1"}');
skips_ok('alias short path', '/v1/a', '{"userId":"u1","previousId":"p1"}');
skips_ok('Stories false', '/v1/track',
    '{"userId":"u1","event":"E","integrations":{"Stories":false}}');
skips_ok('All false', '/v1/track',
    '{"userId":"u1","event":"E","integrations":{"All":false}}');
skips_ok('All false other true', '/v1/track',
    '{"userId":"u1","event":"E",'
        . '"integrations":{"All":false,"Mixpanel":true}}');
skips_ok('sync Stories false', '/sync/v1/identify',
    '{"userId":"u1","traits":{"a":1},"integrations":{"Stories":false}}');

forwards_ok('All false Stories true', '/v1/track',
    '{"userId":"u1","event":"E","integrations":{"All":false,"Stories":true}}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":{"content":"E"}}']]);

forwards_ok('All false Stories object', '/v1/track',
    '{"userId":"u1","event":"E","integrations":{"All":false,"Stories":{}}}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":{"content":"E"}}']]);

forwards_ok('All true Stories absent', '/v1/track',
    '{"userId":"u1","event":"E","integrations":{"All":true}}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":{"content":"E"}}']]);

forwards_ok('other integration false', '/v1/track',
    '{"userId":"u1","event":"E","integrations":{"Mixpanel":false}}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":{"content":"E"}}']]);

# Paths: short names, prefixes, import.

forwards_ok('short path t', '/v1/t', '{"userId":"u1","event":"E"}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":{"content":"E"}}']]);
forwards_ok('short path i', '/v1/i', '{"userId":"u1","traits":{"a":1}}',
    [[$EVENTS, '{"user_id":"u1","name":"Identify","data":'
        . '{"traits":{"a":1}}}']]);
forwards_ok('short path p', '/v1/p', '{"userId":"u1","name":"Home"}',
    [[$EVENTS, '{"user_id":"u1","name":"Page","data":{"content":"Home"}}']]);
forwards_ok('short path s', '/v1/s', '{"userId":"u1","name":"Main"}',
    [[$EVENTS, '{"user_id":"u1","name":"Screen","data":'
        . '{"content":"Main"}}']]);
forwards_ok('short path b', '/v1/b',
    '{"batch":[{"type":"track","userId":"u1","event":"E"}]}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":{"content":"E"}}']]);

forwards_ok('prefix short path', '/segment/v1/t',
    '{"userId":"u1","event":"E"}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":{"content":"E"}}']]);
forwards_ok('prefix long path', '/segment/v1/identify',
    '{"userId":"u1"}',
    [[$EVENTS, '{"user_id":"u1","name":"Identify","data":{"traits":{}}}']]);
forwards_ok('deep prefix', '/segment/api/track',
    '{"userId":"u1","event":"E"}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":{"content":"E"}}']]);
forwards_ok('query string ignored', '/v1/track?writeKey=abc',
    '{"userId":"u1","event":"E"}',
    [[$EVENTS, '{"user_id":"u1","name":"Track","data":{"content":"E"}}']]);

forwards_ok('import', '/v1/import',
    '{"batch":[{"type":"page","userId":"u1","name":"Home"}]}',
    [[$EVENTS, '{"user_id":"u1","name":"Page","data":{"content":"Home"}}']]);

# Paths the module does not handle fall through to the static module.

$t->clear_stories();
my $r = $t->request('GET', '/v1/docs/readme.txt');
is($r->{status}, 200, 'static file status');
is($r->{body}, "plain file\n", 'static file body');
$t->nothing_forwarded('static file');

$r = $t->request('GET', '/v1/docs/missing.txt');
is($r->{status}, 404, 'missing static file status');

# Short names count only after a v1 segment.
$r = $t->send_segment('/segment/api/t', '{"userId":"u1","event":"E"}');
is($r->{status}, 404, 'short name without v1 status');
$t->nothing_forwarded('short name without v1');

$t->stop();

done_testing();
