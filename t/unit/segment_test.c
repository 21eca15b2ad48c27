/*
 * Copyright (C) The ngx_http_stories_module authors
 *
 * Unit tests of the Segment to Stories translation in stories_segment.c.
 * The program prints TAP and exits with status 1 when a test fails.
 *
 * Every path and body goes to the code under test in a malloc()ed buffer of
 * exactly its length, with no terminating NUL.  AddressSanitizer reports a
 * read past its end in stories_segment.c, and valgrind also one inside
 * libcjson, which the sanitizers do not instrument.
 */


#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "stories_segment.h"
#include "tap.h"


typedef struct {
    const char      *path;
    stories_call_e   call;
    int              under_v1;    /* -1 where the contract leaves it open */
} path_case_t;


/* A message of a batch expected in result->invalid or result->skipped. */
typedef struct {
    size_t           index;
    stories_call_e   type;
    const char      *reason;
    const char      *message_id;  /* NULL when none is expected */
} expected_note_t;


/* A single call and the reason it is rejected or skipped with. */
typedef struct {
    const char      *name;
    stories_call_e   call;
    const char      *json;
    const char      *reason;
} reason_case_t;


static int is_bytes(const char *got, size_t got_len, const char *expected,
    const char *name, const char *what);
static int is_text(const char *got, const char *expected, const char *name,
    const char *what);
static int is_int(int got, int expected, const char *name, const char *what);
static int is_call(stories_call_e got, stories_call_e expected,
    const char *name, const char *what);
static int translate(stories_call_e call, const char *json, size_t len,
    const stories_options_t *options, stories_result_t *result);
static int is_accepted(int rc, stories_result_t *result, const char *name);
static void check_request(stories_request_t *request, const char *path,
    const char *body, size_t index, stories_call_e type, const char *name);
static void check_notes(stories_note_t *notes, size_t n,
    const expected_note_t *expected, size_t nexpected, const char *name,
    const char *what);
static void expect_forwarded(const char *name, stories_call_e call,
    const char *json, const stories_options_t *options,
    const char *events_body, const char *users_body);
static void expect_status_len(const char *name, stories_call_e call,
    const char *json, size_t len, const stories_options_t *options,
    int status, const char *error);
static void expect_rejected(const char *name, stories_call_e call,
    const char *json, const stories_options_t *options, const char *error);
static void expect_skipped(const char *name, stories_call_e call,
    const char *json, const char *reason, const char *message_id);

static void test_call_from_path(void);
static void test_call_from_path_length(void);
static void test_call_name(void);
static void test_mapping(void);
static void test_numeric_user_id(void);
static void test_large_user_id(void);
static void test_exact_ids(void);
static void test_exact_numbers(void);
static void test_string_bytes(void);
static void test_strings(void);
static void test_message_id(void);
static void test_sync_users(void);
static void test_sync_users_message_id(void);
static void test_skips(void);
static void test_errors(void);
static void test_truncated_bodies(void);
static void test_batch_errors(void);
static void test_batch_mixed(void);
static void test_batch_message_errors(void);
static void test_batch_types(void);
static void test_batch_sync_users(void);
static void test_batch_growth(void);
static void test_max_depth(void);
static void test_max_depth_nested(void);
static void test_write_key(void);
static void test_max_batch_size(void);
static void test_max_message_size(void);
static void test_batch_message_size(void);
static void test_response_success(void);
static void test_response_error(void);


static const stories_options_t  options_default = { .sync_users = 0 };
static const stories_options_t  options_sync = { .sync_users = 1 };


int
main(void)
{
    tap_start();

    test_call_from_path();
    test_call_from_path_length();
    test_call_name();
    test_mapping();
    test_numeric_user_id();
    test_large_user_id();
    test_exact_ids();
    test_exact_numbers();
    test_string_bytes();
    test_strings();
    test_message_id();
    test_sync_users();
    test_sync_users_message_id();
    test_skips();
    test_errors();
    test_truncated_bodies();
    test_batch_errors();
    test_batch_mixed();
    test_batch_message_errors();
    test_batch_types();
    test_batch_sync_users();
    test_batch_growth();
    test_max_depth();
    test_max_depth_nested();
    test_write_key();
    test_max_batch_size();
    test_max_message_size();
    test_batch_message_size();
    test_response_success();
    test_response_error();

    return tap_finish();
}


/* TAP output and assertions */


static int
is_bytes(const char *got, size_t got_len, const char *expected,
    const char *name, const char *what)
{
    int     passed;
    size_t  len;

    len = strlen(expected);

    passed = got != NULL && got_len == len && memcmp(got, expected, len) == 0;

    if (!test_ok(passed, "%s: %s", name, what)) {
        print_bytes("expected", expected, len);
        print_bytes("got", got, got_len);
    }

    return passed;
}


/* Compares NUL-terminated strings, either of which may be NULL. */
static int
is_text(const char *got, const char *expected, const char *name,
    const char *what)
{
    int  passed;

    if (got == NULL || expected == NULL) {
        passed = (got == expected);

    } else {
        passed = (strcmp(got, expected) == 0);
    }

    if (!test_ok(passed, "%s: %s", name, what)) {
        print_bytes("expected", expected,
                    expected != NULL ? strlen(expected) : 0);
        print_bytes("got", got, got != NULL ? strlen(got) : 0);
    }

    return passed;
}


static int
is_int(int got, int expected, const char *name, const char *what)
{
    if (!test_ok(got == expected, "%s: %s", name, what)) {
        printf("#   expected: %d\n", expected);
        printf("#        got: %d\n", got);
        return 0;
    }

    return 1;
}


static int
is_call(stories_call_e got, stories_call_e expected, const char *name,
    const char *what)
{
    if (!test_ok(got == expected, "%s: %s", name, what)) {
        printf("#   expected: %s\n", stories_call_name(expected));
        printf("#        got: %s\n", stories_call_name(got));
        return 0;
    }

    return 1;
}


/* Helpers that run the code under test */


/*
 * Runs stories_translate() on a copy of the body that is freed before the
 * result is checked, so that a result pointing into the body is reported
 * as a use after free.
 */
static int
translate(stories_call_e call, const char *json, size_t len,
    const stories_options_t *options, stories_result_t *result)
{
    int    rc;
    char  *body;

    body = copy_exact(json, len);
    rc = stories_translate(call, body, len, options, result);
    free(body);

    return rc;
}


static int
is_accepted(int rc, stories_result_t *result, const char *name)
{
    is_int(rc, 0, name, "translate returns 0");

    if (!test_ok(result->status == 0, "%s: accepted", name)) {
        printf("#   status %d, error \"%s\"\n", result->status,
               result->error);
        return 0;
    }

    return 1;
}


static void
check_request(stories_request_t *request, const char *path,
    const char *body, size_t index, stories_call_e type, const char *name)
{
    char  what[64];

    snprintf(what, sizeof(what), "%s path", path);
    is_text(request->path, path, name, what);

    snprintf(what, sizeof(what), "%s body", path);
    is_bytes(request->body, request->body_len, body, name, what);

    snprintf(what, sizeof(what), "%s index", path);
    is_size(request->index, index, name, what);

    snprintf(what, sizeof(what), "%s type", path);
    is_call(request->type, type, name, what);
}


static void
check_notes(stories_note_t *notes, size_t n, const expected_note_t *expected,
    size_t nexpected, const char *name, const char *what)
{
    char    label[64];
    size_t  i;

    snprintf(label, sizeof(label), "%s count", what);

    if (!is_size(n, nexpected, name, label)) {
        for (i = 0; i < n; i++) {
            printf("#   %s %zu: \"%s\"\n", what, notes[i].index,
                   notes[i].reason);
        }

        return;
    }

    for (i = 0; i < n; i++) {
        snprintf(label, sizeof(label), "%s %zu index", what, i);
        is_size(notes[i].index, expected[i].index, name, label);

        snprintf(label, sizeof(label), "%s %zu reason", what, i);
        is_text(notes[i].reason, expected[i].reason, name, label);

        snprintf(label, sizeof(label), "%s %zu type", what, i);
        is_call(notes[i].type, expected[i].type, name, label);

        snprintf(label, sizeof(label), "%s %zu messageId", what, i);
        is_text(notes[i].message_id, expected[i].message_id, name, label);
    }
}


/*
 * Checks that a single call produces an events request and, when users_body
 * is not NULL, a users request after it.
 */
static void
expect_forwarded(const char *name, stories_call_e call, const char *json,
    const stories_options_t *options, const char *events_body,
    const char *users_body)
{
    int                rc;
    size_t             n;
    stories_result_t   result;

    rc = translate(call, json, strlen(json), options, &result);

    is_accepted(rc, &result, name);

    n = users_body != NULL ? 2 : 1;

    if (is_size(result.nrequests, n, name, "request count")) {
        check_request(&result.requests[0], STORIES_EVENTS_PATH, events_body,
                      0, call, name);

        if (users_body != NULL) {
            check_request(&result.requests[1], STORIES_USERS_PATH,
                          users_body, 0, call, name);
        }
    }

    is_size(result.ninvalid, 0, name, "no invalid messages");
    is_size(result.nskipped, 0, name, "no skipped messages");
    is_size(result.messages, 1, name, "message count");

    stories_result_free(&result);
}


static void
expect_status_len(const char *name, stories_call_e call, const char *json,
    size_t len, const stories_options_t *options, int status,
    const char *error)
{
    int                rc;
    stories_result_t   result;

    rc = translate(call, json, len, options, &result);

    is_int(rc, 0, name, "translate returns 0");
    is_int(result.status, status, name, "status");
    is_text(result.error, error, name, "error");
    is_size(result.nrequests, 0, name, "no requests");
    is_size(result.ninvalid, 0, name, "no invalid messages");

    stories_result_free(&result);
}


static void
expect_rejected(const char *name, stories_call_e call, const char *json,
    const stories_options_t *options, const char *error)
{
    expect_status_len(name, call, json, strlen(json), options, 400, error);
}


static void
expect_skipped(const char *name, stories_call_e call, const char *json,
    const char *reason, const char *message_id)
{
    int                rc;
    stories_result_t   result;
    expected_note_t    note;

    rc = translate(call, json, strlen(json), &options_default, &result);

    is_accepted(rc, &result, name);
    is_size(result.nrequests, 0, name, "no requests");
    is_size(result.ninvalid, 0, name, "no invalid messages");

    note.index = 0;
    note.type = call;
    note.reason = reason;
    note.message_id = message_id;

    check_notes(result.skipped, result.nskipped, &note, 1, name, "skipped");

    stories_result_free(&result);
}


