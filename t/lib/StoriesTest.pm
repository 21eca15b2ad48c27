package StoriesTest;

# Test harness for ngx_http_stories_module, written with Perl core modules
# only.  It starts nginx from a generated config in a temporary directory,
# runs two mock HTTP servers on loopback (the Stories API and a backend),
# records every request the mocks receive and sends raw HTTP/1.1 client
# requests.

use strict;
use warnings;

use Cwd qw(abs_path);
use Fcntl qw(:flock O_RDWR O_CREAT);
use File::Basename qw(dirname);
use File::Spec;
use File::Temp qw(tempdir);
use IO::Socket::INET;
use JSON::PP;
use MIME::Base64 qw(encode_base64 decode_base64);
use POSIX qw(WNOHANG);
use Test::More;

use Exporter qw(import);
our @EXPORT_OK = qw(error_body);
use Time::HiRes qw(sleep time);

# A client or mock writing to a socket that the peer closed must get EPIPE,
# not die from the signal.
$SIG{PIPE} = 'IGNORE';

my $JSON = JSON::PP->new->utf8->canonical;

my %REASON = (
    200 => 'OK', 201 => 'Created', 202 => 'Accepted', 204 => 'No Content',
    400 => 'Bad Request', 401 => 'Unauthorized', 403 => 'Forbidden',
    404 => 'Not Found', 408 => 'Request Timeout', 413 => 'Payload Too Large',
    422 => 'Unprocessable Entity', 429 => 'Too Many Requests',
    500 => 'Internal Server Error', 502 => 'Bad Gateway',
    503 => 'Service Unavailable', 504 => 'Gateway Timeout',
);

my $DEFAULT_MODULE = File::Spec->catfile(
    dirname(dirname(dirname(abs_path(__FILE__)))),
    'build', 'ngx_http_stories_module.so');

# Absolute path of the module under test: TEST_NGINX_MODULE, or
# build/ngx_http_stories_module.so in the repository.  "static" names an
# nginx binary with the module compiled in, so no load_module is written.
sub module_path {
    return $ENV{TEST_NGINX_MODULE} || $DEFAULT_MODULE;
}

sub module_is_static {
    return module_path() eq 'static';
}

sub nginx_binary {
    return $ENV{TEST_NGINX_BINARY} || '/usr/sbin/nginx';
}

# Options:
#   error_log_level  level of the generated error_log line (default info)
#   load_module      0 to leave load_module out of the generated config
#   timeout          seconds a client request may take (default 10)
sub new {
    my ($class, %opts) = @_;

    my $leave = $ENV{TEST_NGINX_LEAVE} ? 1 : 0;
    my $dir = tempdir('stories-test-XXXXXX', TMPDIR => 1,
        CLEANUP => !$leave);

    # File::Temp creates the directory with mode 0700.  Workers that do not
    # run as root could then not write spooled request bodies.
    chmod 0755, $dir or die "chmod $dir: $!\n";

    my $self = bless {
        dir             => $dir,
        leave           => $leave,
        error_log_level => $opts{error_log_level} || 'info',
        load_module     => exists $opts{load_module}
                               ? $opts{load_module} : 1,
        timeout         => $opts{timeout} || 10,
        mocks           => {},
        nginx_pid       => undef,
        stopped         => 0,
        owner_pid       => $$,
    }, $class;

    for my $name (qw(port stories_port backend_port)) {
        $self->{$name} = free_port();
    }

    # CLOSED_PORT stays bound to a socket that never listens, so connections
    # to it are refused for as long as the test runs.  The socket has no
    # SO_REUSEADDR, so neither a server nor nginx can take the port.
    $self->{closed_socket} = IO::Socket::INET->new(
        LocalAddr => '127.0.0.1',
        LocalPort => 0,
        Proto     => 'tcp',
    ) or die "cannot bind a loopback port: $!\n";
    $self->{closed_port} = $self->{closed_socket}->sockport;

    diag("test directory kept: $dir") if $leave;

    return $self;
}

sub dir          { $_[0]{dir} }
sub port         { $_[0]{port} }
sub stories_port { $_[0]{stories_port} }
sub backend_port { $_[0]{backend_port} }
sub closed_port  { $_[0]{closed_port} }

# Returns a loopback TCP port that was free when this ran.  The kernel picks
# it when binding port 0, and the socket is closed again at once.  The
# kernel may pick a closed port again, so a port this process was already
# given is skipped: two servers of one test never get the same port.
my %given_ports;

sub free_port {
    for (1 .. 100) {
        my $sock = IO::Socket::INET->new(
            LocalAddr => '127.0.0.1',
            LocalPort => 0,
            Proto     => 'tcp',
            Listen    => 1,
            ReuseAddr => 1,
        ) or die "cannot bind a loopback port: $!\n";
        my $port = $sock->sockport;
        close $sock;
        return $port unless $given_ports{$port}++;
    }
    die "no unused loopback port after 100 tries\n";
}

