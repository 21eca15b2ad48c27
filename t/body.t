#!/usr/bin/perl

# Runs the unit tests of the body checks and inflation in src/stories_body.c.
# The test program build/body_test prints TAP itself.

use strict;
use warnings;

use Cwd qw(abs_path);
use File::Basename qw(dirname);

my $root = dirname(dirname(abs_path(__FILE__)));

chdir $root or die "cannot change directory to $root: $!\n";

my $test = 'build/body_test';

if (!-x $test) {
    print "1..1\n";
    print "not ok 1 - $test exists\n";
    print "# $root/$test is missing; build it with make\n";
    exit 1;
}

exec "./$test" or die "cannot run $root/$test: $!\n";