/* stories_call_from_path() and stories_call_name() */


static void
test_call_from_path(void)
{
    int           under_v1;
    char         *path;
    size_t        i, len;
    stories_call_e  call;

    static const path_case_t  cases[] = {
        { "/identify", STORIES_CALL_IDENTIFY, -1 },
        { "/track", STORIES_CALL_TRACK, -1 },
        { "/page", STORIES_CALL_PAGE, -1 },
        { "/screen", STORIES_CALL_SCREEN, -1 },
        { "/group", STORIES_CALL_GROUP, -1 },
        { "/alias", STORIES_CALL_ALIAS, -1 },
        { "/batch", STORIES_CALL_BATCH, -1 },
        { "/import", STORIES_CALL_BATCH, -1 },
        { "/v1/identify", STORIES_CALL_IDENTIFY, -1 },
        { "/v1/track", STORIES_CALL_TRACK, -1 },
        { "/v1/page", STORIES_CALL_PAGE, -1 },
        { "/v1/screen", STORIES_CALL_SCREEN, -1 },
        { "/v1/group", STORIES_CALL_GROUP, -1 },
        { "/v1/alias", STORIES_CALL_ALIAS, -1 },
        { "/v1/batch", STORIES_CALL_BATCH, -1 },
        { "/v1/import", STORIES_CALL_BATCH, -1 },

        { "/v1/i", STORIES_CALL_IDENTIFY, -1 },
        { "/v1/t", STORIES_CALL_TRACK, -1 },
        { "/v1/p", STORIES_CALL_PAGE, -1 },
        { "/v1/s", STORIES_CALL_SCREEN, -1 },
        { "/v1/g", STORIES_CALL_GROUP, -1 },
        { "/v1/a", STORIES_CALL_ALIAS, -1 },
        { "/v1/b", STORIES_CALL_BATCH, -1 },

        { "/segment/v1/t", STORIES_CALL_TRACK, -1 },
        { "/segment/v1/track", STORIES_CALL_TRACK, -1 },
        { "/a/b/c/v1/b", STORIES_CALL_BATCH, -1 },
        { "/api/segment/identify", STORIES_CALL_IDENTIFY, -1 },
        { "/v2/track", STORIES_CALL_TRACK, -1 },

        { "/x/t", STORIES_CALL_NONE, 0 },
        { "/t", STORIES_CALL_NONE, 0 },
        { "/v2/t", STORIES_CALL_NONE, 0 },
        { "/xv1/t", STORIES_CALL_NONE, 0 },
        { "/v1x/t", STORIES_CALL_NONE, 0 },
        { "/v/t", STORIES_CALL_NONE, 0 },
        { "/V1/t", STORIES_CALL_NONE, 0 },
        { "/segment/t", STORIES_CALL_NONE, 0 },
        { "/v1/x", STORIES_CALL_NONE, 1 },
        { "/v1/T", STORIES_CALL_NONE, 1 },
        { "/v1/tt", STORIES_CALL_NONE, 1 },

        { "/v1/foo", STORIES_CALL_NONE, 1 },
        { "/segment/v1/foo", STORIES_CALL_NONE, 1 },
        { "/v2/foo", STORIES_CALL_NONE, 0 },
        { "/foo", STORIES_CALL_NONE, 0 },
        { "/v1/Track", STORIES_CALL_NONE, 1 },
        { "/v1/tracks", STORIES_CALL_NONE, 1 },
        { "/v1/trac", STORIES_CALL_NONE, 1 },
        { "/v1/track.json", STORIES_CALL_NONE, 1 },

        { "", STORIES_CALL_NONE, 0 },
        { "/", STORIES_CALL_NONE, 0 },
        { "/v1", STORIES_CALL_NONE, 0 },
        { "/v1/", STORIES_CALL_NONE, 1 },
        { "/v1/track/", STORIES_CALL_NONE, 0 },
        { "/v1/t/", STORIES_CALL_NONE, 0 },
        { "/track/", STORIES_CALL_NONE, 0 }
    };

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        len = strlen(cases[i].path);
        path = copy_exact(cases[i].path, len);

        under_v1 = -1;
        call = stories_call_from_path(path, len, &under_v1);

        free(path);

        is_call(call, cases[i].call, "call from path", cases[i].path);

        if (cases[i].under_v1 >= 0) {
            if (!test_ok(under_v1 == cases[i].under_v1,
                         "call from path: %s under_v1 is %d",
                         cases[i].path, cases[i].under_v1))
            {
                printf("#   got: %d\n", under_v1);
            }
        }
    }
}


/* Only len bytes of the path count, whatever follows them. */
static void
test_call_from_path_length(void)
{
    int  under_v1;

    is_call(stories_call_from_path("/v1/trackXYZ", 9, &under_v1),
            STORIES_CALL_TRACK, "call from path length", "/v1/track|XYZ");

    is_call(stories_call_from_path("/v1/t/x", 5, &under_v1),
            STORIES_CALL_TRACK, "call from path length", "/v1/t|/x");

    is_call(stories_call_from_path("/v1/foo", 3, &under_v1),
            STORIES_CALL_NONE, "call from path length", "/v1|/foo");
    is_int(under_v1, 0, "call from path length", "/v1|/foo under_v1");
}


static void
test_call_name(void)
{
    const char  *name;

    name = "call name";

    is_text(stories_call_name(STORIES_CALL_IDENTIFY), "identify", name,
            "identify");
    is_text(stories_call_name(STORIES_CALL_TRACK), "track", name, "track");
    is_text(stories_call_name(STORIES_CALL_PAGE), "page", name, "page");
    is_text(stories_call_name(STORIES_CALL_SCREEN), "screen", name,
            "screen");
    is_text(stories_call_name(STORIES_CALL_GROUP), "group", name, "group");
    is_text(stories_call_name(STORIES_CALL_ALIAS), "alias", name, "alias");
    is_text(stories_call_name(STORIES_CALL_BATCH), "batch", name, "batch");
    is_text(stories_call_name(STORIES_CALL_NONE), "unknown", name, "none");
}


/* Mapping of single calls */


static void
test_mapping(void)
{
    expect_forwarded("identify with traits", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"name\":\"Ada\",\"age\":36,"
        "\"vip\":true,\"tags\":[\"a\",\"b\"],"
        "\"address\":{\"city\":\"London\"},\"nothing\":null}}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":"
        "{\"name\":\"Ada\",\"age\":36,\"vip\":true,\"tags\":[\"a\",\"b\"],"
        "\"address\":{\"city\":\"London\"},\"nothing\":null}}}",
        NULL);

    expect_forwarded("identify with null traits", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":null}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":{}}}",
        NULL);

    expect_forwarded("identify without traits", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\"}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":{}}}",
        NULL);

    expect_forwarded("identify with empty traits", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{}}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":{}}}",
        NULL);

    expect_forwarded("track", STORIES_CALL_TRACK,
        "{\"userId\":\"u1\",\"event\":\"Signed Up\","
        "\"properties\":{\"plan\":\"pro\"},\"timestamp\":"
        "\"2024-01-01T00:00:00Z\"}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Track\","
        "\"data\":{\"content\":\"Signed Up\"}}",
        NULL);

    expect_forwarded("page with name", STORIES_CALL_PAGE,
        "{\"userId\":\"u1\",\"name\":\"Home\","
        "\"properties\":{\"url\":\"https://example.com/\"}}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Page\","
        "\"data\":{\"content\":\"Home\"}}",
        NULL);

    expect_forwarded("page without name", STORIES_CALL_PAGE,
        "{\"userId\":\"u1\",\"properties\":{\"url\":\"https://example.com/\"}}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Page\",\"data\":{}}",
        NULL);

    expect_forwarded("page with null name", STORIES_CALL_PAGE,
        "{\"userId\":\"u1\",\"name\":null}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Page\",\"data\":{}}",
        NULL);

    expect_forwarded("screen with name", STORIES_CALL_SCREEN,
        "{\"userId\":\"u1\",\"name\":\"Settings\"}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Screen\","
        "\"data\":{\"content\":\"Settings\"}}",
        NULL);

    expect_forwarded("screen without name", STORIES_CALL_SCREEN,
        "{\"userId\":\"u1\"}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Screen\",\"data\":{}}",
        NULL);

    /* in a single call the path gives the type */
    expect_forwarded("track ignores type field", STORIES_CALL_TRACK,
        "{\"type\":\"identify\",\"userId\":\"u1\",\"event\":\"E\"}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Track\",\"data\":{\"content\":\"E\"}}",
        NULL);

    expect_forwarded("userId wins over anonymousId", STORIES_CALL_TRACK,
        "{\"anonymousId\":\"a1\",\"userId\":\"u1\",\"event\":\"E\"}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Track\",\"data\":{\"content\":\"E\"}}",
        NULL);

    expect_forwarded("track key order", STORIES_CALL_TRACK,
        "{\"event\":\"E\",\"properties\":{},\"userId\":\"u1\"}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Track\",\"data\":{\"content\":\"E\"}}",
        NULL);

    expect_forwarded("identify traits key order", STORIES_CALL_IDENTIFY,
        "{\"traits\":{\"z\":1,\"a\":2,\"m\":3},\"userId\":\"u1\"}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Identify\","
        "\"data\":{\"traits\":{\"z\":1,\"a\":2,\"m\":3}}}",
        NULL);

    expect_forwarded("whitespace around body", STORIES_CALL_TRACK,
        " \r\n\t{ \"userId\" : \"u1\" , \"event\" : \"E\" } \r\n\t",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Track\",\"data\":{\"content\":\"E\"}}",
        NULL);

    /* only the fields that the mapping reads are checked */
    expect_forwarded("identify ignores event", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"event\":5,\"name\":[]}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":{}}}",
        NULL);
}


static void
test_numeric_user_id(void)
{
    char    json[128], events[128], name[64];
    size_t  i;

    static const struct {
        const char  *number;
        const char  *user_id;
    } cases[] = {
        { "42", "42" },
        { "4.5", "4.5" },
        { "-3", "-3" },
        { "0.1", "0.1" },
        { "0", "0" },
        { "1e3", "1000" },
        { "-0.25", "-0.25" },
        { "123456789012", "123456789012" }
    };

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        snprintf(json, sizeof(json), "{\"userId\":%s,\"event\":\"E\"}",
                 cases[i].number);
        snprintf(events, sizeof(events),
                 "{\"user_id\":\"%s\",\"name\":\"Track\","
                 "\"data\":{\"content\":\"E\"}}",
                 cases[i].user_id);
        snprintf(name, sizeof(name), "numeric userId %s", cases[i].number);

        expect_forwarded(name, STORIES_CALL_TRACK, json, &options_default,
                         events, NULL);
    }
}