sub has_module {
    return module_is_static() || -f module_path();
}

############################################################################
# Configuration

# Replaces %%PORT%%, %%STORIES_PORT%%, %%BACKEND_PORT%%, %%CLOSED_PORT%%,
# %%TESTDIR%% and %%MODULE%% in a template.
sub expand {
    my ($self, $text) = @_;

    my %values = (
        PORT         => $self->{port},
        STORIES_PORT => $self->{stories_port},
        BACKEND_PORT => $self->{backend_port},
        CLOSED_PORT  => $self->{closed_port},
        TESTDIR      => $self->{dir},
        MODULE       => module_path(),
    );
    $text =~ s/%%([A-Z_]+)%%/
        exists $values{$1} ? $values{$1} : die "unknown placeholder %%$1%%\n"
    /ge;
    return $text;
}

# Wraps the body of an http {} block into a complete nginx.conf template.
# Options: error_log_level, load_module (both default to the values given
# to new).
sub http_conf {
    my ($self, $http_body, %opts) = @_;

    my $level = $opts{error_log_level} || $self->{error_log_level};
    my $load = exists $opts{load_module}
        ? $opts{load_module} : $self->{load_module};
    my $load_line = $load && !module_is_static()
        ? "load_module %%MODULE%%;\n" : '';

    return <<"EOF";
${load_line}daemon off;
master_process on;
worker_processes 1;
user root;
pid %%TESTDIR%%/nginx.pid;
error_log %%TESTDIR%%/error.log $level;

events {
}

http {
    access_log %%TESTDIR%%/access.log;
    client_body_temp_path %%TESTDIR%%/client_body_temp;
    proxy_temp_path %%TESTDIR%%/proxy_temp;
    fastcgi_temp_path %%TESTDIR%%/fastcgi_temp;
    uwsgi_temp_path %%TESTDIR%%/uwsgi_temp;
    scgi_temp_path %%TESTDIR%%/scgi_temp;

$http_body
}
EOF
}

# Expands a template and writes it to TESTDIR/NAME (default nginx.conf).
sub write_conf {
    my ($self, $template, $name) = @_;
    $self->write_file($name || 'nginx.conf', $self->expand($template));
    return $self;
}

# Writes the server blocks given as an http {} body into nginx.conf.
sub write_http_conf {
    my ($self, $http_body, %opts) = @_;
    return $self->write_conf($self->http_conf($http_body, %opts));
}

# Writes a file below the test directory, creating its parent directories.
sub write_file {
    my ($self, $name, $content) = @_;

    my $path = File::Spec->catfile($self->{dir}, $name);
    my @parts = File::Spec->splitdir(dirname($path));
    my $sofar = '';
    for my $part (@parts) {
        $sofar = $sofar eq '' ? ($part eq '' ? '/' : $part)
                              : File::Spec->catdir($sofar, $part);
        mkdir $sofar unless -d $sofar;
    }

    open my $fh, '>:raw', $path or die "open $path: $!\n";
    print {$fh} $content;
    close $fh or die "close $path: $!\n";
    return $path;
}

sub read_file {
    my ($self, $name) = @_;
    my $path = File::Spec->catfile($self->{dir}, $name);
    open my $fh, '<:raw', $path or return '';
    local $/;
    my $content = <$fh>;
    close $fh;
    return defined $content ? $content : '';
}

# Runs `nginx -t` on an expanded template written to TESTDIR/NAME.  Returns
# the exit status and the combined stdout and stderr.
sub test_config {
    my ($self, $template, $name) = @_;

    $name ||= 'test.conf';
    $self->write_conf($template, $name);

    my $conf = File::Spec->catfile($self->{dir}, $name);
    my $log = File::Spec->catfile($self->{dir}, 'test-config.log');
    my @cmd = (nginx_binary(), '-t', '-p', "$self->{dir}/", '-c', $conf,
               '-e', $log);

    my $pid = open my $out, '-|';
    die "fork: $!\n" unless defined $pid;
    if ($pid == 0) {
        open STDERR, '>&', \*STDOUT or die "dup: $!\n";
        { exec @cmd }
        print "exec $cmd[0]: $!\n";
        POSIX::_exit(127);
    }
    local $/;
    my $output = <$out>;
    close $out;
    return ($? >> 8, defined $output ? $output : '');
}

############################################################################
# nginx process

