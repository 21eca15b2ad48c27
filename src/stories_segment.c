/*
 * Copyright (C) The ngx_http_stories_module authors
 */


#include <ctype.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "stories_segment.h"


/* The maximum length of an untrusted value quoted in a message. */
#define STORIES_QUOTE_MAX     32

/* Flaws of JSON text that stories_scan() reports. */
#define STORIES_SCAN_NUL      0x01
#define STORIES_SCAN_CONTROL  0x02
#define STORIES_SCAN_UTF8     0x04


typedef struct {
    const char      *name;
    size_t           len;
    stories_call_e   call;
} stories_call_name_t;


/* The state of one translation, so that helpers can append results. */
typedef struct {
    const stories_options_t  *options;
    stories_result_t         *result;
    size_t                    requests_size;
    size_t                    invalid_size;
    size_t                    skipped_size;
    size_t                    body_len;
    char                     *print_buffer;
} stories_translation_t;



static stories_call_e stories_call_from_name(const char *name, size_t len);
static int stories_copy_write_key(cJSON *root, stories_result_t *result);
static int stories_oversized(stories_translation_t *tr, cJSON *message);
static int stories_translate_batch(stories_translation_t *tr, cJSON *root);
static int stories_translate_message(stories_translation_t *tr,
    cJSON *message, stories_call_e call, size_t index);
static int stories_invalid_type(stories_translation_t *tr, cJSON *message,
    size_t index);
static const char *stories_check_message(cJSON *message, stories_call_e call,
    int *has_user_id);
static int stories_id_state(cJSON *item);
static cJSON *stories_id_item(cJSON *item);
static int stories_stories_enabled(cJSON *message);
static int stories_add_event(stories_translation_t *tr, cJSON *message,
    stories_call_e call, size_t index);
static int stories_add_user(stories_translation_t *tr, cJSON *message,
    size_t index);
static int stories_add_user_name(cJSON *body, cJSON *traits);
static int stories_add_copy(cJSON *body, const char *key, cJSON *traits,
    const char *field);
static int stories_add_request(stories_translation_t *tr, cJSON *body,
    const char *path, stories_call_e call, cJSON *message, size_t index);
static int stories_add_note(stories_note_t **notes, size_t *n, size_t *size,
    size_t index, stories_call_e call, const char *reason, cJSON *message);
static char *stories_message_id(cJSON *message);
static char *stories_printable(const char *s, size_t max);
static size_t stories_scan(const char *body, size_t len, size_t limit,
    int *flaws);
static size_t stories_utf8_length(const unsigned char *p, size_t left);
static int stories_keep_numbers(cJSON *item, const char *body, size_t len,
    size_t *pos);
static int stories_is_number(const cJSON *item);
static int stories_reject(stories_translation_t *tr, cJSON *message,
    stories_call_e call, size_t index, const char *reason);
static void stories_fail(stories_result_t *result, int status,
    const char *error);
static int stories_grow(void **array, size_t *size, size_t n, size_t item);
static int stories_compare_rejections(const void *one, const void *two);
static char *stories_print(cJSON *root, size_t *len);


static const stories_call_name_t  stories_calls[] = {
    { "identify", 8, STORIES_CALL_IDENTIFY },
    { "track", 5, STORIES_CALL_TRACK },
    { "page", 4, STORIES_CALL_PAGE },
    { "screen", 6, STORIES_CALL_SCREEN },
    { "group", 5, STORIES_CALL_GROUP },
    { "alias", 5, STORIES_CALL_ALIAS },
    { "batch", 5, STORIES_CALL_BATCH },
    { "import", 6, STORIES_CALL_BATCH },
    { NULL, 0, STORIES_CALL_NONE }
};


/* analytics.js posts to these one-letter forms after "/v1/". */
static const char  stories_short_names[] = "itpsgab";

static const stories_call_e  stories_short_calls[] = {
    STORIES_CALL_IDENTIFY, STORIES_CALL_TRACK, STORIES_CALL_PAGE,
    STORIES_CALL_SCREEN, STORIES_CALL_GROUP, STORIES_CALL_ALIAS,
    STORIES_CALL_BATCH
};


stories_call_e
stories_call_from_path(const char *path, size_t len, int *under_v1)
{
    size_t       start, parent;
    const char  *p;

    start = len;
    while (start > 0 && path[start - 1] != '/') {
        start--;
    }

    parent = start > 0 ? start - 1 : 0;
    while (parent > 0 && path[parent - 1] != '/') {
        parent--;
    }

    *under_v1 = start >= 3 && start - 1 - parent == 2
                && path[parent] == 'v' && path[parent + 1] == '1';

    if (*under_v1 && len - start == 1) {
        p = memchr(stories_short_names, path[start],
                   sizeof(stories_short_names) - 1);
        if (p != NULL) {
            return stories_short_calls[p - stories_short_names];
        }
    }

    return stories_call_from_name(path + start, len - start);
}


