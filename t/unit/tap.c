/*
 * Copyright (C) The ngx_http_stories_module authors
 */


#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tap.h"


static unsigned  test_number;
static unsigned  test_failures;


int
test_ok(int passed, const char *fmt, ...)
{
    va_list  args;

    test_number++;

    if (!passed) {
        test_failures++;
    }

    printf("%sok %u - ", passed ? "" : "not ", test_number);

    va_start(args, fmt);
    vprintf(fmt, args);
    va_end(args);

    printf("\n");

    return passed;
}


void
print_bytes(const char *label, const char *s, size_t len)
{
    size_t          i;
    unsigned char   c;

    if (s == NULL) {
        printf("#   %8s: NULL\n", label);
        return;
    }

    printf("#   %8s: \"", label);

    for (i = 0; i < len; i++) {
        c = (unsigned char) s[i];

        if (c == '"' || c == '\\') {
            printf("\\%c", c);

        } else if (c >= 0x20 && c < 0x7f) {
            putchar(c);

        } else {
            printf("\\x%02x", c);
        }
    }

    printf("\" (%zu bytes)\n", len);
}


int
is_size(size_t got, size_t expected, const char *name, const char *what)
{
    if (!test_ok(got == expected, "%s: %s", name, what)) {
        printf("#   expected: %zu\n", expected);
        printf("#        got: %zu\n", got);
        return 0;
    }

    return 1;
}


char *
copy_exact(const char *data, size_t len)
{
    char  *copy;

    copy = malloc(len != 0 ? len : 1);
    if (copy == NULL) {
        printf("Bail out! malloc() of %zu bytes failed\n", len);
        exit(1);
    }

    if (len != 0) {
        memcpy(copy, data, len);
    }

    return copy;
}


void
tap_start(void)
{
    setvbuf(stdout, NULL, _IONBF, 0);
}


int
tap_finish(void)
{
    printf("1..%u\n", test_number);

    if (test_failures != 0) {
        printf("# %u of %u tests failed\n", test_failures, test_number);
        return 1;
    }

    return 0;
}
