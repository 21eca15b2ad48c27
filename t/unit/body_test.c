/*
 * Copyright (C) The ngx_http_stories_module authors
 *
 * Unit tests of the Content-Type and Content-Encoding checks and of the
 * bounded inflation in stories_body.c.  The program prints TAP and exits
 * with status 1 when a test fails.
 *
 * Header values and compressed bodies go to the code under test in a
 * malloc()ed buffer of exactly their length, with no terminating NUL, so
 * that AddressSanitizer or valgrind report a read past the end.
 */


#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>

#include "stories_body.h"
#include "tap.h"


/* zlib window bits for deflateInit2(): gzip wrapper, zlib wrapper, raw */
#define GZIP_BITS  (15 + 16)
#define ZLIB_BITS  15
#define RAW_BITS   (-15)


typedef struct {
    const char  *value;
    size_t       len;        /* 0: strlen(value) */
    int          allowed;
} content_type_case_t;


typedef struct {
    const char          *value;
    size_t               len;   /* 0: strlen(value) */
    stories_encoding_e   encoding;
} encoding_case_t;


/* Bytes built up by append_bytes(), in a malloc()ed buffer. */
typedef struct {
    char    *data;
    size_t   len;
} bytes_t;


/* A compressed format: the encoding it is sent with and deflate's bits. */
typedef struct {
    const char          *name;
    stories_encoding_e   encoding;
    int                  bits;
} format_t;


static const char *escape_bytes(const char *s, size_t len, char *buf,
    size_t size);
static const char *encoding_name(stories_encoding_e encoding);
static const char *inflate_status_name(int rc);
static char *make_text(size_t len);
static char *compress_bytes(int bits, const char *data, size_t len,
    size_t *out_len);
static char *compress_zeros(int bits, size_t total, size_t *out_len);
static void append_bytes(bytes_t *b, const char *data, size_t len);
static void append_stream(bytes_t *b, int bits, const char *data,
    size_t len);
static int run_inflate(stories_encoding_e encoding, const char *in,
    size_t len, size_t max, char **out, size_t *out_len);
static void expect_inflated(const char *name, stories_encoding_e encoding,
    const char *in, size_t len, size_t max, const char *expected,
    size_t expected_len);
static void expect_failure(const char *name, stories_encoding_e encoding,
    const char *in, size_t len, size_t max, int status);

static void test_content_type(void);
static void test_encoding_names(void);
static void test_inflate_formats(void);
static void test_inflate_limit(void);
static void test_inflate_bomb(void);
static void test_inflate_corrupt(void);
static void test_inflate_truncated(void);
static void test_inflate_trailing_data(void);
static void test_inflate_empty(void);
static void test_inflate_gzip_members(void);
static void test_inflate_gzip_members_limit(void);
static void test_inflate_gzip_members_corrupt(void);
static void test_inflate_deflate_streams(void);


static const format_t  formats[] = {
    { "gzip", STORIES_ENCODING_GZIP, GZIP_BITS },
    { "zlib deflate", STORIES_ENCODING_DEFLATE, ZLIB_BITS },
    { "raw deflate", STORIES_ENCODING_DEFLATE, RAW_BITS },
};

#define NFORMATS  (sizeof(formats) / sizeof(formats[0]))


static const char  json_body[] =
    "{\"batch\":[{\"type\":\"track\",\"userId\":\"u1\",\"event\":\"Signed Up\"},"
    "{\"type\":\"identify\",\"userId\":\"u2\",\"traits\":{\"plan\":\"pro\"}}]}";


int
main(void)
{
    tap_start();

    test_content_type();
    test_encoding_names();
    test_inflate_formats();
    test_inflate_limit();
    test_inflate_bomb();
    test_inflate_corrupt();
    test_inflate_truncated();
    test_inflate_trailing_data();
    test_inflate_empty();
    test_inflate_gzip_members();
    test_inflate_gzip_members_limit();
    test_inflate_gzip_members_corrupt();
    test_inflate_deflate_streams();

    return tap_finish();
}


/* TAP output and assertions */


/* Writes bytes for a test name, with non-printable bytes as \xNN. */
static const char *
escape_bytes(const char *s, size_t len, char *buf, size_t size)
{
    size_t          i, n;
    unsigned char   c;

    n = 0;

    for (i = 0; i < len && n + 5 < size; i++) {
        c = (unsigned char) s[i];

        if (c >= 0x20 && c < 0x7f) {
            buf[n++] = (char) c;

        } else {
            n += snprintf(buf + n, size - n, "\\x%02x", c);
        }
    }

    buf[n] = '\0';

    return buf;
}


static const char *
encoding_name(stories_encoding_e encoding)
{
    switch (encoding) {
    case STORIES_ENCODING_IDENTITY:
        return "identity";
    case STORIES_ENCODING_GZIP:
        return "gzip";
    case STORIES_ENCODING_DEFLATE:
        return "deflate";
    case STORIES_ENCODING_UNKNOWN:
        return "unknown";
    }

    return "invalid enum value";
}


