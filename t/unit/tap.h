/*
 * Copyright (C) The ngx_http_stories_module authors
 *
 * TAP output for the unit test programs.  Each check prints "ok N" or
 * "not ok N" with its name, and tap_finish() prints the plan.
 */


#ifndef TAP_H_INCLUDED
#define TAP_H_INCLUDED


#include <stddef.h>


#if defined(__GNUC__)
#define TEST_PRINTF(f, a)  __attribute__((format(printf, f, a)))
#else
#define TEST_PRINTF(f, a)
#endif


/* Prints one result and returns passed. */
int test_ok(int passed, const char *fmt, ...) TEST_PRINTF(2, 3);

/*
 * Prints bytes on a diagnostic line, with bytes outside printable ASCII
 * as \xNN.  NULL prints as NULL.
 */
void print_bytes(const char *label, const char *s, size_t len);

int is_size(size_t got, size_t expected, const char *name, const char *what);

/*
 * Copies data into a malloc()ed buffer of exactly len bytes with no NUL
 * after it, so that a read past the end is caught.  Bails out when memory
 * runs out.
 */
char *copy_exact(const char *data, size_t len);

/* Unbuffers stdout, so that diagnostics stay next to their results. */
void tap_start(void);

/* Prints the plan and returns the exit status of the test program. */
int tap_finish(void);


#endif /* TAP_H_INCLUDED */
