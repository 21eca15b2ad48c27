#!/usr/bin/perl

# stories-replay: sends dead-letter lines to a mock Stories API on loopback,
# retries, .failed and .progress files, resuming after SIGKILL and SIGTERM,
# exit statuses.  Every run passes --api http://127.0.0.1:PORT.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use File::Spec;
use JSON::PP;
use MIME::Base64 qw(decode_base64);
use POSIX qw(WNOHANG);
use Test::More;
use Time::HiRes qw(sleep time);

use StoriesTest;

my $TOOL = File::Spec->catfile($FindBin::Bin, File::Spec->updir,
    'build', 'stories-replay');

plan(skip_all => "stories-replay not built: $TOOL is missing")
    unless -x $TOOL;

my $KEY = 'replay-key-8c41e7';

my $t = StoriesTest->new();
my $dir = $t->dir;
$t->start_mock('stories', $t->stories_port);

my $API = 'http://127.0.0.1:' . $t->stories_port;
my $CLOSED_API = 'http://127.0.0.1:' . $t->closed_port;

my $KEY_FILE = $t->write_file('key', "$KEY\n");

# stdout and stderr of every run, checked for the key at the end.
my @OUTPUTS;
my $RUNS = 0;

############################################################################
# Helpers

# Returns one dead-letter line as the module writes it, newline included.
sub dead_letter {
    my (%f) = @_;
    my $path = $f{path} || '/v1/events/';
    my $status = defined $f{status} ? $f{status} : 500;
    my $id = defined $f{id} ? qq("$f{id}") : 'null';
    return qq({"time":"2026-12-04T15:30:00Z","path":"$path",)
        . qq("status":$status,"error":"Stories answered $status",)
        . qq("messageId":$id,"body":$f{body}}\n);
}

sub track_body {
    my ($n) = @_;
    return qq({"user_id":"u$n","name":"Track",)
        . qq("data":{"content":"Signed Up $n"}});
}

# Writes dead-letter lines to a new file and returns its path.
sub dead_letter_file {
    my ($name, @lines) = @_;
    for my $suffix ('', '.failed', '.progress') {
        unlink "$dir/$name$suffix";
    }
    return $t->write_file($name, join '', @lines);
}

# Starts stories-replay in the background.  Options: api (required),
# key_file (default the test key), args (after the options), env.
sub start_replay {
    my (%opt) = @_;

    die "start_replay needs api\n" unless $opt{api};

    $RUNS++;
    my $run = {
        out   => "$dir/run$RUNS.stdout",
        err   => "$dir/run$RUNS.stderr",
        start => time(),
    };
    my @cmd = ($TOOL, '--api', $opt{api});
    push @cmd, '--api-key-file', $opt{key_file} || $KEY_FILE
        unless $opt{no_key_file};
    push @cmd, @{ $opt{args} || [] };

    my $pid = fork();
    die "fork: $!\n" unless defined $pid;
    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        open STDOUT, '>', $run->{out};
        open STDERR, '>', $run->{err};
        delete @ENV{qw(http_proxy HTTP_PROXY https_proxy HTTPS_PROXY
                       all_proxy ALL_PROXY)};
        $ENV{STORIES_REPLAY_BACKOFF_MS} = 20;
        $ENV{STORIES_REPLAY_CONNECT_TIMEOUT} = 5;
        $ENV{STORIES_REPLAY_TIMEOUT} = 5;
        my %env = %{ $opt{env} || {} };
        @ENV{keys %env} = values %env;
        { exec @cmd }
        print STDERR "exec $TOOL: $!\n";
        POSIX::_exit(127);
    }
    $run->{pid} = $pid;
    return $run;
}

# Waits for a run to end (killing it after 20 seconds) and adds exit,
# signal, elapsed, stdout and stderr to it.
sub finish_replay {
    my ($run) = @_;

    my $deadline = time() + 20;
    my $done = 0;
    while (time() < $deadline) {
        if (waitpid($run->{pid}, WNOHANG) == $run->{pid}) {
            $done = 1;
            last;
        }
        sleep 0.02;
    }
    if (!$done) {
        kill 'KILL', $run->{pid};
        waitpid($run->{pid}, 0);
        fail("stories-replay ended within 20 seconds");
    }

    $run->{exit} = $? >> 8;
    $run->{signal} = $? & 127;
    $run->{elapsed} = time() - $run->{start};
    $run->{stdout} = slurp($run->{out});
    $run->{stderr} = slurp($run->{err});
    push @OUTPUTS, $run->{stdout}, $run->{stderr};
    return $run;
}