static const char *
inflate_status_name(int rc)
{
    switch (rc) {
    case STORIES_INFLATE_OK:
        return "OK";
    case STORIES_INFLATE_NO_MEMORY:
        return "NO_MEMORY";
    case STORIES_INFLATE_TOO_LARGE:
        return "TOO_LARGE";
    case STORIES_INFLATE_CORRUPT:
        return "CORRUPT";
    }

    return "invalid status";
}


/* Helpers that build inputs and run the code under test */


/*
 * Returns len bytes of printable text that compresses poorly, so that a
 * test of the output limit does not depend on one long run of a byte.
 */
static char *
make_text(size_t len)
{
    char      *text;
    size_t     i;
    unsigned   state;

    text = malloc(len != 0 ? len : 1);
    if (text == NULL) {
        printf("Bail out! malloc() of %zu bytes failed\n", len);
        exit(1);
    }

    state = 12345;

    for (i = 0; i < len; i++) {
        state = state * 1103515245 + 12345;
        text[i] = (char) ('a' + (state >> 16) % 26);
    }

    return text;
}


/* Compresses data with zlib in the format that bits selects. */
static char *
compress_bytes(int bits, const char *data, size_t len, size_t *out_len)
{
    int        rc;
    char      *out;
    size_t     size;
    z_stream   zs;

    memset(&zs, 0, sizeof(z_stream));

    if (deflateInit2(&zs, Z_BEST_COMPRESSION, Z_DEFLATED, bits, 8,
                     Z_RLE)
        != Z_OK)
    {
        printf("Bail out! deflateInit2() failed\n");
        exit(1);
    }

    size = deflateBound(&zs, len) + 32;

    out = malloc(size);
    if (out == NULL) {
        printf("Bail out! malloc() of %zu bytes failed\n", size);
        exit(1);
    }

    zs.next_in = (unsigned char *) data;
    zs.avail_in = (uInt) len;
    zs.next_out = (unsigned char *) out;
    zs.avail_out = (uInt) size;

    rc = deflate(&zs, Z_FINISH);
    if (rc != Z_STREAM_END) {
        printf("Bail out! deflate() returned %d\n", rc);
        exit(1);
    }

    *out_len = zs.total_out;

    deflateEnd(&zs);

    return out;
}


/*
 * Compresses total bytes of zeros, fed to deflate() one chunk at a time so
 * that the uncompressed data never exists in memory.  The run-length
 * strategy is much faster than the default one on zeros, with about the
 * same ratio.
 */
static char *
compress_zeros(int bits, size_t total, size_t *out_len)
{
    int             rc, flush;
    char           *out;
    size_t          size, fed, chunk;
    z_stream        zs;
    static char     zeros[1 << 20];

    memset(&zs, 0, sizeof(z_stream));

    if (deflateInit2(&zs, Z_BEST_COMPRESSION, Z_DEFLATED, bits, 8,
                     Z_DEFAULT_STRATEGY)
        != Z_OK)
    {
        printf("Bail out! deflateInit2() failed\n");
        exit(1);
    }

    /*
     * An estimate: zeros compress about 1000 to 1.  The check in the loop
     * bails out if the output buffer turns out too small.
     */

    size = total / 1000 + 65536;

    out = malloc(size);
    if (out == NULL) {
        printf("Bail out! malloc() of %zu bytes failed\n", size);
        exit(1);
    }

    zs.next_out = (unsigned char *) out;
    zs.avail_out = (uInt) size;

    fed = 0;

    do {
        chunk = total - fed < sizeof(zeros) ? total - fed : sizeof(zeros);
        fed += chunk;
        flush = (fed == total) ? Z_FINISH : Z_NO_FLUSH;

        zs.next_in = (unsigned char *) zeros;
        zs.avail_in = (uInt) chunk;

        rc = deflate(&zs, flush);

        if (rc == Z_STREAM_ERROR || zs.avail_out == 0) {
            printf("Bail out! compressing zeros failed: %d\n", rc);
            exit(1);
        }

    } while (flush != Z_FINISH);

    if (rc != Z_STREAM_END) {
        printf("Bail out! deflate() returned %d at the end\n", rc);
        exit(1);
    }

    *out_len = zs.total_out;

    deflateEnd(&zs);

    return out;
}


static void
append_bytes(bytes_t *b, const char *data, size_t len)
{
    char  *p;

    p = realloc(b->data, b->len + len + 1);
    if (p == NULL) {
        printf("Bail out! realloc() of %zu bytes failed\n", b->len + len);
        exit(1);
    }

    b->data = p;
    memcpy(b->data + b->len, data, len);
    b->len += len;
}


