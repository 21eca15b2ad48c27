
/*
 * Copyright (C) The ngx_http_stories_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "stories_body.h"
#include "stories_segment.h"


/* What a Stories request came to, in the order a client should hear it. */
typedef enum {
    NGX_HTTP_STORIES_OK = 0,
    NGX_HTTP_STORIES_REJECTED,
    NGX_HTTP_STORIES_FAILED,
    NGX_HTTP_STORIES_UNREACHABLE,
    NGX_HTTP_STORIES_TIMED_OUT,
    NGX_HTTP_STORIES_RATE_LIMITED,
    NGX_HTTP_STORIES_KEY_REJECTED,
    NGX_HTTP_STORIES_INTERNAL
} ngx_http_stories_outcome_e;


typedef struct {
    ngx_str_t                    forward;
    ngx_str_t                    api_key;
    ngx_flag_t                   sync_users;
    ngx_int_t                    concurrency;
    ngx_array_t                 *write_keys;
    ngx_array_t                 *cors_origins;
    size_t                       max_message_size;
    size_t                       max_batch_size;
    ngx_int_t                    max_depth;
    ngx_open_file_t             *dead_letter;

    /* built from the above when the configuration is merged */
    ngx_str_t                    events_uri;
    ngx_str_t                    users_uri;
    ngx_str_t                    authorization;
} ngx_http_stories_loc_conf_t;


typedef struct ngx_http_stories_ctx_s  ngx_http_stories_ctx_t;


/* One Stories request and what became of it. */
typedef struct {
    ngx_http_stories_ctx_t      *ctx;
    stories_request_t           *request;
    ngx_uint_t                   status;
    ngx_str_t                    retry_after;
    ngx_http_stories_outcome_e   outcome;
    unsigned                     started:1;
    unsigned                     done:1;
    unsigned                     kept:1;
} ngx_http_stories_delivery_t;


struct ngx_http_stories_ctx_s {
    ngx_http_request_t           *request;
    ngx_http_stories_loc_conf_t  *conf;
    stories_call_e                call;
    stories_encoding_e            encoding;
    stories_result_t              result;
    ngx_http_stories_delivery_t  *deliveries;
    ngx_uint_t                    started;
    ngx_uint_t                    finished;
    ngx_uint_t                    active;
    ngx_int_t                     phase_rc;
    ngx_event_t                   free_event;
    unsigned                      front:1;
    unsigned                      detached:1;
    unsigned                      translated:1;
    unsigned                      responded:1;
};


static ngx_int_t ngx_http_stories_front_handler(ngx_http_request_t *r);
static void ngx_http_stories_front_body_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_stories_endpoint_handler(ngx_http_request_t *r);
static void ngx_http_stories_endpoint_body_handler(ngx_http_request_t *r);
static void ngx_http_stories_endpoint_wake(ngx_http_request_t *r);
static ngx_http_stories_ctx_t *ngx_http_stories_detach(ngx_http_request_t *r,
    ngx_http_stories_ctx_t *client_ctx);
static ngx_connection_t *ngx_http_stories_fake_connection(
    ngx_http_request_t *r, ngx_pool_t *pool);
static ngx_http_request_t *ngx_http_stories_fake_request(
    ngx_http_request_t *r, ngx_connection_t *c);
static void ngx_http_stories_detached_free(ngx_event_t *ev);
static ngx_int_t ngx_http_stories_check_headers(ngx_http_request_t *r,
    stories_encoding_e *encoding, const char **error);
static ngx_int_t ngx_http_stories_translate(ngx_http_request_t *r,
    ngx_http_stories_ctx_t *ctx);
static ngx_int_t ngx_http_stories_decode(ngx_http_request_t *r,
    ngx_http_stories_ctx_t *ctx, ngx_str_t *body, char **inflated);
static ngx_int_t ngx_http_stories_read_body(ngx_http_request_t *r,
    ngx_str_t *body);
static ngx_uint_t ngx_http_stories_authorized(ngx_http_request_t *r,
    ngx_http_stories_ctx_t *ctx);
static ngx_uint_t ngx_http_stories_key_matches(ngx_array_t *keys,
    u_char *candidate, size_t len);
static void ngx_http_stories_start(ngx_http_stories_ctx_t *ctx);
static ngx_int_t ngx_http_stories_subrequest(ngx_http_stories_ctx_t *ctx,
    ngx_http_stories_delivery_t *d);
static ngx_int_t ngx_http_stories_set_headers(ngx_http_request_t *sr,
    ngx_http_stories_loc_conf_t *slcf, size_t len);
static ngx_int_t ngx_http_stories_done(ngx_http_request_t *sr, void *data,
    ngx_int_t rc);
static void ngx_http_stories_classify(ngx_http_request_t *sr,
    ngx_http_stories_delivery_t *d, ngx_int_t rc);
static void ngx_http_stories_log_failure(ngx_log_t *log,
    ngx_http_stories_delivery_t *d);
static ngx_int_t ngx_http_stories_keep(ngx_http_stories_ctx_t *ctx,
    ngx_http_stories_delivery_t *d, const char *error);
static ngx_int_t ngx_http_stories_respond(ngx_http_request_t *r,
    ngx_http_stories_ctx_t *ctx);
static ngx_int_t ngx_http_stories_respond_success(ngx_http_request_t *r,
    ngx_http_stories_ctx_t *ctx);
static ngx_int_t ngx_http_stories_preflight(ngx_http_request_t *r);
static ngx_int_t ngx_http_stories_send_error(ngx_http_request_t *r,
    ngx_uint_t status, const char *error);
static ngx_int_t ngx_http_stories_send_json(ngx_http_request_t *r,
    ngx_uint_t status, char *json, size_t len);
static ngx_int_t ngx_http_stories_add_header(ngx_http_request_t *r,
    const char *key, ngx_str_t *value);
static ngx_str_t *ngx_http_stories_allowed_origin(ngx_http_request_t *r);
static ngx_table_elt_t *ngx_http_stories_find_header(ngx_http_request_t *r,
    const char *name, size_t len);
static void ngx_http_stories_log_notes(ngx_http_request_t *r,
    ngx_http_stories_ctx_t *ctx);
static ngx_http_stories_ctx_t *ngx_http_stories_get_ctx(ngx_http_request_t *r);
static ngx_http_stories_ctx_t *ngx_http_stories_create_ctx(
    ngx_http_request_t *r, stories_call_e call);