static stories_call_e
stories_call_from_name(const char *name, size_t len)
{
    const stories_call_name_t  *c;

    for (c = stories_calls; c->name != NULL; c++) {
        if (len == c->len && memcmp(name, c->name, len) == 0) {
            return c->call;
        }
    }

    return STORIES_CALL_NONE;
}


const char *
stories_call_name(stories_call_e call)
{
    switch (call) {
    case STORIES_CALL_IDENTIFY:
        return "identify";
    case STORIES_CALL_TRACK:
        return "track";
    case STORIES_CALL_PAGE:
        return "page";
    case STORIES_CALL_SCREEN:
        return "screen";
    case STORIES_CALL_GROUP:
        return "group";
    case STORIES_CALL_ALIAS:
        return "alias";
    case STORIES_CALL_BATCH:
        return "batch";
    default:
        return "unknown";
    }
}


int
stories_translate(stories_call_e call, const char *body, size_t len,
    const stories_options_t *options, stories_result_t *result)
{
    int                     rc, flaws;
    size_t                  i, depth, limit;
    cJSON                  *root;
    const char             *end;
    stories_translation_t   tr;

    memset(result, 0, sizeof(stories_result_t));
    memset(&tr, 0, sizeof(stories_translation_t));
    tr.options = options;
    tr.result = result;
    tr.body_len = len;

    result->batch = (call == STORIES_CALL_BATCH);

    for (i = 0; i < len; i++) {
        if (body[i] != ' ' && body[i] != '\t'
            && body[i] != '\r' && body[i] != '\n')
        {
            break;
        }
    }

    if (i == len) {
        stories_fail(result, 400, "empty body");
        return 0;
    }

    if (options->max_batch_size != 0 && len > options->max_batch_size) {
        snprintf(result->error, STORIES_ERROR_SIZE,
                 "body is larger than stories_max_batch_size %zu bytes",
                 options->max_batch_size);
        result->status = 413;
        return 0;
    }

    if (call != STORIES_CALL_BATCH && options->max_message_size != 0
        && len > options->max_message_size)
    {
        snprintf(result->error, STORIES_ERROR_SIZE,
                 "message is larger than stories_max_message_size %zu bytes",
                 options->max_message_size);
        result->status = 413;
        return 0;
    }

    limit = options->max_depth != 0 ? options->max_depth : (size_t) -1 - 1;

    depth = stories_scan(body, len, limit, &flaws);

    if (depth > limit) {
        snprintf(result->error, STORIES_ERROR_SIZE,
                 "JSON nesting is deeper than stories_max_depth %zu",
                 options->max_depth);
        result->status = 400;
        return 0;
    }

    /* cJSON ends a string at a NUL, which would cut an id or a name */

    if (flaws & STORIES_SCAN_NUL) {
        stories_fail(result, 400, "JSON strings with \\u0000 are not "
                                  "supported");
        return 0;
    }

    /* cJSON accepts both, and would forward them as they are */

    if (flaws & STORIES_SCAN_CONTROL) {
        stories_fail(result, 400, "invalid JSON");
        return 0;
    }

    if (flaws & STORIES_SCAN_UTF8) {
        stories_fail(result, 400, "invalid UTF-8 in a JSON string");
        return 0;
    }

    end = NULL;

    root = cJSON_ParseWithLengthOpts(body, len, &end, 0);
    if (root == NULL) {
        stories_fail(result, 400, "invalid JSON");
        return 0;
    }

    /* cJSON stops after the first value, so trailing data is checked here */

    for ( /* void */ ; end < body + len; end++) {
        if (*end != ' ' && *end != '\t' && *end != '\r' && *end != '\n') {
            cJSON_Delete(root);
            stories_fail(result, 400, "invalid JSON");
            return 0;
        }
    }

    i = 0;

    if (!cJSON_IsObject(root)) {
        rc = 0;
        stories_fail(result, 400, "body is not a JSON object");

    } else if (stories_keep_numbers(root, body, len, &i) != 0) {
        rc = -1;

    } else if (stories_copy_write_key(root, result) != 0) {
        rc = -1;

    } else if (call == STORIES_CALL_BATCH) {
        rc = stories_translate_batch(&tr, root);

    } else {
        result->messages = 1;
        rc = stories_translate_message(&tr, root, call, 0);
    }

    cJSON_Delete(root);
    free(tr.print_buffer);

    if (rc != 0) {
        stories_result_free(result);
    }

    return rc;
}