sub replay {
    return finish_replay(start_replay(@_));
}

sub slurp {
    my ($path) = @_;
    open my $fh, '<:raw', $path or return undef;
    local $/;
    my $content = <$fh>;
    close $fh;
    return defined $content ? $content : '';
}

# Returns (inode, offset) from a .progress file, or an empty list.
sub progress {
    my ($path) = @_;
    my $text = slurp("$path.progress");
    return () unless defined $text && $text =~ /^(\d+) (\d+)\n\z/;
    return ($1, $2);
}

sub failed_lines {
    my ($path) = @_;
    my $text = slurp("$path.failed");
    return defined $text ? split /(?<=\n)/, $text : ();
}

# Returns the byte offsets at which each line ends.
sub line_ends {
    my $pos = 0;
    return map { $pos += length $_ } @_;
}

# Counts the recorded requests for each body.
sub count_bodies {
    my %count;
    $count{ $_->{body} }++ for @_;
    return \%count;
}

############################################################################
# Delivery

my @bodies = (
    track_body(1),
    qq({"user_id":"u2","name":"Identify","data":{"traits":{"note":)
        . qq("brace } bracket ] quote \\" backslash \\\\ tab \\t",)
        . qq("body":"x}","list":[1,{"a":null}],)
        . qq("name":"Zo\xc3\xab \xe6\x97\xa5"}}}),
    qq({"user_id":"u3","name":"Ann","email":"ann\@example.com",)
        . qq("attributes":{"plan":"pro"}}),
    track_body(4),
);
my @paths = ('/v1/events/', '/v1/events/', '/v1/users', '/v1/events/');

my $file = dead_letter_file('events.jsonl',
    dead_letter(path => $paths[0], body => $bodies[0], id => 'm1'),
    dead_letter(path => $paths[1], body => $bodies[1], id => 'm2'),
    "\n",
    dead_letter(path => $paths[2], body => $bodies[2]),
    "\r\n",
    # A CRLF line as an editor on Windows may leave it.
    substr(dead_letter(path => $paths[3], body => $bodies[3], id => 'm4'),
        0, -1) . "\r\n",
);

my $run = replay(api => "$API/", args => [$file]);

is($run->{exit}, 0, 'delivery exits 0');
is($run->{stdout}, '', 'delivery prints nothing on stdout');
like($run->{stderr}, qr/^delivered 4, failed 0, elapsed \d+\.\ds$/m,
    'delivery summary');

my @requests = $t->stories_requests;
is(scalar @requests, 4, 'delivery sends each line once');

for my $i (0 .. $#bodies) {
    my $r = $requests[$i] or next;
    my $n = $i + 1;
    is($r->{method}, 'POST', "line $n method");
    is($r->{uri}, $paths[$i], "line $n path");
    is($r->{body}, $bodies[$i], "line $n exact body");
    is_deeply([StoriesTest::header_values($r, 'Authorization')],
        ["Bearer $KEY"], "line $n Authorization");
    is_deeply([StoriesTest::header_values($r, 'Content-Type')],
        ['application/json'], "line $n Content-Type");
    is_deeply([StoriesTest::header_values($r, 'Content-Length')],
        [length $bodies[$i]], "line $n Content-Length");
}

ok(!-e "$file.failed", 'delivery writes no .failed file');

my ($inode, $offset) = progress($file);
is($inode, (stat $file)[1], 'progress stores the inode');
is($offset, -s $file, 'progress stores the end of the file');

$t->clear_stories;
$run = replay(api => $API, args => [$file]);
is($run->{exit}, 0, 'second run exits 0');
like($run->{stderr}, qr/^delivered 0, failed 0,/m, 'second run sends nothing');
is(scalar $t->stories_requests, 0, 'second run sends no request');

# Lines appended after a run are sent by the next one.
open my $append, '>>:raw', $file or die "open $file: $!\n";
print {$append} dead_letter(body => track_body(5)),
    dead_letter(body => track_body(6));
close $append;

$t->clear_stories;
$run = replay(api => $API, args => [$file]);
is($run->{exit}, 0, 'appended lines exit 0');
is_deeply([map { $_->{body} } $t->stories_requests],
    [track_body(5), track_body(6)], 'appended lines only are sent');

# A file truncated in place is replayed from the start.
$t->write_file('events.jsonl', dead_letter(body => track_body(7)));
$t->clear_stories;
$run = replay(api => $API, args => [$file]);
is($run->{exit}, 0, 'truncated file exits 0');
like($run->{stderr}, qr/replaced or truncated/, 'truncated file notice');
is_deeply([map { $_->{body} } $t->stories_requests],
    [track_body(7)], 'truncated file is sent from the start');

# A file replaced by rename has a new inode.
my $tmp = $t->write_file('events.new', dead_letter(body => track_body(8))
    . dead_letter(body => track_body(9)) . dead_letter(body => track_body(10)));
rename $tmp, $file or die "rename $tmp: $!\n";
$t->clear_stories;
$run = replay(api => $API, args => [$file]);
is($run->{exit}, 0, 'replaced file exits 0');
is(scalar $t->stories_requests, 3, 'replaced file is sent from the start');

############################################################################
# Paths other than the module's, and control bytes in a messageId

$file = dead_letter_file('paths.jsonl',
    dead_letter(path => '/../../admin', id => 'm-admin', status => 500,
        body => track_body(11)),
    dead_letter(path => '/v1/users', id => "m-esc\e[31m",
        status => 400, body => track_body(12)));
$t->clear_stories;
$t->set_stories_rules({ status => 400 });
$run = replay(api => $API, args => [$file]);
$t->set_stories_rules();
is($run->{exit}, 1, 'foreign path exits 1');
is_deeply([map { $_->{uri} } $t->stories_requests], ['/v1/users'],
    'foreign path is not sent');
my @foreign = failed_lines($file);
is(scalar @foreign, 2, 'foreign path and rejection both failed');
like($foreign[0] // '', qr/^\{"replay_status":0,"time"/,
    'foreign path failed with status 0');
unlike($run->{stderr}, qr/\e/, 'no escape byte on stderr');

############################################################################
# Large body

my $big_body = '{"user_id":"u1","name":"Track","data":{"content":"'
    . ('x' x (1536 * 1024)) . '"}}';
$file = dead_letter_file('big.jsonl', dead_letter(body => $big_body));
$t->clear_stories;
$run = replay(api => $API, args => [$file]);
is($run->{exit}, 0, 'large body exits 0');
@requests = $t->stories_requests;
is(scalar @requests, 1, 'large body sent once');
ok(defined $requests[0] && $requests[0]{body} eq $big_body,
    'large body arrives byte for byte');

############################################################################
# Retries

$file = dead_letter_file('retry.jsonl', dead_letter(body => track_body(1)));
$t->clear_stories;
$t->set_stories_rules({ seq => 1, status => 503 }, { seq => 2, status => 503 });
$run = replay(api => $API, args => [$file]);
is($run->{exit}, 0, '503 then 200 exits 0');
@requests = $t->stories_requests;
is(scalar @requests, 3, '503 then 200 takes three attempts');
is_deeply([map { $_->{body} } @requests], [(track_body(1)) x 3],
    '503 retries send the same body');
ok(!-e "$file.failed", '503 then 200 writes no .failed file');

$file = dead_letter_file('rate.jsonl', dead_letter(body => track_body(1)));
$t->clear_stories;
$t->set_stories_rules(
    { seq => 1, status => 429, headers => [['Retry-After', '1']] });
$run = replay(api => $API, args => [$file]);
is($run->{exit}, 0, '429 then 200 exits 0');
@requests = $t->stories_requests;
is(scalar @requests, 2, '429 then 200 takes two attempts');
cmp_ok($requests[1]{time} - $requests[0]{time}, '>=', 0.9,
    '429 waits for Retry-After') if @requests == 2;

$file = dead_letter_file('rate-backoff.jsonl',
    dead_letter(body => track_body(1)));
$t->clear_stories;
$t->set_stories_rules({ seq => 1, status => 429 });
$run = replay(api => $API, args => [$file]);
is($run->{exit}, 0, '429 without Retry-After exits 0');
is(scalar $t->stories_requests, 2, '429 without Retry-After is retried');

$file = dead_letter_file('timeout.jsonl', dead_letter(body => track_body(1)));
$t->clear_stories;
$t->set_stories_rules({ seq => 1, delay => 3 });
$run = replay(api => $API, args => [$file],
    env => { STORIES_REPLAY_TIMEOUT => 1 });
is($run->{exit}, 0, 'timeout then 200 exits 0');
is(scalar $t->stories_requests, 2, 'timeout is retried');

$file = dead_letter_file('408.jsonl', dead_letter(body => track_body(1)));
$t->clear_stories;
$t->set_stories_rules({ seq => 1, status => 408 });
$run = replay(api => $API, args => [$file]);
is($run->{exit}, 0, '408 then 200 exits 0');
is(scalar $t->stories_requests, 2, '408 is retried');

############################################################################
# Failures

my $rejected = dead_letter(body => track_body(2), id => 'm2');
$file = dead_letter_file('reject.jsonl',
    dead_letter(body => track_body(1)), $rejected,
    dead_letter(body => track_body(3)));
$t->clear_stories;
$t->set_stories_rules({ body_contains => '"u2"', status => 400 });
$run = replay(api => $API, args => [$file]);
is($run->{exit}, 1, 'permanent 400 exits 1');
like($run->{stderr}, qr/^delivered 2, failed 1,/m, 'permanent 400 summary');
like($run->{stderr}, qr/messageId "m2".*Stories answered 400/,
    'permanent 400 is logged with the messageId');
is(scalar $t->stories_requests, 3, 'permanent 400 is not retried');

my @failed = failed_lines($file);
is(scalar @failed, 1, 'permanent 400 writes one .failed line');
is($failed[0], '{"replay_status":400,' . substr($rejected, 1),
    '.failed line is the original line with replay_status in front');
my $record = eval { decode_json($failed[0]) } || {};
is($record->{replay_status}, 400, '.failed line is JSON with replay_status');
is($record->{messageId}, 'm2', '.failed line keeps messageId');
is($record->{path}, '/v1/events/', '.failed line keeps path');
like($failed[0], qr/,"body":\Q${\ track_body(2)}\E\}\n\z/,
    '.failed line keeps body last');