static void ngx_http_stories_cleanup(void *data);
static void *ngx_http_stories_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_stories_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static char *ngx_http_stories_forward(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_stories_api_key_file(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_stories_write_key(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_stories_write_keys_file(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_stories_dead_letter(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_stories_read_conf_file(ngx_conf_t *cf,
    ngx_str_t *name, ngx_str_t *content);
static ngx_int_t ngx_http_stories_concat(ngx_conf_t *cf, ngx_str_t *dst,
    ngx_str_t *prefix, ngx_str_t *suffix);
static ngx_int_t ngx_http_stories_init(ngx_conf_t *cf);


static ngx_conf_num_bounds_t  ngx_http_stories_concurrency_bounds = {
    ngx_conf_check_num_bounds, 1, 1000
};


static ngx_conf_num_bounds_t  ngx_http_stories_depth_bounds = {
    ngx_conf_check_num_bounds, 1, 1000
};


static ngx_command_t  ngx_http_stories_commands[] = {

    { ngx_string("stories_forward"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_stories_forward,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("stories_api_key"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_stories_loc_conf_t, api_key),
      NULL },

    { ngx_string("stories_api_key_file"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_stories_api_key_file,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("stories_sync_users"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_stories_loc_conf_t, sync_users),
      NULL },

    { ngx_string("stories_concurrency"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_stories_loc_conf_t, concurrency),
      &ngx_http_stories_concurrency_bounds },

    { ngx_string("stories_write_key"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_stories_write_key,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("stories_write_keys_file"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_stories_write_keys_file,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("stories_max_message_size"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_stories_loc_conf_t, max_message_size),
      NULL },

    { ngx_string("stories_max_batch_size"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_stories_loc_conf_t, max_batch_size),
      NULL },

    { ngx_string("stories_max_depth"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_stories_loc_conf_t, max_depth),
      &ngx_http_stories_depth_bounds },

    { ngx_string("stories_cors_origin"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_array_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_stories_loc_conf_t, cors_origins),
      NULL },

    { ngx_string("stories_dead_letter"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_stories_dead_letter,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_stories_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_stories_init,                 /* postconfiguration */

    NULL,                                  /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_stories_create_loc_conf,      /* create location configuration */
    ngx_http_stories_merge_loc_conf        /* merge location configuration */
};


ngx_module_t  ngx_http_stories_module = {
    NGX_MODULE_V1,
    &ngx_http_stories_module_ctx,          /* module context */
    ngx_http_stories_commands,             /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    NULL,                                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_str_t  ngx_http_stories_post = ngx_string("POST");
static ngx_str_t  ngx_http_stories_json = ngx_string("application/json");


/*
 * In a location with a content handler of its own, the module reads the
 * body, sends the Stories requests in the background and lets the request
 * go on to that handler unchanged.
 */

static ngx_int_t
ngx_http_stories_front_handler(ngx_http_request_t *r)
{
    int                           under_v1;
    ngx_int_t                     rc;
    const char                   *error;
    stories_call_e                call;
    stories_encoding_e            encoding;
    ngx_http_stories_ctx_t       *ctx;
    ngx_http_core_loc_conf_t     *clcf;
    ngx_http_stories_loc_conf_t  *slcf;

    if (r != r->main || r->content_handler == NULL) {
        return NGX_DECLINED;
    }

    slcf = ngx_http_get_module_loc_conf(r, ngx_http_stories_module);
    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    if (slcf->forward.len == 0 || clcf->internal) {
        return NGX_DECLINED;
    }

    if (r->method != NGX_HTTP_POST) {
        return NGX_DECLINED;
    }

    call = stories_call_from_path((char *) r->uri.data, r->uri.len,
                                  &under_v1);
    if (call == STORIES_CALL_NONE) {
        return NGX_DECLINED;
    }

    ctx = ngx_http_stories_get_ctx(r);

    if (ctx != NULL) {
        return ctx->front ? ctx->phase_rc : NGX_DECLINED;
    }

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "stories front handler");

    if (ngx_http_stories_check_headers(r, &encoding, &error) != NGX_OK) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "stories: %s call not forwarded: %s",
                      stories_call_name(call), error);
        return NGX_DECLINED;
    }

    ctx = ngx_http_stories_create_ctx(r, call);
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->front = 1;
    ctx->encoding = encoding;
    ctx->phase_rc = NGX_DONE;

    rc = ngx_http_read_client_request_body(r,
                                         ngx_http_stories_front_body_handler);
    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    ngx_http_finalize_request(r, NGX_DONE);
    return NGX_DONE;
}


static void
ngx_http_stories_front_body_handler(ngx_http_request_t *r)
{
    ngx_http_stories_ctx_t  *ctx, *dctx;

    ctx = ngx_http_stories_get_ctx(r);

    dctx = ngx_http_stories_detach(r, ctx);

    if (dctx == NULL) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "stories: %s call not forwarded: failed to create "
                      "the request that sends it",
                      stories_call_name(ctx->call));

    } else if (ngx_http_stories_translate(r, dctx) != NGX_OK
               || dctx->result.status != 0
               || dctx->result.nrequests == 0)
    {
        if (dctx->result.status != 0) {
            ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                          "stories: %s call not forwarded: %s",
                          stories_call_name(ctx->call), dctx->result.error);

        } else {
            ngx_http_stories_log_notes(r, dctx);
        }

        ngx_http_stories_detached_free(&dctx->free_event);

    } else {
        ngx_http_stories_log_notes(r, dctx);
        ngx_http_stories_start(dctx);

        /* subrequests of the detached request are posted to it alone */

        ngx_http_run_posted_requests(dctx->request->connection);
    }

    /* the request goes on to its own handler whatever happened above */

    ctx->phase_rc = NGX_DECLINED;

    r->write_event_handler = ngx_http_core_run_phases;
    ngx_http_core_run_phases(r);
}


/*
 * Creates a request of the module's own, on a connection without a
 * socket, to be the parent of the Stories subrequests in front of an
 * existing endpoint.  The client's request then ends, and frees its
 * keepalive connection, without waiting for Stories, and a client that
 * goes away does not cancel the delivery.
 */

static ngx_http_stories_ctx_t *
ngx_http_stories_detach(ngx_http_request_t *r,
    ngx_http_stories_ctx_t *client_ctx)
{
    ngx_pool_t              *pool;
    ngx_connection_t        *c;
    ngx_http_request_t      *fr;
    ngx_pool_cleanup_t      *cln;
    ngx_http_stories_ctx_t  *ctx;

    pool = ngx_create_pool(NGX_DEFAULT_POOL_SIZE, r->connection->log);
    if (pool == NULL) {
        return NULL;
    }

    c = ngx_http_stories_fake_connection(r, pool);
    if (c == NULL) {
        goto failed;
    }

    fr = ngx_http_stories_fake_request(r, c);
    if (fr == NULL) {
        goto failed;
    }

    ctx = ngx_pcalloc(pool, sizeof(ngx_http_stories_ctx_t));
    if (ctx == NULL) {
        goto failed;
    }

    cln = ngx_pool_cleanup_add(pool, 0);
    if (cln == NULL) {
        goto failed;
    }

    ctx->request = fr;
    ctx->conf = client_ctx->conf;
    ctx->call = client_ctx->call;
    ctx->encoding = client_ctx->encoding;
    ctx->front = 1;
    ctx->detached = 1;

    ctx->free_event.handler = ngx_http_stories_detached_free;
    ctx->free_event.data = ctx;
    ctx->free_event.log = c->log;

    cln->handler = ngx_http_stories_cleanup;
    cln->data = ctx;

    ngx_http_set_ctx(fr, ctx, ngx_http_stories_module);

    return ctx;

failed:

    ngx_destroy_pool(pool);
    return NULL;
}


static ngx_connection_t *
ngx_http_stories_fake_connection(ngx_http_request_t *r, ngx_pool_t *pool)
{
    ngx_log_t           *log;
    ngx_connection_t    *c, *client;
    ngx_http_log_ctx_t  *lctx;

    client = r->connection;

    c = ngx_pcalloc(pool, sizeof(ngx_connection_t));
    if (c == NULL) {
        return NULL;
    }

    log = ngx_palloc(pool, sizeof(ngx_log_t));
    lctx = ngx_pcalloc(pool, sizeof(ngx_http_log_ctx_t));
    c->read = ngx_pcalloc(pool, sizeof(ngx_event_t));
    c->write = ngx_pcalloc(pool, sizeof(ngx_event_t));

    if (log == NULL || lctx == NULL || c->read == NULL || c->write == NULL) {
        return NULL;
    }

    /* log lines keep the client's connection number and address */

    *log = *client->log;
    log->data = lctx;
    log->action = "sending to Stories";
    lctx->connection = c;

    c->fd = (ngx_socket_t) -1;
    c->pool = pool;
    c->log = log;
    c->number = client->number;
    c->listening = client->listening;
    c->read->data = c;
    c->read->log = log;
    c->write->data = c;
    c->write->log = log;

    /* with no socket, marking both events active keeps epoll away */

    c->read->active = 1;
    c->write->active = 1;

    c->addr_text.data = ngx_pstrdup(pool, &client->addr_text);
    c->addr_text.len = client->addr_text.len;

    c->sockaddr = ngx_palloc(pool, client->socklen);
    c->local_sockaddr = ngx_palloc(pool, client->local_socklen);

    if (c->addr_text.data == NULL || c->sockaddr == NULL
        || c->local_sockaddr == NULL)
    {
        return NULL;
    }

    ngx_memcpy(c->sockaddr, client->sockaddr, client->socklen);
    c->socklen = client->socklen;
    ngx_memcpy(c->local_sockaddr, client->local_sockaddr,
               client->local_socklen);
    c->local_socklen = client->local_socklen;

    return c;
}


static ngx_http_request_t *
ngx_http_stories_fake_request(ngx_http_request_t *r, ngx_connection_t *c)
{
    ngx_time_t                 *tp;
    ngx_http_request_t         *fr;
    ngx_http_log_ctx_t         *lctx;
    ngx_http_core_main_conf_t  *cmcf;

    fr = ngx_pcalloc(c->pool, sizeof(ngx_http_request_t));
    if (fr == NULL) {
        return NULL;
    }

    cmcf = ngx_http_get_module_main_conf(r, ngx_http_core_module);

    fr->ctx = ngx_pcalloc(c->pool, sizeof(void *) * ngx_http_max_module);
    fr->variables = ngx_pcalloc(c->pool, cmcf->variables.nelts
                                         * sizeof(ngx_http_variable_value_t));
    fr->request_line.data = ngx_pstrdup(c->pool, &r->request_line);
    fr->uri.data = ngx_pstrdup(c->pool, &r->uri);

    if (fr->ctx == NULL || fr->variables == NULL
        || fr->request_line.data == NULL || fr->uri.data == NULL)
    {
        return NULL;
    }

    if (ngx_list_init(&fr->headers_in.headers, c->pool, 1,
                      sizeof(ngx_table_elt_t))
        != NGX_OK
        || ngx_list_init(&fr->headers_out.headers, c->pool, 1,
                         sizeof(ngx_table_elt_t))
           != NGX_OK
        || ngx_list_init(&fr->headers_out.trailers, c->pool, 1,
                         sizeof(ngx_table_elt_t))
           != NGX_OK)
    {
        return NULL;
    }

    fr->pool = c->pool;
    fr->connection = c;
    fr->signature = NGX_HTTP_MODULE;
    fr->main = fr;
    fr->count = 1;
    fr->main_conf = r->main_conf;
    fr->srv_conf = r->srv_conf;
    fr->loc_conf = r->loc_conf;
    fr->log_handler = r->log_handler;
    fr->read_event_handler = ngx_http_block_reading;
    fr->write_event_handler = ngx_http_request_empty_handler;

    fr->method = NGX_HTTP_POST;
    fr->method_name = ngx_http_stories_post;
    fr->http_version = NGX_HTTP_VERSION_11;
    fr->http_protocol = r->http_protocol;
    fr->request_line.len = r->request_line.len;
    fr->uri.len = r->uri.len;
    fr->unparsed_uri = fr->uri;
    fr->headers_in.content_length_n = -1;
    fr->headers_in.keep_alive_n = -1;
    fr->headers_out.content_length_n = -1;
    fr->subrequests = NGX_HTTP_MAX_SUBREQUESTS + 1;
    fr->internal = 1;

    /* the client's request has its own access log line */

    fr->logged = 1;

    tp = ngx_timeofday();
    fr->start_sec = tp->sec;
    fr->start_msec = tp->msec;

    lctx = c->log->data;
    lctx->request = fr;
    lctx->current_request = fr;

    c->data = fr;

    return fr;
}


/*
 * Frees the detached request once its last subrequest has ended.  It runs
 * as a posted event, after the subrequest's own finalization has let go
 * of the request.
 */

static void
ngx_http_stories_detached_free(ngx_event_t *ev)
{
    ngx_http_stories_ctx_t  *ctx = ev->data;

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, ev->log, 0, "stories detached free");

    ngx_http_free_request(ctx->request, 0);
}


/*
 * In a location without a content handler, the module is the Segment
 * endpoint.  It sends the client's response once every Stories request
 * has ended.
 */

static ngx_int_t
ngx_http_stories_endpoint_handler(ngx_http_request_t *r)
{
    int                           under_v1;
    ngx_int_t                     rc;
    const char                   *error;
    stories_call_e                call;
    stories_encoding_e            encoding;
    ngx_http_stories_ctx_t       *ctx;
    ngx_http_stories_loc_conf_t  *slcf;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    slcf = ngx_http_get_module_loc_conf(r, ngx_http_stories_module);

    if (slcf->forward.len == 0) {
        return NGX_DECLINED;
    }

    call = stories_call_from_path((char *) r->uri.data, r->uri.len,
                                  &under_v1);

    if (call == STORIES_CALL_NONE) {
        if (under_v1 && r->method == NGX_HTTP_POST) {
            return ngx_http_stories_send_error(r, NGX_HTTP_BAD_REQUEST,
                       "unknown call; expected identify, track, page, "
                       "screen, group, alias or batch");
        }

        return NGX_DECLINED;
    }

    if (ngx_http_stories_get_ctx(r) != NULL) {
        return NGX_DECLINED;
    }

    if (r->method == NGX_HTTP_OPTIONS && slcf->cors_origins != NULL) {
        return ngx_http_stories_preflight(r);
    }

    if (r->method != NGX_HTTP_POST) {
        return ngx_http_stories_send_error(r, NGX_HTTP_NOT_ALLOWED,
                                           "method not allowed; use POST");
    }

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "stories endpoint handler");

    if (ngx_http_stories_check_headers(r, &encoding, &error) != NGX_OK) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "stories: %s call rejected: %s",
                      stories_call_name(call), error);

        return ngx_http_stories_send_error(r,
                                          NGX_HTTP_UNSUPPORTED_MEDIA_TYPE,
                                          error);
    }

    ctx = ngx_http_stories_create_ctx(r, call);
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->encoding = encoding;

    rc = ngx_http_read_client_request_body(r,
                                      ngx_http_stories_endpoint_body_handler);
    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    return NGX_DONE;
}


static void
ngx_http_stories_endpoint_body_handler(ngx_http_request_t *r)
{
    ngx_http_stories_ctx_t  *ctx;

    ctx = ngx_http_stories_get_ctx(r);

    if (ngx_http_stories_translate(r, ctx) != NGX_OK) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    if (ctx->result.status != 0) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "stories: %s call rejected: %s",
                      stories_call_name(ctx->call), ctx->result.error);

        ngx_http_finalize_request(r,
            ngx_http_stories_send_error(r, ctx->result.status,
                                        ctx->result.error));
        return;
    }

    ngx_http_stories_log_notes(r, ctx);

    r->write_event_handler = ngx_http_stories_endpoint_wake;

    ngx_http_stories_start(ctx);

    if (ctx->finished == ctx->result.nrequests) {
        ctx->responded = 1;
        ngx_http_finalize_request(r, ngx_http_stories_respond(r, ctx));
    }
}