static int
stories_translate_batch(stories_translation_t *tr, cJSON *root)
{
    int              oversized;
    char             error[STORIES_ERROR_SIZE];
    size_t           n;
    cJSON           *batch, *message, *type;
    stories_call_e   call;

    batch = cJSON_GetObjectItemCaseSensitive(root, "batch");

    if (batch == NULL || cJSON_IsNull(batch)) {
        stories_fail(tr->result, 400, "missing batch");
        return 0;
    }

    if (!cJSON_IsArray(batch)) {
        stories_fail(tr->result, 400, "batch is not an array");
        return 0;
    }

    n = 0;

    cJSON_ArrayForEach(message, batch) {
        oversized = stories_oversized(tr, message);

        if (oversized < 0) {
            return -1;
        }

        if (oversized) {
            snprintf(error, sizeof(error),
                     "message is larger than stories_max_message_size "
                     "%zu bytes", tr->options->max_message_size);

            if (stories_reject(tr, message, STORIES_CALL_NONE, n, error) != 0)
            {
                return -1;
            }

            n++;
            continue;
        }

        type = cJSON_GetObjectItemCaseSensitive(message, "type");

        call = STORIES_CALL_NONE;

        if (cJSON_IsObject(message) && cJSON_IsString(type)) {
            call = stories_call_from_name(type->valuestring,
                                          strlen(type->valuestring));
        }

        if (call == STORIES_CALL_NONE || call == STORIES_CALL_BATCH) {
            if (stories_invalid_type(tr, message, n) != 0) {
                return -1;
            }

        } else if (stories_translate_message(tr, message, call, n) != 0) {
            return -1;
        }

        n++;
    }

    tr->result->messages = n;

    return 0;
}


static int
stories_copy_write_key(cJSON *root, stories_result_t *result)
{
    cJSON  *key;

    key = cJSON_GetObjectItemCaseSensitive(root, "writeKey");

    if (!cJSON_IsString(key)) {
        return 0;
    }

    result->write_key_len = strlen(key->valuestring);

    result->write_key = malloc(result->write_key_len + 1);
    if (result->write_key == NULL) {
        return -1;
    }

    memcpy(result->write_key, key->valuestring, result->write_key_len + 1);

    return 0;
}


/*
 * Tells whether a message of a batch, printed compactly, is larger than
 * max_message_size.  The printing stops at the limit, and is skipped
 * when the whole body fits in it.  Returns 1 or 0, or -1 without memory.
 */
static int
stories_oversized(stories_translation_t *tr, cJSON *message)
{
    size_t  max;

    max = tr->options->max_message_size;

    if (max == 0 || tr->body_len <= max || max > INT_MAX - 6) {
        return 0;
    }

    /* cJSON needs 5 bytes more than the output, for its estimates */

    if (tr->print_buffer == NULL) {
        tr->print_buffer = malloc(max + 6);
        if (tr->print_buffer == NULL) {
            return -1;
        }
    }

    if (!cJSON_PrintPreallocated(message, tr->print_buffer, (int) max + 6,
                                 0))
    {
        return 1;
    }

    return strlen(tr->print_buffer) > max;
}


static int
stories_invalid_type(stories_translation_t *tr, cJSON *message, size_t index)
{
    int     rc;
    char    error[STORIES_ERROR_SIZE];
    char   *quoted;
    cJSON  *type;

    if (!cJSON_IsObject(message)) {
        return stories_reject(tr, NULL, STORIES_CALL_NONE, index,
                              "message is not an object");
    }

    type = cJSON_GetObjectItemCaseSensitive(message, "type");

    if (type == NULL || cJSON_IsNull(type)) {
        return stories_reject(tr, message, STORIES_CALL_NONE, index,
                              "missing type");
    }

    if (!cJSON_IsString(type)) {
        return stories_reject(tr, message, STORIES_CALL_NONE, index,
                              "type is not a string");
    }

    quoted = stories_printable(type->valuestring, STORIES_QUOTE_MAX);
    if (quoted == NULL) {
        return -1;
    }

    snprintf(error, sizeof(error), "unknown type \"%s\"", quoted);
    free(quoted);

    rc = stories_reject(tr, message, STORIES_CALL_NONE, index, error);

    return rc;
}


