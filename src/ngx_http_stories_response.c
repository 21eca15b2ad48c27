
/*
 * Copyright (C) The ngx_http_stories_module authors
 *
 * The endpoint's JSON responses and CORS headers.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_stories.h"


static ngx_int_t ngx_http_stories_respond_success(ngx_http_request_t *r,
    ngx_http_stories_ctx_t *ctx);
static ngx_int_t ngx_http_stories_send_json(ngx_http_request_t *r,
    ngx_uint_t status, char *json, size_t len);
static ngx_int_t ngx_http_stories_add_header(ngx_http_request_t *r,
    const char *key, ngx_str_t *value);
static ngx_str_t *ngx_http_stories_allowed_origin(ngx_http_request_t *r);


ngx_str_t  ngx_http_stories_json = ngx_string("application/json");


/* Builds the client's response from the outcomes of its Stories requests. */

ngx_int_t
ngx_http_stories_respond(ngx_http_request_t *r, ngx_http_stories_ctx_t *ctx)
{
    u_char                        buf[STORIES_ERROR_SIZE];
    ngx_uint_t                    i;
    ngx_http_stories_delivery_t  *d, *worst;

    worst = NULL;

    for (i = 0; i < ctx->result.nrequests; i++) {
        d = &ctx->deliveries[i];

        if (!d->kept && d->outcome > NGX_HTTP_STORIES_REJECTED
            && (worst == NULL || d->outcome > worst->outcome))
        {
            worst = d;
        }
    }

    if (worst == NULL) {
        return ngx_http_stories_respond_success(r, ctx);
    }

    switch (worst->outcome) {

    case NGX_HTTP_STORIES_KEY_REJECTED:
        return ngx_http_stories_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                           "Stories rejected the API key");

    case NGX_HTTP_STORIES_RATE_LIMITED:
        if (worst->retry_after.len
            && ngx_http_stories_add_header(r, "Retry-After",
                                           &worst->retry_after)
               != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        return ngx_http_stories_send_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                     "Stories rate limit reached, retry later");

    case NGX_HTTP_STORIES_TIMED_OUT:
        return ngx_http_stories_send_error(r, NGX_HTTP_GATEWAY_TIME_OUT,
                                           "Stories timed out");

    case NGX_HTTP_STORIES_UNREACHABLE:
        return ngx_http_stories_send_error(r, NGX_HTTP_BAD_GATEWAY,
                                           "Stories is unreachable");

    case NGX_HTTP_STORIES_FAILED:
        ngx_snprintf(buf, sizeof(buf), "Stories failed with status %ui%Z",
                     worst->status);
        return ngx_http_stories_send_error(r, NGX_HTTP_BAD_GATEWAY,
                                           (char *) buf);

    default:
        return ngx_http_stories_send_error(r,
                                     NGX_HTTP_INTERNAL_SERVER_ERROR,
                                     "failed to forward to Stories, "
                                     "see the error log");
    }
}