/*
 * Runs as the main request's write handler: the post-subrequest handler
 * posts the main request each time a Stories request ends.
 */

static void
ngx_http_stories_endpoint_wake(ngx_http_request_t *r)
{
    ngx_http_stories_ctx_t  *ctx;

    ctx = ngx_http_stories_get_ctx(r);

    if (ctx == NULL || ctx->responded
        || ctx->finished < ctx->result.nrequests)
    {
        return;
    }

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                   "stories endpoint respond");

    ctx->responded = 1;
    ngx_http_finalize_request(r, ngx_http_stories_respond(r, ctx));
}


/*
 * Checks the Content-Type and Content-Encoding before the body is read.
 * Returns NGX_DECLINED with the reason in *error for a body the module
 * cannot read.
 */

static ngx_int_t
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

static ngx_int_t
ngx_http_stories_translate(ngx_http_request_t *r, ngx_http_stories_ctx_t *ctx)
{
    char                         *inflated;
    ngx_int_t                     rc;
    ngx_str_t                     body;
    ngx_uint_t                    i;
    stories_options_t             options;
    ngx_http_stories_loc_conf_t  *slcf;

    slcf = ctx->conf;

    if (ngx_http_stories_read_body(r, &body) != NGX_OK) {
        return NGX_ERROR;
    }

    inflated = NULL;

    rc = ngx_http_stories_decode(r, ctx, &body, &inflated);

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


/*
 * Returns the whole request body as one string, whether nginx kept it in
 * memory buffers or wrote it to a temporary file.
 */

static ngx_int_t
ngx_http_stories_read_body(ngx_http_request_t *r, ngx_str_t *body)
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

    /* a chunked body can end with an empty buffer that is neither */

    cl = r->request_body->bufs;

    if (cl->next == NULL && !cl->buf->in_file) {
        body->data = cl->buf->pos;
        body->len = cl->buf->last - cl->buf->pos;
        return NGX_OK;
    }

    len = 0;

    for (cl = r->request_body->bufs; cl; cl = cl->next) {
        b = cl->buf;
        len += b->in_file ? b->file_last - b->file_pos : b->last - b->pos;
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


/* Starts Stories requests until stories_concurrency of them are running. */

static void
ngx_http_stories_start(ngx_http_stories_ctx_t *ctx)
{
    ngx_http_stories_delivery_t  *d;

    while (ctx->started < ctx->result.nrequests
           && ctx->active < (ngx_uint_t) ctx->conf->concurrency)
    {
        d = &ctx->deliveries[ctx->started++];
        d->started = 1;

        if (ngx_http_stories_subrequest(ctx, d) == NGX_OK) {
            ctx->active++;
            continue;
        }

        d->done = 1;
        d->outcome = NGX_HTTP_STORIES_INTERNAL;
        ctx->finished++;

        ngx_log_error(NGX_LOG_ERR, ctx->request->connection->log, 0,
                      "stories: failed to start the request to \"%s\" "
                      "for a %s call",
                      d->request->path, stories_call_name(d->request->type));
    }
}


static ngx_int_t
ngx_http_stories_subrequest(ngx_http_stories_ctx_t *ctx,
    ngx_http_stories_delivery_t *d)
{
    ngx_buf_t                    *b;
    ngx_str_t                    *uri;
    ngx_chain_t                  *cl;
    ngx_http_request_t           *r, *sr;
    ngx_http_request_body_t      *rb;
    ngx_http_post_subrequest_t   *ps;

    r = ctx->request;

    ps = ngx_palloc(r->pool, sizeof(ngx_http_post_subrequest_t));
    if (ps == NULL) {
        return NGX_ERROR;
    }

    ps->handler = ngx_http_stories_done;
    ps->data = d;

    uri = ngx_strcmp(d->request->path, STORIES_EVENTS_PATH) == 0
          ? &ctx->conf->events_uri : &ctx->conf->users_uri;

    /*
     * Background subrequests run in parallel and write nothing to the
     * client.  Their response bodies are read into memory, so that the
     * upstream connection to Stories can be kept alive.
     */

    if (ngx_http_subrequest(r, uri, NULL, &sr, ps,
                            NGX_HTTP_SUBREQUEST_BACKGROUND
                            |NGX_HTTP_SUBREQUEST_IN_MEMORY)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    sr->method = NGX_HTTP_POST;
    sr->method_name = ngx_http_stories_post;

    rb = ngx_pcalloc(r->pool, sizeof(ngx_http_request_body_t));
    if (rb == NULL) {
        return NGX_ERROR;
    }

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    /* start is set too: the upstream rewinds to it when it retries */

    b->start = (u_char *) d->request->body;
    b->pos = b->start;
    b->last = b->start + d->request->body_len;
    b->end = b->last;
    b->memory = 1;
    b->last_buf = 1;
    b->last_in_chain = 1;

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = b;
    cl->next = NULL;

    rb->bufs = cl;
    sr->request_body = rb;

    return ngx_http_stories_set_headers(sr, ctx->conf, d->request->body_len);
}


/*
 * Replaces the headers that the subrequest copied from the client with
 * the two Stories needs, so that no cookie or client credential reaches it.
 */

static ngx_int_t
ngx_http_stories_set_headers(ngx_http_request_t *sr,
    ngx_http_stories_loc_conf_t *slcf, size_t len)
{
    ngx_table_elt_t  *h;

    ngx_memzero(&sr->headers_in, sizeof(ngx_http_headers_in_t));

    if (ngx_list_init(&sr->headers_in.headers, sr->pool, 2,
                      sizeof(ngx_table_elt_t))
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    sr->headers_in.content_length_n = len;
    sr->headers_in.keep_alive_n = -1;

    h = ngx_list_push(&sr->headers_in.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Authorization");
    h->value = slcf->authorization;
    h->lowcase_key = (u_char *) "authorization";

    sr->headers_in.authorization = h;

    h = ngx_list_push(&sr->headers_in.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Content-Type");
    h->value = ngx_http_stories_json;
    h->lowcase_key = (u_char *) "content-type";

    sr->headers_in.content_type = h;

    return NGX_OK;
}


/*
 * The post-subrequest handler.  It returns NGX_OK whatever rc is: an
 * NGX_ERROR here would terminate the client's request together with
 * every other Stories request still running.
 */

static ngx_int_t
ngx_http_stories_done(ngx_http_request_t *sr, void *data, ngx_int_t rc)
{
    ngx_http_stories_delivery_t  *d = data;

    ngx_http_stories_ctx_t  *ctx;

    if (d->done) {
        return NGX_OK;
    }

    ctx = d->ctx;

    d->done = 1;
    ctx->finished++;
    ctx->active--;

    ngx_http_stories_classify(sr, d, rc);

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, sr->connection->log, 0,
                   "stories request done rc:%i s:%ui outcome:%d",
                   rc, d->status, d->outcome);

    if (d->outcome != NGX_HTTP_STORIES_OK) {
        ngx_http_stories_log_failure(sr->connection->log, d);

        if (ctx->conf->dead_letter != NULL
            && ngx_http_stories_keep(ctx, d, NULL) == NGX_OK)
        {
            d->kept = 1;
        }
    }

    ngx_http_stories_start(ctx);

    if (ctx->detached) {
        if (ctx->finished == ctx->result.nrequests
            && !ctx->free_event.posted)
        {
            ngx_post_event(&ctx->free_event, &ngx_posted_events);
        }

        return NGX_OK;
    }

    if (!ctx->front && ngx_http_post_request(ctx->request, NULL) != NGX_OK) {
        return NGX_ERROR;
    }

    return NGX_OK;
}


static void
ngx_http_stories_classify(ngx_http_request_t *sr,
    ngx_http_stories_delivery_t *d, ngx_int_t rc)
{
    ngx_uint_t        i, status;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    if (sr->upstream == NULL || sr->upstream->headers_in.status_n == 0) {

        /* Stories sent no status line: nginx failed the request itself */

        d->status = sr->headers_out.status;

        if (rc == NGX_HTTP_GATEWAY_TIME_OUT) {
            d->outcome = NGX_HTTP_STORIES_TIMED_OUT;

        } else if (sr->upstream != NULL
                   && (rc == NGX_ERROR || rc == NGX_HTTP_BAD_GATEWAY))
        {
            d->outcome = NGX_HTTP_STORIES_UNREACHABLE;

        } else if (d->status >= 200 && d->status < 300) {
            d->outcome = NGX_HTTP_STORIES_OK;

        } else {
            if (d->status == 0 && rc >= NGX_HTTP_SPECIAL_RESPONSE) {
                d->status = rc;
            }

            d->outcome = NGX_HTTP_STORIES_INTERNAL;
        }

        return;
    }

    status = sr->upstream->headers_in.status_n;
    d->status = status;

    if (status >= 200 && status < 300) {
        d->outcome = NGX_HTTP_STORIES_OK;

    } else if (status == NGX_HTTP_UNAUTHORIZED
               || status == NGX_HTTP_FORBIDDEN)
    {
        d->outcome = NGX_HTTP_STORIES_KEY_REJECTED;

    } else if (status == NGX_HTTP_TOO_MANY_REQUESTS) {
        d->outcome = NGX_HTTP_STORIES_RATE_LIMITED;

    } else if (status == NGX_HTTP_REQUEST_TIME_OUT) {
        d->outcome = NGX_HTTP_STORIES_TIMED_OUT;

    } else if (status >= 400 && status < 500) {
        d->outcome = NGX_HTTP_STORIES_REJECTED;

    } else {
        d->outcome = NGX_HTTP_STORIES_FAILED;
    }

    if (d->outcome != NGX_HTTP_STORIES_RATE_LIMITED) {
        return;
    }

    part = &sr->upstream->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].hash != 0
            && h[i].key.len == sizeof("Retry-After") - 1
            && ngx_strncasecmp(h[i].key.data, (u_char *) "Retry-After",
                               sizeof("Retry-After") - 1)
               == 0)
        {
            d->retry_after = h[i].value;
            break;
        }
    }
}


static void
ngx_http_stories_log_failure(ngx_log_t *log, ngx_http_stories_delivery_t *d)
{
    const char         *call, *id, *quote;
    stories_request_t  *request;

    request = d->request;
    call = stories_call_name(request->type);

    /* the message id was reduced to printable ASCII by the core */

    id = request->message_id != NULL ? request->message_id : "";
    quote = request->message_id != NULL ? "\"" : "";

    switch (d->outcome) {

    case NGX_HTTP_STORIES_KEY_REJECTED:
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "stories API key rejected with status %ui, "
                      "check stories_api_key", d->status);
        return;

    case NGX_HTTP_STORIES_TIMED_OUT:
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "stories request to \"%s\" timed out, %s call, "
                      "messageId %s%s%s",
                      request->path, call, quote, id[0] ? id : "none", quote);
        return;

    case NGX_HTTP_STORIES_UNREACHABLE:
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "stories request to \"%s\" failed: Stories is "
                      "unreachable, %s call, messageId %s%s%s",
                      request->path, call, quote, id[0] ? id : "none", quote);
        return;

    case NGX_HTTP_STORIES_INTERNAL:
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "stories request to \"%s\" failed with status %ui "
                      "before reaching Stories, check the location that "
                      "stories_forward names, %s call, messageId %s%s%s",
                      request->path, d->status, call, quote,
                      id[0] ? id : "none", quote);
        return;

    default:
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "stories request to \"%s\" failed with status %ui, "
                      "%s call, messageId %s%s%s",
                      request->path, d->status, call, quote,
                      id[0] ? id : "none", quote);
        return;
    }
}


