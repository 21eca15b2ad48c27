/*
 * Copyright (C) The ngx_http_stories_module authors
 *
 * A libFuzzer target over everything the module does to a body before
 * nginx sends it on: inflation, parsing, validation, mapping and the
 * response.  The first input byte chooses how the body arrives:
 *
 *     bits 0-2  the call (stories_call_e; 0 and 7 both mean batch)
 *     bit  3    stories_sync_users
 *     bits 4-5  Content-Encoding: none, gzip, deflate, none
 *     bit  6    no depth limit, so that cJSON's own limit applies
 *     bit  7    small message and batch limits
 */


#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "stories_body.h"
#include "stories_segment.h"


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


/* Parses a whole Stories body, and aborts unless it is one JSON object. */
static cJSON *
parse_body(stories_request_t *request)
{
    cJSON       *root;
    const char  *end;

    if (request->body_len == 0) {
        abort();
    }

    end = NULL;
    root = cJSON_ParseWithLengthOpts(request->body, request->body_len, &end,
                                     0);

    if (root == NULL) {
        /* out of memory is the only other way to get here */
        return NULL;
    }

    if (!cJSON_IsObject(root) || end != request->body + request->body_len) {
        abort();
    }

    return root;
}


/*
 * Tells whether two parsed values are equal member by member and in the
 * same order.  cJSON_Compare() looks object members up by key, which goes
 * wrong when a key occurs twice.
 */
static int
same_value(const cJSON *one, const cJSON *two)
{
    const cJSON  *a, *b;

    if (one == NULL || two == NULL
        || (one->type & 0xff) != (two->type & 0xff))
    {
        return 0;
    }

    if (cJSON_IsNumber(one)) {
        return one->valuedouble == two->valuedouble;
    }

    if (cJSON_IsString(one)) {
        return strcmp(one->valuestring, two->valuestring) == 0;
    }

    if (!cJSON_IsArray(one) && !cJSON_IsObject(one)) {
        return 1;
    }

    for (a = one->child, b = two->child;
         a != NULL && b != NULL;
         a = a->next, b = b->next)
    {
        if (cJSON_IsObject(one) && strcmp(a->string, b->string) != 0) {
            return 0;
        }

        if (!same_value(a, b)) {
            return 0;
        }
    }

    return a == NULL && b == NULL;
}


/*
 * Aborts unless the traits of a single identify call reached the Stories
 * event with the same values, numbers included.
 */
static void
check_traits(const char *body, size_t len, cJSON *event)
{
    cJSON  *input, *sent, *traits;

    input = cJSON_ParseWithLength(body, len);
    if (input == NULL) {
        return;
    }

    traits = cJSON_GetObjectItemCaseSensitive(input, "traits");
    sent = cJSON_GetObjectItemCaseSensitive(
               cJSON_GetObjectItemCaseSensitive(event, "data"), "traits");

    if (cJSON_IsObject(traits) && !same_value(traits, sent)) {
        abort();
    }

    cJSON_Delete(input);
}


static void
check_result(stories_call_e call, const char *body, size_t len,
    stories_result_t *result)
{
    char                 *json;
    size_t                i;
    cJSON                *root;
    stories_rejection_t  *rejected;

    if (result->status != 0) {
        json = stories_response_error(result->error, &len);
        free(json);
        return;
    }

    for (i = 0; i < result->nrequests; i++) {
        root = parse_body(&result->requests[i]);

        if (i == 0 && call == STORIES_CALL_IDENTIFY && root != NULL) {
            check_traits(body, len, root);
        }

        cJSON_Delete(root);
    }

    rejected = malloc((result->ninvalid + 1) * sizeof(stories_rejection_t));
    if (rejected == NULL) {
        return;
    }

    for (i = 0; i < result->ninvalid; i++) {
        rejected[i].index = result->invalid[i].index;
        rejected[i].error = result->invalid[i].reason;
    }

    json = stories_response_success(rejected, result->ninvalid, &len);

    free(json);
    free(rejected);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int                  rc;
    char                *body, *inflated;
    size_t               len;
    uint8_t              mode;
    stories_call_e       call;
    stories_result_t     result;
    stories_options_t    options;
    stories_encoding_e   encodings[] = {
        STORIES_ENCODING_IDENTITY, STORIES_ENCODING_GZIP,
        STORIES_ENCODING_DEFLATE, STORIES_ENCODING_IDENTITY
    };

    if (size == 0) {
        return 0;
    }

    mode = data[0];

    call = (stories_call_e) (mode & 0x07);
    if (call == STORIES_CALL_NONE) {
        call = STORIES_CALL_BATCH;
    }

    options.sync_users = (mode & 0x08) != 0;
    options.max_depth = (mode & 0x40) ? 0 : 64;
    options.max_message_size = (mode & 0x80) ? 64 : 32 * 1024;
    options.max_batch_size = (mode & 0x80) ? 512 : 500 * 1024;

    /* an exact-size copy, so that a read past the end is caught */

    len = size - 1;
    body = malloc(len != 0 ? len : 1);
    if (body == NULL) {
        return 0;
    }

    memcpy(body, data + 1, len);

    inflated = NULL;

    if (encodings[(mode >> 4) & 0x03] != STORIES_ENCODING_IDENTITY) {
        rc = stories_inflate(encodings[(mode >> 4) & 0x03], body, len,
                             options.max_batch_size, &inflated, &len);
        if (rc != STORIES_INFLATE_OK) {
            free(body);
            return 0;
        }
    }

    if (stories_translate(call, inflated != NULL ? inflated : body, len,
                          &options, &result)
        == 0)
    {
        check_result(call, inflated != NULL ? inflated : body, len, &result);
        stories_result_free(&result);
    }

    free(inflated);
    free(body);

    return 0;
}