/*
 * An integral userId of 1e15 or more whose "%.15g" form reads back exactly
 * comes out in exponent form, while its neighbours print all digits.
 */
static void
test_large_user_id(void)
{
    int                rc;
    char               json[128], expected[128];
    size_t             i;
    stories_result_t   result;

    static const char  *numbers[] = {
        "1000000000000001",
        "1000000000000000",
        "1234567890123450"
    };

    for (i = 0; i < sizeof(numbers) / sizeof(numbers[0]); i++) {
        snprintf(json, sizeof(json), "{\"userId\":%s,\"event\":\"E\"}",
                 numbers[i]);
        snprintf(expected, sizeof(expected),
                 "{\"user_id\":\"%s\",\"name\":\"Track\","
                 "\"data\":{\"content\":\"E\"}}",
                 numbers[i]);

        rc = translate(STORIES_CALL_TRACK, json, strlen(json),
                       &options_default, &result);

        is_accepted(rc, &result, "large numeric userId");

        if (is_size(result.nrequests, 1, "large numeric userId",
                    "request count"))
        {
            is_bytes(result.requests[0].body, result.requests[0].body_len,
                     expected, "large numeric userId", numbers[i]);
        }

        stories_result_free(&result);
    }
}


static void
test_strings(void)
{
    /* raw UTF-8: "ユーザー" and "café ☕" */
    expect_forwarded("UTF-8 kept as is", STORIES_CALL_TRACK,
        "{\"userId\":\"\xe3\x83\xa6\xe3\x83\xbc\xe3\x82\xb6\xe3\x83\xbc\","
        "\"event\":\"caf\xc3\xa9 \xe2\x98\x95\"}",
        &options_default,
        "{\"user_id\":\"\xe3\x83\xa6\xe3\x83\xbc\xe3\x82\xb6\xe3\x83\xbc\","
        "\"name\":\"Track\","
        "\"data\":{\"content\":\"caf\xc3\xa9 \xe2\x98\x95\"}}",
        NULL);

    /* \u escapes, with a surrogate pair, come out as raw UTF-8 */
    expect_forwarded("unicode escapes as UTF-8", STORIES_CALL_TRACK,
        "{\"userId\":\"u1\","
        "\"event\":\"\\u00e9\\u65e5\\ud83d\\ude00\"}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Track\","
        "\"data\":{\"content\":\"\xc3\xa9\xe6\x97\xa5\xf0\x9f\x98\x80\"}}",
        NULL);

    expect_forwarded("control characters escaped", STORIES_CALL_TRACK,
        "{\"userId\":\"u1\","
        "\"event\":\"a\\u0001b\\u001fc\\n\\r\\t\\b\\f\\\"\\\\\\/\"}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Track\","
        "\"data\":{\"content\":\"a\\u0001b\\u001fc\\n\\r\\t\\b\\f\\\"\\\\/\"}}",
        NULL);

    expect_forwarded("control characters in userId", STORIES_CALL_PAGE,
        "{\"userId\":\"u\\n\\u0007x\",\"name\":\"\\t\"}",
        &options_default,
        "{\"user_id\":\"u\\n\\u0007x\",\"name\":\"Page\","
        "\"data\":{\"content\":\"\\t\"}}",
        NULL);

    expect_forwarded("control characters in traits", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"a\\nb\":\"\\u0002\\\"\"}}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Identify\","
        "\"data\":{\"traits\":{\"a\\nb\":\"\\u0002\\\"\"}}}",
        NULL);
}


static void
test_message_id(void)
{
    int                 rc;
    size_t              i;
    stories_result_t    result;
    char                json[256], id[80];

    static const struct {
        const char  *name;
        const char  *json_id;
        const char  *message_id;
    } cases[] = {
        { "messageId copied", "\"ajs-1\"", "ajs-1" },
        { "messageId sanitized", "\"a\\\"b\\\\c\\u0001d\\u00e9\"",
          "a?b?c?d??" },
        { "messageId number ignored", "17", NULL },
        { "messageId null ignored", "null", NULL }
    };

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        snprintf(json, sizeof(json),
                 "{\"userId\":\"u1\",\"event\":\"E\",\"messageId\":%s}",
                 cases[i].json_id);

        rc = translate(STORIES_CALL_TRACK, json, strlen(json),
                       &options_default, &result);

        is_accepted(rc, &result, cases[i].name);

        if (is_size(result.nrequests, 1, cases[i].name, "request count")) {
            is_text(result.requests[0].message_id, cases[i].message_id,
                    cases[i].name, "request messageId");
        }

        stories_result_free(&result);
    }

    json[0] = '\0';
    strcat(json, "{\"userId\":\"u1\",\"event\":\"E\"}");

    rc = translate(STORIES_CALL_TRACK, json, strlen(json), &options_default,
                   &result);

    is_accepted(rc, &result, "messageId absent");

    if (is_size(result.nrequests, 1, "messageId absent", "request count")) {
        is_text(result.requests[0].message_id, NULL, "messageId absent",
                "request messageId");
    }

    stories_result_free(&result);

    /* a messageId of 70 characters is truncated to 64 */

    for (i = 0; i < 70; i++) {
        id[i] = (char) ('0' + i % 10);
    }

    id[70] = '\0';

    snprintf(json, sizeof(json),
             "{\"userId\":\"u1\",\"event\":\"E\",\"messageId\":\"%s\"}", id);

    id[64] = '\0';

    rc = translate(STORIES_CALL_TRACK, json, strlen(json), &options_default,
                   &result);

    is_accepted(rc, &result, "messageId truncated");

    if (is_size(result.nrequests, 1, "messageId truncated", "request count"))
    {
        is_text(result.requests[0].message_id, id, "messageId truncated",
                "request messageId");
    }

    stories_result_free(&result);
}


/* stories_sync_users on */


static void
test_sync_users(void)
{
    expect_forwarded("sync users full traits", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"plan\":\"pro\","
        "\"phone\":\"+44 20 7946 0000\",\"email\":\"ada@example.com\","
        "\"name\":\"Ada Lovelace\"}}",
        &options_sync,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":"
        "{\"plan\":\"pro\",\"phone\":\"+44 20 7946 0000\","
        "\"email\":\"ada@example.com\",\"name\":\"Ada Lovelace\"}}}",
        "{\"user_id\":\"u1\",\"name\":\"Ada Lovelace\","
        "\"email\":\"ada@example.com\",\"phone\":\"+44 20 7946 0000\","
        "\"attributes\":{\"plan\":\"pro\",\"phone\":\"+44 20 7946 0000\","
        "\"email\":\"ada@example.com\",\"name\":\"Ada Lovelace\"}}");

    expect_forwarded("sync users first and last name", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"firstName\":\"Ada\","
        "\"lastName\":\"Lovelace\"}}",
        &options_sync,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":"
        "{\"firstName\":\"Ada\",\"lastName\":\"Lovelace\"}}}",
        "{\"user_id\":\"u1\",\"name\":\"Ada Lovelace\",\"attributes\":"
        "{\"firstName\":\"Ada\",\"lastName\":\"Lovelace\"}}");

    expect_forwarded("sync users first name only", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"firstName\":\"Ada\"}}",
        &options_sync,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":"
        "{\"firstName\":\"Ada\"}}}",
        "{\"user_id\":\"u1\",\"name\":\"Ada\",\"attributes\":"
        "{\"firstName\":\"Ada\"}}");

    expect_forwarded("sync users last name only", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"lastName\":\"Lovelace\"}}",
        &options_sync,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":"
        "{\"lastName\":\"Lovelace\"}}}",
        "{\"user_id\":\"u1\",\"name\":\"Lovelace\",\"attributes\":"
        "{\"lastName\":\"Lovelace\"}}");

    expect_forwarded("sync users name wins", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"firstName\":\"Ada\","
        "\"lastName\":\"Lovelace\",\"name\":\"Countess\"}}",
        &options_sync,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":"
        "{\"firstName\":\"Ada\",\"lastName\":\"Lovelace\","
        "\"name\":\"Countess\"}}}",
        "{\"user_id\":\"u1\",\"name\":\"Countess\",\"attributes\":"
        "{\"firstName\":\"Ada\",\"lastName\":\"Lovelace\","
        "\"name\":\"Countess\"}}");

    expect_forwarded("sync users null name", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"name\":null,\"firstName\":\"Ada\","
        "\"lastName\":\"Lovelace\"}}",
        &options_sync,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":"
        "{\"name\":null,\"firstName\":\"Ada\",\"lastName\":\"Lovelace\"}}}",
        "{\"user_id\":\"u1\",\"name\":\"Ada Lovelace\",\"attributes\":"
        "{\"name\":null,\"firstName\":\"Ada\",\"lastName\":\"Lovelace\"}}");

    expect_forwarded("sync users empty name parts", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"firstName\":\"\","
        "\"lastName\":\"\"}}",
        &options_sync,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":"
        "{\"firstName\":\"\",\"lastName\":\"\"}}}",
        "{\"user_id\":\"u1\",\"attributes\":"
        "{\"firstName\":\"\",\"lastName\":\"\"}}");

    expect_forwarded("sync users email only", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"email\":\"ada@example.com\"}}",
        &options_sync,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":"
        "{\"email\":\"ada@example.com\"}}}",
        "{\"user_id\":\"u1\",\"email\":\"ada@example.com\",\"attributes\":"
        "{\"email\":\"ada@example.com\"}}");

    expect_forwarded("sync users phone only", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"phone\":\"555-0100\"}}",
        &options_sync,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":"
        "{\"phone\":\"555-0100\"}}}",
        "{\"user_id\":\"u1\",\"phone\":\"555-0100\",\"attributes\":"
        "{\"phone\":\"555-0100\"}}");

    expect_forwarded("sync users null email", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"email\":null,\"plan\":\"pro\"}}",
        &options_sync,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":"
        "{\"email\":null,\"plan\":\"pro\"}}}",
        "{\"user_id\":\"u1\",\"attributes\":"
        "{\"email\":null,\"plan\":\"pro\"}}");

    expect_forwarded("sync users without traits", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\"}",
        &options_sync,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":{}}}",
        "{\"user_id\":\"u1\",\"attributes\":{}}");

    expect_forwarded("sync users null traits", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":null}",
        &options_sync,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":{}}}",
        "{\"user_id\":\"u1\",\"attributes\":{}}");

    expect_forwarded("sync users numeric userId", STORIES_CALL_IDENTIFY,
        "{\"userId\":42,\"traits\":{\"name\":\"Ada\"}}",
        &options_sync,
        "{\"user_id\":\"42\",\"name\":\"Identify\",\"data\":{\"traits\":"
        "{\"name\":\"Ada\"}}}",
        "{\"user_id\":\"42\",\"name\":\"Ada\",\"attributes\":"
        "{\"name\":\"Ada\"}}");

    expect_forwarded("sync users UTF-8 name", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"firstName\":\"Jos\xc3\xa9\","
        "\"lastName\":\"\\\"Pe\\u00f1a\\\"\"}}",
        &options_sync,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":"
        "{\"firstName\":\"Jos\xc3\xa9\","
        "\"lastName\":\"\\\"Pe\xc3\xb1" "a\\\"\"}}}",
        "{\"user_id\":\"u1\",\"name\":\"Jos\xc3\xa9 \\\"Pe\xc3\xb1" "a\\\"\","
        "\"attributes\":{\"firstName\":\"Jos\xc3\xa9\","
        "\"lastName\":\"\\\"Pe\xc3\xb1" "a\\\"\"}}");

    /* the users request exists for identify only */
    expect_forwarded("sync users track", STORIES_CALL_TRACK,
        "{\"userId\":\"u1\",\"event\":\"E\",\"traits\":{\"name\":\"Ada\"}}",
        &options_sync,
        "{\"user_id\":\"u1\",\"name\":\"Track\",\"data\":{\"content\":\"E\"}}",
        NULL);

    expect_forwarded("sync users page", STORIES_CALL_PAGE,
        "{\"userId\":\"u1\",\"name\":\"Home\"}",
        &options_sync,
        "{\"user_id\":\"u1\",\"name\":\"Page\","
        "\"data\":{\"content\":\"Home\"}}",
        NULL);
}