static int
stories_translate_message(stories_translation_t *tr, cJSON *message,
    stories_call_e call, size_t index)
{
    int                 has_user_id;
    const char         *reason;
    stories_result_t   *result;

    result = tr->result;

    reason = stories_check_message(message, call, &has_user_id);
    if (reason != NULL) {
        return stories_reject(tr, message, call, index, reason);
    }

    reason = NULL;

    if (call == STORIES_CALL_GROUP || call == STORIES_CALL_ALIAS) {
        reason = "no Stories equivalent";

    } else if (!has_user_id) {
        reason = "no userId";

    } else if (!stories_stories_enabled(message)) {
        reason = "integrations turn Stories off";
    }

    if (reason != NULL) {
        return stories_add_note(&result->skipped, &result->nskipped,
                                &tr->skipped_size, index, call, reason,
                                message);
    }

    if (stories_add_event(tr, message, call, index) != 0) {
        return -1;
    }

    if (call == STORIES_CALL_IDENTIFY && tr->options->sync_users) {
        return stories_add_user(tr, message, index);
    }

    return 0;
}


/*
 * Validates the fields that the mapping reads.  Returns NULL for a valid
 * message, or the reason it is invalid.
 */
static const char *
stories_check_message(cJSON *message, stories_call_e call, int *has_user_id)
{
    int     user_id, anonymous_id;
    cJSON  *item;

    user_id = stories_id_state(cJSON_GetObjectItemCaseSensitive(message,
                                                                 "userId"));
    if (user_id == -2) {
        return "userId is a number of 2^53 or more; send it as a string";
    }

    if (user_id < 0) {
        return "userId is not a string or number";
    }

    anonymous_id = stories_id_state(
                     cJSON_GetObjectItemCaseSensitive(message, "anonymousId"));
    if (anonymous_id == -2) {
        return "anonymousId is a number of 2^53 or more; "
               "send it as a string";
    }

    if (anonymous_id < 0) {
        return "anonymousId is not a string or number";
    }

    if (!user_id && !anonymous_id) {
        return "missing userId and anonymousId";
    }

    *has_user_id = user_id;

    if (call == STORIES_CALL_TRACK) {
        item = cJSON_GetObjectItemCaseSensitive(message, "event");

        if (item == NULL || cJSON_IsNull(item)
            || (cJSON_IsString(item) && item->valuestring[0] == '\0'))
        {
            return "missing event";
        }

        if (!cJSON_IsString(item)) {
            return "event is not a string";
        }
    }

    if (call == STORIES_CALL_PAGE || call == STORIES_CALL_SCREEN) {
        item = cJSON_GetObjectItemCaseSensitive(message, "name");

        if (item != NULL && !cJSON_IsNull(item) && !cJSON_IsString(item)) {
            return "name is not a string";
        }
    }

    if (call == STORIES_CALL_IDENTIFY) {
        item = cJSON_GetObjectItemCaseSensitive(message, "traits");

        if (item != NULL && !cJSON_IsNull(item) && !cJSON_IsObject(item)) {
            return "traits is not an object";
        }
    }

    item = cJSON_GetObjectItemCaseSensitive(message, "integrations");

    if (item != NULL && !cJSON_IsNull(item) && !cJSON_IsObject(item)) {
        return "integrations is not an object";
    }

    return NULL;
}


/*
 * Returns 1 for a usable userId or anonymousId, 0 for one that is missing,
 * null or empty, -1 for a value of the wrong type, and -2 for a number
 * too large to be exact in a double.
 */
static int
stories_id_state(cJSON *item)
{
    if (item == NULL || cJSON_IsNull(item)) {
        return 0;
    }

    if (cJSON_IsString(item)) {
        return item->valuestring[0] != '\0';
    }

    if (!stories_is_number(item) || !isfinite(item->valuedouble)) {
        return -1;
    }

    /*
     * From 2^53 on, doubles cannot tell neighbouring integers apart, so the
     * number may already name another user.
     */

    return fabs(item->valuedouble) < 9007199254740992.0 ? 1 : -2;
}


/*
 * Creates the Stories user_id from a valid userId.  Segment's libraries
 * also send numbers: an integral one prints without a fraction.
 */
static cJSON *
stories_id_item(cJSON *item)
{
    char    buf[32];
    double  value;

    if (cJSON_IsString(item)) {
        return cJSON_CreateStringReference(item->valuestring);
    }

    value = item->valuedouble + 0.0;

    if (value == 0) {
        value = 0;
    }

    /* whole numbers print as JavaScript's String() does, up to 1e21 */

    if (value == floor(value) && fabs(value) < 1e21) {
        snprintf(buf, sizeof(buf), "%.0f", value);

    } else {
        /* the shortest of the two forms that reads back as the same value */
        snprintf(buf, sizeof(buf), "%.15g", value);

        if (strtod(buf, NULL) != value) {
            snprintf(buf, sizeof(buf), "%.17g", value);
        }
    }

    return cJSON_CreateString(buf);
}