/* Appends data compressed in the format that bits selects. */
static void
append_stream(bytes_t *b, int bits, const char *data, size_t len)
{
    char    *compressed;
    size_t   compressed_len;

    compressed = compress_bytes(bits, data, len, &compressed_len);
    append_bytes(b, compressed, compressed_len);
    free(compressed);
}


/* Runs stories_inflate() on a copy of the input of exactly len bytes. */
static int
run_inflate(stories_encoding_e encoding, const char *in, size_t len,
    size_t max, char **out, size_t *out_len)
{
    int    rc;
    char  *copy;

    copy = copy_exact(in, len);

    *out = NULL;
    *out_len = 0;

    rc = stories_inflate(encoding, copy, len, max, out, out_len);

    free(copy);

    return rc;
}


static void
expect_inflated(const char *name, stories_encoding_e encoding,
    const char *in, size_t len, size_t max, const char *expected,
    size_t expected_len)
{
    int     rc, same;
    char   *out;
    size_t  out_len;

    rc = run_inflate(encoding, in, len, max, &out, &out_len);

    if (!test_ok(rc == STORIES_INFLATE_OK, "%s: inflated", name)) {
        printf("#   expected: OK\n");
        printf("#        got: %s\n", inflate_status_name(rc));
        return;
    }

    is_size(out_len, expected_len, name, "output length");

    same = out_len == expected_len
           && (expected_len == 0 || memcmp(out, expected, expected_len) == 0);

    if (!test_ok(same, "%s: output bytes", name) && expected_len <= 200) {
        print_bytes("expected", expected, expected_len);
        print_bytes("got", out, out_len);
    }

    free(out);
}


static void
expect_failure(const char *name, stories_encoding_e encoding,
    const char *in, size_t len, size_t max, int status)
{
    int     rc;
    char   *out;
    size_t  out_len;

    rc = run_inflate(encoding, in, len, max, &out, &out_len);

    if (!test_ok(rc == status, "%s: %s", name, inflate_status_name(status))) {
        printf("#   expected: %s\n", inflate_status_name(status));
        printf("#        got: %s\n", inflate_status_name(rc));
    }

    if (rc == STORIES_INFLATE_OK) {
        free(out);
    }
}


/* Tests */


static void
test_content_type(void)
{
    int                        allowed;
    char                      *copy, label[128];
    size_t                     i, len;
    const content_type_case_t  *c;

    static const content_type_case_t  cases[] = {
        { "application/json", 0, 1 },
        { "application/json; charset=utf-8", 0, 1 },
        { "application/json;charset=UTF-8", 0, 1 },
        { "APPLICATION/JSON", 0, 1 },
        { "Application/Json; Charset=UTF-8", 0, 1 },
        { " application/json ", 0, 1 },
        { "\tapplication/json", 0, 1 },
        { "application/json ; charset=utf-8", 0, 1 },
        { "application/json;", 0, 1 },
        { "text/plain", 0, 1 },
        { "text/plain;charset=UTF-8", 0, 1 },
        { "TEXT/PLAIN; charset=utf-8", 0, 1 },

        { "", 0, 0 },
        { " ", 0, 0 },
        { ";charset=utf-8", 0, 0 },
        { "application/x-www-form-urlencoded", 0, 0 },
        { "multipart/form-data; boundary=xyz", 0, 0 },
        { "text/html", 0, 0 },
        { "text/html; charset=application/json", 0, 0 },
        { "application/javascript", 0, 0 },
        { "application/jsonp", 0, 0 },
        { "application/json-patch+json", 0, 0 },
        { "application/ld+json", 0, 0 },
        { "application/jso", 0, 0 },
        { "application", 0, 0 },
        { "text/plainx", 0, 0 },
        { "text/plai", 0, 0 },
        { "application json", 0, 0 },
        { "xapplication/json", 0, 0 },

        /* only letters fold case: a control byte is not "/" or "-" */
        { "application\x0fjson", 0, 0 },
        { "text\x0fplain", 0, 0 },

        /* a NUL byte inside the value does not end it */
        { "application/json\0x", sizeof("application/json\0x") - 1, 0 },
    };

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        c = &cases[i];
        len = c->len != 0 ? c->len : strlen(c->value);

        copy = copy_exact(c->value, len);
        allowed = stories_content_type_allowed(copy, len);
        free(copy);

        if (!test_ok(allowed == c->allowed, "content type %s: %s",
                     c->allowed ? "allowed" : "rejected",
                     escape_bytes(c->value, len, label, sizeof(label))))
        {
            print_bytes("value", c->value, len);
            printf("#   expected: %d\n", c->allowed);
            printf("#        got: %d\n", allowed);
        }
    }
}