static ngx_int_t
ngx_http_stories_respond_success(ngx_http_request_t *r,
    ngx_http_stories_ctx_t *ctx)
{
    char                         *json;
    u_char                       *p;
    size_t                        len;
    ngx_uint_t                    i, n;
    stories_rejection_t          *rejected;
    ngx_http_stories_delivery_t  *d;

    n = ctx->result.ninvalid;

    for (i = 0; i < ctx->result.nrequests; i++) {
        d = &ctx->deliveries[i];
        n += (!d->kept && d->outcome == NGX_HTTP_STORIES_REJECTED);
    }

    rejected = NULL;

    if (n != 0) {
        rejected = ngx_palloc(r->pool, n * sizeof(stories_rejection_t));
        if (rejected == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    n = 0;

    for (i = 0; i < ctx->result.ninvalid; i++) {
        rejected[n].index = ctx->result.invalid[i].index;
        rejected[n].error = ctx->result.invalid[i].reason;
        n++;
    }

    for (i = 0; i < ctx->result.nrequests; i++) {
        d = &ctx->deliveries[i];

        if (d->kept || d->outcome != NGX_HTTP_STORIES_REJECTED) {
            continue;
        }

        p = ngx_pnalloc(r->pool, STORIES_ERROR_SIZE);
        if (p == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ngx_snprintf(p, STORIES_ERROR_SIZE,
                     "Stories rejected the %s with status %ui%Z",
                     ngx_strcmp(d->request->path, STORIES_EVENTS_PATH) == 0
                     ? "event" : "user",
                     d->status);

        if (!ctx->result.batch) {
            r->headers_out.status_line.len =
                                      sizeof("422 Unprocessable Entity") - 1;
            r->headers_out.status_line.data =
                                      (u_char *) "422 Unprocessable Entity";

            return ngx_http_stories_send_error(r, 422, (char *) p);
        }

        rejected[n].index = d->request->index;
        rejected[n].error = (char *) p;
        n++;
    }

    json = stories_response_success(rejected, n, &len);
    if (json == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_stories_send_json(r, NGX_HTTP_OK, json, len);
}


/*
 * Responds to a CORS preflight request, so that analytics.js can post to
 * the endpoint from the pages of the configured origins.
 */

ngx_int_t
ngx_http_stories_preflight(ngx_http_request_t *r)
{
    ngx_int_t   rc;
    ngx_str_t  *origin, value;

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    origin = ngx_http_stories_allowed_origin(r);

    if (origin == NULL) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "stories: preflight from an origin that "
                      "stories_cors_origin does not allow");

        return ngx_http_stories_send_error(r, NGX_HTTP_FORBIDDEN,
                                           "origin not allowed");
    }

    if (ngx_http_stories_add_header(r, "Access-Control-Allow-Origin", origin)
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_str_set(&value, "POST, OPTIONS");

    if (ngx_http_stories_add_header(r, "Access-Control-Allow-Methods",
                                    &value)
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_str_set(&value, "Authorization, Content-Type, Content-Encoding, "
                        "X-Retry-Count");

    if (ngx_http_stories_add_header(r, "Access-Control-Allow-Headers",
                                    &value)
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_str_set(&value, "86400");

    if (ngx_http_stories_add_header(r, "Access-Control-Max-Age", &value)
        != NGX_OK)
    {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ngx_str_set(&value, "Origin");

    if (ngx_http_stories_add_header(r, "Vary", &value) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    r->headers_out.status = NGX_HTTP_NO_CONTENT;
    r->headers_out.content_length_n = 0;
    r->header_only = 1;

    rc = ngx_http_send_header(r);

    return rc == NGX_ERROR || rc > NGX_OK ? rc : NGX_OK;
}


ngx_int_t
ngx_http_stories_send_error(ngx_http_request_t *r, ngx_uint_t status,
    const char *error)
{
    char       *json;
    size_t      len;
    ngx_str_t   value;

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (status == NGX_HTTP_NOT_ALLOWED) {
        ngx_str_set(&value, "POST");

        if (ngx_http_stories_add_header(r, "Allow", &value) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    if (status == NGX_HTTP_UNAUTHORIZED) {
        ngx_str_set(&value, "Basic realm=\"stories\"");

        if (ngx_http_stories_add_header(r, "WWW-Authenticate", &value)
            != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    json = stories_response_error(error, &len);
    if (json == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    return ngx_http_stories_send_json(r, status, json, len);
}


/* Sends a JSON response and frees the malloc()ed json. */

static ngx_int_t
ngx_http_stories_send_json(ngx_http_request_t *r, ngx_uint_t status,
    char *json, size_t len)
{
    ngx_int_t     rc;
    ngx_buf_t    *b;
    ngx_str_t    *origin, vary;
    ngx_chain_t   out;

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        ngx_free(json);
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b->last = ngx_cpymem(b->last, json, len);
    b->last_buf = 1;
    b->last_in_chain = 1;

    ngx_free(json);

    origin = ngx_http_stories_allowed_origin(r);

    if (origin != NULL) {
        ngx_str_set(&vary, "Origin");

        if (ngx_http_stories_add_header(r, "Access-Control-Allow-Origin",
                                        origin)
            != NGX_OK
            || ngx_http_stories_add_header(r, "Vary", &vary) != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    r->headers_out.status = status;
    r->headers_out.content_type = ngx_http_stories_json;
    r->headers_out.content_type_len = ngx_http_stories_json.len;
    r->headers_out.content_type_lowcase = NULL;
    r->headers_out.content_length_n = len;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}


static ngx_int_t
ngx_http_stories_add_header(ngx_http_request_t *r, const char *key,
    ngx_str_t *value)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    h->key.data = (u_char *) key;
    h->key.len = ngx_strlen(key);
    h->value = *value;

    return NGX_OK;
}


/*
 * Returns the value for Access-Control-Allow-Origin when the request's
 * Origin is one that stories_cors_origin allows, or NULL.
 */

static ngx_str_t *
ngx_http_stories_allowed_origin(ngx_http_request_t *r)
{
    ngx_str_t                    *origin;
    ngx_uint_t                    i;
    ngx_table_elt_t              *h;
    ngx_http_stories_loc_conf_t  *slcf;

    slcf = ngx_http_get_module_loc_conf(r, ngx_http_stories_module);

    if (slcf->cors_origins == NULL) {
        return NULL;
    }

    h = ngx_http_stories_find_header(r, "Origin", sizeof("Origin") - 1);
    if (h == NULL) {
        return NULL;
    }

    origin = slcf->cors_origins->elts;

    for (i = 0; i < slcf->cors_origins->nelts; i++) {
        if (origin[i].len == 1 && origin[i].data[0] == '*') {
            return &origin[i];
        }

        /* the configured spelling goes back, never the client's bytes */

        if (origin[i].len == h->value.len
            && ngx_strncasecmp(origin[i].data, h->value.data,
                               h->value.len)
               == 0)
        {
            return &origin[i];
        }
    }

    return NULL;
}
