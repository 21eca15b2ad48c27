/*
 * Copyright (C) The ngx_http_stories_module authors
 *
 * Translation of Segment tracking calls into Stories API requests.
 * This part has no nginx types so that it can be unit-tested and fuzzed
 * on its own.  Everything it allocates comes from malloc() and is released
 * by stories_result_free().
 */


#ifndef STORIES_SEGMENT_H_INCLUDED
#define STORIES_SEGMENT_H_INCLUDED


#include <stddef.h>


#define STORIES_EVENTS_PATH    "/v1/events/"
#define STORIES_USERS_PATH     "/v1/users"

#define STORIES_ERROR_SIZE     160


typedef enum {
    STORIES_CALL_NONE = 0,
    STORIES_CALL_IDENTIFY,
    STORIES_CALL_TRACK,
    STORIES_CALL_PAGE,
    STORIES_CALL_SCREEN,
    STORIES_CALL_GROUP,
    STORIES_CALL_ALIAS,
    STORIES_CALL_BATCH
} stories_call_e;


/* One request for the Stories API. */
typedef struct {
    const char      *path;        /* STORIES_EVENTS_PATH or _USERS_PATH */
    char            *body;        /* JSON, not NUL-terminated on purpose */
    size_t           body_len;
    size_t           index;       /* message position, 0 outside a batch */
    stories_call_e   type;
    char            *message_id;  /* printable ASCII only, or NULL */
} stories_request_t;


/* A message that was not forwarded, with the reason. */
typedef struct {
    size_t           index;
    stories_call_e   type;
    char            *reason;      /* printable ASCII only */
    char            *message_id;  /* printable ASCII only, or NULL */
} stories_note_t;


/* Limits of zero are not checked. */
typedef struct {
    int              sync_users;
    size_t           max_depth;          /* JSON nesting levels */
    size_t           max_message_size;   /* bytes of one message */
    size_t           max_batch_size;     /* bytes of the whole body */
} stories_options_t;


typedef struct {
    /* 0 when the body was accepted, else the HTTP status to respond with */
    int                 status;
    char                error[STORIES_ERROR_SIZE];

    int                 batch;
    size_t              messages;

    /* the body's "writeKey" string, NULL when absent */
    char               *write_key;
    size_t              write_key_len;

    stories_request_t  *requests;
    size_t              nrequests;

    /* invalid messages of a batch: listed in the response */
    stories_note_t     *invalid;
    size_t              ninvalid;

    /* valid messages that Stories cannot take: logged only */
    stories_note_t     *skipped;
    size_t              nskipped;
} stories_result_t;


/* A message listed in a 200 response as not taken. */
typedef struct {
    size_t           index;
    const char      *error;
} stories_rejection_t;


/*
 * Classifies the last segment of a request path.  Returns STORIES_CALL_NONE
 * when it names no Segment call.  *under_v1 is set when the segment
 * before it is "v1", so that the caller can respond "unknown call".
 */
stories_call_e stories_call_from_path(const char *path, size_t len,
    int *under_v1);

const char *stories_call_name(stories_call_e call);

/*
 * Parses a request body sent to a path of the given call and maps every
 * message that Stories can take.  Returns 0 on success, including partial
 * success of a batch, and -1 when memory ran out.  A non-zero
 * result->status means that the call as a whole was rejected.
 */
int stories_translate(stories_call_e call, const char *body, size_t len,
    const stories_options_t *options, stories_result_t *result);

void stories_result_free(stories_result_t *result);

/*
 * Builds the JSON response bodies.  The returned string is NUL-terminated,
 * comes from malloc() and is released with free().  Rejections are listed
 * sorted by index.
 */
char *stories_response_success(stories_rejection_t *rejected, size_t n,
    size_t *len);
char *stories_response_error(const char *error, size_t *len);


#endif /* STORIES_SEGMENT_H_INCLUDED */