static void
test_encoding_names(void)
{
    char                   *copy, label[128];
    size_t                  i, len;
    stories_encoding_e      encoding;
    const encoding_case_t  *c;

    static const encoding_case_t  cases[] = {
        { "", 0, STORIES_ENCODING_IDENTITY },
        { " ", 0, STORIES_ENCODING_IDENTITY },
        { "identity", 0, STORIES_ENCODING_IDENTITY },
        { "IDENTITY", 0, STORIES_ENCODING_IDENTITY },
        { " Identity ", 0, STORIES_ENCODING_IDENTITY },

        { "gzip", 0, STORIES_ENCODING_GZIP },
        { "GZIP", 0, STORIES_ENCODING_GZIP },
        { "Gzip", 0, STORIES_ENCODING_GZIP },
        { " gzip", 0, STORIES_ENCODING_GZIP },
        { "gzip ", 0, STORIES_ENCODING_GZIP },
        { "\tgzip\t", 0, STORIES_ENCODING_GZIP },
        { "x-gzip", 0, STORIES_ENCODING_GZIP },
        { "X-GZIP", 0, STORIES_ENCODING_GZIP },

        { "deflate", 0, STORIES_ENCODING_DEFLATE },
        { "DEFLATE", 0, STORIES_ENCODING_DEFLATE },
        { " Deflate ", 0, STORIES_ENCODING_DEFLATE },

        { "br", 0, STORIES_ENCODING_UNKNOWN },
        { "zstd", 0, STORIES_ENCODING_UNKNOWN },
        { "compress", 0, STORIES_ENCODING_UNKNOWN },
        { "x-compress", 0, STORIES_ENCODING_UNKNOWN },
        { "gzip, br", 0, STORIES_ENCODING_UNKNOWN },
        { "gzip,gzip", 0, STORIES_ENCODING_UNKNOWN },
        { "deflate, gzip", 0, STORIES_ENCODING_UNKNOWN },
        { "identity, gzip", 0, STORIES_ENCODING_UNKNOWN },
        { "gzip;q=1", 0, STORIES_ENCODING_UNKNOWN },
        { "gzi", 0, STORIES_ENCODING_UNKNOWN },
        { "gzipx", 0, STORIES_ENCODING_UNKNOWN },
        { "xgzip", 0, STORIES_ENCODING_UNKNOWN },
        { "g zip", 0, STORIES_ENCODING_UNKNOWN },
        { "deflat", 0, STORIES_ENCODING_UNKNOWN },
        { "deflate-raw", 0, STORIES_ENCODING_UNKNOWN },
        { "identityx", 0, STORIES_ENCODING_UNKNOWN },

        /* only letters fold case: a control byte is not "-" */
        { "x\rgzip", 0, STORIES_ENCODING_UNKNOWN },

        /* a NUL byte inside the value does not end it */
        { "gzip\0br", sizeof("gzip\0br") - 1, STORIES_ENCODING_UNKNOWN },
    };

    for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        c = &cases[i];
        len = c->len != 0 ? c->len : strlen(c->value);

        copy = copy_exact(c->value, len);
        encoding = stories_encoding_from_header(copy, len);
        free(copy);

        if (!test_ok(encoding == c->encoding, "encoding \"%s\" is %s",
                     escape_bytes(c->value, len, label, sizeof(label)),
                     encoding_name(c->encoding)))
        {
            print_bytes("value", c->value, len);
            printf("#   expected: %s\n", encoding_name(c->encoding));
            printf("#        got: %s\n", encoding_name(encoding));
        }
    }
}


static void
test_inflate_formats(void)
{
    char    name[64], *text, *compressed;
    size_t  i, len, compressed_len;

    len = sizeof(json_body) - 1;

    for (i = 0; i < NFORMATS; i++) {
        compressed = compress_bytes(formats[i].bits, json_body, len,
                                    &compressed_len);

        snprintf(name, sizeof(name), "%s json body", formats[i].name);
        expect_inflated(name, formats[i].encoding, compressed,
                        compressed_len, 512000, json_body, len);

        free(compressed);
    }

    /* larger than the first output buffer, so the buffer has to grow */

    len = 300000;
    text = make_text(len);

    for (i = 0; i < NFORMATS; i++) {
        compressed = compress_bytes(formats[i].bits, text, len,
                                    &compressed_len);

        snprintf(name, sizeof(name), "%s 300000 bytes", formats[i].name);
        expect_inflated(name, formats[i].encoding, compressed,
                        compressed_len, 512000, text, len);

        free(compressed);
    }

    free(text);

    /* a gzip stream sent as "deflate" is neither zlib nor raw deflate */

    compressed = compress_bytes(GZIP_BITS, json_body, sizeof(json_body) - 1,
                                &compressed_len);
    expect_failure("gzip stream as deflate", STORIES_ENCODING_DEFLATE,
                   compressed, compressed_len, 512000,
                   STORIES_INFLATE_CORRUPT);
    free(compressed);
}


/*
 * Output of exactly max bytes is accepted and max + 1 is rejected, for
 * small outputs and for ones past the first output buffer.
 */