static void
test_sync_users_message_id(void)
{
    int                rc;
    const char        *name, *json;
    stories_result_t   result;

    name = "sync users messageId";
    json = "{\"userId\":\"u1\",\"messageId\":\"m-7\"}";

    rc = translate(STORIES_CALL_IDENTIFY, json, strlen(json), &options_sync,
                   &result);

    is_accepted(rc, &result, name);

    if (is_size(result.nrequests, 2, name, "request count")) {
        is_text(result.requests[0].message_id, "m-7", name,
                "events messageId");
        is_text(result.requests[1].message_id, "m-7", name,
                "users messageId");
    }

    stories_result_free(&result);

    name = "sync users anonymous identify";
    json = "{\"anonymousId\":\"a1\",\"traits\":{\"name\":\"Ada\"}}";

    rc = translate(STORIES_CALL_IDENTIFY, json, strlen(json), &options_sync,
                   &result);

    is_accepted(rc, &result, name);
    is_size(result.nrequests, 0, name, "no requests");
    is_size(result.nskipped, 1, name, "skipped count");

    stories_result_free(&result);
}


/* Valid messages that are not forwarded */


static void
test_skips(void)
{
    size_t  i;

    static const reason_case_t  cases[] = {
        { "skip group", STORIES_CALL_GROUP,
          "{\"userId\":\"u1\",\"groupId\":\"g1\"}",
          "no Stories equivalent" },
        { "skip alias", STORIES_CALL_ALIAS,
          "{\"userId\":\"u1\",\"previousId\":\"p1\"}",
          "no Stories equivalent" },
        { "skip anonymous group", STORIES_CALL_GROUP,
          "{\"anonymousId\":\"a1\",\"groupId\":\"g1\"}",
          "no Stories equivalent" },
        { "skip anonymous track", STORIES_CALL_TRACK,
          "{\"anonymousId\":\"a1\",\"event\":\"E\"}",
          "no userId" },
        { "skip anonymous identify", STORIES_CALL_IDENTIFY,
          "{\"anonymousId\":\"a1\",\"traits\":{\"name\":\"Ada\"}}",
          "no userId" },
        { "skip empty userId", STORIES_CALL_PAGE,
          "{\"userId\":\"\",\"anonymousId\":\"a1\"}",
          "no userId" },
        { "skip null userId", STORIES_CALL_SCREEN,
          "{\"userId\":null,\"anonymousId\":\"a1\"}",
          "no userId" },
        { "skip numeric anonymousId", STORIES_CALL_TRACK,
          "{\"anonymousId\":5,\"event\":\"E\"}",
          "no userId" },
        { "skip Stories false", STORIES_CALL_TRACK,
          "{\"userId\":\"u1\",\"event\":\"E\","
          "\"integrations\":{\"Stories\":false}}",
          "integrations turn Stories off" },
        { "skip All false", STORIES_CALL_IDENTIFY,
          "{\"userId\":\"u1\",\"integrations\":{\"All\":false}}",
          "integrations turn Stories off" },
        { "skip All and Stories false", STORIES_CALL_PAGE,
          "{\"userId\":\"u1\","
          "\"integrations\":{\"All\":false,\"Stories\":false}}",
          "integrations turn Stories off" },
        { "skip All true Stories false", STORIES_CALL_TRACK,
          "{\"userId\":\"u1\",\"event\":\"E\","
          "\"integrations\":{\"All\":true,\"Stories\":false}}",
          "integrations turn Stories off" }
    };

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        expect_skipped(cases[i].name, cases[i].call, cases[i].json,
                       cases[i].reason, NULL);
    }

    expect_skipped("skip group messageId", STORIES_CALL_GROUP,
                   "{\"userId\":\"u1\",\"groupId\":\"g1\","
                   "\"messageId\":\"m-g\"}",
                   "no Stories equivalent", "m-g");

    expect_skipped("skip anonymous messageId", STORIES_CALL_TRACK,
                   "{\"anonymousId\":\"a1\",\"event\":\"E\","
                   "\"messageId\":\"m\\nx\"}",
                   "no userId", "m?x");

    expect_forwarded("All false Stories true", STORIES_CALL_TRACK,
        "{\"userId\":\"u1\",\"event\":\"E\","
        "\"integrations\":{\"All\":false,\"Stories\":true}}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Track\",\"data\":{\"content\":\"E\"}}",
        NULL);

    expect_forwarded("All false Stories object", STORIES_CALL_TRACK,
        "{\"userId\":\"u1\",\"event\":\"E\","
        "\"integrations\":{\"All\":false,\"Stories\":{}}}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Track\",\"data\":{\"content\":\"E\"}}",
        NULL);

    expect_forwarded("All false Stories settings", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\","
        "\"integrations\":{\"Stories\":{\"key\":\"v\"},\"All\":false}}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":{}}}",
        NULL);

    expect_forwarded("Stories true", STORIES_CALL_TRACK,
        "{\"userId\":\"u1\",\"event\":\"E\","
        "\"integrations\":{\"Stories\":true}}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Track\",\"data\":{\"content\":\"E\"}}",
        NULL);

    expect_forwarded("other integration false", STORIES_CALL_TRACK,
        "{\"userId\":\"u1\",\"event\":\"E\","
        "\"integrations\":{\"Mixpanel\":false}}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Track\",\"data\":{\"content\":\"E\"}}",
        NULL);

    expect_forwarded("empty integrations", STORIES_CALL_TRACK,
        "{\"userId\":\"u1\",\"event\":\"E\",\"integrations\":{}}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Track\",\"data\":{\"content\":\"E\"}}",
        NULL);

    expect_forwarded("null integrations", STORIES_CALL_TRACK,
        "{\"userId\":\"u1\",\"event\":\"E\",\"integrations\":null}",
        &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Track\",\"data\":{\"content\":\"E\"}}",
        NULL);
}


/* Single calls rejected with status 400 */


static void
test_errors(void)
{
    size_t  i;

    static const reason_case_t  cases[] = {
        { "empty body", STORIES_CALL_TRACK, "", "empty body" },
        { "whitespace-only body", STORIES_CALL_TRACK, " \t\r\n ",
          "empty body" },
        { "unclosed object", STORIES_CALL_TRACK, "{", "invalid JSON" },
        { "missing value", STORIES_CALL_TRACK, "{\"userId\":}",
          "invalid JSON" },
        { "single quotes", STORIES_CALL_TRACK, "{'userId':'u1'}",
          "invalid JSON" },
        { "trailing word", STORIES_CALL_TRACK,
          "{\"userId\":\"u1\",\"event\":\"E\"} x", "invalid JSON" },
        { "trailing object", STORIES_CALL_TRACK,
          "{\"userId\":\"u1\",\"event\":\"E\"}{}", "invalid JSON" },
        { "trailing comma", STORIES_CALL_TRACK,
          "{\"userId\":\"u1\",\"event\":\"E\"},", "invalid JSON" },
        { "array body", STORIES_CALL_TRACK, "[]",
          "body is not a JSON object" },
        { "string body", STORIES_CALL_IDENTIFY, "\"u1\"",
          "body is not a JSON object" },
        { "number body", STORIES_CALL_PAGE, "42",
          "body is not a JSON object" },
        { "null body", STORIES_CALL_SCREEN, "null",
          "body is not a JSON object" },
        { "true body", STORIES_CALL_GROUP, "true",
          "body is not a JSON object" },
        { "empty object", STORIES_CALL_TRACK, "{}",
          "missing userId and anonymousId" },
        { "no ids", STORIES_CALL_TRACK, "{\"event\":\"E\"}",
          "missing userId and anonymousId" },
        { "null and empty ids", STORIES_CALL_IDENTIFY,
          "{\"userId\":null,\"anonymousId\":\"\"}",
          "missing userId and anonymousId" },
        { "no ids on group", STORIES_CALL_GROUP, "{\"groupId\":\"g1\"}",
          "missing userId and anonymousId" },
        { "userId true", STORIES_CALL_TRACK,
          "{\"userId\":true,\"event\":\"E\"}",
          "userId is not a string or number" },
        { "userId object", STORIES_CALL_IDENTIFY, "{\"userId\":{}}",
          "userId is not a string or number" },
        { "userId array", STORIES_CALL_PAGE, "{\"userId\":[\"u1\"]}",
          "userId is not a string or number" },
        { "userId checked first", STORIES_CALL_TRACK, "{\"userId\":false}",
          "userId is not a string or number" },
        { "anonymousId false", STORIES_CALL_TRACK,
          "{\"anonymousId\":false,\"event\":\"E\"}",
          "anonymousId is not a string or number" },
        { "missing event", STORIES_CALL_TRACK, "{\"userId\":\"u1\"}",
          "missing event" },
        { "null event", STORIES_CALL_TRACK,
          "{\"userId\":\"u1\",\"event\":null}", "missing event" },
        { "empty event", STORIES_CALL_TRACK,
          "{\"userId\":\"u1\",\"event\":\"\"}", "missing event" },
        { "anonymous without event", STORIES_CALL_TRACK,
          "{\"anonymousId\":\"a1\"}", "missing event" },
        { "numeric event", STORIES_CALL_TRACK,
          "{\"userId\":\"u1\",\"event\":5}", "event is not a string" },
        { "object event", STORIES_CALL_TRACK,
          "{\"userId\":\"u1\",\"event\":{}}", "event is not a string" },
        { "numeric page name", STORIES_CALL_PAGE,
          "{\"userId\":\"u1\",\"name\":5}", "name is not a string" },
        { "array screen name", STORIES_CALL_SCREEN,
          "{\"userId\":\"u1\",\"name\":[]}", "name is not a string" },
        { "string traits", STORIES_CALL_IDENTIFY,
          "{\"userId\":\"u1\",\"traits\":\"x\"}", "traits is not an object" },
        { "array traits", STORIES_CALL_IDENTIFY,
          "{\"userId\":\"u1\",\"traits\":[]}", "traits is not an object" },
        { "anonymous array traits", STORIES_CALL_IDENTIFY,
          "{\"anonymousId\":\"a1\",\"traits\":[]}",
          "traits is not an object" },
        { "string integrations", STORIES_CALL_TRACK,
          "{\"userId\":\"u1\",\"event\":\"E\",\"integrations\":\"x\"}",
          "integrations is not an object" },
        { "array integrations", STORIES_CALL_IDENTIFY,
          "{\"userId\":\"u1\",\"integrations\":[]}",
          "integrations is not an object" },
        { "false integrations on alias", STORIES_CALL_ALIAS,
          "{\"userId\":\"u1\",\"integrations\":false}",
          "integrations is not an object" }
    };

    static const char  trailing_nul[] =
        "{\"userId\":\"u1\",\"event\":\"E\"}\0";

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        expect_rejected(cases[i].name, cases[i].call, cases[i].json,
                        &options_default, cases[i].reason);
    }

    expect_status_len("trailing NUL", STORIES_CALL_TRACK, trailing_nul,
                      sizeof(trailing_nul) - 1, &options_default, 400,
                      "invalid JSON");
}