/*
 * Appends a failed Stories request to the dead-letter file as one JSON
 * line, with the body last and byte for byte, so that stories-replay can
 * send it again.  A single write() to a file opened with O_APPEND keeps
 * lines of different workers whole.
 */

static ngx_int_t
ngx_http_stories_keep(ngx_http_stories_ctx_t *ctx,
    ngx_http_stories_delivery_t *d, const char *error)
{
    u_char             *line, *p;
    size_t              len;
    ssize_t             n;
    ngx_tm_t            tm;
    ngx_log_t          *log;
    ngx_open_file_t    *file;
    stories_request_t  *request;

    static const char  *errors[] = {
        "delivered",
        "Stories rejected the request",
        "Stories failed",
        "Stories is unreachable",
        "Stories timed out",
        "Stories rate limit reached",
        "Stories rejected the API key",
        "failed before reaching Stories"
    };

    file = ctx->conf->dead_letter;
    request = d->request;
    log = ctx->request->connection->log;

    if (error == NULL) {
        error = errors[d->outcome];
    }

    len = sizeof("{\"time\":\"1970-01-01T00:00:00Z\",\"path\":\"\","
                 "\"status\":,\"error\":\"\",\"messageId\":\"\","
                 "\"body\":}\n")
          + ngx_strlen(request->path) + NGX_INT_T_LEN + ngx_strlen(error)
          + (request->message_id ? ngx_strlen(request->message_id) : 4)
          + request->body_len;

    line = ngx_pnalloc(ctx->request->pool, len);
    if (line == NULL) {
        return NGX_ERROR;
    }

    ngx_gmtime(ngx_time(), &tm);

    /* the message id and the error contain no quote or backslash */

    p = ngx_sprintf(line, "{\"time\":\"%4d-%02d-%02dT%02d:%02d:%02dZ\","
                          "\"path\":\"%s\",\"status\":%ui,"
                          "\"error\":\"%s\",\"messageId\":",
                    tm.ngx_tm_year, tm.ngx_tm_mon, tm.ngx_tm_mday,
                    tm.ngx_tm_hour, tm.ngx_tm_min, tm.ngx_tm_sec,
                    request->path, d->status, error);

    if (request->message_id != NULL) {
        p = ngx_sprintf(p, "\"%s\"", request->message_id);

    } else {
        p = ngx_cpymem(p, "null", 4);
    }

    p = ngx_cpymem(p, ",\"body\":", sizeof(",\"body\":") - 1);
    p = ngx_cpymem(p, request->body, request->body_len);
    *p++ = '}';
    *p++ = LF;

    n = ngx_write_fd(file->fd, line, p - line);

    if (n != p - line) {
        ngx_log_error(NGX_LOG_ALERT, log, ngx_errno,
                      ngx_write_fd_n " to dead-letter file \"%s\" failed, "
                      "a %s call to \"%s\" is lost",
                      file->name.data, stories_call_name(request->type),
                      request->path);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* Builds the client's response from the outcomes of its Stories requests. */

static ngx_int_t
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


static ngx_int_t
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


/*
 * Responds to a CORS preflight request, so that analytics.js can post to
 * the endpoint from the pages of the configured origins.
 */

static ngx_int_t
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

        if (origin[i].len == h->value.len
            && ngx_strncasecmp(origin[i].data, h->value.data,
                               h->value.len)
               == 0)
        {
            return &h->value;
        }
    }

    return NULL;
}