static void
test_inflate_limit(void)
{
    char    name[96], *text, *compressed;
    size_t  i, j, len, compressed_len;

    static const size_t  sizes[] = { 1, 100, 16383, 16384, 16385, 100000 };

    for (j = 0; j < sizeof(sizes) / sizeof(sizes[0]); j++) {
        len = sizes[j];
        text = make_text(len);

        for (i = 0; i < NFORMATS; i++) {
            compressed = compress_bytes(formats[i].bits, text, len,
                                        &compressed_len);

            snprintf(name, sizeof(name), "%s %zu bytes with max %zu",
                     formats[i].name, len, len);
            expect_inflated(name, formats[i].encoding, compressed,
                            compressed_len, len, text, len);

            snprintf(name, sizeof(name), "%s %zu bytes with max %zu",
                     formats[i].name, len, len - 1);
            expect_failure(name, formats[i].encoding, compressed,
                           compressed_len, len - 1,
                           STORIES_INFLATE_TOO_LARGE);

            free(compressed);
        }

        free(text);
    }

    /* zeros compress well, so the input is far smaller than the output */

    len = 512001;
    text = calloc(1, len);
    if (text == NULL) {
        printf("Bail out! calloc() of %zu bytes failed\n", len);
        exit(1);
    }

    for (i = 0; i < NFORMATS; i++) {
        compressed = compress_bytes(formats[i].bits, text, len - 1,
                                    &compressed_len);

        snprintf(name, sizeof(name), "%s 512000 zeros with max 512000",
                 formats[i].name);
        expect_inflated(name, formats[i].encoding, compressed,
                        compressed_len, 512000, text, len - 1);

        free(compressed);

        compressed = compress_bytes(formats[i].bits, text, len,
                                    &compressed_len);

        snprintf(name, sizeof(name), "%s 512001 zeros with max 512000",
                 formats[i].name);
        expect_failure(name, formats[i].encoding, compressed,
                       compressed_len, 512000, STORIES_INFLATE_TOO_LARGE);

        free(compressed);
    }

    free(text);
}


/*
 * A stream that inflates to 128 MiB of zeros, 262 times max, is rejected.
 * Inflation stops at max, so the 128 MiB never exist in memory.
 */
static void
test_inflate_bomb(void)
{
    char    name[64], *compressed;
    size_t  i, compressed_len;

    for (i = 0; i < NFORMATS; i++) {
        compressed = compress_zeros(formats[i].bits, (size_t) 128 << 20,
                                    &compressed_len);

        snprintf(name, sizeof(name), "%s 128 MiB of zeros", formats[i].name);
        expect_failure(name, formats[i].encoding, compressed, compressed_len,
                       512000, STORIES_INFLATE_TOO_LARGE);

        free(compressed);
    }
}


static void
test_inflate_corrupt(void)
{
    char    name[64], *compressed;
    size_t  i, len, compressed_len;

    static const char  garbage[] = "this is not a compressed stream";

    len = sizeof(json_body) - 1;

    for (i = 0; i < NFORMATS; i++) {
        snprintf(name, sizeof(name), "%s of plain text", formats[i].name);
        expect_failure(name, formats[i].encoding, garbage,
                       sizeof(garbage) - 1, 512000, STORIES_INFLATE_CORRUPT);

        snprintf(name, sizeof(name), "%s of plain json", formats[i].name);
        expect_failure(name, formats[i].encoding, json_body, len, 512000,
                       STORIES_INFLATE_CORRUPT);
    }

    /* gzip's trailer is the CRC-32 of the output, then its length */

    compressed = compress_bytes(GZIP_BITS, json_body, len, &compressed_len);
    compressed[compressed_len - 8] ^= 0x01;
    expect_failure("gzip with wrong crc", STORIES_ENCODING_GZIP, compressed,
                   compressed_len, 512000, STORIES_INFLATE_CORRUPT);
    free(compressed);

    compressed = compress_bytes(GZIP_BITS, json_body, len, &compressed_len);
    compressed[compressed_len - 4] ^= 0x01;
    expect_failure("gzip with wrong length", STORIES_ENCODING_GZIP,
                   compressed, compressed_len, 512000,
                   STORIES_INFLATE_CORRUPT);
    free(compressed);

    compressed = compress_bytes(GZIP_BITS, json_body, len, &compressed_len);
    compressed[0] = 0x1e;
    expect_failure("gzip with wrong magic", STORIES_ENCODING_GZIP, compressed,
                   compressed_len, 512000, STORIES_INFLATE_CORRUPT);
    free(compressed);

    /* zlib's trailer is the Adler-32 of the output */

    compressed = compress_bytes(ZLIB_BITS, json_body, len, &compressed_len);
    compressed[compressed_len - 1] ^= 0x01;
    expect_failure("zlib with wrong adler32", STORIES_ENCODING_DEFLATE,
                   compressed, compressed_len, 512000,
                   STORIES_INFLATE_CORRUPT);
    free(compressed);

    /* block type 3 is reserved in deflate (RFC 1951) */

    expect_failure("raw deflate with block type 3", STORIES_ENCODING_DEFLATE,
                   "\x07\x00\x00\x00", 4, 512000, STORIES_INFLATE_CORRUPT);
}


