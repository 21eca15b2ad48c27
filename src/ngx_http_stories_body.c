
/*
 * Copyright (C) The ngx_http_stories_module authors
 *
 * Reading, decoding, authorizing and translating a Segment request body.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_stories.h"


static ngx_int_t ngx_http_stories_decode(ngx_http_request_t *r,
    ngx_http_stories_ctx_t *ctx, ngx_str_t *body, char **inflated);
static ngx_int_t ngx_http_stories_read_body(ngx_http_request_t *r,
    size_t max, ngx_str_t *body);
static ngx_uint_t ngx_http_stories_authorized(ngx_http_request_t *r,
    ngx_http_stories_ctx_t *ctx);
static ngx_uint_t ngx_http_stories_key_matches(ngx_array_t *keys,
    u_char *candidate, size_t len);


/*
 * Checks the Content-Type and Content-Encoding before the body is read.
 * Returns NGX_DECLINED with the reason in *error for a body the module
 * cannot read.
 */

ngx_int_t
ngx_http_stories_check_headers(ngx_http_request_t *r,
    stories_encoding_e *encoding, const char **error)
{
    ngx_table_elt_t  *h;

    *encoding = STORIES_ENCODING_IDENTITY;

    h = r->headers_in.content_type;

    if (h != NULL
        && !stories_content_type_allowed((char *) h->value.data,
                                         h->value.len))
    {
        *error = "unsupported Content-Type; "
                 "send application/json or text/plain";
        return NGX_DECLINED;
    }

    h = ngx_http_stories_find_header(r, "Content-Encoding",
                                     sizeof("Content-Encoding") - 1);

    if (h != NULL) {
        *encoding = stories_encoding_from_header((char *) h->value.data,
                                                 h->value.len);

        if (*encoding == STORIES_ENCODING_UNKNOWN) {
            *error = "unsupported Content-Encoding; "
                     "send gzip, deflate or none";
            return NGX_DECLINED;
        }
    }

    return NGX_OK;
}


/*
 * Reads, inflates and translates the body.  A body that cannot be taken
 * leaves the status and the reason in ctx->result.  NGX_ERROR means an
 * internal failure that nginx has logged already.
 */

ngx_int_t
ngx_http_stories_translate(ngx_http_request_t *r, ngx_http_stories_ctx_t *ctx)
{
    char                         *inflated;
    ngx_int_t                     rc;
    ngx_str_t                     body;
    ngx_uint_t                    i;
    stories_options_t             options;
    ngx_http_stories_loc_conf_t  *slcf;

    slcf = ctx->conf;

    inflated = NULL;

    rc = ngx_http_stories_read_body(r, slcf->max_batch_size, &body);

    if (rc == NGX_DECLINED) {

        /* a compressed body this large is refused without inflating it */

        ctx->result.status = NGX_HTTP_REQUEST_ENTITY_TOO_LARGE;
        ngx_snprintf((u_char *) ctx->result.error, STORIES_ERROR_SIZE,
                     "body is larger than stories_max_batch_size "
                     "%uz bytes%Z", slcf->max_batch_size);

    } else if (rc == NGX_OK) {
        rc = ngx_http_stories_decode(r, ctx, &body, &inflated);
    }

    if (rc == NGX_OK) {
        options.sync_users = slcf->sync_users;
        options.max_depth = slcf->max_depth;
        options.max_message_size = slcf->max_message_size;
        options.max_batch_size = slcf->max_batch_size;

        if (stories_translate(ctx->call, (char *) body.data, body.len,
                              &options, &ctx->result)
            != 0)
        {
            rc = NGX_ERROR;
        }
    }

    ngx_free(inflated);

    if (rc == NGX_ERROR) {
        return NGX_ERROR;
    }

    ctx->translated = 1;

    if (slcf->write_keys != NULL && !ngx_http_stories_authorized(r, ctx)) {
        stories_result_free(&ctx->result);

        ctx->result.status = NGX_HTTP_UNAUTHORIZED;
        ngx_cpystrn((u_char *) ctx->result.error,
                    (u_char *) "missing or invalid write key",
                    STORIES_ERROR_SIZE);
        return NGX_OK;
    }

    if (ctx->result.status != 0 || ctx->result.nrequests == 0) {
        return NGX_OK;
    }

    ctx->deliveries = ngx_pcalloc(ctx->request->pool,
                                  ctx->result.nrequests
                                  * sizeof(ngx_http_stories_delivery_t));
    if (ctx->deliveries == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i < ctx->result.nrequests; i++) {
        ctx->deliveries[i].ctx = ctx;
        ctx->deliveries[i].request = &ctx->result.requests[i];
    }

    return NGX_OK;
}


/*
 * Inflates a compressed body into *inflated, bounded by
 * stories_max_batch_size.  A body that cannot be inflated returns
 * NGX_DECLINED with the status and the reason in ctx->result.
 */