static ngx_table_elt_t *
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


/* Logs each valid message that Stories cannot take, with the reason. */

static void
ngx_http_stories_log_notes(ngx_http_request_t *r, ngx_http_stories_ctx_t *ctx)
{
    ngx_uint_t       i;
    stories_note_t  *note;

    for (i = 0; i < ctx->result.nskipped; i++) {
        note = &ctx->result.skipped[i];

        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "stories: %s message %uz not forwarded: %s",
                      stories_call_name(note->type), note->index,
                      note->reason);
    }

    for (i = 0; i < ctx->result.ninvalid; i++) {
        note = &ctx->result.invalid[i];

        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "stories: invalid batch message %uz skipped: %s",
                      note->index, note->reason);
    }
}


/*
 * The context is also found through the pool cleanup, because an internal
 * redirect clears the module contexts.  So a call is never sent twice.
 */

static ngx_http_stories_ctx_t *
ngx_http_stories_get_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t      *cln;
    ngx_http_stories_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_stories_module);

    if (ctx != NULL) {
        return ctx;
    }

    for (cln = r->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_http_stories_cleanup) {
            ctx = cln->data;

            if (ctx->request == r) {
                ngx_http_set_ctx(r, ctx, ngx_http_stories_module);
                return ctx;
            }
        }
    }

    return NULL;
}