/*
 * Truncated bodies.  cJSON must stop at the length given, and a read past
 * the buffer inside libcjson shows only under valgrind.
 */
static void
test_truncated_bodies(void)
{
    size_t  i;

    static const char  *bodies[] = {
        "{\"userId\":\"u1",
        "{\"userId\":\"u1\\",
        "{\"userId\":\"\\u00",
        "{\"userId\":\"\\ud83d",
        "{\"userId\":\"\\ud83d\\u",
        "{\"userId\":12",
        "{\"userId\":-",
        "{\"userId\":1e",
        "{\"userId\":tru",
        "{\"userId\":nul",
        "{\"userId\"",
        "{\"",
        "[",
        "\"",
        "-"
    };

    for (i = 0; i < sizeof(bodies) / sizeof(bodies[0]); i++) {
        expect_rejected(bodies[i], STORIES_CALL_TRACK, bodies[i],
                        &options_default, "invalid JSON");
    }
}


/* Batches */


static void
test_batch_errors(void)
{
    int                rc;
    const char        *name;
    stories_result_t   result;

    expect_rejected("batch bare array", STORIES_CALL_BATCH,
                    "[{\"type\":\"track\",\"userId\":\"u1\",\"event\":\"E\"}]",
                    &options_default, "body is not a JSON object");
    expect_rejected("batch empty body", STORIES_CALL_BATCH, "",
                    &options_default, "empty body");
    expect_rejected("batch whitespace body", STORIES_CALL_BATCH, "\n\n",
                    &options_default, "empty body");
    expect_rejected("batch invalid JSON", STORIES_CALL_BATCH,
                    "{\"batch\":[", &options_default, "invalid JSON");
    expect_rejected("batch trailing data", STORIES_CALL_BATCH,
                    "{\"batch\":[]}]", &options_default, "invalid JSON");
    expect_rejected("batch missing", STORIES_CALL_BATCH, "{}",
                    &options_default, "missing batch");
    expect_rejected("batch key is case-sensitive", STORIES_CALL_BATCH,
                    "{\"Batch\":[]}", &options_default, "missing batch");
    expect_rejected("batch object", STORIES_CALL_BATCH, "{\"batch\":{}}",
                    &options_default, "batch is not an array");
    expect_rejected("batch string", STORIES_CALL_BATCH,
                    "{\"batch\":\"[]\"}", &options_default,
                    "batch is not an array");

    name = "batch empty";

    rc = translate(STORIES_CALL_BATCH, "{\"batch\":[]}", 12,
                   &options_default, &result);

    is_accepted(rc, &result, name);
    is_int(result.batch, 1, name, "batch flag");
    is_size(result.messages, 0, name, "message count");
    is_size(result.nrequests, 0, name, "no requests");
    is_size(result.ninvalid, 0, name, "no invalid messages");
    is_size(result.nskipped, 0, name, "no skipped messages");

    stories_result_free(&result);
}


static void
test_batch_mixed(void)
{
    int                   rc;
    char                 *out;
    size_t                i, n, len;
    const char           *name;
    stories_result_t      result;
    stories_rejection_t   rejected[16];

    static const char  json[] =
        "{\"batch\":["
        /* 0 */
        "{\"type\":\"track\",\"userId\":\"u1\",\"event\":\"Signed Up\","
        "\"messageId\":\"m0\"},"
        /* 1 */
        "{\"type\":\"track\",\"userId\":\"u1\",\"messageId\":\"m1\"},"
        /* 2 */
        "\"text\","
        /* 3 */
        "{\"type\":\"foo\",\"userId\":\"u1\",\"messageId\":\"m3\"},"
        /* 4 */
        "{\"userId\":\"u1\",\"event\":\"E\"},"
        /* 5 */
        "{\"type\":7,\"userId\":\"u1\"},"
        /* 6 */
        "{\"type\":\"page\",\"userId\":\"u2\",\"name\":\"Home\"},"
        /* 7 */
        "{\"type\":\"group\",\"userId\":\"u1\",\"groupId\":\"g1\","
        "\"messageId\":\"m7\"},"
        /* 8 */
        "{\"type\":\"identify\",\"anonymousId\":\"a1\"},"
        /* 9 */
        "null,"
        /* 10 */
        "[{\"type\":\"track\"}],"
        /* 11 */
        "{\"type\":\"batch\",\"userId\":\"u1\"},"
        /* 12 */
        "{\"type\":null,\"userId\":\"u1\"},"
        /* 13 */
        "{\"type\":\"identify\",\"userId\":\"u3\",\"traits\":[]},"
        /* 14 */
        "{\"type\":\"Track\",\"userId\":\"u1\",\"event\":\"E\"},"
        /* 15 */
        "{\"type\":\"screen\",\"userId\":3}"
        "]}";

    static const expected_note_t  invalid[] = {
        { 1, STORIES_CALL_TRACK, "missing event", "m1" },
        { 2, STORIES_CALL_NONE, "message is not an object", NULL },
        { 3, STORIES_CALL_NONE, "unknown type \"foo\"", "m3" },
        { 4, STORIES_CALL_NONE, "missing type", NULL },
        { 5, STORIES_CALL_NONE, "type is not a string", NULL },
        { 9, STORIES_CALL_NONE, "message is not an object", NULL },
        { 10, STORIES_CALL_NONE, "message is not an object", NULL },
        { 11, STORIES_CALL_NONE, "unknown type \"batch\"", NULL },
        { 12, STORIES_CALL_NONE, "missing type", NULL },
        { 13, STORIES_CALL_IDENTIFY, "traits is not an object", NULL },
        { 14, STORIES_CALL_NONE, "unknown type \"Track\"", NULL }
    };

    static const expected_note_t  skipped[] = {
        { 7, STORIES_CALL_GROUP, "no Stories equivalent", "m7" },
        { 8, STORIES_CALL_IDENTIFY, "no userId", NULL }
    };

    name = "batch mixed";

    rc = translate(STORIES_CALL_BATCH, json, sizeof(json) - 1,
                   &options_default, &result);

    is_accepted(rc, &result, name);
    is_int(result.batch, 1, name, "batch flag");
    is_size(result.messages, 16, name, "message count");

    if (is_size(result.nrequests, 3, name, "request count")) {
        check_request(&result.requests[0], STORIES_EVENTS_PATH,
                      "{\"user_id\":\"u1\",\"name\":\"Track\","
                      "\"data\":{\"content\":\"Signed Up\"}}",
                      0, STORIES_CALL_TRACK, name);
        is_text(result.requests[0].message_id, "m0", name,
                "request 0 messageId");

        check_request(&result.requests[1], STORIES_EVENTS_PATH,
                      "{\"user_id\":\"u2\",\"name\":\"Page\","
                      "\"data\":{\"content\":\"Home\"}}",
                      6, STORIES_CALL_PAGE, name);
        is_text(result.requests[1].message_id, NULL, name,
                "request 1 messageId");

        check_request(&result.requests[2], STORIES_EVENTS_PATH,
                      "{\"user_id\":\"3\",\"name\":\"Screen\",\"data\":{}}",
                      15, STORIES_CALL_SCREEN, name);
    }

    check_notes(result.invalid, result.ninvalid, invalid,
                sizeof(invalid) / sizeof(invalid[0]), name, "invalid");
    check_notes(result.skipped, result.nskipped, skipped,
                sizeof(skipped) / sizeof(skipped[0]), name, "skipped");

    /* the 200 response lists the invalid messages, here in reverse order */

    n = result.ninvalid;

    if (n > sizeof(rejected) / sizeof(rejected[0])) {
        n = sizeof(rejected) / sizeof(rejected[0]);
    }

    for (i = 0; i < n; i++) {
        rejected[i].index = result.invalid[n - 1 - i].index;
        rejected[i].error = result.invalid[n - 1 - i].reason;
    }

    len = 0;
    out = stories_response_success(rejected, n, &len);

    is_bytes(out, len,
             "{\"success\":true,\"rejected\":["
             "{\"index\":1,\"error\":\"missing event\"},"
             "{\"index\":2,\"error\":\"message is not an object\"},"
             "{\"index\":3,\"error\":\"unknown type \\\"foo\\\"\"},"
             "{\"index\":4,\"error\":\"missing type\"},"
             "{\"index\":5,\"error\":\"type is not a string\"},"
             "{\"index\":9,\"error\":\"message is not an object\"},"
             "{\"index\":10,\"error\":\"message is not an object\"},"
             "{\"index\":11,\"error\":\"unknown type \\\"batch\\\"\"},"
             "{\"index\":12,\"error\":\"missing type\"},"
             "{\"index\":13,\"error\":\"traits is not an object\"},"
             "{\"index\":14,\"error\":\"unknown type \\\"Track\\\"\"}]}",
             name, "response");

    free(out);
    stories_result_free(&result);
}