# Starts the two mocks (unless started already) and nginx, then waits until
# nginx has written its pid file and accepts connections.  Dies with the
# error log when nginx does not come up.
sub run {
    my ($self) = @_;

    $self->start_mock('stories', $self->{stories_port})
        unless $self->{mocks}{stories};
    $self->start_mock('backend', $self->{backend_port})
        unless $self->{mocks}{backend};

    my $dir = $self->{dir};
    my $pid_file = "$dir/nginx.pid";
    unlink $pid_file;

    my $pid = fork();
    die "fork: $!\n" unless defined $pid;
    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        open STDOUT, '>>', "$dir/nginx.stdout";
        open STDERR, '>&', \*STDOUT;
        {
            exec nginx_binary(), '-p', "$dir/", '-c', "$dir/nginx.conf",
                '-e', "$dir/error.log";
        }
        print STDERR "exec " . nginx_binary() . ": $!\n";
        POSIX::_exit(127);
    }
    $self->{nginx_pid} = $pid;
    $self->{stopped} = 0;

    my $deadline = time() + 10;
    while (time() < $deadline) {
        if (waitpid($pid, WNOHANG) == $pid) {
            $self->{nginx_pid} = undef;
            die "nginx exited with status " . ($? >> 8) . " at startup:\n"
                . $self->read_file('nginx.stdout')
                . $self->read_file('error.log');
        }
        if (-s $pid_file && $self->_port_accepts($self->{port})) {
            return $self;
        }
        sleep 0.05;
    }

    die "nginx did not start within 10 seconds:\n"
        . $self->read_file('error.log');
}

sub _port_accepts {
    my ($self, $port) = @_;
    my $sock = IO::Socket::INET->new(
        PeerAddr => '127.0.0.1',
        PeerPort => $port,
        Proto    => 'tcp',
    ) or return 0;
    close $sock;
    return 1;
}

# Sends QUIT to nginx and waits up to 10 seconds for a graceful exit, then
# uses TERM and KILL.  Stops the mocks.  Unless $no_checks is true, the
# first call also runs two tests on error.log, so call it before
# done_testing (or count 2 tests in the plan).
sub stop {
    my ($self, $no_checks) = @_;

    return if $self->{stopped};
    $self->{stopped} = 1;

    if (my $pid = $self->{nginx_pid}) {
        kill 'QUIT', $pid;
        my $deadline = time() + 10;
        while (time() < $deadline && waitpid($pid, WNOHANG) == 0) {
            sleep 0.05;
        }
        if (kill 0, $pid) {
            kill 'TERM', $pid;
            sleep 0.5;
            kill 'KILL', $pid;
            waitpid($pid, 0);
        }
        $self->{nginx_pid} = undef;
    }

    $self->stop_mocks();

    return if $no_checks;

    my $log = $self->read_file('error.log');
    my @bad = grep { /\[(?:alert|crit|emerg)\]/ } split /\n/, $log;
    is(join("\n", @bad), '', 'error.log has no alert, crit or emerg');
    unlike($log, qr/http request count is zero/,
        'error.log has no request count underflow');

    # sanitizer builds write their reports to nginx's stderr, error.log
    my @reports = grep { /runtime error:|Sanitizer/ } split /\n/, $log;
    is(join("\n", @reports), '', 'error.log has no sanitizer report');
    return;
}

sub DESTROY {
    my ($self) = @_;

    # A forked mock or client inherits the object; only the process that
    # made it may stop anything.
    return unless $self->{owner_pid} == $$;
    local $?;
    $self->stop(1) unless $self->{stopped};
    return;
}

# Returns the current size of error.log, to read only later lines with
# error_log_since.
sub error_log_offset {
    my ($self) = @_;
    my $size = -s File::Spec->catfile($self->{dir}, 'error.log');
    return $size || 0;
}

sub error_log_since {
    my ($self, $offset) = @_;
    return substr($self->read_file('error.log'), $offset || 0);
}

# Polls error.log from $offset until $pattern matches or $timeout seconds
# (default 5) pass.  Returns the log text read last.
sub wait_for_log {
    my ($self, $offset, $pattern, $timeout) = @_;
    my $deadline = time() + (defined $timeout ? $timeout : 5);
    while (1) {
        my $log = $self->error_log_since($offset);
        return $log if $log =~ $pattern || time() >= $deadline;
        sleep 0.05;
    }
}

# Returns the lines of a JSON lines file in the test directory, decoded,
# after waiting up to $timeout seconds for $count of them.  A line that is
# not JSON comes back as { line => TEXT }.
sub wait_for_json_lines {
    my ($self, $name, $count, $timeout) = @_;
    my $deadline = time() + $timeout;
    while (1) {
        my @lines = grep { $_ ne '' } split /\n/, $self->read_file($name);
        if (@lines >= $count || time() >= $deadline) {
            return map { eval { $JSON->decode($_) } || { line => $_ } }
                @lines;
        }
        sleep 0.05;
    }
}