static ngx_http_stories_ctx_t *
ngx_http_stories_create_ctx(ngx_http_request_t *r, stories_call_e call)
{
    ngx_pool_cleanup_t      *cln;
    ngx_http_stories_ctx_t  *ctx;

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_stories_ctx_t));
    if (ctx == NULL) {
        return NULL;
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NULL;
    }

    ctx->request = r;
    ctx->conf = ngx_http_get_module_loc_conf(r, ngx_http_stories_module);
    ctx->call = call;

    cln->handler = ngx_http_stories_cleanup;
    cln->data = ctx;

    ngx_http_set_ctx(r, ctx, ngx_http_stories_module);

    return ctx;
}


/*
 * Frees the translation.  A Stories request that never finished means
 * that nginx ended the client's request early, for example on a lost
 * client connection or a fast shutdown.  Such an event is logged and
 * written to the dead-letter file.
 */

static void
ngx_http_stories_cleanup(void *data)
{
    ngx_http_stories_ctx_t  *ctx = data;

    ngx_uint_t                    i;
    ngx_http_stories_delivery_t  *d;

    for (i = 0; ctx->deliveries != NULL && i < ctx->result.nrequests; i++) {
        d = &ctx->deliveries[i];

        if (d->done) {
            continue;
        }

        ngx_log_error(NGX_LOG_ERR, ctx->request->connection->log, 0,
                      "stories request to \"%s\" for a %s call was not "
                      "delivered: the client request ended first, "
                      "messageId \"%s\"",
                      d->request->path, stories_call_name(d->request->type),
                      d->request->message_id ? d->request->message_id
                                             : "none");

        if (ctx->conf->dead_letter != NULL) {
            (void) ngx_http_stories_keep(ctx, d,
                                      "the client request ended first");
        }
    }

    stories_result_free(&ctx->result);
}


