
/*
 * Copyright (C) The ngx_http_stories_module authors
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_stories.h"


static ngx_int_t ngx_http_stories_front_handler(ngx_http_request_t *r);
static void ngx_http_stories_front_body_handler(ngx_http_request_t *r);
static void ngx_http_stories_send_copy(ngx_http_request_t *r,
    ngx_http_stories_ctx_t *ctx);
static ngx_int_t ngx_http_stories_endpoint_handler(ngx_http_request_t *r);
static void ngx_http_stories_endpoint_body_handler(ngx_http_request_t *r);
static void ngx_http_stories_endpoint_wake(ngx_http_request_t *r);
static ngx_http_stories_ctx_t *ngx_http_stories_get_ctx(ngx_http_request_t *r);
static ngx_http_stories_ctx_t *ngx_http_stories_create_ctx(
    ngx_http_request_t *r, stories_call_e call);
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
static ngx_int_t ngx_http_stories_create_write_keys(ngx_conf_t *cf,
    ngx_http_stories_loc_conf_t *slcf);
static char *ngx_http_stories_dead_letter(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_stories_read_conf_file(ngx_conf_t *cf,
    ngx_str_t *name, ngx_str_t *content);
static ngx_int_t ngx_http_stories_concat(ngx_conf_t *cf, ngx_str_t *dst,
    ngx_str_t *prefix, ngx_str_t *suffix);
static ngx_int_t ngx_http_stories_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);
static ngx_int_t ngx_http_stories_init(ngx_conf_t *cf);
static ngx_int_t ngx_http_stories_init_process(ngx_cycle_t *cycle);
static void ngx_http_stories_exit_process(ngx_cycle_t *cycle);


static ngx_conf_num_bounds_t  ngx_http_stories_concurrency_bounds = {
    ngx_conf_check_num_bounds, 1, 1000
};


static ngx_conf_num_bounds_t  ngx_http_stories_max_pending_bounds = {
    ngx_conf_check_num_bounds, 1, 1000000
};


static ngx_conf_num_bounds_t  ngx_http_stories_depth_bounds = {
    ngx_conf_check_num_bounds, 1, 1000
};


static ngx_http_output_body_filter_pt  ngx_http_next_body_filter;


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

    { ngx_string("stories_max_pending"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_num_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_stories_loc_conf_t, max_pending),
      &ngx_http_stories_max_pending_bounds },

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
    ngx_http_stories_init_process,         /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_stories_exit_process,         /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


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


/*
 * Hands the Stories requests of a call in front of an existing endpoint to
 * a detached request of the module's own and starts them.
 */

static void
ngx_http_stories_send_copy(ngx_http_request_t *r, ngx_http_stories_ctx_t *ctx)
{
    ngx_http_stories_ctx_t  *dctx;

    dctx = ngx_http_stories_detach(r, ctx);

    if (dctx == NULL) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "stories: %s call not forwarded: failed to create "
                      "the request that sends it",
                      stories_call_name(ctx->call));
        return;
    }

    if (ngx_http_stories_translate(r, dctx) != NGX_OK) {
        ngx_http_stories_detached_free(&dctx->free_event);
        return;
    }

    if (dctx->result.status != 0) {
        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "stories: %s call not forwarded: %s",
                      stories_call_name(ctx->call), dctx->result.error);
        ngx_http_stories_detached_free(&dctx->free_event);
        return;
    }

    ngx_http_stories_log_notes(r, dctx);

    if (dctx->result.nrequests == 0
        || ngx_http_stories_admit(dctx) != NGX_OK)
    {
        ngx_http_stories_detached_free(&dctx->free_event);
        return;
    }

    ngx_http_stories_start(dctx);

    /* when none could start, no subrequest is left to free it */

    if (dctx->finished == dctx->result.nrequests
        && !dctx->free_event.posted)
    {
        ngx_post_event(&dctx->free_event, &ngx_posted_events);
    }
}


static void
ngx_http_stories_front_body_handler(ngx_http_request_t *r)
{
    ngx_http_stories_ctx_t  *ctx;

    ctx = ngx_http_stories_get_ctx(r);

    ngx_http_stories_send_copy(r, ctx);

    /* the request goes on to its own handler whatever happened above */

    ctx->phase_rc = NGX_DECLINED;

    r->write_event_handler = ngx_http_core_run_phases;
    ngx_http_core_run_phases(r);
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
    ngx_http_core_loc_conf_t     *clcf;
    ngx_http_stories_loc_conf_t  *slcf;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    slcf = ngx_http_get_module_loc_conf(r, ngx_http_stories_module);
    clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

    if (slcf->forward.len == 0 || clcf->internal) {
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

    /*
     * The Stories requests do not watch the client's connection, so this
     * request does: a client that goes away, or a reset HTTP/2 stream,
     * ends it, and the Stories requests not yet started with it.
     */

    r->read_event_handler = ngx_http_test_reading;
    r->write_event_handler = ngx_http_stories_endpoint_wake;

    ngx_http_stories_start(ctx);

    if (ctx->finished == ctx->result.nrequests) {
        ctx->responded = 1;
        ngx_http_finalize_request(r, ngx_http_stories_respond(r, ctx));
    }
}


/*
 * Sends the endpoint's response.  It runs as the request's write handler,
 * on the write event that the last Stories request to end posts.
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
    conf->max_pending = NGX_CONF_UNSET;
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
    ngx_conf_merge_value(conf->max_pending, prev->max_pending, 256);
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

    if (ngx_http_stories_create_write_keys(cf, slcf) != NGX_OK) {
        return NGX_CONF_ERROR;
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

    if (ngx_http_stories_create_write_keys(cf, slcf) != NGX_OK) {
        return NGX_CONF_ERROR;
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


/* Creates the list of write keys of this level on its first key. */

static ngx_int_t
ngx_http_stories_create_write_keys(ngx_conf_t *cf,
    ngx_http_stories_loc_conf_t *slcf)
{
    if (slcf->write_keys != NGX_CONF_UNSET_PTR) {
        return NGX_OK;
    }

    slcf->write_keys = ngx_array_create(cf->pool, 4, sizeof(ngx_str_t));
    if (slcf->write_keys == NULL) {
        return NGX_ERROR;
    }

    return NGX_OK;
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

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_stories_body_filter;

    return NGX_OK;
}


/*
 * Drops the response body of a Stories subrequest: only its status counts.
 * Passed on, the body would stay queued for a client that never gets it,
 * and in memory it would fail at subrequest_output_buffer_size, which
 * also ends the client's request.
 */

static ngx_int_t
ngx_http_stories_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    ngx_chain_t                  *cl;
    ngx_http_stories_delivery_t  *d;

    if (r == r->main) {
        return ngx_http_next_body_filter(r, in);
    }

    d = ngx_http_get_module_ctx(r, ngx_http_stories_module);

    if (d == NULL || !d->subrequest) {
        return ngx_http_next_body_filter(r, in);
    }

    for (cl = in; cl; cl = cl->next) {
        cl->buf->pos = cl->buf->last;
        cl->buf->file_pos = cl->buf->file_last;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_stories_init_process(ngx_cycle_t *cycle)
{
    ngx_http_stories_init_pending();

    return NGX_OK;
}


static void
ngx_http_stories_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_stories_abandon_pending();
}
