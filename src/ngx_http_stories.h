
/*
 * Copyright (C) The ngx_http_stories_module authors
 */


#ifndef _NGX_HTTP_STORIES_H_INCLUDED_
#define _NGX_HTTP_STORIES_H_INCLUDED_


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
    ngx_int_t                    max_pending;
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


typedef struct ngx_http_stories_ctx_s      ngx_http_stories_ctx_t;
typedef struct ngx_http_stories_carrier_s  ngx_http_stories_carrier_t;


/* One Stories request and what became of it. */
typedef struct {
    ngx_http_stories_ctx_t      *ctx;
    ngx_http_stories_carrier_t  *carrier;
    stories_request_t           *request;
    ngx_uint_t                   status;
    ngx_str_t                    retry_after;
    ngx_http_stories_outcome_e   outcome;
    unsigned                     started:1;
    unsigned                     done:1;
    unsigned                     kept:1;
    unsigned                     subrequest:1;
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
    ngx_uint_t                    units;
    ngx_int_t                     phase_rc;
    ngx_event_t                   free_event;
    ngx_queue_t                   queue;
    unsigned                      front:1;
    unsigned                      detached:1;
    unsigned                      translated:1;
    unsigned                      responded:1;
    unsigned                      queued:1;
    unsigned                      counted:1;
};


ngx_int_t ngx_http_stories_check_headers(ngx_http_request_t *r,
    stories_encoding_e *encoding, const char **error);
ngx_int_t ngx_http_stories_translate(ngx_http_request_t *r,
    ngx_http_stories_ctx_t *ctx);
ngx_table_elt_t *ngx_http_stories_find_header(ngx_http_request_t *r,
    const char *name, size_t len);

ngx_http_stories_ctx_t *ngx_http_stories_detach(ngx_http_request_t *r,
    ngx_http_stories_ctx_t *client_ctx);
void ngx_http_stories_detached_free(ngx_event_t *ev);
void ngx_http_stories_free_request(ngx_http_request_t *r);
ngx_int_t ngx_http_stories_admit(ngx_http_stories_ctx_t *ctx);
void ngx_http_stories_start(ngx_http_stories_ctx_t *ctx);
void ngx_http_stories_cleanup(void *data);
void ngx_http_stories_init_pending(void);
void ngx_http_stories_abandon_pending(void);
void ngx_http_stories_log_notes(ngx_http_request_t *r,
    ngx_http_stories_ctx_t *ctx);

ngx_int_t ngx_http_stories_respond(ngx_http_request_t *r,
    ngx_http_stories_ctx_t *ctx);
ngx_int_t ngx_http_stories_preflight(ngx_http_request_t *r);
ngx_int_t ngx_http_stories_send_error(ngx_http_request_t *r,
    ngx_uint_t status, const char *error);


extern ngx_str_t     ngx_http_stories_json;
extern ngx_module_t  ngx_http_stories_module;


#endif /* _NGX_HTTP_STORIES_H_INCLUDED_ */