static void *
ngx_http_stories_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_stories_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_stories_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     conf->forward = { 0, NULL };
     *     conf->api_key = { 0, NULL };
     *     conf->events_uri = { 0, NULL };
     *     conf->users_uri = { 0, NULL };
     *     conf->authorization = { 0, NULL };
     */

    conf->sync_users = NGX_CONF_UNSET;
    conf->concurrency = NGX_CONF_UNSET;
    conf->write_keys = NGX_CONF_UNSET_PTR;
    conf->cors_origins = NGX_CONF_UNSET_PTR;
    conf->max_message_size = NGX_CONF_UNSET_SIZE;
    conf->max_batch_size = NGX_CONF_UNSET_SIZE;
    conf->max_depth = NGX_CONF_UNSET;
    conf->dead_letter = NGX_CONF_UNSET_PTR;

    return conf;
}


static char *
ngx_http_stories_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_stories_loc_conf_t *prev = parent;
    ngx_http_stories_loc_conf_t *conf = child;

    ngx_str_t   bearer, events, users;
    ngx_uint_t  i;

    ngx_conf_merge_str_value(conf->forward, prev->forward, "");
    ngx_conf_merge_str_value(conf->api_key, prev->api_key, "");
    ngx_conf_merge_value(conf->sync_users, prev->sync_users, 0);
    ngx_conf_merge_value(conf->concurrency, prev->concurrency, 8);
    ngx_conf_merge_ptr_value(conf->write_keys, prev->write_keys, NULL);
    ngx_conf_merge_ptr_value(conf->cors_origins, prev->cors_origins, NULL);
    ngx_conf_merge_size_value(conf->max_message_size,
                              prev->max_message_size, 32 * 1024);
    ngx_conf_merge_size_value(conf->max_batch_size,
                              prev->max_batch_size, 500 * 1024);
    ngx_conf_merge_value(conf->max_depth, prev->max_depth, 64);
    ngx_conf_merge_ptr_value(conf->dead_letter, prev->dead_letter, NULL);

    if (conf->forward.len == 0) {
        return NGX_CONF_OK;
    }

    if (conf->api_key.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"stories_forward\" requires \"stories_api_key\"");
        return NGX_CONF_ERROR;
    }

    for (i = 0; i < conf->api_key.len; i++) {
        if (conf->api_key.data[i] <= ' ' || conf->api_key.data[i] == 0x7f) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid \"stories_api_key\": the key "
                               "contains a space or a control character");
            return NGX_CONF_ERROR;
        }
    }

    ngx_str_set(&bearer, "Bearer ");
    ngx_str_set(&events, STORIES_EVENTS_PATH);
    ngx_str_set(&users, STORIES_USERS_PATH);

    if (ngx_http_stories_concat(cf, &conf->events_uri, &conf->forward,
                                &events)
        != NGX_OK
        || ngx_http_stories_concat(cf, &conf->users_uri, &conf->forward,
                                   &users)
           != NGX_OK
        || ngx_http_stories_concat(cf, &conf->authorization, &bearer,
                                   &conf->api_key)
           != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_stories_forward(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_stories_loc_conf_t *slcf = conf;

    ngx_str_t  *value;

    if (slcf->forward.data != NULL) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0) {
        ngx_str_set(&slcf->forward, "");
        return NGX_CONF_OK;
    }

    if (value[1].data[0] != '/') {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid URI \"%V\" in \"stories_forward\": "
                           "it must start with \"/\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    slcf->forward = value[1];

    /* URI/v1/events/ for both "/_stories" and "/_stories/" */

    while (slcf->forward.len > 0
           && slcf->forward.data[slcf->forward.len - 1] == '/')
    {
        slcf->forward.len--;
    }

    if (slcf->forward.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid URI \"%V\" in \"stories_forward\": "
                           "\"/\" is not an internal location", &value[1]);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_stories_api_key_file(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_stories_loc_conf_t *slcf = conf;

    ngx_str_t  *value, key;

    if (slcf->api_key.data != NULL) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_http_stories_read_conf_file(cf, &value[1], &key) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    while (key.len > 0
           && (key.data[key.len - 1] == LF || key.data[key.len - 1] == CR))
    {
        key.len--;
    }

    if (key.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "API key file \"%V\" is empty", &value[1]);
        return NGX_CONF_ERROR;
    }

    slcf->api_key = key;

    return NGX_CONF_OK;
}


static char *
ngx_http_stories_write_key(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_stories_loc_conf_t *slcf = conf;

    ngx_str_t  *value, *key;

    value = cf->args->elts;

    if (value[1].len == 0) {
        return "takes an empty key";
    }

    if (slcf->write_keys == NGX_CONF_UNSET_PTR) {
        slcf->write_keys = ngx_array_create(cf->pool, 4, sizeof(ngx_str_t));
        if (slcf->write_keys == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    key = ngx_array_push(slcf->write_keys);
    if (key == NULL) {
        return NGX_CONF_ERROR;
    }

    *key = value[1];

    return NGX_CONF_OK;
}


/* Adds the keys of a file, one per line.  Empty lines are skipped. */

static char *
ngx_http_stories_write_keys_file(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_stories_loc_conf_t *slcf = conf;

    u_char      *p, *last, *eol;
    ngx_str_t   *value, content, *key;
    ngx_uint_t   n;

    value = cf->args->elts;

    if (ngx_http_stories_read_conf_file(cf, &value[1], &content) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    if (slcf->write_keys == NGX_CONF_UNSET_PTR) {
        slcf->write_keys = ngx_array_create(cf->pool, 4, sizeof(ngx_str_t));
        if (slcf->write_keys == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    n = 0;
    p = content.data;
    last = content.data + content.len;

    while (p < last) {
        eol = ngx_strlchr(p, last, LF);
        if (eol == NULL) {
            eol = last;
        }

        key = ngx_array_push(slcf->write_keys);
        if (key == NULL) {
            return NGX_CONF_ERROR;
        }

        key->data = p;
        key->len = eol - p;

        while (key->len > 0
               && (key->data[key->len - 1] == CR
                   || key->data[key->len - 1] == ' '
                   || key->data[key->len - 1] == '\t'))
        {
            key->len--;
        }

        if (key->len == 0) {
            slcf->write_keys->nelts--;

        } else {
            n++;
        }

        p = eol + 1;
    }

    if (n == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "write keys file \"%V\" has no keys", &value[1]);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_stories_dead_letter(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_stories_loc_conf_t *slcf = conf;

    ngx_str_t  *value;

    if (slcf->dead_letter != NGX_CONF_UNSET_PTR) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0) {
        slcf->dead_letter = NULL;
        return NGX_CONF_OK;
    }

    /* opened by the cycle like access_log, so USR1 reopens it */

    slcf->dead_letter = ngx_conf_open_file(cf->cycle, &value[1]);
    if (slcf->dead_letter == NULL) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/*
 * Reads a small file at configuration time.  A relative name is taken
 * from the configuration prefix.
 */

static ngx_int_t
ngx_http_stories_read_conf_file(ngx_conf_t *cf, ngx_str_t *name,
    ngx_str_t *content)
{
    off_t            size;
    ssize_t          n;
    ngx_fd_t         fd;
    ngx_str_t        path;
    ngx_file_info_t  fi;

    path = *name;

    if (ngx_conf_full_name(cf->cycle, &path, 1) != NGX_OK) {
        return NGX_ERROR;
    }

    fd = ngx_open_file(path.data, NGX_FILE_RDONLY, NGX_FILE_OPEN, 0);
    if (fd == NGX_INVALID_FILE) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           ngx_open_file_n " \"%V\" failed", &path);
        return NGX_ERROR;
    }

    if (ngx_fd_info(fd, &fi) == NGX_FILE_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           ngx_fd_info_n " \"%V\" failed", &path);
        goto failed;
    }

    size = ngx_file_size(&fi);

    if (size > 1024 * 1024) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "file \"%V\" is larger than 1m", &path);
        goto failed;
    }

    content->len = (size_t) size;
    content->data = ngx_pnalloc(cf->pool, content->len + 1);
    if (content->data == NULL) {
        goto failed;
    }

    n = ngx_read_fd(fd, content->data, content->len);

    if (n == -1) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, ngx_errno,
                           ngx_read_fd_n " \"%V\" failed", &path);
        goto failed;
    }

    if ((size_t) n != content->len) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           ngx_read_fd_n " \"%V\" returned only %z bytes",
                           &path, n);
        goto failed;
    }

    content->data[content->len] = '\0';

    ngx_close_file(fd);

    return NGX_OK;

failed:

    if (ngx_close_file(fd) == NGX_FILE_ERROR) {
        ngx_log_error(NGX_LOG_ALERT, cf->log, ngx_errno,
                      ngx_close_file_n " \"%V\" failed", &path);
    }

    return NGX_ERROR;
}


static ngx_int_t
ngx_http_stories_concat(ngx_conf_t *cf, ngx_str_t *dst, ngx_str_t *prefix,
    ngx_str_t *suffix)
{
    u_char  *p;

    p = ngx_pnalloc(cf->pool, prefix->len + suffix->len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    dst->data = p;
    dst->len = prefix->len + suffix->len;

    p = ngx_cpymem(p, prefix->data, prefix->len);
    ngx_memcpy(p, suffix->data, suffix->len);

    return NGX_OK;
}


static ngx_int_t
ngx_http_stories_init(ngx_conf_t *cf)
{
    ngx_http_handler_pt        *h;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_PRECONTENT_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_stories_front_handler;

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_CONTENT_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_stories_endpoint_handler;

    return NGX_OK;
}