############################################################################
# Mock HTTP servers
#
# Each mock is a forked accept loop that forks again for every connection,
# so delayed answers do not block other connections.  Requests are read as
# HTTP/1.x with a Content-Length or chunked body.  Several requests may use
# one connection unless the request is HTTP/1.0 without keep-alive or has
# "Connection: close".
#
# Files in the test directory, for a mock named NAME:
#   NAME.jsonl  one JSON object per request: seq, method, uri, version,
#               headers ([name, value] pairs in received order and case),
#               body_base64, connection (number of the connection in
#               accept order, from 1 since the mock started), time
#   NAME.state  JSON {seq, active, peak}: sequence counter, requests being
#               answered now, and the maximum of active
#   NAME.rules  JSON list of rules written by set_rules
#   NAME.lock   flock target guarding the three files above

sub start_mock {
    my ($self, $name, $port) = @_;

    my $listen = IO::Socket::INET->new(
        LocalAddr => '127.0.0.1',
        LocalPort => $port,
        Proto     => 'tcp',
        Listen    => 128,
        ReuseAddr => 1,
    ) or die "mock $name cannot listen on 127.0.0.1:$port: $!\n";

    $self->_reset_mock_files($name);

    my $pid = fork();
    die "fork: $!\n" unless defined $pid;
    if ($pid == 0) {
        # Own process group, so stop_mocks also ends connection processes.
        setpgrp(0, 0);
        $self->{owner_pid} = 0;
        $SIG{CHLD} = 'IGNORE';
        $SIG{TERM} = 'DEFAULT';
        _mock_accept_loop($self->{dir}, $name, $listen);
        POSIX::_exit(0);
    }
    close $listen;
    $self->{mocks}{$name} = $pid;
    return $self;
}

sub stop_mocks {
    my ($self) = @_;
    for my $name (keys %{ $self->{mocks} }) {
        my $pid = delete $self->{mocks}{$name};
        kill 'TERM', -$pid;
        kill 'TERM', $pid;
        waitpid($pid, 0);
    }
    return;
}

sub _reset_mock_files {
    my ($self, $name) = @_;
    my $dir = $self->{dir};
    _with_lock($dir, $name, sub {
        _write_raw("$dir/$name.jsonl", '');
        _write_raw("$dir/$name.state",
            $JSON->encode({ seq => 0, active => 0, peak => 0 }));
    });
    _write_raw("$dir/$name.rules", '[]') unless -e "$dir/$name.rules";
    return;
}

sub _write_raw {
    my ($path, $content) = @_;
    open my $fh, '>:raw', $path or die "open $path: $!\n";
    print {$fh} $content;
    close $fh or die "close $path: $!\n";
    return;
}

sub _read_raw {
    my ($path) = @_;
    open my $fh, '<:raw', $path or return undef;
    local $/;
    my $content = <$fh>;
    close $fh;
    return $content;
}

sub _with_lock {
    my ($dir, $name, $code) = @_;
    sysopen my $lock, "$dir/$name.lock", O_RDWR | O_CREAT
        or die "open $dir/$name.lock: $!\n";
    flock $lock, LOCK_EX or die "flock: $!\n";
    my @result = $code->();
    close $lock;
    return wantarray ? @result : $result[0];
}

sub _mock_accept_loop {
    my ($dir, $name, $listen) = @_;

    my $accepted = 0;
    while (1) {
        my $conn = $listen->accept or next;
        $accepted++;
        my $pid = fork();
        if (!defined $pid) {
            close $conn;
            next;
        }
        if ($pid == 0) {
            close $listen;
            _mock_serve_connection($dir, $name, $conn, $accepted);
            POSIX::_exit(0);
        }
        close $conn;
    }
}

sub _mock_serve_connection {
    my ($dir, $name, $conn, $connection) = @_;

    my $buffer = '';
    while (1) {
        my $request = _read_http_request($conn, \$buffer) or return;

        my $seq = _with_lock($dir, $name, sub {
            my $state = $JSON->decode(_read_raw("$dir/$name.state"));
            $state->{seq}++;
            $state->{active}++;
            $state->{peak} = $state->{active}
                if $state->{active} > $state->{peak};
            _write_raw("$dir/$name.state", $JSON->encode($state));

            my $record = {
                seq         => $state->{seq},
                method      => $request->{method},
                uri         => $request->{uri},
                version     => $request->{version},
                headers     => $request->{headers},
                body_base64 => encode_base64($request->{body}, ''),
                connection  => $connection,
                time        => time(),
            };
            open my $fh, '>>:raw', "$dir/$name.jsonl"
                or die "open $dir/$name.jsonl: $!\n";
            print {$fh} $JSON->encode($record), "\n";
            close $fh;
            return $state->{seq};
        });

        my $rule = _find_rule($dir, $name, $seq, $request);

        sleep $rule->{delay} if $rule->{delay};
        if (defined $rule->{hold}) {
            my $deadline = time() + 60;
            sleep 0.02 until -e "$dir/$rule->{hold}" || time() > $deadline;
        }

        # Count the request as finished before nginx can see the answer.
        # Otherwise the next request nginx sends in its place could be
        # counted while this one still is, and peak would be one too high.
        _with_lock($dir, $name, sub {
            my $state = $JSON->decode(_read_raw("$dir/$name.state"));
            $state->{active}-- if $state->{active} > 0;
            _write_raw("$dir/$name.state", $JSON->encode($state));
        });

        last if $rule->{close};

        my $keep = _wants_keepalive($request);
        my $response = _build_response($rule, $keep);
        syswrite $conn, $response;

        last unless $keep;
    }
    close $conn;
    return;
}