# The .failed file is a dead-letter file in turn.
my $failed_file = "$file.failed";
$t->clear_stories;
$t->set_stories_rules();
$run = replay(api => $API, args => [$failed_file]);
is($run->{exit}, 0, '.failed file replays');
@requests = $t->stories_requests;
is_deeply([map { $_->{body} } @requests], [track_body(2)],
    '.failed file replay sends the original body');

$file = dead_letter_file('exhaust.jsonl', dead_letter(body => track_body(1)));
$t->clear_stories;
$t->set_stories_rules({ status => 503 });
$run = replay(api => $API, args => ['--max-attempts', 2, $file]);
is($run->{exit}, 1, 'exhausted attempts exit 1');
is(scalar $t->stories_requests, 2, '--max-attempts 2 makes two attempts');
@failed = failed_lines($file);
is(scalar @failed, 1, 'exhausted attempts write one .failed line');
like($failed[0] || '', qr/^\{"replay_status":503,"time":/,
    'exhausted attempts store the last status');
like($run->{stderr}, qr/gave up after 2 attempts/,
    'exhausted attempts are logged');
$t->set_stories_rules();

$file = dead_letter_file('refused.jsonl', dead_letter(body => track_body(1)));
$run = replay(api => $CLOSED_API, args => ['--max-attempts', 3, $file]);
is($run->{exit}, 1, 'connection refused exits 1');
like($run->{stderr}, qr/gave up after 3 attempts/,
    'connection refused is retried');
@failed = failed_lines($file);
like($failed[0] || '', qr/^\{"replay_status":0,"time":/,
    'connection refused stores status 0');

############################################################################
# Invalid lines

# Lines that are JSON objects keep their members after "replay_status".
my @invalid = (
    qq({"time":"t","status":500,"body":{"a":1}}\n),
    qq({"path":"v1/events/","body":{"a":1}}\n),
    qq({"path":"/v1/events/","status":500}\n),
    qq({"path":"/v1/events/","body":{"a":1},"status":500}\n),
);

# Other lines are kept as a JSON string in "line", or in base64 in
# "line_base64" when they are not UTF-8.  Each case is the line without
# its newline, then the .failed line's members after "replay_status".
my $NOT_OBJECT = '"replay_error":"not a JSON object"';
my @not_objects = (
    ['not json', qq($NOT_OBJECT,"line":"not json")],
    ['{', qq($NOT_OBJECT,"line":"{")],
    ['[1,2]', qq($NOT_OBJECT,"line":"[1,2]")],
    ['"text"', qq($NOT_OBJECT,"line":"\\"text\\"")],
    [qq({"path":"/v1/events/","body":{"a":1}),
        qq($NOT_OBJECT,"line":"{\\"path\\":\\"/v1/events/\\",)
        . qq(\\"body\\":{\\"a\\":1}")],
    [qq({"a":1} tail), qq($NOT_OBJECT,"line":"{\\"a\\":1} tail")],
    [qq({"a":1,}), qq($NOT_OBJECT,"line":"{\\"a\\":1,}")],
    [qq({"a":"\\ud800"}), qq($NOT_OBJECT,"line":"{\\"a\\":\\"\\\\ud800\\"}")],
    [qq(say "hi" \\o/), qq($NOT_OBJECT,"line":"say \\"hi\\" \\\\o/")],
    ["tab\there", qq($NOT_OBJECT,"line":"tab\\u0009here")],
    ["caf\xc3\xa9 {", qq($NOT_OBJECT,"line":"caf\xc3\xa9 {")],
    [qq({"a":"\xff"}), qq($NOT_OBJECT,"line_base64":"eyJhIjoi/yJ9")],
    ["caf\xe9 \xc3", qq($NOT_OBJECT,"line_base64":"Y2Fm6SDD")],
);

$file = dead_letter_file('invalid.jsonl', @invalid,
    (map { "$_->[0]\n" } @not_objects),
    dead_letter(body => track_body(1)));
$t->clear_stories;
$run = replay(api => $API, args => [$file]);
my $invalid_count = @invalid + @not_objects;
is($run->{exit}, 1, 'invalid lines exit 1');
like($run->{stderr}, qr/^delivered 1, failed $invalid_count,/m,
    'invalid lines summary');
is_deeply([map { $_->{body} } $t->stories_requests], [track_body(1)],
    'invalid lines are not sent');
@failed = failed_lines($file);
is(scalar @failed, $invalid_count, 'invalid lines go to .failed');
for my $i (0 .. $#invalid) {
    is($failed[$i], '{"replay_status":0,' . substr($invalid[$i], 1),
        "invalid object $i keeps its bytes");
}
for my $i (0 .. $#not_objects) {
    my ($line, $members) = @{ $not_objects[$i] };
    my $failed_line = $failed[@invalid + $i];

    is($failed_line, qq({"replay_status":0,$members}\n),
        "non-object line $i exact bytes");

    my $record = eval { JSON::PP->new->utf8->decode($failed_line // '') };
    is(ref $record, 'HASH', "non-object line $i is a JSON object")
        or diag($@);
    $record ||= {};
    is($record->{replay_status}, 0, "non-object line $i replay_status");
    is($record->{replay_error}, 'not a JSON object',
        "non-object line $i replay_error");

    my $kept = exists $record->{line_base64}
        ? decode_base64($record->{line_base64})
        : $record->{line};
    utf8::encode($kept) if defined $kept && !exists $record->{line_base64};
    is($kept, $line, "non-object line $i keeps the line");
}
like($run->{stderr}, qr/missing "path"/, 'missing path is logged');

############################################################################
# Replaying a .failed file

# "replay_status" gets the new value in place of those that earlier runs
# put first.
my $REFAILED_BODY = ',"path":"/v1/events/","body":' . track_body(1) . '}';
my @refailed = (
    ['{"replay_status":400' . $REFAILED_BODY,
        '{"replay_status":503' . $REFAILED_BODY],
    ['{"replay_status":400,"replay_status":500' . $REFAILED_BODY,
        '{"replay_status":503' . $REFAILED_BODY],
    # "Replay_status" is another name, because names are case-sensitive.
    ['{"Replay_status":400' . $REFAILED_BODY,
        '{"replay_status":503,"Replay_status":400' . $REFAILED_BODY],
    # An invalid line is not sent, so its status stays 0.
    [qq({"replay_status":9,$NOT_OBJECT,"line":"{"}),
        qq({"replay_status":0,$NOT_OBJECT,"line":"{"})],
);
$file = dead_letter_file('refailed.jsonl', map { "$_->[0]\n" } @refailed);
$t->clear_stories;
$t->set_stories_rules({ status => 503 });
$run = replay(api => $API, args => ['--max-attempts', 1, $file]);
$t->set_stories_rules();
is($run->{exit}, 1, '.failed lines failing again exit 1');
is(scalar $t->stories_requests, @refailed - 1,
    '.failed lines are sent again');
@failed = failed_lines($file);
is(scalar @failed, scalar @refailed, '.failed lines fail again');
for my $i (0 .. $#refailed) {
    my $failed_line = $failed[$i] // '';
    is($failed_line, "$refailed[$i][1]\n", "refailed line $i exact bytes");

    my @statuses = $failed_line =~ /"replay_status"/g;
    is(scalar @statuses, 1, "refailed line $i has one replay_status");

    my $record = eval { decode_json($failed_line) };
    is(ref $record, 'HASH', "refailed line $i is a JSON object") or diag($@);
}

# A line that fails, then fails again from the .failed file, keeps its
# original members and only its replay_status changes.
my $chain_line = dead_letter(body => track_body(2), id => 'm-chain');
$file = dead_letter_file('chain.jsonl', $chain_line);
unlink "$file.failed.failed", "$file.failed.progress";
$t->clear_stories;
$t->set_stories_rules({ status => 400 });
$run = replay(api => $API, args => [$file]);
is($run->{exit}, 1, 'chain first run exits 1');
$t->set_stories_rules({ status => 503 });
$run = replay(api => $API, args => ['--max-attempts', 1, "$file.failed"]);
$t->set_stories_rules();
is($run->{exit}, 1, 'chain second run exits 1');

# failed_lines() adds ".failed" to the path it is given.
is_deeply([failed_lines($file)],
    ['{"replay_status":400,' . substr($chain_line, 1)],
    'chain first .failed line');
@failed = failed_lines("$file.failed");
is_deeply(\@failed, ['{"replay_status":503,' . substr($chain_line, 1)],
    'chain second .failed line replaces replay_status');
$record = eval { decode_json($failed[0] // '') } || {};
is($record->{replay_status}, 503, 'chain second .failed line is JSON');
is($record->{messageId}, 'm-chain', 'chain second .failed keeps messageId');

# A last line without a newline may still be being written.
$file = dead_letter_file('partial.jsonl', dead_letter(body => track_body(1)),
    substr(dead_letter(body => track_body(2)), 0, -1));
$t->clear_stories;
$run = replay(api => $API, args => [$file]);
is($run->{exit}, 1, 'unfinished last line exits 1');
like($run->{stderr}, qr/has no newline yet/, 'unfinished last line notice');
is(scalar $t->stories_requests, 1, 'unfinished last line is not sent');
open $append, '>>:raw', $file or die "open $file: $!\n";
print {$append} "\n";
close $append;
$run = replay(api => $API, args => [$file]);
is($run->{exit}, 0, 'finished last line exits 0');
is_deeply([map { $_->{body} } $t->stories_requests],
    [track_body(1), track_body(2)], 'finished last line is sent once');

############################################################################
# Interruption

my @many = map { dead_letter(body => track_body($_), id => "m$_") } 1 .. 20;
my @ends = line_ends(@many);

# Returns the number of lines finished according to the progress file that
# an interrupted run left (2 tests).
sub finished_lines {
    my ($name, $path) = @_;

    my ($inode, $offset) = progress($path);
    ok(defined $offset, "$name leaves a progress file");
    $offset = 0 unless defined $offset;
    ok((grep { $_ == $offset } 0, @ends), "$name offset is a line end");

    return scalar grep { $_ <= $offset } @ends;
}

# Checks that every line was sent, that no line finished by the first run
# was sent again, and that only the line in flight when the first run
# stopped was sent twice (3 tests).
sub check_resume {
    my ($name, $finished, $first, $all) = @_;

    my $count = count_bodies(@$all);
    my $first_count = count_bodies(@$first);

    my @twice = grep { ($count->{ track_body($_ + 1) } || 0) > 1 } 0 .. 19;
    my @finished_again = grep {
        ($count->{ track_body($_ + 1) } || 0)
            > ($first_count->{ track_body($_ + 1) } || 0)
    } 0 .. $finished - 1;

    is_deeply(\@finished_again, [],
        "$name resends no line recorded in progress");
    ok(@twice == 0 || (@twice == 1 && $twice[0] == $finished),
        "$name sends only the line in flight twice");
    is_deeply([grep { !$count->{ track_body($_ + 1) } } 0 .. 19], [],
        "$name delivers every line");
    return;
}

$file = dead_letter_file('kill.jsonl', @many);
$t->clear_stories;
$t->set_stories_rules({ delay => 0.2 });
my $bg = start_replay(api => $API, args => [$file]);
$t->wait_for_stories(8, 10);
kill 'KILL', $bg->{pid};
$run = finish_replay($bg);
is($run->{signal}, 9, 'SIGKILL ends the first run');
my @first = $t->stories_requests;
my $finished = finished_lines('SIGKILL', $file);
cmp_ok($finished, '>=', 7, 'SIGKILL run finished the answered lines');

$t->set_stories_rules();
$run = replay(api => $API, args => [$file]);
is($run->{exit}, 0, 'run after SIGKILL exits 0');
check_resume('SIGKILL', $finished, \@first, [$t->stories_requests]);

$file = dead_letter_file('term.jsonl', @many);
$t->clear_stories;
$t->set_stories_rules({ delay => 0.3 });
$bg = start_replay(api => $API, args => [$file]);
$t->wait_for_stories(3, 10);
kill 'TERM', $bg->{pid};
$run = finish_replay($bg);
is($run->{signal}, 0, 'SIGTERM run exits by itself');
is($run->{exit}, 143, 'SIGTERM run exits 143');
like($run->{stderr}, qr/interrupted by SIGTERM/, 'SIGTERM is logged');
like($run->{stderr}, qr/^delivered \d+, failed 0, elapsed/m,
    'SIGTERM run prints the summary');
ok(!-e "$file.failed", 'SIGTERM run writes no .failed file');
$finished = finished_lines('SIGTERM', $file);
cmp_ok($finished, '>', 0, 'SIGTERM run records finished lines');
@first = $t->stories_requests;

$t->set_stories_rules();
$run = replay(api => $API, args => [$file]);
is($run->{exit}, 0, 'run after SIGTERM exits 0');
check_resume('SIGTERM', $finished, \@first, [$t->stories_requests]);

############################################################################
# Two runs on one file

# The mock holds the answer to the first run's first request until the
# test creates the release file, so the second run starts and ends while
# the first holds the lock.
my @locked = map { dead_letter(body => track_body($_), id => "m$_") } 1 .. 6;
$file = dead_letter_file('locked.jsonl', @locked);
unlink "$dir/locked.release";
$t->clear_stories;
$t->set_stories_rules({ hold => 'locked.release' });
$bg = start_replay(api => $API, args => [$file]);
$t->wait_for_stories(1, 10);
my $second = replay(api => $API, args => [$file]);
is(scalar $t->stories_requests, 1,
    'second run sends nothing while the first waits');
is($second->{exit}, 3, 'second run exits 3');
is($second->{stderr}, "stories-replay: $file is being replayed by another "
    . "stories-replay process, which holds the lock on $file.lock; "
    . "run again after it ends\n",
    'second run prints only the lock message');
is($second->{stdout}, '', 'second run prints nothing on stdout');

$t->write_file('locked.release', '');
$run = finish_replay($bg);
is($run->{exit}, 0, 'first run exits 0');
is_deeply(count_bodies($t->stories_requests),
    { map { (track_body($_) => 1) } 1 .. 6 },
    'two runs deliver every line exactly once');
ok(!-e "$file.failed", 'two runs write no .failed file');
my ($lock_inode, $lock_offset) = progress($file);
is($lock_offset, -s $file, 'first run records the end of the file');
ok(-e "$file.lock", 'lock file stays after the run');

# The lock ends with the first run.
$t->set_stories_rules();
$t->clear_stories;
$run = replay(api => $API, args => [$file]);
is($run->{exit}, 0, 'run after the first exits 0');
is(scalar $t->stories_requests, 0, 'run after the first sends nothing');

# One run may name a file twice, spelled differently: it holds the lock.
$file = dead_letter_file('twice.jsonl', dead_letter(body => track_body(1)));
$t->clear_stories;
$run = replay(api => $API, args => [$file, "$dir/./twice.jsonl"]);
is($run->{exit}, 0, 'file named twice exits 0');
is_deeply([map { $_->{body} } $t->stories_requests], [track_body(1)],
    'file named twice is sent once');

############################################################################
# Usage and setup errors

$file = dead_letter_file('setup.jsonl', dead_letter(body => track_body(1)));
$t->clear_stories;

my $missing = "$dir/no-such-key";
$run = replay(api => $API, key_file => $missing, args => [$file]);
is($run->{exit}, 2, 'missing key file exits 2');
like($run->{stderr}, qr/\Q$missing\E/, 'missing key file is named');

my $empty = $t->write_file('empty-key', "\n");
$run = replay(api => $API, key_file => $empty, args => [$file]);
is($run->{exit}, 2, 'empty key file exits 2');
like($run->{stderr}, qr/\Q$empty\E is empty/, 'empty key file is named');

my $two_lines = $t->write_file('two-line-key', "$KEY\nsecond\n");
$run = replay(api => $API, key_file => $two_lines, args => [$file]);
is($run->{exit}, 2, 'two-line key file exits 2');

$run = replay(api => $API, no_key_file => 1, args => [$file]);
is($run->{exit}, 2, 'no --api-key-file exits 2');
like($run->{stderr}, qr/missing --api-key-file/, 'no --api-key-file message');

$run = replay(api => $API);
is($run->{exit}, 2, 'no dead-letter file exits 2');

$run = replay(api => $API, args => ["$dir/no-such-file"]);
is($run->{exit}, 2, 'missing dead-letter file exits 2');
like($run->{stderr}, qr/\Q$dir\E\/no-such-file/, 'missing file is named');

for my $value (0, 'x', 1001) {
    $run = replay(api => $API, args => ['--max-attempts', $value, $file]);
    is($run->{exit}, 2, "--max-attempts $value exits 2");
}

$run = replay(api => $API, args => ['--bogus', $file]);
is($run->{exit}, 2, 'unknown option exits 2');

$run = replay(api => 'ftp://127.0.0.1/', args => [$file]);
is($run->{exit}, 2, 'non-HTTP --api exits 2');

$run = replay(api => $API, args => [$file],
    env => { STORIES_REPLAY_TIMEOUT => 'soon' });
is($run->{exit}, 2, 'invalid STORIES_REPLAY_TIMEOUT exits 2');

is(scalar $t->stories_requests, 0, 'setup errors send nothing');

my $crlf_key = $t->write_file('crlf-key', "$KEY\r\n");
$run = replay(api => $API, key_file => $crlf_key, args => [$file]);
is($run->{exit}, 0, 'CRLF key file exits 0');
is_deeply([map { StoriesTest::header_values($_, 'Authorization') }
    $t->stories_requests], ["Bearer $KEY"], 'CRLF key file strips CRLF');

$run = replay(api => $API, args => ['--help']);
is($run->{exit}, 0, '--help exits 0');
like($run->{stdout}, qr/^Usage: stories-replay /, '--help prints usage');
like($run->{stdout}, qr/STORIES_REPLAY_BACKOFF_MS/,
    '--help documents the test variables');

my $leaks = grep { index($_, $KEY) >= 0 } @OUTPUTS;
is($leaks, 0, 'no output contains the API key');

$t->stop(1);

done_testing();