/*
 * Applies Segment's integrations switches: {"Stories": false} turns this
 * destination off, and {"All": false} turns it off unless "Stories" is true
 * or an object.
 */
static int
stories_stories_enabled(cJSON *message)
{
    cJSON  *integrations, *all, *stories;

    integrations = cJSON_GetObjectItemCaseSensitive(message, "integrations");
    if (!cJSON_IsObject(integrations)) {
        return 1;
    }

    stories = cJSON_GetObjectItemCaseSensitive(integrations, "Stories");

    if (cJSON_IsFalse(stories)) {
        return 0;
    }

    all = cJSON_GetObjectItemCaseSensitive(integrations, "All");

    if (cJSON_IsFalse(all)) {
        return cJSON_IsTrue(stories) || cJSON_IsObject(stories);
    }

    return 1;
}


/*
 * The output trees below point into the parsed message with cJSON
 * references, so no string or traits object is copied before printing.
 */

static int
stories_add_event(stories_translation_t *tr, cJSON *message,
    stories_call_e call, size_t index)
{
    int          rc;
    cJSON       *body, *data, *item;
    const char  *name, *field;

    body = cJSON_CreateObject();
    if (body == NULL) {
        return -1;
    }

    item = stories_id_item(cJSON_GetObjectItemCaseSensitive(message,
                                                            "userId"));
    if (item == NULL || !cJSON_AddItemToObject(body, "user_id", item)) {
        cJSON_Delete(item);
        goto failed;
    }

    switch (call) {
    case STORIES_CALL_IDENTIFY:
        name = "Identify";
        field = "traits";
        break;
    case STORIES_CALL_TRACK:
        name = "Track";
        field = "event";
        break;
    case STORIES_CALL_PAGE:
        name = "Page";
        field = "name";
        break;
    default:
        name = "Screen";
        field = "name";
        break;
    }

    if (cJSON_AddStringToObject(body, "name", name) == NULL) {
        goto failed;
    }

    data = cJSON_AddObjectToObject(body, "data");
    if (data == NULL) {
        goto failed;
    }

    item = cJSON_GetObjectItemCaseSensitive(message, field);

    if (call == STORIES_CALL_IDENTIFY) {
        item = cJSON_IsObject(item) ? cJSON_CreateObjectReference(item->child)
                                    : cJSON_CreateObject();
        if (item == NULL || !cJSON_AddItemToObject(data, "traits", item)) {
            cJSON_Delete(item);
            goto failed;
        }

    } else if (cJSON_IsString(item) && item->valuestring[0] != '\0') {
        item = cJSON_CreateStringReference(item->valuestring);
        if (item == NULL || !cJSON_AddItemToObject(data, "content", item)) {
            cJSON_Delete(item);
            goto failed;
        }
    }

    rc = stories_add_request(tr, body, STORIES_EVENTS_PATH, call, message,
                             index);
    cJSON_Delete(body);
    return rc;

failed:

    cJSON_Delete(body);
    return -1;
}


static int
stories_add_user(stories_translation_t *tr, cJSON *message, size_t index)
{
    int     rc;
    cJSON  *body, *traits, *item;

    body = cJSON_CreateObject();
    if (body == NULL) {
        return -1;
    }

    item = stories_id_item(cJSON_GetObjectItemCaseSensitive(message,
                                                            "userId"));
    if (item == NULL || !cJSON_AddItemToObject(body, "user_id", item)) {
        cJSON_Delete(item);
        goto failed;
    }

    traits = cJSON_GetObjectItemCaseSensitive(message, "traits");
    if (!cJSON_IsObject(traits)) {
        traits = NULL;
    }

    if (traits != NULL
        && (stories_add_user_name(body, traits) != 0
            || stories_add_copy(body, "email", traits, "email") != 0
            || stories_add_copy(body, "phone", traits, "phone") != 0))
    {
        goto failed;
    }

    item = traits != NULL ? cJSON_CreateObjectReference(traits->child)
                          : cJSON_CreateObject();
    if (item == NULL || !cJSON_AddItemToObject(body, "attributes", item)) {
        cJSON_Delete(item);
        goto failed;
    }

    rc = stories_add_request(tr, body, STORIES_USERS_PATH,
                             STORIES_CALL_IDENTIFY, message, index);
    cJSON_Delete(body);
    return rc;

failed:

    cJSON_Delete(body);
    return -1;
}