/* Every check of a single message applies to a message of a batch. */
static void
test_batch_message_errors(void)
{
    int                rc;
    char               json[256], name[96];
    size_t             i;
    stories_result_t   result;

    static const struct {
        const char      *message;
        stories_call_e   type;
        const char      *reason;
    } cases[] = {
        { "{\"type\":\"track\"}", STORIES_CALL_TRACK,
          "missing userId and anonymousId" },
        { "{\"type\":\"group\",\"userId\":true}", STORIES_CALL_GROUP,
          "userId is not a string or number" },
        { "{\"type\":\"alias\",\"userId\":\"u1\",\"anonymousId\":[]}",
          STORIES_CALL_ALIAS, "anonymousId is not a string or number" },
        { "{\"type\":\"track\",\"userId\":\"u1\",\"event\":\"\"}",
          STORIES_CALL_TRACK, "missing event" },
        { "{\"type\":\"track\",\"userId\":\"u1\",\"event\":1}",
          STORIES_CALL_TRACK, "event is not a string" },
        { "{\"type\":\"page\",\"userId\":\"u1\",\"name\":{}}",
          STORIES_CALL_PAGE, "name is not a string" },
        { "{\"type\":\"screen\",\"userId\":\"u1\",\"name\":true}",
          STORIES_CALL_SCREEN, "name is not a string" },
        { "{\"type\":\"identify\",\"userId\":\"u1\",\"traits\":1}",
          STORIES_CALL_IDENTIFY, "traits is not an object" },
        { "{\"type\":\"track\",\"userId\":\"u1\",\"event\":\"E\","
          "\"integrations\":[]}",
          STORIES_CALL_TRACK, "integrations is not an object" },
        { "{\"type\":\"import\",\"userId\":\"u1\"}", STORIES_CALL_NONE,
          "unknown type \"import\"" },
        { "{\"type\":[\"track\"],\"userId\":\"u1\"}", STORIES_CALL_NONE,
          "type is not a string" },
        { "[]", STORIES_CALL_NONE, "message is not an object" },
        { "42", STORIES_CALL_NONE, "message is not an object" },
        { "true", STORIES_CALL_NONE, "message is not an object" }
    };

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        snprintf(json, sizeof(json),
                 "{\"batch\":[{\"type\":\"page\",\"userId\":\"u1\"},%s]}",
                 cases[i].message);
        snprintf(name, sizeof(name), "batch message %s", cases[i].message);

        rc = translate(STORIES_CALL_BATCH, json, strlen(json),
                       &options_default, &result);

        is_accepted(rc, &result, name);
        is_size(result.messages, 2, name, "message count");
        is_size(result.nrequests, 1, name, "request count");

        if (is_size(result.ninvalid, 1, name, "invalid count")) {
            is_size(result.invalid[0].index, 1, name, "invalid index");
            is_text(result.invalid[0].reason, cases[i].reason, name,
                    "invalid reason");
            is_call(result.invalid[0].type, cases[i].type, name,
                    "invalid type");
        }

        stories_result_free(&result);
    }
}


/* The reason quotes an unknown type cut to 32 bytes, unsafe bytes as '?'. */
static void
test_batch_types(void)
{
    int                rc;
    size_t             i;
    stories_result_t   result;

    static const struct {
        const char  *name;
        const char  *json;
        const char  *reason;
    } cases[] = {
        { "batch type foo",
          "{\"batch\":[{\"type\":\"foo\",\"userId\":\"u1\"}]}",
          "unknown type \"foo\"" },
        { "batch type sanitized",
          "{\"batch\":[{\"type\":\"a\\\"b\\\\c\\nd\\u0001\xc3\xa9\","
          "\"userId\":\"u1\"}]}",
          "unknown type \"a?b?c?d???\"" },
        { "batch type truncated",
          "{\"batch\":[{\"type\":"
          "\"0123456789abcdefghijklmnopqrstuvwxyzABCD\"}]}",
          "unknown type \"0123456789abcdefghijklmnopqrstuv\"" }
    };

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        rc = translate(STORIES_CALL_BATCH, cases[i].json,
                       strlen(cases[i].json), &options_default, &result);

        is_accepted(rc, &result, cases[i].name);
        is_size(result.nrequests, 0, cases[i].name, "no requests");

        if (is_size(result.ninvalid, 1, cases[i].name, "invalid count")) {
            is_text(result.invalid[0].reason, cases[i].reason,
                    cases[i].name, "invalid reason");
        }

        stories_result_free(&result);
    }
}


static void
test_batch_sync_users(void)
{
    int                rc;
    const char        *name, *json;
    stories_result_t   result;

    name = "batch sync users";
    json = "{\"batch\":["
           "{\"type\":\"track\",\"userId\":\"u1\",\"event\":\"E\"},"
           "{\"type\":\"identify\",\"userId\":\"u2\","
           "\"traits\":{\"name\":\"Bo\"},\"messageId\":\"m1\"},"
           "{\"type\":\"page\",\"userId\":\"u3\"}"
           "]}";

    rc = translate(STORIES_CALL_BATCH, json, strlen(json), &options_sync,
                   &result);

    is_accepted(rc, &result, name);
    is_size(result.messages, 3, name, "message count");

    if (is_size(result.nrequests, 4, name, "request count")) {
        check_request(&result.requests[0], STORIES_EVENTS_PATH,
                      "{\"user_id\":\"u1\",\"name\":\"Track\","
                      "\"data\":{\"content\":\"E\"}}",
                      0, STORIES_CALL_TRACK, name);
        check_request(&result.requests[1], STORIES_EVENTS_PATH,
                      "{\"user_id\":\"u2\",\"name\":\"Identify\","
                      "\"data\":{\"traits\":{\"name\":\"Bo\"}}}",
                      1, STORIES_CALL_IDENTIFY, name);
        check_request(&result.requests[2], STORIES_USERS_PATH,
                      "{\"user_id\":\"u2\",\"name\":\"Bo\","
                      "\"attributes\":{\"name\":\"Bo\"}}",
                      1, STORIES_CALL_IDENTIFY, name);
        is_text(result.requests[2].message_id, "m1", name,
                "users messageId");
        check_request(&result.requests[3], STORIES_EVENTS_PATH,
                      "{\"user_id\":\"u3\",\"name\":\"Page\",\"data\":{}}",
                      2, STORIES_CALL_PAGE, name);
    }

    stories_result_free(&result);
}


/* More messages of each kind than the initial capacity of each result list */
static void
test_batch_growth(void)
{
    int                rc;
    char               json[4096], expected[128], what[64];
    size_t             i, n, len, index;
    const char        *name;
    stories_result_t   result;

    name = "batch of 30";
    n = 10;

    len = (size_t) snprintf(json, sizeof(json), "{\"batch\":[");

    for (i = 0; i < n; i++) {
        len += (size_t) snprintf(json + len, sizeof(json) - len,
                 "{\"type\":\"track\",\"userId\":\"u%zu\",\"event\":\"E\"},"
                 "{\"type\":\"track\",\"userId\":\"u%zu\"},"
                 "{\"type\":\"alias\",\"userId\":\"u%zu\"}%s",
                 i, i, i, i + 1 < n ? "," : "");
    }

    snprintf(json + len, sizeof(json) - len, "]}");

    rc = translate(STORIES_CALL_BATCH, json, strlen(json), &options_default,
                   &result);

    is_accepted(rc, &result, name);
    is_size(result.messages, 3 * n, name, "message count");

    if (is_size(result.nrequests, n, name, "request count")) {
        for (i = 0; i < n; i++) {
            snprintf(expected, sizeof(expected),
                     "{\"user_id\":\"u%zu\",\"name\":\"Track\","
                     "\"data\":{\"content\":\"E\"}}", i);
            snprintf(what, sizeof(what), "request %zu body", i);
            is_bytes(result.requests[i].body, result.requests[i].body_len,
                     expected, name, what);

            snprintf(what, sizeof(what), "request %zu index", i);
            is_size(result.requests[i].index, 3 * i, name, what);
        }
    }

    if (is_size(result.ninvalid, n, name, "invalid count")) {
        for (i = 0; i < n; i++) {
            index = 3 * i + 1;
            snprintf(what, sizeof(what), "invalid %zu index", i);
            is_size(result.invalid[i].index, index, name, what);
        }
    }

    if (is_size(result.nskipped, n, name, "skipped count")) {
        for (i = 0; i < n; i++) {
            index = 3 * i + 2;
            snprintf(what, sizeof(what), "skipped %zu index", i);
            is_size(result.skipped[i].index, index, name, what);
        }
    }

    stories_result_free(&result);
}


/* stories_options_t.max_depth */


static void
test_max_depth(void)
{
    stories_options_t  options;

    memset(&options, 0, sizeof(stories_options_t));
    options.max_depth = 3;

    expect_forwarded("depth 3 of 3", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"a\":{\"b\":1}}}",
        &options,
        "{\"user_id\":\"u1\",\"name\":\"Identify\","
        "\"data\":{\"traits\":{\"a\":{\"b\":1}}}}",
        NULL);

    expect_rejected("depth 4 of 3", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"a\":{\"b\":[1]}}}",
        &options, "JSON nesting is deeper than stories_max_depth 3");

    expect_forwarded("depth 3 of 3 after closing", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"a\":[1],\"b\":[2],\"c\":{\"d\":3}}}",
        &options,
        "{\"user_id\":\"u1\",\"name\":\"Identify\","
        "\"data\":{\"traits\":{\"a\":[1],\"b\":[2],\"c\":{\"d\":3}}}}",
        NULL);

    /* the brackets and the escaped quote are inside strings */
    options.max_depth = 2;

    expect_forwarded("depth ignores brackets in strings",
        STORIES_CALL_IDENTIFY,
        "{\"userId\":\"[[[\",\"traits\":{\"a\":\"{{{[[[\","
        "\"b\":\"\\\"[{\",\"c\":\"}]\"}}",
        &options,
        "{\"user_id\":\"[[[\",\"name\":\"Identify\",\"data\":{\"traits\":"
        "{\"a\":\"{{{[[[\",\"b\":\"\\\"[{\",\"c\":\"}]\"}}}",
        NULL);

    /* an escaped backslash does not escape the quote after it */
    options.max_depth = 3;

    expect_forwarded("depth after escaped backslash", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"a\":\"\\\\\",\"b\":{\"c\":1}}}",
        &options,
        "{\"user_id\":\"u1\",\"name\":\"Identify\","
        "\"data\":{\"traits\":{\"a\":\"\\\\\",\"b\":{\"c\":1}}}}",
        NULL);

    expect_rejected("depth counted after escaped backslash",
        STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"a\":\"\\\\\",\"b\":{\"c\":[1]}}}",
        &options, "JSON nesting is deeper than stories_max_depth 3");

    options.max_depth = 1;

    expect_forwarded("depth 1 of 1", STORIES_CALL_TRACK,
        "{\"userId\":\"u1\",\"event\":\"E\"}",
        &options,
        "{\"user_id\":\"u1\",\"name\":\"Track\",\"data\":{\"content\":\"E\"}}",
        NULL);

    expect_rejected("depth 2 of 1", STORIES_CALL_TRACK,
        "{\"userId\":\"u1\",\"event\":\"E\",\"properties\":{}}",
        &options, "JSON nesting is deeper than stories_max_depth 1");

    options.max_depth = 2;

    expect_rejected("batch depth 3 of 2", STORIES_CALL_BATCH,
        "{\"batch\":[{\"type\":\"track\",\"userId\":\"u1\",\"event\":\"E\"}]}",
        &options, "JSON nesting is deeper than stories_max_depth 2");
}