static void
test_inflate_truncated(void)
{
    char    name[80], *compressed;
    size_t  i, len, compressed_len, cut;

    len = sizeof(json_body) - 1;

    for (i = 0; i < NFORMATS; i++) {
        compressed = compress_bytes(formats[i].bits, json_body, len,
                                    &compressed_len);

        cut = compressed_len - 1;
        snprintf(name, sizeof(name), "%s without its last byte",
                 formats[i].name);
        expect_failure(name, formats[i].encoding, compressed, cut, 512000,
                       STORIES_INFLATE_CORRUPT);

        cut = compressed_len / 2;
        snprintf(name, sizeof(name), "%s cut to %zu of %zu bytes",
                 formats[i].name, cut, compressed_len);
        expect_failure(name, formats[i].encoding, compressed, cut, 512000,
                       STORIES_INFLATE_CORRUPT);

        cut = 1;
        snprintf(name, sizeof(name), "%s cut to 1 byte", formats[i].name);
        expect_failure(name, formats[i].encoding, compressed, cut, 512000,
                       STORIES_INFLATE_CORRUPT);

        free(compressed);
    }

    /* a gzip stream without its 8-byte trailer of CRC-32 and length */

    compressed = compress_bytes(GZIP_BITS, json_body, len, &compressed_len);
    expect_failure("gzip without trailer", STORIES_ENCODING_GZIP, compressed,
                   compressed_len - 8, 512000, STORIES_INFLATE_CORRUPT);
    free(compressed);

    /* a gzip header alone, 10 bytes */

    compressed = compress_bytes(GZIP_BITS, json_body, len, &compressed_len);
    expect_failure("gzip header only", STORIES_ENCODING_GZIP, compressed, 10,
                   512000, STORIES_INFLATE_CORRUPT);
    free(compressed);
}


static void
test_inflate_trailing_data(void)
{
    char    name[64], *compressed, *padded;
    size_t  i, len, compressed_len;

    len = sizeof(json_body) - 1;

    for (i = 0; i < NFORMATS; i++) {
        compressed = compress_bytes(formats[i].bits, json_body, len,
                                    &compressed_len);

        padded = malloc(compressed_len + 4);
        if (padded == NULL) {
            printf("Bail out! malloc() failed\n");
            exit(1);
        }

        memcpy(padded, compressed, compressed_len);
        memcpy(padded + compressed_len, "junk", 4);

        snprintf(name, sizeof(name), "%s with trailing bytes",
                 formats[i].name);
        expect_failure(name, formats[i].encoding, padded, compressed_len + 4,
                       512000, STORIES_INFLATE_CORRUPT);

        /* a single zero byte after the stream is still data after it */

        padded[compressed_len] = '\0';

        snprintf(name, sizeof(name), "%s with a trailing zero byte",
                 formats[i].name);
        expect_failure(name, formats[i].encoding, padded, compressed_len + 1,
                       512000, STORIES_INFLATE_CORRUPT);

        free(padded);
        free(compressed);
    }
}


static void
test_inflate_empty(void)
{
    char    name[64], *compressed;
    size_t  i, compressed_len;

    for (i = 0; i < NFORMATS; i++) {
        snprintf(name, sizeof(name), "%s of no bytes", formats[i].name);
        expect_failure(name, formats[i].encoding, "", 0, 512000,
                       STORIES_INFLATE_CORRUPT);

        /* a complete stream of an empty body inflates to no bytes */

        compressed = compress_bytes(formats[i].bits, "", 0, &compressed_len);

        snprintf(name, sizeof(name), "%s stream of an empty body",
                 formats[i].name);
        expect_inflated(name, formats[i].encoding, compressed,
                        compressed_len, 512000, "", 0);

        snprintf(name, sizeof(name), "%s empty body with max 0",
                 formats[i].name);
        expect_inflated(name, formats[i].encoding, compressed,
                        compressed_len, 0, "", 0);

        free(compressed);
    }
}


/*
 * A gzip body may be a series of members (RFC 1952, section 2.2).  The
 * output is the concatenation of the members' data.
 */