/*
 * Adds the user's name: the "name" trait, or, as Segment builds it when
 * that is absent, "firstName lastName" from the parts that are strings.
 */
static int
stories_add_user_name(cJSON *body, cJSON *traits)
{
    int      rc;
    char    *name;
    cJSON   *first, *last;
    size_t   first_len, last_len;

    if (stories_add_copy(body, "name", traits, "name") != 0) {
        return -1;
    }

    if (cJSON_GetObjectItemCaseSensitive(body, "name") != NULL) {
        return 0;
    }

    first = cJSON_GetObjectItemCaseSensitive(traits, "firstName");
    last = cJSON_GetObjectItemCaseSensitive(traits, "lastName");

    first_len = cJSON_IsString(first) ? strlen(first->valuestring) : 0;
    last_len = cJSON_IsString(last) ? strlen(last->valuestring) : 0;

    if (first_len == 0 && last_len == 0) {
        return 0;
    }

    name = malloc(first_len + last_len + 2);
    if (name == NULL) {
        return -1;
    }

    name[0] = '\0';

    if (first_len != 0) {
        memcpy(name, first->valuestring, first_len + 1);
    }

    if (first_len != 0 && last_len != 0) {
        strcat(name, " ");
    }

    if (last_len != 0) {
        strcat(name, last->valuestring);
    }

    rc = cJSON_AddStringToObject(body, "name", name) != NULL ? 0 : -1;

    free(name);

    return rc;
}


/*
 * Copies a trait that is a non-empty string into the users body; other
 * values stay in the attributes only.
 */
static int
stories_add_copy(cJSON *body, const char *key, cJSON *traits,
    const char *field)
{
    cJSON  *item;

    item = cJSON_GetObjectItemCaseSensitive(traits, field);

    if (!cJSON_IsString(item) || item->valuestring[0] == '\0') {
        return 0;
    }

    item = cJSON_CreateStringReference(item->valuestring);
    if (item == NULL || !cJSON_AddItemToObject(body, key, item)) {
        cJSON_Delete(item);
        return -1;
    }

    return 0;
}


static int
stories_add_request(stories_translation_t *tr, cJSON *body, const char *path,
    stories_call_e call, cJSON *message, size_t index)
{
    stories_result_t   *result;
    stories_request_t  *request;

    result = tr->result;

    if (stories_grow((void **) &result->requests, &tr->requests_size,
                     result->nrequests, sizeof(stories_request_t))
        != 0)
    {
        return -1;
    }

    request = &result->requests[result->nrequests];
    memset(request, 0, sizeof(stories_request_t));

    request->body = stories_print(body, &request->body_len);
    if (request->body == NULL) {
        return -1;
    }

    request->message_id = stories_message_id(message);
    if (request->message_id == NULL
        && cJSON_IsString(cJSON_GetObjectItemCaseSensitive(message,
                                                           "messageId")))
    {
        free(request->body);
        return -1;
    }

    request->path = path;
    request->index = index;
    request->type = call;

    result->nrequests++;

    return 0;
}


static int
stories_reject(stories_translation_t *tr, cJSON *message, stories_call_e call,
    size_t index, const char *reason)
{
    stories_result_t  *result;

    result = tr->result;

    if (!result->batch) {
        stories_fail(result, 400, reason);
        return 0;
    }

    return stories_add_note(&result->invalid, &result->ninvalid,
                            &tr->invalid_size, index, call, reason, message);
}


static int
stories_add_note(stories_note_t **notes, size_t *n, size_t *size,
    size_t index, stories_call_e call, const char *reason, cJSON *message)
{
    stories_note_t  *note;

    if (stories_grow((void **) notes, size, *n, sizeof(stories_note_t)) != 0)
    {
        return -1;
    }

    note = &(*notes)[*n];
    memset(note, 0, sizeof(stories_note_t));

    /* reasons are composed here, with untrusted parts already printable */

    note->reason = malloc(strlen(reason) + 1);
    if (note->reason == NULL) {
        return -1;
    }

    memcpy(note->reason, reason, strlen(reason) + 1);

    if (message != NULL) {
        note->message_id = stories_message_id(message);
    }

    note->index = index;
    note->type = call;

    (*n)++;

    return 0;
}


/* Copies a string messageId for logs, or returns NULL. */
static char *
stories_message_id(cJSON *message)
{
    cJSON  *id;

    id = cJSON_GetObjectItemCaseSensitive(message, "messageId");

    if (!cJSON_IsString(id)) {
        return NULL;
    }

    return stories_printable(id->valuestring, 2 * STORIES_QUOTE_MAX);
}


