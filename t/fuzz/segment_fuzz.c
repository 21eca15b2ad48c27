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

#include "stories_body.h"
#include "stories_segment.h"


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


static void
check_result(stories_result_t *result)
{
    char                 *json;
    size_t                i, len;
    stories_rejection_t  *rejected;

    if (result->status != 0) {
        json = stories_response_error(result->error, &len);
        free(json);
        return;
    }

    for (i = 0; i < result->nrequests; i++) {
        if (result->requests[i].body_len == 0) {
            abort();
        }
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
        check_result(&result);
        stories_result_free(&result);
    }

    free(inflated);
    free(body);

    return 0;
}