sub _wants_keepalive {
    my ($request) = @_;
    my $connection = lc(_header_value($request->{headers}, 'Connection')
        || '');
    return 0 if $connection =~ /\bclose\b/;
    return 1 if $request->{version} eq 'HTTP/1.1';
    return $connection =~ /\bkeep-alive\b/ ? 1 : 0;
}

# Returns the first rule that matches the request, or the default rule
# (200 with {"ok":true}).  The rules file is read again for every request,
# so a test can change the rules between requests.
sub _find_rule {
    my ($dir, $name, $seq, $request) = @_;

    my $text = _read_raw("$dir/$name.rules");
    my $rules = eval { $JSON->decode(defined $text ? $text : '[]') } || [];

    for my $rule (@$rules) {
        next if defined $rule->{seq} && $rule->{seq} != $seq;
        next if defined $rule->{body_contains}
            && index($request->{body}, $rule->{body_contains}) < 0;
        next if defined $rule->{uri_contains}
            && index($request->{uri}, $rule->{uri_contains}) < 0;
        return $rule;
    }
    return {};
}

sub _build_response {
    my ($rule, $keep) = @_;

    my $status = $rule->{status} || 200;
    my $body = defined $rule->{body} ? $rule->{body} : '{"ok":true}';
    my $reason = $REASON{$status} || 'Status';

    my $head = "HTTP/1.1 $status $reason\r\n"
        . "Content-Type: application/json\r\n"
        . 'Content-Length: ' . length($body) . "\r\n"
        . 'Connection: ' . ($keep ? 'keep-alive' : 'close') . "\r\n";
    for my $pair (@{ $rule->{headers} || [] }) {
        $head .= "$pair->[0]: $pair->[1]\r\n";
    }
    return "$head\r\n$body";
}

# Reads more bytes into $$buffer.  Returns 0 at end of file.
sub _fill {
    my ($sock, $buffer) = @_;
    my $n = sysread $sock, $$buffer, 65536, length $$buffer;
    return $n ? 1 : 0;
}

# Reads one request from $sock into a hash (method, uri, version, headers,
# body).  Returns undef when the peer closes before a complete request.
sub _read_http_request {
    my ($sock, $buffer) = @_;

    while ($$buffer !~ /\r\n\r\n/) {
        _fill($sock, $buffer) or return undef;
    }
    my $end = index($$buffer, "\r\n\r\n");
    my $head = substr($$buffer, 0, $end);
    substr($$buffer, 0, $end + 4) = '';

    my ($request_line, @lines) = split /\r\n/, $head;
    my ($method, $uri, $version) = split / /, $request_line, 3;
    $version = 'HTTP/1.0' unless defined $version;

    my @headers;
    for my $line (@lines) {
        my ($header, $value) = $line =~ /^([^:]+):[ \t]*(.*?)[ \t]*$/
            or next;
        push @headers, [$header, $value];
    }

    my $body = _read_body($sock, $buffer, \@headers);
    return undef unless defined $body;

    return {
        method  => $method,
        uri     => $uri,
        version => $version,
        headers => \@headers,
        body    => $body,
    };
}

# Reads a message body framed by the given headers from $sock.  Returns ''
# when there is neither Content-Length nor chunked Transfer-Encoding, and
# undef on a premature end of file.
sub _read_body {
    my ($sock, $buffer, $headers, $read_to_eof) = @_;

    my $encoding = _header_value($headers, 'Transfer-Encoding');
    if (defined $encoding && $encoding =~ /chunked/i) {
        return _read_chunked($sock, $buffer);
    }

    my $length = _header_value($headers, 'Content-Length');
    if (defined $length) {
        while (length $$buffer < $length) {
            _fill($sock, $buffer) or return undef;
        }
        return substr($$buffer, 0, $length, '');
    }

    if ($read_to_eof) {
        1 while _fill($sock, $buffer);
        return substr($$buffer, 0, length $$buffer, '');
    }
    return '';
}

sub _read_chunked {
    my ($sock, $buffer) = @_;

    my $body = '';
    while (1) {
        while ($$buffer !~ /\r\n/) {
            _fill($sock, $buffer) or return undef;
        }
        $$buffer =~ s/^([0-9a-fA-F]+)[^\r]*\r\n// or return undef;
        my $size = hex $1;
        if ($size == 0) {
            # Skip trailer fields up to the empty line.
            while ($$buffer !~ /^(?:[^\r]*\r\n)*?\r\n/) {
                _fill($sock, $buffer) or return undef;
            }
            $$buffer =~ s/^(?:[^\r]*\r\n)*?\r\n//;
            return $body;
        }
        while (length $$buffer < $size + 2) {
            _fill($sock, $buffer) or return undef;
        }
        $body .= substr($$buffer, 0, $size);
        substr($$buffer, 0, $size + 2) = '';
    }
}