/*
 * Deep nesting with and without max_depth, and past CJSON_NESTING_LIMIT,
 * which is 1000 in cJSON 1.7.15 (cjson/cJSON.h).
 */
static void
test_max_depth_nested(void)
{
    char               *json, *expected;
    size_t              i, depth, len;
    stories_options_t   options;

    static const char  prefix[] = "{\"userId\":\"u1\",\"traits\":{\"a\":";
    static const char  events_prefix[] =
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":"
        "{\"a\":";

    /* the body and the traits object add 2 levels to the arrays */
    depth = 200;

    json = malloc(sizeof(prefix) + 2 * depth + 8);
    expected = malloc(sizeof(events_prefix) + 2 * depth + 8);

    if (json == NULL || expected == NULL) {
        printf("Bail out! malloc() failed\n");
        exit(1);
    }

    len = strlen(prefix);
    memcpy(json, prefix, len);

    for (i = 0; i < depth; i++) {
        json[len++] = '[';
    }

    for (i = 0; i < depth; i++) {
        json[len++] = ']';
    }

    memcpy(json + len, "}}", 3);

    len = strlen(events_prefix);
    memcpy(expected, events_prefix, len);

    for (i = 0; i < depth; i++) {
        expected[len++] = '[';
    }

    for (i = 0; i < depth; i++) {
        expected[len++] = ']';
    }

    memcpy(expected + len, "}}}", 4);

    memset(&options, 0, sizeof(stories_options_t));

    expect_forwarded("depth 202 without max_depth", STORIES_CALL_IDENTIFY,
                     json, &options, expected, NULL);

    options.max_depth = depth + 2;

    expect_forwarded("depth 202 of 202", STORIES_CALL_IDENTIFY,
                     json, &options, expected, NULL);

    options.max_depth = depth + 1;

    expect_rejected("depth 202 of 201", STORIES_CALL_IDENTIFY, json,
                    &options,
                    "JSON nesting is deeper than stories_max_depth 201");

    free(json);
    free(expected);

    /* past cJSON's own limit the body cannot be parsed */
    depth = 1100;

    json = malloc(2 * depth + 1);
    if (json == NULL) {
        printf("Bail out! malloc() failed\n");
        exit(1);
    }

    for (i = 0; i < depth; i++) {
        json[i] = '[';
        json[2 * depth - 1 - i] = ']';
    }

    json[2 * depth] = '\0';

    options.max_depth = 0;

    expect_rejected("depth past cJSON limit", STORIES_CALL_TRACK, json,
                    &options, "invalid JSON");

    free(json);
}


/* The body's writeKey */


static void
test_write_key(void)
{
    int                rc;
    size_t             i;
    stories_result_t   result;

    static const struct {
        const char      *name;
        stories_call_e   call;
        const char      *json;
        const char      *write_key;
    } cases[] = {
        { "writeKey in track", STORIES_CALL_TRACK,
          "{\"writeKey\":\"wk_123\",\"userId\":\"u1\",\"event\":\"E\"}",
          "wk_123" },
        { "writeKey in batch", STORIES_CALL_BATCH,
          "{\"batch\":[],\"writeKey\":\"wk \\\"x\\\"\"}",
          "wk \"x\"" },
        { "writeKey in skipped call", STORIES_CALL_GROUP,
          "{\"userId\":\"u1\",\"writeKey\":\"wk_9\"}",
          "wk_9" },
        { "writeKey absent", STORIES_CALL_TRACK,
          "{\"userId\":\"u1\",\"event\":\"E\"}",
          NULL },
        { "writeKey number", STORIES_CALL_TRACK,
          "{\"writeKey\":5,\"userId\":\"u1\",\"event\":\"E\"}",
          NULL },
        { "writeKey null", STORIES_CALL_BATCH,
          "{\"batch\":[],\"writeKey\":null}",
          NULL }
    };

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        rc = translate(cases[i].call, cases[i].json, strlen(cases[i].json),
                       &options_default, &result);

        is_accepted(rc, &result, cases[i].name);

        if (cases[i].write_key == NULL) {
            is_text(result.write_key, NULL, cases[i].name, "write_key NULL");
            is_size(result.write_key_len, 0, cases[i].name,
                    "write_key_len");

        } else {
            is_bytes(result.write_key, result.write_key_len,
                     cases[i].write_key, cases[i].name, "write_key bytes");

            if (result.write_key != NULL) {
                is_int(result.write_key[result.write_key_len], '\0',
                       cases[i].name, "NUL after write_key");
            }
        }

        stories_result_free(&result);
    }
}


/* stories_options_t.max_batch_size and max_message_size */


static void
test_max_batch_size(void)
{
    char                error[STORIES_ERROR_SIZE];
    size_t              len;
    const char         *track, *batch;
    stories_options_t   options;

    track = "{\"userId\":\"u1\",\"event\":\"E\"}";
    batch = "{\"batch\":[{\"type\":\"page\",\"userId\":\"u1\"}]}";

    memset(&options, 0, sizeof(stories_options_t));

    len = strlen(track);
    options.max_batch_size = len;

    expect_forwarded("track at max_batch_size", STORIES_CALL_TRACK, track,
        &options,
        "{\"user_id\":\"u1\",\"name\":\"Track\","
        "\"data\":{\"content\":\"E\"}}",
        NULL);

    options.max_batch_size = len - 1;
    snprintf(error, sizeof(error),
             "body is larger than stories_max_batch_size %zu bytes", len - 1);

    expect_status_len("track over max_batch_size", STORIES_CALL_TRACK, track,
                      len, &options, 413, error);

    len = strlen(batch);
    options.max_batch_size = len - 1;
    snprintf(error, sizeof(error),
             "body is larger than stories_max_batch_size %zu bytes", len - 1);

    expect_status_len("batch over max_batch_size", STORIES_CALL_BATCH, batch,
                      len, &options, 413, error);

    /* a whitespace-only body is empty whatever its size */
    options.max_batch_size = 1;

    expect_rejected("blank body over max_batch_size", STORIES_CALL_TRACK,
                    "    ", &options, "empty body");
}


/* A single call counts the bytes of the body as received. */
static void
test_max_message_size(void)
{
    int                 rc;
    char                error[STORIES_ERROR_SIZE];
    size_t              len;
    const char         *track, *padded, *name;
    stories_result_t    result;
    stories_options_t   options;

    track = "{\"userId\":\"u1\",\"event\":\"E\"}";
    padded = "{ \"userId\":\"u1\",\"event\":\"E\"}";

    memset(&options, 0, sizeof(stories_options_t));

    len = strlen(track);
    options.max_message_size = len;

    expect_forwarded("track at max_message_size", STORIES_CALL_TRACK, track,
        &options,
        "{\"user_id\":\"u1\",\"name\":\"Track\","
        "\"data\":{\"content\":\"E\"}}",
        NULL);

    snprintf(error, sizeof(error),
             "message is larger than stories_max_message_size %zu bytes",
             len);

    expect_status_len("padded track over max_message_size",
                      STORIES_CALL_TRACK, padded, strlen(padded), &options,
                      413, error);

    options.max_message_size = len - 1;
    snprintf(error, sizeof(error),
             "message is larger than stories_max_message_size %zu bytes",
             len - 1);

    expect_status_len("track over max_message_size", STORIES_CALL_TRACK,
                      track, len, &options, 413, error);

    /* the body of a batch call is limited by max_batch_size only */
    name = "batch body over max_message_size";
    options.max_message_size = 4;

    rc = translate(STORIES_CALL_BATCH, "{\"batch\":[]}", 12, &options,
                   &result);

    is_accepted(rc, &result, name);
    is_size(result.messages, 0, name, "message count");

    stories_result_free(&result);
}


/*
 * A message of a batch counts the bytes of its compact JSON.  The messages
 * end in each kind of value, because cJSON reserves a different amount of
 * room for each while printing.
 */