/*
 * Copies at most max bytes of an untrusted string for a log line or an
 * error message: bytes outside printable ASCII, quotes and backslashes
 * become '?', so the copy cannot break a log line or forge one.
 */
static char *
stories_printable(const char *s, size_t max)
{
    char    *copy;
    size_t   i, len;

    len = strlen(s);
    if (len > max) {
        len = max;
    }

    copy = malloc(len + 1);
    if (copy == NULL) {
        return NULL;
    }

    for (i = 0; i < len; i++) {
        copy[i] = (s[i] >= 0x20 && s[i] < 0x7f && s[i] != '"' && s[i] != '\\')
                  ? s[i] : '?';
    }

    copy[len] = '\0';

    return copy;
}


/*
 * Measures the nesting of JSON text up to limit + 1 levels, so that a deep
 * document is rejected before cJSON recurses into it.  It also reports, as
 * STORIES_SCAN_* flags, what cJSON lets through in strings: the \u0000
 * escape, raw control characters and invalid UTF-8.  The rest of the
 * syntax is left to cJSON.
 */
static size_t
stories_scan(const char *body, size_t len, size_t limit, int *flaws)
{
    int             in_string;
    size_t          i, n, depth, max;
    unsigned char   c;

    in_string = 0;
    depth = 0;
    max = 0;
    *flaws = 0;

    for (i = 0; i < len; i++) {
        if (in_string) {
            c = (unsigned char) body[i];

            if (c == '\\') {
                if (len - i > 5 && body[i + 1] == 'u'
                    && memcmp(body + i + 2, "0000", 4) == 0)
                {
                    *flaws |= STORIES_SCAN_NUL;
                }

                i++;

            } else if (c == '"') {
                in_string = 0;

            } else if (c < 0x20) {
                *flaws |= STORIES_SCAN_CONTROL;

            } else if (c >= 0x80) {
                n = stories_utf8_length((const unsigned char *) body + i,
                                        len - i);
                if (n == 0) {
                    *flaws |= STORIES_SCAN_UTF8;

                } else {
                    i += n - 1;
                }
            }

            continue;
        }

        switch (body[i]) {
        case '"':
            in_string = 1;
            break;

        case '{':
        case '[':
            if (++depth > max) {
                max = depth;

                if (max > limit) {
                    return max;
                }
            }
            break;

        case '}':
        case ']':
            if (depth > 0) {
                depth--;
            }
            break;
        }
    }

    return max;
}


/*
 * Turns each number under item into a raw node that contains the number's
 * text from the body and keeps its valuedouble.  cJSON would print the double,
 * which rounds integers from 2^53 on and prints 1e2 as 100.  The walk and
 * the body both go in document order, so the next number node matches the
 * next number token after *pos.  Returns 0, or -1 without memory.
 */
static int
stories_keep_numbers(cJSON *item, const char *body, size_t len, size_t *pos)
{
    char    *text;
    size_t   i, start;
    cJSON   *child;

    if (cJSON_IsNumber(item)) {
        i = *pos;

        /* skip to the next number token, past any string */

        while (i < len && body[i] != '-' && !isdigit((unsigned char) body[i]))
        {
            if (body[i++] == '"') {
                while (i < len && body[i] != '"') {
                    i += (body[i] == '\\') ? 2 : 1;
                }

                i++;
            }
        }

        start = i;

        while (i < len
               && (isdigit((unsigned char) body[i]) || body[i] == '-'
                   || body[i] == '+' || body[i] == '.' || body[i] == 'e'
                   || body[i] == 'E'))
        {
            i++;
        }

        *pos = i;

        if (i == start) {
            return 0;
        }

        text = malloc(i - start + 1);
        if (text == NULL) {
            return -1;
        }

        memcpy(text, body + start, i - start);
        text[i - start] = '\0';

        item->type = cJSON_Raw;
        item->valuestring = text;

        return 0;
    }

    for (child = item->child; child != NULL; child = child->next) {
        if (stories_keep_numbers(child, body, len, pos) != 0) {
            return -1;
        }
    }

    return 0;
}


/* Tells whether item is a number, kept as a raw node or not. */
static int
stories_is_number(const cJSON *item)
{
    return cJSON_IsNumber(item) || cJSON_IsRaw(item);
}


/*
 * Returns the length of the well-formed UTF-8 sequence that starts at p,
 * as RFC 3629 defines it (no overlong forms, no surrogates, nothing past
 * U+10FFFF), or 0.
 */