sub _header_value {
    my ($headers, $name) = @_;
    my @values = header_values($headers, $name);
    return @values ? $values[0] : undef;
}

# Returns every value of the named header, case-insensitively, from a list
# of [name, value] pairs or from a mock record.
sub header_values {
    my ($headers, $name) = @_;
    $headers = $headers->{headers} if ref $headers eq 'HASH';
    return map { $_->[1] } grep { lc $_->[0] eq lc $name } @$headers;
}

############################################################################
# Mock control from tests

# Replaces the rules of a mock.  Each rule is a hash:
#   match:  seq (request number since the last clear, from 1),
#           body_contains (byte substring), uri_contains
#   answer: status (default 200), headers ([[name, value], ...]),
#           body (default {"ok":true}), delay (seconds, fractional),
#           hold (a file name: answer once the test directory has it,
#           or after 60 s), close (true: close the connection without
#           answering)
# The first rule whose match keys all hold is used.  A rule with no match
# keys applies to every request.
sub set_rules {
    my ($self, $name, @rules) = @_;
    my $path = "$self->{dir}/$name.rules";
    _write_raw("$path.tmp", $JSON->encode(\@rules));
    rename "$path.tmp", $path or die "rename $path: $!\n";
    return $self;
}

sub set_stories_rules { my $self = shift; $self->set_rules('stories', @_) }
sub set_backend_rules { my $self = shift; $self->set_rules('backend', @_) }

# Forgets the recorded requests and resets the sequence counter and peak.
sub clear {
    my ($self, $name) = @_;
    $self->_reset_mock_files($name);
    return $self;
}

sub clear_stories { $_[0]->clear('stories') }
sub clear_backend { $_[0]->clear('backend') }

# Returns the recorded requests as hashes with seq, method, uri, version,
# headers ([name, value] pairs), body (bytes) and connection.  They are in
# the order their bodies were complete, which for requests on different
# connections can differ from the order nginx sent them.  Sort by
# connection to get the order nginx connected in, because the mock accepts
# loopback connections in the order of their connect() calls.
# In scalar context, returns their number.
sub requests {
    my ($self, $name) = @_;
    my $dir = $self->{dir};
    my $text = _with_lock($dir, $name, sub {
        _read_raw("$dir/$name.jsonl");
    });

    my @records;
    for my $line (split /\n/, defined $text ? $text : '') {
        next if $line eq '';
        my $record = $JSON->decode($line);
        $record->{body} = decode_base64(delete $record->{body_base64});
        push @records, $record;
    }
    @records = sort { $a->{seq} <=> $b->{seq} } @records;
    return wantarray ? @records : scalar @records;
}

sub stories_requests { $_[0]->requests('stories') }
sub backend_requests { $_[0]->requests('backend') }

# Polls until the mock has recorded at least $count requests or $timeout
# seconds (default 5) have passed.  Returns the records found.
sub wait_for {
    my ($self, $name, $count, $timeout) = @_;
    my $deadline = time() + (defined $timeout ? $timeout : 5);
    while (1) {
        my @records = $self->requests($name);
        return @records if @records >= $count || time() >= $deadline;
        sleep 0.05;
    }
}

sub wait_for_stories { my $self = shift; $self->wait_for('stories', @_) }
sub wait_for_backend { my $self = shift; $self->wait_for('backend', @_) }

# Returns the maximum number of requests the mock had received and not yet
# answered at one time since the last clear.
sub peak {
    my ($self, $name) = @_;
    my $dir = $self->{dir};
    my $text = _with_lock($dir, $name, sub {
        _read_raw("$dir/$name.state");
    });
    return $JSON->decode($text)->{peak};
}

sub stories_peak { $_[0]->peak('stories') }

############################################################################
# HTTP client

# Opens a connection to nginx (or to $port).
sub connect {
    my ($self, $port) = @_;
    my $sock = IO::Socket::INET->new(
        PeerAddr => '127.0.0.1',
        PeerPort => $port || $self->{port},
        Proto    => 'tcp',
        Timeout  => $self->{timeout},
    ) or die "connect to 127.0.0.1:" . ($port || $self->{port})
        . ": $!\n";
    binmode $sock;
    return $sock;
}

# Sends one request on a new connection with "Connection: close" and
# returns the response; see request_on.
sub request {
    my ($self, $method, $path, $body, $headers, %opts) = @_;
    my $sock = $self->connect($opts{port});
    my $response = $self->request_on($sock, $method, $path, $body, $headers,
        %opts, close => 1);
    close $sock;
    return $response;
}

