/*
 * Copyright (C) The ngx_http_stories_module authors
 */


#include <stdlib.h>
#include <string.h>

#include <zlib.h>

#include "stories_body.h"


/* zlib's window bits: 15, plus 16 for a gzip wrapper, negative for raw */
#define STORIES_GZIP_BITS     (15 + 16)
#define STORIES_ZLIB_BITS     15
#define STORIES_RAW_BITS      (-15)

#define STORIES_INFLATE_STEP  16384


static int stories_token_equal(const char *value, size_t len,
    const char *token);
static void stories_trim(const char **value, size_t *len);
static int stories_inflate_bits(int bits, const char *in, size_t len,
    size_t max, char **out, size_t *out_len);


int
stories_content_type_allowed(const char *value, size_t len)
{
    const char  *semicolon;

    semicolon = memchr(value, ';', len);
    if (semicolon != NULL) {
        len = semicolon - value;
    }

    stories_trim(&value, &len);

    return stories_token_equal(value, len, "application/json")
           || stories_token_equal(value, len, "text/plain");
}


stories_encoding_e
stories_encoding_from_header(const char *value, size_t len)
{
    stories_trim(&value, &len);

    if (len == 0 || stories_token_equal(value, len, "identity")) {
        return STORIES_ENCODING_IDENTITY;
    }

    if (stories_token_equal(value, len, "gzip")
        || stories_token_equal(value, len, "x-gzip"))
    {
        return STORIES_ENCODING_GZIP;
    }

    if (stories_token_equal(value, len, "deflate")) {
        return STORIES_ENCODING_DEFLATE;
    }

    return STORIES_ENCODING_UNKNOWN;
}


/* Compares an HTTP token case-insensitively with a lowercase one. */
static int
stories_token_equal(const char *value, size_t len, const char *token)
{
    char    c;
    size_t  i;

    if (len != strlen(token)) {
        return 0;
    }

    for (i = 0; i < len; i++) {
        c = value[i];

        if (c >= 'A' && c <= 'Z') {
            c = (char) (c - 'A' + 'a');
        }

        if (c != token[i]) {
            return 0;
        }
    }

    return 1;
}


static void
stories_trim(const char **value, size_t *len)
{
    while (*len > 0 && (**value == ' ' || **value == '\t')) {
        (*value)++;
        (*len)--;
    }

    while (*len > 0
           && ((*value)[*len - 1] == ' ' || (*value)[*len - 1] == '\t'))
    {
        (*len)--;
    }
}


int
stories_inflate(stories_encoding_e encoding, const char *in, size_t len,
    size_t max, char **out, size_t *out_len)
{
    int  rc;

    if (encoding == STORIES_ENCODING_GZIP) {
        return stories_inflate_bits(STORIES_GZIP_BITS, in, len, max, out,
                                    out_len);
    }

    /* "deflate" means zlib-wrapped data, but some clients send it raw */

    rc = stories_inflate_bits(STORIES_ZLIB_BITS, in, len, max, out, out_len);

    if (rc == STORIES_INFLATE_CORRUPT) {
        rc = stories_inflate_bits(STORIES_RAW_BITS, in, len, max, out,
                                  out_len);
    }

    return rc;
}


static int
stories_inflate_bits(int bits, const char *in, size_t len, size_t max,
    char **out, size_t *out_len)
{
    int        rc;
    char      *buf, *p;
    size_t     size, used;
    z_stream   zs;

    memset(&zs, 0, sizeof(z_stream));

    if (inflateInit2(&zs, bits) != Z_OK) {
        return STORIES_INFLATE_NO_MEMORY;
    }

    /* room for max + 1 bytes shows whether the output exceeds max */

    size = len * 4 < STORIES_INFLATE_STEP ? STORIES_INFLATE_STEP : len * 4;
    if (size > max + 1) {
        size = max + 1;
    }

    buf = malloc(size);
    if (buf == NULL) {
        inflateEnd(&zs);
        return STORIES_INFLATE_NO_MEMORY;
    }

    zs.next_in = (unsigned char *) in;
    zs.avail_in = (uInt) len;
    zs.next_out = (unsigned char *) buf;
    zs.avail_out = (uInt) size;

    /*
     * The output length is counted from next_out, not from total_out,
     * because inflateReset() sets total_out to 0 at each gzip member.
     */

    for ( ;; ) {
        rc = inflate(&zs, Z_NO_FLUSH);
        used = (char *) zs.next_out - buf;

        if (used > max) {
            rc = STORIES_INFLATE_TOO_LARGE;
            goto failed;
        }

        if (rc == Z_STREAM_END) {
            if (zs.avail_in == 0) {
                break;
            }

            /* data after the end of a zlib or raw deflate stream */

            if (bits != STORIES_GZIP_BITS) {
                rc = STORIES_INFLATE_CORRUPT;
                goto failed;
            }

            /*
             * A gzip body may be a series of members (RFC 1952, section
             * 2.2), so what follows a member must be another whole member.
             * Trailing zero bytes are not, and make the body corrupt.
             */

            if (inflateReset(&zs) != Z_OK) {
                rc = STORIES_INFLATE_CORRUPT;
                goto failed;
            }

            continue;
        }

        if (rc != Z_OK && rc != Z_BUF_ERROR) {
            rc = (rc == Z_MEM_ERROR) ? STORIES_INFLATE_NO_MEMORY
                                     : STORIES_INFLATE_CORRUPT;
            goto failed;
        }

        if (zs.avail_out != 0) {
            /* all input was used and the stream has not ended */
            rc = STORIES_INFLATE_CORRUPT;
            goto failed;
        }

        size = size * 2 > max + 1 ? max + 1 : size * 2;

        p = realloc(buf, size);
        if (p == NULL) {
            rc = STORIES_INFLATE_NO_MEMORY;
            goto failed;
        }

        buf = p;
        zs.next_out = (unsigned char *) buf + used;
        zs.avail_out = (uInt) (size - used);
    }

    *out = buf;
    *out_len = used;

    inflateEnd(&zs);

    return STORIES_INFLATE_OK;

failed:

    free(buf);
    inflateEnd(&zs);

    return rc;
}