static void
test_inflate_gzip_members(void)
{
    char     *text;
    size_t    len, half, third;
    bytes_t   body;

    len = sizeof(json_body) - 1;

    /* the split falls inside a JSON string */

    half = 21;
    memset(&body, 0, sizeof(bytes_t));
    append_stream(&body, GZIP_BITS, json_body, half);
    append_stream(&body, GZIP_BITS, json_body + half, len - half);
    expect_inflated("gzip two members", STORIES_ENCODING_GZIP, body.data,
                    body.len, 512000, json_body, len);
    free(body.data);

    third = len / 3;
    memset(&body, 0, sizeof(bytes_t));
    append_stream(&body, GZIP_BITS, json_body, third);
    append_stream(&body, GZIP_BITS, json_body + third, third);
    append_stream(&body, GZIP_BITS, json_body + 2 * third, len - 2 * third);
    expect_inflated("gzip three members", STORIES_ENCODING_GZIP, body.data,
                    body.len, 512000, json_body, len);
    free(body.data);

    /* a member of no data adds nothing, wherever it is */

    memset(&body, 0, sizeof(bytes_t));
    append_stream(&body, GZIP_BITS, "", 0);
    append_stream(&body, GZIP_BITS, json_body, half);
    append_stream(&body, GZIP_BITS, "", 0);
    append_stream(&body, GZIP_BITS, json_body + half, len - half);
    append_stream(&body, GZIP_BITS, "", 0);
    expect_inflated("gzip members with empty ones", STORIES_ENCODING_GZIP,
                    body.data, body.len, 512000, json_body, len);
    free(body.data);

    memset(&body, 0, sizeof(bytes_t));
    append_stream(&body, GZIP_BITS, "", 0);
    append_stream(&body, GZIP_BITS, "", 0);
    expect_inflated("gzip two empty members", STORIES_ENCODING_GZIP,
                    body.data, body.len, 0, "", 0);
    free(body.data);

    /* members larger than the first output buffer, so it grows between them */

    len = 60000;
    text = make_text(len);

    memset(&body, 0, sizeof(bytes_t));
    append_stream(&body, GZIP_BITS, text, 20000);
    append_stream(&body, GZIP_BITS, text + 20000, 20000);
    append_stream(&body, GZIP_BITS, text + 40000, 20000);
    expect_inflated("gzip three members of 20000 bytes",
                    STORIES_ENCODING_GZIP, body.data, body.len, 512000,
                    text, len);
    free(body.data);

    free(text);
}


/* The limit applies to the output of all members together. */
static void
test_inflate_gzip_members_limit(void)
{
    char     *text;
    size_t    len;
    bytes_t   body;

    len = 60000;
    text = make_text(len);

    memset(&body, 0, sizeof(bytes_t));
    append_stream(&body, GZIP_BITS, text, 20000);
    append_stream(&body, GZIP_BITS, text + 20000, 20000);
    append_stream(&body, GZIP_BITS, text + 40000, 20000);

    expect_inflated("gzip members of 60000 bytes with max 60000",
                    STORIES_ENCODING_GZIP, body.data, body.len, 60000,
                    text, len);
    expect_failure("gzip members of 60000 bytes with max 59999",
                   STORIES_ENCODING_GZIP, body.data, body.len, 59999,
                   STORIES_INFLATE_TOO_LARGE);

    /* each member is under the limit, their sum is not */

    expect_failure("gzip members of 60000 bytes with max 30000",
                   STORIES_ENCODING_GZIP, body.data, body.len, 30000,
                   STORIES_INFLATE_TOO_LARGE);
    free(body.data);

    /* the first member fills the limit, and the second adds one byte */

    memset(&body, 0, sizeof(bytes_t));
    append_stream(&body, GZIP_BITS, text, 100);
    append_stream(&body, GZIP_BITS, text + 100, 1);
    expect_failure("gzip members of 100 and 1 bytes with max 100",
                   STORIES_ENCODING_GZIP, body.data, body.len, 100,
                   STORIES_INFLATE_TOO_LARGE);
    expect_inflated("gzip members of 100 and 1 bytes with max 101",
                    STORIES_ENCODING_GZIP, body.data, body.len, 101,
                    text, 101);
    free(body.data);

    /* an empty member after a member that fills the limit is accepted */

    memset(&body, 0, sizeof(bytes_t));
    append_stream(&body, GZIP_BITS, text, 100);
    append_stream(&body, GZIP_BITS, "", 0);
    expect_inflated("gzip members of 100 and 0 bytes with max 100",
                    STORIES_ENCODING_GZIP, body.data, body.len, 100,
                    text, 100);
    free(body.data);

    free(text);
}