static ngx_int_t
ngx_http_stories_decode(ngx_http_request_t *r, ngx_http_stories_ctx_t *ctx,
    ngx_str_t *body, char **inflated)
{
    int      rc;
    size_t   len;

    if (ctx->encoding == STORIES_ENCODING_IDENTITY) {
        return NGX_OK;
    }

    rc = stories_inflate(ctx->encoding, (char *) body->data, body->len,
                         ctx->conf->max_batch_size, inflated, &len);

    switch (rc) {

    case STORIES_INFLATE_OK:
        body->data = (u_char *) *inflated;
        body->len = len;
        return NGX_OK;

    case STORIES_INFLATE_TOO_LARGE:
        ctx->result.status = NGX_HTTP_REQUEST_ENTITY_TOO_LARGE;
        ngx_snprintf((u_char *) ctx->result.error, STORIES_ERROR_SIZE,
                     "body inflates to more than stories_max_batch_size "
                     "%uz bytes%Z", ctx->conf->max_batch_size);
        return NGX_DECLINED;

    case STORIES_INFLATE_CORRUPT:
        ctx->result.status = NGX_HTTP_BAD_REQUEST;
        ngx_cpystrn((u_char *) ctx->result.error,
                    (u_char *) (ctx->encoding == STORIES_ENCODING_GZIP
                                ? "invalid gzip body" : "invalid deflate body"),
                    STORIES_ERROR_SIZE);
        return NGX_DECLINED;

    default:
        ngx_log_error(NGX_LOG_ALERT, r->connection->log, 0,
                      "stories: inflating the request body failed");
        return NGX_ERROR;
    }
}


/*
 * Returns the whole request body as one string, whether nginx kept it in
 * memory buffers or wrote it to a temporary file.  A body of more than max
 * bytes (0: no limit), as sent, returns NGX_DECLINED and is not copied:
 * client_max_body_size can be far larger than a Segment call.
 */

static ngx_int_t
ngx_http_stories_read_body(ngx_http_request_t *r, size_t max,
    ngx_str_t *body)
{
    off_t         len;
    u_char       *p;
    ssize_t       n;
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    ngx_str_null(body);

    if (r->request_body == NULL || r->request_body->bufs == NULL) {
        return NGX_OK;
    }

    len = 0;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        b = cl->buf;
        len += b->in_file ? b->file_last - b->file_pos : b->last - b->pos;
    }

    if (max != 0 && len > (off_t) max) {
        return NGX_DECLINED;
    }

    /* a chunked body can end with an empty buffer that is neither */

    cl = r->request_body->bufs;

    if (cl->next == NULL && !cl->buf->in_file) {
        body->data = cl->buf->pos;
        body->len = cl->buf->last - cl->buf->pos;
        return NGX_OK;
    }

    if (len == 0) {
        return NGX_OK;
    }

    p = ngx_pnalloc(r->pool, len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    body->data = p;
    body->len = len;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        b = cl->buf;

        if (!b->in_file) {
            p = ngx_cpymem(p, b->pos, b->last - b->pos);
            continue;
        }

        /* NOTE: a blocking pread(), bounded by client_max_body_size */

        n = ngx_read_file(b->file, p, b->file_last - b->file_pos,
                          b->file_pos);

        if (n == NGX_ERROR) {
            return NGX_ERROR;
        }

        if (n != b->file_last - b->file_pos) {
            ngx_log_error(NGX_LOG_ALERT, r->connection->log, 0,
                          ngx_read_file_n " read only %z of %O bytes "
                          "of request body from \"%V\"",
                          n, b->file_last - b->file_pos, &b->file->name);
            return NGX_ERROR;
        }

        p += n;
    }

    return NGX_OK;
}


/*
 * Accepts a write key given as the user name of HTTP Basic credentials,
 * as Segment's libraries send it, or as the body's "writeKey" field.
 */

static ngx_uint_t
ngx_http_stories_authorized(ngx_http_request_t *r, ngx_http_stories_ctx_t *ctx)
{
    u_char           *colon;
    ngx_str_t         encoded, decoded;
    ngx_table_elt_t  *h;

    h = r->headers_in.authorization;

    if (h != NULL
        && h->value.len > sizeof("Basic ") - 1
        && ngx_strncasecmp(h->value.data, (u_char *) "Basic ",
                           sizeof("Basic ") - 1)
           == 0)
    {
        encoded.data = h->value.data + sizeof("Basic ") - 1;
        encoded.len = h->value.len - (sizeof("Basic ") - 1);

        while (encoded.len > 0 && encoded.data[0] == ' ') {
            encoded.data++;
            encoded.len--;
        }

        decoded.data = ngx_pnalloc(r->pool,
                                   ngx_base64_decoded_length(encoded.len));
        if (decoded.data != NULL
            && ngx_decode_base64(&decoded, &encoded) == NGX_OK)
        {
            colon = ngx_strlchr(decoded.data, decoded.data + decoded.len,
                                ':');
            if (colon != NULL) {
                decoded.len = colon - decoded.data;
            }

            if (ngx_http_stories_key_matches(ctx->conf->write_keys,
                                             decoded.data, decoded.len))
            {
                return 1;
            }
        }
    }

    if (ctx->result.write_key != NULL
        && ngx_http_stories_key_matches(ctx->conf->write_keys,
                                        (u_char *) ctx->result.write_key,
                                        ctx->result.write_key_len))
    {
        return 1;
    }

    return 0;
}


/*
 * Compares a candidate with every configured key.  The time taken
 * depends on the keys' lengths only, not on where a candidate differs.
 */

static ngx_uint_t
ngx_http_stories_key_matches(ngx_array_t *keys, u_char *candidate,
    size_t len)
{
    u_char      diff, c;
    size_t      j;
    ngx_str_t  *key;
    ngx_uint_t  i, found;

    key = keys->elts;
    found = 0;

    for (i = 0; i < keys->nelts; i++) {
        diff = (key[i].len != len);

        for (j = 0; j < key[i].len; j++) {
            c = (j < len) ? candidate[j] : 0;
            diff |= key[i].data[j] ^ c;
        }

        found |= (diff == 0);
    }

    return found;
}


ngx_table_elt_t *
ngx_http_stories_find_header(ngx_http_request_t *r, const char *name,
    size_t len)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                return NULL;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len == len
            && ngx_strncasecmp(h[i].key.data, (u_char *) name, len) == 0)
        {
            return &h[i];
        }
    }
}
