/*
 * Copyright (C) The ngx_http_stories_module authors
 *
 * Checks of a request body's Content-Type and Content-Encoding, and
 * inflation of gzip and deflate bodies with a bound on the output, with
 * no nginx types.
 */


#ifndef STORIES_BODY_H_INCLUDED
#define STORIES_BODY_H_INCLUDED


#include <stddef.h>


typedef enum {
    STORIES_ENCODING_IDENTITY = 0,
    STORIES_ENCODING_GZIP,
    STORIES_ENCODING_DEFLATE,
    STORIES_ENCODING_UNKNOWN
} stories_encoding_e;


#define STORIES_INFLATE_OK         0
#define STORIES_INFLATE_NO_MEMORY  -1
#define STORIES_INFLATE_TOO_LARGE  -2
#define STORIES_INFLATE_CORRUPT    -3


/*
 * Returns 1 for "application/json" and "text/plain" with any parameters,
 * which is what Segment's libraries and navigator.sendBeacon() send.
 */
int stories_content_type_allowed(const char *value, size_t len);

stories_encoding_e stories_encoding_from_header(const char *value,
    size_t len);

/*
 * Inflates a gzip or zlib-wrapped deflate body.  A raw deflate stream is
 * accepted for "deflate" too.  A gzip body may have several members, and
 * the output is their concatenation.  Stops as soon as the output would
 * exceed max bytes, so that the work done is bounded by max, not by the
 * ratio.
 * On success *out comes from malloc() and is released with free().
 */
int stories_inflate(stories_encoding_e encoding, const char *in, size_t len,
    size_t max, char **out, size_t *out_len);


#endif /* STORIES_BODY_H_INCLUDED */