static void
test_inflate_gzip_members_corrupt(void)
{
    size_t    len, half, first_len;
    bytes_t   body;

    len = sizeof(json_body) - 1;
    half = 21;

    /* gzip's trailer is the CRC-32 of the output, then its length */

    memset(&body, 0, sizeof(bytes_t));
    append_stream(&body, GZIP_BITS, json_body, half);
    append_stream(&body, GZIP_BITS, json_body + half, len - half);
    body.data[body.len - 8] ^= 0x01;
    expect_failure("gzip second member with wrong crc",
                   STORIES_ENCODING_GZIP, body.data, body.len, 512000,
                   STORIES_INFLATE_CORRUPT);
    free(body.data);

    memset(&body, 0, sizeof(bytes_t));
    append_stream(&body, GZIP_BITS, json_body, half);
    first_len = body.len;
    append_stream(&body, GZIP_BITS, json_body + half, len - half);
    body.data[first_len] = 0x1e;
    expect_failure("gzip second member with wrong magic",
                   STORIES_ENCODING_GZIP, body.data, body.len, 512000,
                   STORIES_INFLATE_CORRUPT);
    free(body.data);

    memset(&body, 0, sizeof(bytes_t));
    append_stream(&body, GZIP_BITS, json_body, half);
    first_len = body.len;
    append_stream(&body, GZIP_BITS, json_body + half, len - half);
    body.data[first_len - 8] ^= 0x01;
    expect_failure("gzip first member with wrong crc",
                   STORIES_ENCODING_GZIP, body.data, body.len, 512000,
                   STORIES_INFLATE_CORRUPT);
    free(body.data);

    memset(&body, 0, sizeof(bytes_t));
    append_stream(&body, GZIP_BITS, json_body, half);
    append_stream(&body, GZIP_BITS, json_body + half, len - half);
    expect_failure("gzip second member without its last byte",
                   STORIES_ENCODING_GZIP, body.data, body.len - 1, 512000,
                   STORIES_INFLATE_CORRUPT);
    free(body.data);

    memset(&body, 0, sizeof(bytes_t));
    append_stream(&body, GZIP_BITS, json_body, half);
    first_len = body.len;
    append_stream(&body, GZIP_BITS, json_body + half, len - half);
    expect_failure("gzip second member cut to its header",
                   STORIES_ENCODING_GZIP, body.data, first_len + 10, 512000,
                   STORIES_INFLATE_CORRUPT);
    expect_failure("gzip second member cut to 1 byte",
                   STORIES_ENCODING_GZIP, body.data, first_len + 1, 512000,
                   STORIES_INFLATE_CORRUPT);
    free(body.data);

    /* bytes after the last member are not a member */

    memset(&body, 0, sizeof(bytes_t));
    append_stream(&body, GZIP_BITS, json_body, half);
    append_stream(&body, GZIP_BITS, json_body + half, len - half);
    append_bytes(&body, "junk", 4);
    expect_failure("gzip members with trailing bytes", STORIES_ENCODING_GZIP,
                   body.data, body.len, 512000, STORIES_INFLATE_CORRUPT);
    free(body.data);

    /* zero bytes after the last member are rejected, unlike in gzip 1.12 */

    memset(&body, 0, sizeof(bytes_t));
    append_stream(&body, GZIP_BITS, json_body, half);
    append_stream(&body, GZIP_BITS, json_body + half, len - half);
    append_bytes(&body, "\0\0\0\0\0\0\0\0", 8);
    expect_failure("gzip members with 8 trailing zero bytes",
                   STORIES_ENCODING_GZIP, body.data, body.len, 512000,
                   STORIES_INFLATE_CORRUPT);
    free(body.data);

    /* a zlib or raw deflate stream after a gzip member is not a member */

    memset(&body, 0, sizeof(bytes_t));
    append_stream(&body, GZIP_BITS, json_body, half);
    append_stream(&body, ZLIB_BITS, json_body + half, len - half);
    expect_failure("gzip member then zlib stream", STORIES_ENCODING_GZIP,
                   body.data, body.len, 512000, STORIES_INFLATE_CORRUPT);
    free(body.data);

    memset(&body, 0, sizeof(bytes_t));
    append_stream(&body, GZIP_BITS, json_body, half);
    append_stream(&body, RAW_BITS, json_body + half, len - half);
    expect_failure("gzip member then raw deflate stream",
                   STORIES_ENCODING_GZIP, body.data, body.len, 512000,
                   STORIES_INFLATE_CORRUPT);
    free(body.data);
}


/* Only gzip has members: a second zlib or raw deflate stream is corrupt. */
static void
test_inflate_deflate_streams(void)
{
    char     name[64];
    size_t   i, len, half;
    bytes_t  body;

    len = sizeof(json_body) - 1;
    half = 21;

    for (i = 0; i < NFORMATS; i++) {
        if (formats[i].encoding != STORIES_ENCODING_DEFLATE) {
            continue;
        }

        memset(&body, 0, sizeof(bytes_t));
        append_stream(&body, formats[i].bits, json_body, half);
        append_stream(&body, formats[i].bits, json_body + half, len - half);

        snprintf(name, sizeof(name), "%s two streams", formats[i].name);
        expect_failure(name, formats[i].encoding, body.data, body.len,
                       512000, STORIES_INFLATE_CORRUPT);

        free(body.data);
    }
}