static size_t
stories_utf8_length(const unsigned char *p, size_t left)
{
    size_t          n, i;
    unsigned char   low, high;

    low = 0x80;
    high = 0xbf;

    if (p[0] >= 0xc2 && p[0] <= 0xdf) {
        n = 2;

    } else if (p[0] >= 0xe0 && p[0] <= 0xef) {
        n = 3;
        low = (p[0] == 0xe0) ? 0xa0 : 0x80;
        high = (p[0] == 0xed) ? 0x9f : 0xbf;

    } else if (p[0] >= 0xf0 && p[0] <= 0xf4) {
        n = 4;
        low = (p[0] == 0xf0) ? 0x90 : 0x80;
        high = (p[0] == 0xf4) ? 0x8f : 0xbf;

    } else {
        return 0;
    }

    if (left < n || p[1] < low || p[1] > high) {
        return 0;
    }

    for (i = 2; i < n; i++) {
        if (p[i] < 0x80 || p[i] > 0xbf) {
            return 0;
        }
    }

    return n;
}


static void
stories_fail(stories_result_t *result, int status, const char *error)
{
    result->status = status;
    snprintf(result->error, STORIES_ERROR_SIZE, "%s", error);
}


static int
stories_grow(void **array, size_t *size, size_t n, size_t item)
{
    void    *p;
    size_t   size_new;

    if (n < *size) {
        return 0;
    }

    size_new = *size != 0 ? 2 * *size : 4;

    p = realloc(*array, size_new * item);
    if (p == NULL) {
        return -1;
    }

    *array = p;
    *size = size_new;

    return 0;
}


void
stories_result_free(stories_result_t *result)
{
    size_t  i;

    for (i = 0; i < result->nrequests; i++) {
        free(result->requests[i].body);
        free(result->requests[i].message_id);
    }

    for (i = 0; i < result->ninvalid; i++) {
        free(result->invalid[i].reason);
        free(result->invalid[i].message_id);
    }

    for (i = 0; i < result->nskipped; i++) {
        free(result->skipped[i].reason);
        free(result->skipped[i].message_id);
    }

    free(result->requests);
    free(result->invalid);
    free(result->skipped);
    free(result->write_key);

    result->write_key = NULL;
    result->requests = NULL;
    result->invalid = NULL;
    result->skipped = NULL;
    result->nrequests = 0;
    result->ninvalid = 0;
    result->nskipped = 0;
}


static int
stories_compare_rejections(const void *one, const void *two)
{
    const stories_rejection_t  *a, *b;

    a = one;
    b = two;

    return (a->index > b->index) - (a->index < b->index);
}


char *
stories_response_success(stories_rejection_t *rejected, size_t n,
    size_t *len)
{
    char    *out;
    cJSON   *root, *list, *item;
    size_t   i;

    root = cJSON_CreateObject();
    if (root == NULL) {
        return NULL;
    }

    if (cJSON_AddTrueToObject(root, "success") == NULL) {
        goto failed;
    }

    if (n != 0) {
        qsort(rejected, n, sizeof(stories_rejection_t),
              stories_compare_rejections);

        list = cJSON_AddArrayToObject(root, "rejected");
        if (list == NULL) {
            goto failed;
        }

        for (i = 0; i < n; i++) {
            item = cJSON_CreateObject();
            if (item == NULL || !cJSON_AddItemToArray(list, item)) {
                cJSON_Delete(item);
                goto failed;
            }

            if (cJSON_AddNumberToObject(item, "index",
                                        (double) rejected[i].index)
                == NULL
                || cJSON_AddStringToObject(item, "error", rejected[i].error)
                   == NULL)
            {
                goto failed;
            }
        }
    }

    out = stories_print(root, len);
    cJSON_Delete(root);
    return out;

failed:

    cJSON_Delete(root);
    return NULL;
}


char *
stories_response_error(const char *error, size_t *len)
{
    char   *out;
    cJSON  *root;

    root = cJSON_CreateObject();
    if (root == NULL) {
        return NULL;
    }

    if (cJSON_AddFalseToObject(root, "success") == NULL
        || cJSON_AddStringToObject(root, "error", error) == NULL)
    {
        cJSON_Delete(root);
        return NULL;
    }

    out = stories_print(root, len);
    cJSON_Delete(root);
    return out;
}


static char *
stories_print(cJSON *root, size_t *len)
{
    char  *out;

    out = cJSON_PrintUnformatted(root);
    if (out != NULL) {
        *len = strlen(out);
    }

    return out;
}
