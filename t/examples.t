#!/usr/bin/perl

# Checks every configuration in conf-examples/ with "nginx -t" and the
# built module.  Paths under /var/log/nginx and /run move into the test
# directory, and when api.getstories.io does not resolve here, as in a
# sandbox without DNS, it becomes 127.0.0.1: nginx 1.22 resolves upstream
# host names while it reads the configuration.

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(basename dirname);
use Socket qw(inet_aton);
use Test::More;

use lib dirname(abs_path(__FILE__)) . '/lib';
use StoriesTest;

BAIL_OUT('module not built: ' . StoriesTest::module_path() . '; run make')
    unless StoriesTest::has_module();

my $root = dirname(dirname(abs_path(__FILE__)));
my @examples = sort glob "$root/conf-examples/*.conf";

ok(scalar @examples >= 3, 'examples found') or diag("in $root/conf-examples");

my $resolves = defined inet_aton('api.getstories.io');

for my $example (@examples) {
    my $name = basename($example);
    my $t = StoriesTest->new(load_module => 0);
    my $dir = $t->dir;

    # the quick start keeps its logs in logs/ under the prefix, as make run
    mkdir "$dir/logs" or die "mkdir $dir/logs: $!\n";

    open my $fh, '<', $example or die "$example: $!\n";
    my $conf = do { local $/; <$fh> };
    close $fh;

    $conf =~ s{/var/log/nginx/}{$dir/}g;
    $conf =~ s{/run/}{$dir/}g;
    $conf =~ s{api\.getstories\.io:443}{127.0.0.1:443}g unless $resolves;

    if (!StoriesTest::module_is_static()) {
        $conf = 'load_module ' . StoriesTest::module_path() . ";\n" . $conf;
    }

    # write_conf() fills %%...%% placeholders, which the examples lack
    my ($status, $output) = $t->test_config($conf, $name);

    is($status, 0, "$name passes nginx -t") or diag($output);
    like($output, qr/test is successful/, "$name test output");
}

done_testing();