# Sends one HTTP/1.1 request on an open connection and reads the response,
# so several calls can share a keepalive connection.
#
# $body is sent as bytes; undef sends no body and no Content-Length.
# $headers is a hash or a list of [name, value] pairs, sent in order.
# Options:
#   close    add "Connection: close"
#   chunked  send the body with chunked transfer encoding, in pieces of
#            this many bytes
#
# Returns undef on timeout or when the connection closes before a response,
# otherwise a hash: status, headers (lowercase name => value, repeated
# headers joined with ", "), header_list ([name, value] pairs), body (with
# chunked encoding removed).
sub request_on {
    my ($self, $sock, $method, $path, $body, $headers, %opts) = @_;

    my @pairs = ref $headers eq 'HASH'
        ? map { [$_, $headers->{$_}] } sort keys %$headers
        : @{ $headers || [] };
    my %given = map { lc $_->[0] => 1 } @pairs;

    my $request = "$method $path HTTP/1.1\r\n";
    $request .= "Host: localhost\r\n" unless $given{host};
    $request .= "Connection: close\r\n"
        if $opts{close} && !$given{connection};
    if (defined $body) {
        if ($opts{chunked}) {
            $request .= "Transfer-Encoding: chunked\r\n";
        } elsif (!$given{'content-length'}) {
            $request .= 'Content-Length: ' . length($body) . "\r\n";
        }
    }
    $request .= "$_->[0]: $_->[1]\r\n" for @pairs;
    $request .= "\r\n";

    if (defined $body) {
        if ($opts{chunked}) {
            my $offset = 0;
            while ($offset < length $body) {
                my $piece = substr($body, $offset, $opts{chunked});
                $request .= sprintf("%x\r\n%s\r\n", length $piece, $piece);
                $offset += length $piece;
            }
            $request .= "0\r\n\r\n";
        } else {
            $request .= $body;
        }
    }

    $self->send_raw($sock, $request);
    return $self->read_response($sock, $method);
}

# Writes raw bytes to a client connection, for pipelined or malformed
# requests.
sub send_raw {
    my ($self, $sock, $bytes) = @_;
    my $ok = eval {
        local $SIG{ALRM} = sub { die "timeout\n" };
        alarm $self->{timeout};
        _write_all($sock, $bytes);
        alarm 0;
        1;
    };
    alarm 0;
    diag("writing a request failed: $@") unless $ok;
    return;
}

# Reads one response from a client connection; $method (default GET) tells
# whether a body follows.  Returns undef on timeout or early close, else the
# hash described at request_on.
sub read_response {
    my ($self, $sock, $method) = @_;

    my $response;
    my $ok = eval {
        local $SIG{ALRM} = sub { die "timeout\n" };
        alarm $self->{timeout};
        $response = _read_http_response($sock, $method || 'GET');
        alarm 0;
        1;
    };
    alarm 0;
    if (!$ok || !$response) {
        diag('reading a response failed: '
            . ($ok ? "connection closed\n" : $@));
        return undef;
    }
    return $response;
}

# Writes the whole string.  An error is ignored because nginx may answer
# (413, for example) and close before reading everything, and the response
# is still there to read.
sub _write_all {
    my ($sock, $data) = @_;
    my $offset = 0;
    while ($offset < length $data) {
        my $n = syswrite $sock, $data, length($data) - $offset, $offset;
        return unless $n;
        $offset += $n;
    }
    return;
}

sub _read_http_response {
    my ($sock, $method) = @_;

    # Bytes already read past an earlier response on this socket.
    my $buffer = \${*$sock}{stories_test_buffer};
    $$buffer = '' unless defined $$buffer;

    while ($$buffer !~ /\r\n\r\n/) {
        _fill($sock, $buffer) or return undef;
    }
    my $end = index($$buffer, "\r\n\r\n");
    my $head = substr($$buffer, 0, $end);
    substr($$buffer, 0, $end + 4) = '';

    my ($status_line, @lines) = split /\r\n/, $head;
    my ($status) = $status_line =~ m{^HTTP/\d\.\d (\d{3})}
        or die "invalid status line: $status_line\n";

    my (@list, %headers);
    for my $line (@lines) {
        my ($header, $value) = $line =~ /^([^:]+):[ \t]*(.*?)[ \t]*$/
            or next;
        push @list, [$header, $value];
        $headers{lc $header} = exists $headers{lc $header}
            ? "$headers{lc $header}, $value" : $value;
    }

    my $body = '';
    if ($method ne 'HEAD' && $status != 204 && $status != 304) {
        $body = _read_body($sock, $buffer, \@list, 1);
        die "connection closed inside the response body\n"
            unless defined $body;
    }

    return {
        status      => $status,
        headers     => \%headers,
        header_list => \@list,
        body        => $body,
    };
}