static void
test_batch_message_size(void)
{
    int                 rc;
    char                json[512], name[160], reason[STORIES_ERROR_SIZE];
    size_t              i, len;
    stories_result_t    result;
    stories_options_t   options;

    static const char  *messages[] = {
        "{\"type\":\"track\",\"userId\":\"u1\",\"event\":\"E\"}",
        "{\"type\":\"track\",\"userId\":\"u1\",\"event\":\"E\",\"n\":12345}",
        "{\"type\":\"track\",\"userId\":\"u1\",\"event\":\"E\",\"n\":-0.5}",
        "{\"type\":\"track\",\"userId\":\"u1\",\"event\":\"E\",\"b\":true}",
        "{\"type\":\"track\",\"userId\":\"u1\",\"event\":\"E\",\"b\":false}",
        "{\"type\":\"track\",\"userId\":\"u1\",\"event\":\"E\",\"z\":null}",
        "{\"type\":\"track\",\"userId\":\"u1\",\"event\":\"E\",\"a\":[]}",
        "{\"type\":\"track\",\"userId\":\"u1\",\"event\":\"E\","
        "\"o\":{\"a\":[1,{}]}}",
        "{\"type\":\"identify\",\"userId\":\"u1\","
        "\"traits\":{\"s\":\"\\u0001\\\"x\"}}",
        "\"a message that is a string, not an object\""
    };

    memset(&options, 0, sizeof(stories_options_t));

    for (i = 0; i < sizeof(messages) / sizeof(messages[0]); i++) {
        len = strlen(messages[i]);

        /* a page before the message makes the body larger than the limit */
        snprintf(json, sizeof(json),
                 "{\"batch\":[{\"type\":\"page\",\"userId\":\"u1\"}, %s ]}",
                 messages[i]);

        options.max_message_size = len;

        snprintf(name, sizeof(name), "batch message at size limit %s",
                 messages[i]);

        rc = translate(STORIES_CALL_BATCH, json, strlen(json), &options,
                       &result);

        is_accepted(rc, &result, name);

        if (messages[i][0] != '{') {
            if (is_size(result.ninvalid, 1, name, "invalid count")) {
                is_text(result.invalid[0].reason, "message is not an object",
                        name, "invalid reason");
            }

        } else {
            is_size(result.ninvalid, 0, name, "no invalid messages");
            is_size(result.nrequests, 2, name, "request count");
        }

        stories_result_free(&result);

        options.max_message_size = len - 1;

        snprintf(name, sizeof(name), "batch message over size limit %s",
                 messages[i]);
        snprintf(reason, sizeof(reason),
                 "message is larger than stories_max_message_size %zu bytes",
                 len - 1);

        rc = translate(STORIES_CALL_BATCH, json, strlen(json), &options,
                       &result);

        is_accepted(rc, &result, name);
        is_size(result.messages, 2, name, "message count");

        if (is_size(result.ninvalid, 1, name, "invalid count")) {
            is_size(result.invalid[0].index, 1, name, "invalid index");
            is_text(result.invalid[0].reason, reason, name,
                    "invalid reason");
            is_call(result.invalid[0].type, STORIES_CALL_NONE, name,
                    "invalid type");
        }

        if (is_size(result.nrequests, 1, name, "request count")) {
            is_size(result.requests[0].index, 0, name, "request index");
        }

        stories_result_free(&result);
    }
}


/* Response bodies */


static void
test_response_success(void)
{
    char                 *out;
    size_t                len;
    stories_rejection_t   one[1];
    stories_rejection_t   several[4];

    len = 0;
    out = stories_response_success(NULL, 0, &len);

    is_bytes(out, len, "{\"success\":true}", "response success", "body");

    if (out != NULL) {
        is_int(out[len], '\0', "response success", "NUL after body");
    }

    free(out);

    several[0].index = 7;
    several[0].error = "Stories rejected the event with status 422";
    several[1].index = 0;
    several[1].error = "missing event";
    several[2].index = 1000000;
    several[2].error = "unknown type \"foo\"";
    several[3].index = 3;
    several[3].error = "message is not an object";

    len = 0;
    out = stories_response_success(several, 4, &len);

    is_bytes(out, len,
             "{\"success\":true,\"rejected\":["
             "{\"index\":0,\"error\":\"missing event\"},"
             "{\"index\":3,\"error\":\"message is not an object\"},"
             "{\"index\":7,"
             "\"error\":\"Stories rejected the event with status 422\"},"
             "{\"index\":1000000,\"error\":\"unknown type \\\"foo\\\"\"}]}",
             "response success rejected", "body");

    if (out != NULL) {
        is_int(out[len], '\0', "response success rejected",
               "NUL after body");
    }

    free(out);

    one[0].index = 1;
    one[0].error = "missing event";

    len = 0;
    out = stories_response_success(one, 1, &len);

    is_bytes(out, len,
             "{\"success\":true,\"rejected\":"
             "[{\"index\":1,\"error\":\"missing event\"}]}",
             "response success one rejected", "body");

    free(out);
}


static void
test_response_error(void)
{
    char    *out;
    size_t   len;

    len = 0;
    out = stories_response_error("empty body", &len);

    is_bytes(out, len, "{\"success\":false,\"error\":\"empty body\"}",
             "response error", "body");

    if (out != NULL) {
        is_int(out[len], '\0', "response error", "NUL after body");
    }

    free(out);

    len = 0;
    out = stories_response_error(
              "unknown call; expected identify, track, page, screen, "
              "group, alias or batch", &len);

    is_bytes(out, len,
             "{\"success\":false,\"error\":\"unknown call; expected "
             "identify, track, page, screen, group, alias or batch\"}",
             "response error unknown call", "body");

    free(out);

    len = 0;
    out = stories_response_error("type \"a\\b\" is not valid", &len);

    is_bytes(out, len,
             "{\"success\":false,"
             "\"error\":\"type \\\"a\\\\b\\\" is not valid\"}",
             "response error with quote", "body");

    free(out);
}


static void
test_exact_ids(void)
{
    expect_rejected("userId at 2^53", STORIES_CALL_TRACK,
        "{\"userId\":9007199254740992,\"event\":\"E\"}", &options_default,
        "userId is a number of 2^53 or more; send it as a string");

    expect_rejected("userId beyond 2^53", STORIES_CALL_TRACK,
        "{\"userId\":9007199254740993,\"event\":\"E\"}", &options_default,
        "userId is a number of 2^53 or more; send it as a string");

    expect_rejected("anonymousId beyond 2^53", STORIES_CALL_TRACK,
        "{\"anonymousId\":-1e300,\"event\":\"E\"}", &options_default,
        "anonymousId is a number of 2^53 or more; send it as a string");

    expect_forwarded("userId below 2^53", STORIES_CALL_TRACK,
        "{\"userId\":9007199254740991,\"event\":\"E\"}", &options_default,
        "{\"user_id\":\"9007199254740991\",\"name\":\"Track\","
        "\"data\":{\"content\":\"E\"}}", NULL);

    expect_forwarded("userId negative zero", STORIES_CALL_TRACK,
        "{\"userId\":-0,\"event\":\"E\"}", &options_default,
        "{\"user_id\":\"0\",\"name\":\"Track\","
        "\"data\":{\"content\":\"E\"}}", NULL);
}


/* Numbers in traits reach Stories as their original text. */
static void
test_exact_numbers(void)
{
    expect_forwarded("trait numbers kept as sent", STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u1\",\"traits\":{\"big\":12345678901234567890,"
        "\"above\":9007199254740993,\"price\":1.50,\"exp\":1e2,"
        "\"neg\":-0,\"tiny\":1E-7,\"huge\":1E400,"
        "\"list\":[1, 2.0 ,-3e+2],\"deep\":{\"a\":[{\"b\":0.1000}]}}}",
        &options_sync,
        "{\"user_id\":\"u1\",\"name\":\"Identify\",\"data\":{\"traits\":"
        "{\"big\":12345678901234567890,\"above\":9007199254740993,"
        "\"price\":1.50,\"exp\":1e2,\"neg\":-0,\"tiny\":1E-7,"
        "\"huge\":1E400,\"list\":[1,2.0,-3e+2],"
        "\"deep\":{\"a\":[{\"b\":0.1000}]}}}}",
        "{\"user_id\":\"u1\",\"attributes\":{\"big\":12345678901234567890,"
        "\"above\":9007199254740993,\"price\":1.50,\"exp\":1e2,"
        "\"neg\":-0,\"tiny\":1E-7,\"huge\":1E400,"
        "\"list\":[1,2.0,-3e+2],\"deep\":{\"a\":[{\"b\":0.1000}]}}}");

    /* digits, minus signs and escaped quotes inside strings are skipped */

    expect_forwarded("numbers after strings with digits",
        STORIES_CALL_IDENTIFY,
        "{\"userId\":\"u-1\",\"context\":{\"n\":7,\"s\":\"-8 \\\"9\\\\\"},"
        "\"traits\":{\"10\":\"-11\",\"k\\\"12\":13.0,\"e\":\"1e5\","
        "\"z\":-14E1}}",
        &options_default,
        "{\"user_id\":\"u-1\",\"name\":\"Identify\",\"data\":{\"traits\":"
        "{\"10\":\"-11\",\"k\\\"12\":13.0,\"e\":\"1e5\",\"z\":-14E1}}}",
        NULL);

    /* a numeric userId still becomes its shortest string */

    expect_forwarded("numeric userId with exact traits",
        STORIES_CALL_IDENTIFY,
        "{\"userId\":4.20e1,\"traits\":{\"n\":4.20e1}}",
        &options_default,
        "{\"user_id\":\"42\",\"name\":\"Identify\",\"data\":{\"traits\":"
        "{\"n\":4.20e1}}}",
        NULL);
}


static void
test_string_bytes(void)
{
    static const struct {
        const char  *name;
        const char  *json;
        const char  *error;
    } cases[] = {
        { "raw NUL in userId", "{\"userId\":\"u1\0evil\",\"event\":\"E\"}",
          "invalid JSON" },
        { "raw tab in event", "{\"userId\":\"u1\",\"event\":\"a\tb\"}",
          "invalid JSON" },
        { "raw newline in key", "{\"user\nId\":\"u1\",\"event\":\"E\"}",
          "invalid JSON" },
        { "lone continuation byte", "{\"userId\":\"u\x80\",\"event\":\"E\"}",
          "invalid UTF-8 in a JSON string" },
        { "0xff byte", "{\"userId\":\"u1\",\"event\":\"\xff\"}",
          "invalid UTF-8 in a JSON string" },
        { "overlong slash", "{\"userId\":\"u1\",\"event\":\"\xc0\xaf\"}",
          "invalid UTF-8 in a JSON string" },
        { "surrogate half", "{\"userId\":\"u1\",\"event\":\"\xed\xa0\x80\"}",
          "invalid UTF-8 in a JSON string" },
        { "beyond U+10FFFF",
          "{\"userId\":\"u1\",\"event\":\"\xf4\x90\x80\x80\"}",
          "invalid UTF-8 in a JSON string" },
        { "truncated sequence", "{\"userId\":\"u1\",\"event\":\"\xe2\x98\"}",
          "invalid UTF-8 in a JSON string" }
    };

    size_t  i, len;

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        /* strlen() would stop at the raw NUL of the first case */
        len = (i == 0) ? sizeof("{\"userId\":\"u1\0evil\",\"event\":\"E\"}") - 1
                       : strlen(cases[i].json);

        expect_status_len(cases[i].name, STORIES_CALL_TRACK, cases[i].json,
                          len, &options_default, 400, cases[i].error);
    }

    expect_forwarded("four-byte UTF-8 kept", STORIES_CALL_TRACK,
        "{\"userId\":\"u1\",\"event\":\"\xf0\x9f\x8e\x89\"}", &options_default,
        "{\"user_id\":\"u1\",\"name\":\"Track\","
        "\"data\":{\"content\":\"\xf0\x9f\x8e\x89\"}}", NULL);
}