# Sends a POST with "Content-Type: application/json" before the given
# headers and returns the response, as request does.
sub post_json {
    my ($self, $path, $body, $headers, %opts) = @_;
    my @pairs = (['Content-Type', 'application/json'],
        ref $headers eq 'HASH'
            ? map { [$_, $headers->{$_}] } sort keys %$headers
            : @{ $headers || [] });
    return $self->request('POST', $path, $body, \@pairs, %opts);
}

############################################################################
# Assertions shared by the endpoint tests

# Client headers sent with every Segment call.  None of them may reach
# Stories.
my @CLIENT_HEADERS = (
    ['Content-Type',  'application/json'],
    ['Cookie',        'session=client-cookie-1'],
    ['Authorization', 'Basic Y2xpZW50OnNlY3JldA=='],
    ['X-Client-Id',   'client-header-1'],
    ['User-Agent',    'client-agent/1.0'],
);

sub client_headers { return @CLIENT_HEADERS }

# Forgets earlier Stories requests, then POSTs $body to $path with the
# client headers (or with the pairs in $opts{headers}).  Other options go to
# request.  Returns the response.
sub send_segment {
    my ($self, $path, $body, %opts) = @_;
    my $headers = delete $opts{headers} || \@CLIENT_HEADERS;
    $self->clear_stories();
    return $self->request('POST', $path, $body, $headers, %opts);
}

# Checks status, "Content-Type: application/json" and exact body bytes of a
# module response (3 tests).
sub json_response_is {
    my ($self, $response, $status, $body, $name) = @_;
    $response ||= { status => 'none', headers => {}, body => undef };
    is($response->{status}, $status, "$name status");
    is($response->{headers}{'content-type'}, 'application/json',
        "$name content type");
    is($response->{body}, $body, "$name body");
    return;
}

# Checks one request recorded by the Stories mock (11 tests): method, path,
# exact body bytes, Content-Length, a single "Authorization: Bearer $key",
# "Content-Type: application/json", and that no client header reached it.
sub stories_request_is {
    my ($self, $record, $uri, $body, $key, $name) = @_;
    $record ||= { method => 'none', uri => 'none', body => undef,
                  headers => [] };

    is($record->{method}, 'POST', "$name method");
    is($record->{uri}, $uri, "$name path");
    bytes_are($record->{body}, $body, "$name stories body");
    is_deeply([header_values($record, 'Content-Length')],
        [defined $body ? length $body : 0], "$name content length");
    is_deeply([header_values($record, 'Authorization')],
        ["Bearer $key"], "$name authorization");
    is_deeply([header_values($record, 'Content-Type')],
        ['application/json'], "$name stories content type");
    is_deeply([header_values($record, 'Cookie')], [],
        "$name no cookie");
    is_deeply([header_values($record, 'User-Agent')], [],
        "$name no user agent");
    is_deeply([header_values($record, 'X-Client-Id')], [],
        "$name no x header");

    my @leaked = grep { $_->[1] =~ /client-|Y2xpZW50/ }
        @{ $record->{headers} };
    is_deeply(\@leaked, [], "$name no client header values");
    is(scalar(grep { $_->[0] =~ /^(?:Cookie|X-|User-Agent)/i }
        @{ $record->{headers} }), 0, "$name no client header names");
    return;
}

# Compares two byte strings like is(), but for long strings reports the
# first differing offset and the bytes around it instead of both strings.
sub bytes_are {
    my ($got, $expected, $name) = @_;

    if (!defined $expected || length($expected) <= 400) {
        return is($got, $expected, $name);
    }
    if (!defined $got) {
        ok(0, $name);
        diag('got undef, expected ' . length($expected) . ' bytes');
        return 0;
    }
    return 1 if ok($got eq $expected, $name);

    my $offset = 0;
    $offset++ while $offset < length $got && $offset < length $expected
        && substr($got, $offset, 1) eq substr($expected, $offset, 1);
    my $start = $offset > 40 ? $offset - 40 : 0;
    diag("lengths: got " . length($got) . ', expected ' . length($expected)
        . "; first difference at byte $offset\n"
        . '     got: ' . substr($got, $start, 80) . "\n"
        . 'expected: ' . substr($expected, $start, 80));
    return 0;
}

# Waits $settle seconds (default 0.3), then checks that the Stories mock
# recorded nothing since the last clear (1 test).  The wait catches
# requests sent after the client response.
sub nothing_forwarded {
    my ($self, $name, $settle) = @_;
    sleep(defined $settle ? $settle : 0.3);
    my @records = $self->stories_requests();
    is(scalar @records, 0, "$name nothing forwarded")
        or diag(join "\n", map { "$_->{uri} $_->{body}" } @records);
    return;
}

# The module's JSON error response for a message, quotes escaped.
sub error_body {
    my ($message) = @_;
    $message =~ s/(["\\])/\\$1/g;
    return qq({"success":false,"error":"$message"});
}

1;
