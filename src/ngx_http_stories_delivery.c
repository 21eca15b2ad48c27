
/*
 * Copyright (C) The ngx_http_stories_module authors
 *
 * Stories requests as subrequests: starting them, reading their outcome,
 * keeping failures in the dead-letter file, the carrier request that each
 * one runs under, and the detached request that keeps a call in front of
 * an existing endpoint.
 */


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_stories.h"


/*
 * A request of the module's own, on a connection without a socket, that is
 * the parent of one Stories subrequest.  nginx allocates a subrequest and
 * its proxy buffers from the parent's pool, and frees them only with that
 * pool.  So each Stories request gets a parent that is freed as soon as it
 * ends, and a batch of thousands of messages uses the memory of at most
 * stories_concurrency subrequests at a time.
 */

struct ngx_http_stories_carrier_s {
    ngx_http_request_t           *request;
    ngx_http_request_t           *subrequest;

    /* the call's delivery, or NULL once the call's request has ended */
    ngx_http_stories_delivery_t  *delivery;

    ngx_http_stories_loc_conf_t  *conf;

    /* the Stories request and its outcome, on the carrier's own pool */
    stories_request_t             copy;
    ngx_http_stories_delivery_t   own;

    ngx_event_t                   run_event;
    ngx_event_t                   free_event;
    ngx_queue_t                   queue;
    unsigned                      done:1;
};


static void ngx_http_stories_finish(ngx_http_stories_ctx_t *ctx,
    ngx_http_stories_delivery_t *d);
static void ngx_http_stories_abandon(ngx_http_stories_ctx_t *ctx,
    const char *reason);
static void ngx_http_stories_abandon_one(ngx_http_stories_loc_conf_t *conf,
    ngx_log_t *log, ngx_http_stories_delivery_t *d, const char *reason);
static ngx_http_stories_carrier_t *ngx_http_stories_carrier(
    ngx_http_stories_ctx_t *ctx, ngx_http_stories_delivery_t *d);
static void ngx_http_stories_carrier_event(ngx_event_t *ev);
static void ngx_http_stories_carrier_run(ngx_event_t *ev);
static void ngx_http_stories_carrier_free(ngx_event_t *ev);
static void ngx_http_stories_carrier_close(
    ngx_http_stories_carrier_t *carrier);
static ngx_connection_t *ngx_http_stories_fake_connection(
    ngx_http_request_t *r, ngx_pool_t *pool);
static ngx_http_request_t *ngx_http_stories_fake_request(
    ngx_http_request_t *r, ngx_connection_t *c);
static ngx_int_t ngx_http_stories_subrequest(
    ngx_http_stories_carrier_t *carrier);
static ngx_int_t ngx_http_stories_set_headers(ngx_http_request_t *sr,
    ngx_http_stories_loc_conf_t *slcf, size_t len);
static ngx_int_t ngx_http_stories_done(ngx_http_request_t *sr, void *data,
    ngx_int_t rc);
static void ngx_http_stories_classify(ngx_http_request_t *sr,
    ngx_http_stories_delivery_t *d, ngx_int_t rc);
static void ngx_http_stories_log_failure(ngx_log_t *log,
    ngx_http_stories_delivery_t *d);
static ngx_int_t ngx_http_stories_keep(ngx_http_stories_loc_conf_t *conf,
    ngx_log_t *log, ngx_http_stories_delivery_t *d, const char *error);


static ngx_str_t  ngx_http_stories_post = ngx_string("POST");


/*
 * The contexts with Stories requests that have not all finished, so that
 * a worker that exits at once (nginx -s stop) can still account for them:
 * request pools are not destroyed then, and their cleanups do not run.
 */
static ngx_queue_t  ngx_http_stories_pending;

/*
 * The carriers whose call's request has ended, for the same reason: they
 * log and keep their own outcome.
 */
static ngx_queue_t  ngx_http_stories_orphans;

/*
 * The Stories requests that detached calls in this worker may run at once,
 * compared with stories_max_pending.
 */
static ngx_uint_t   ngx_http_stories_npending;


/*
 * Creates a request of the module's own, on a connection without a
 * socket, to keep a call in front of an existing endpoint.  The client's
 * request then ends, and frees its keepalive connection, without waiting
 * for Stories, and a client that goes away does not cancel the delivery.
 *
 * Their clients never wait for them, so ngx_http_stories_admit() caps
 * their Stories requests in a worker.
 */

ngx_http_stories_ctx_t *
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

    /* the client's log goes away with its connection, this pool stays */

    pool->log = c->log;

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

    /*
     * With no socket, marking both events active keeps epoll away, and a
     * ready write event keeps an unbuffered proxy from setting a
     * send_timeout timer on it.  A module that still sets a timer on the
     * connection of a subrequest, as limit_req does to delay it, gets its
     * event handled by ngx_http_stories_carrier_event().
     */

    c->read->active = 1;
    c->write->active = 1;
    c->write->write = 1;
    c->write->ready = 1;
    c->read->handler = ngx_http_empty_handler;
    c->write->handler = ngx_http_empty_handler;

    /* nothing may call setsockopt() on the missing socket */

    c->tcp_nodelay = NGX_TCP_NODELAY_DISABLED;
    c->tcp_nopush = NGX_TCP_NOPUSH_DISABLED;

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
    ngx_str_set(&fr->http_protocol, "HTTP/1.1");
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

void
ngx_http_stories_detached_free(ngx_event_t *ev)
{
    ngx_http_stories_ctx_t  *ctx = ev->data;

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, ev->log, 0, "stories detached free");

    ngx_http_stories_free_request(ctx->request);
}


/*
 * Admits a detached call while the Stories requests that the worker's
 * detached calls may run at once are fewer than stories_max_pending, so
 * that a slow Stories cannot use up worker_connections.  A call counts as
 * many as it may run at once: its requests, up to stories_concurrency.  A
 * call that is not admitted has each request logged and written to the
 * dead-letter file, and the caller frees it.
 */

ngx_int_t
ngx_http_stories_admit(ngx_http_stories_ctx_t *ctx)
{
    ngx_uint_t  units;

    if (ngx_http_stories_npending >= (ngx_uint_t) ctx->conf->max_pending) {
        ngx_http_stories_abandon(ctx, "stories_max_pending reached");
        return NGX_DECLINED;
    }

    units = ngx_min(ctx->result.nrequests,
                    (ngx_uint_t) ctx->conf->concurrency);

    ngx_http_stories_npending += units;
    ctx->units = units;
    ctx->counted = 1;

    return NGX_OK;
}


/* Starts Stories requests until stories_concurrency of them are running. */

void
ngx_http_stories_start(ngx_http_stories_ctx_t *ctx)
{
    ngx_log_t                    *log;
    ngx_http_stories_carrier_t   *carrier;
    ngx_http_stories_delivery_t  *d;

    if (!ctx->queued && ctx->finished < ctx->result.nrequests) {
        ngx_queue_insert_tail(&ngx_http_stories_pending, &ctx->queue);
        ctx->queued = 1;
    }

    while (ctx->started < ctx->result.nrequests
           && ctx->active < (ngx_uint_t) ctx->conf->concurrency)
    {
        d = &ctx->deliveries[ctx->started++];
        d->started = 1;

        carrier = ngx_http_stories_carrier(ctx, d);

        if (carrier != NULL) {
            if (ngx_http_stories_subrequest(carrier) == NGX_OK) {
                d->carrier = carrier;
                ctx->active++;

                /* run from the event loop, not from inside this call */

                ngx_post_event(&carrier->run_event, &ngx_posted_events);
                continue;
            }

            ngx_http_stories_free_request(carrier->request);
        }

        d->outcome = NGX_HTTP_STORIES_INTERNAL;
        ngx_http_stories_finish(ctx, d);

        log = ctx->request->connection->log;

        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "stories: failed to start the request to \"%s\" "
                      "for a %s call",
                      d->request->path, stories_call_name(d->request->type));

        if (ctx->conf->dead_letter != NULL
            && ngx_http_stories_keep(ctx->conf, log, d, NULL) == NGX_OK)
        {
            d->kept = 1;
        }
    }
}


/*
 * Creates the carrier of one Stories request, with a copy of the request
 * on the carrier's pool, so that it can still be sent, logged and kept
 * after the call's request has ended.
 */

static ngx_http_stories_carrier_t *
ngx_http_stories_carrier(ngx_http_stories_ctx_t *ctx,
    ngx_http_stories_delivery_t *d)
{
    size_t                       len;
    ngx_pool_t                  *pool;
    ngx_connection_t            *c;
    ngx_http_request_t          *cr;
    stories_request_t           *request;
    ngx_http_stories_carrier_t  *carrier;

    pool = ngx_create_pool(NGX_DEFAULT_POOL_SIZE,
                           ctx->request->connection->log);
    if (pool == NULL) {
        return NULL;
    }

    c = ngx_http_stories_fake_connection(ctx->request, pool);
    if (c == NULL) {
        goto failed;
    }

    pool->log = c->log;

    cr = ngx_http_stories_fake_request(ctx->request, c);
    if (cr == NULL) {
        goto failed;
    }

    carrier = ngx_pcalloc(pool, sizeof(ngx_http_stories_carrier_t));
    if (carrier == NULL) {
        goto failed;
    }

    request = d->request;

    carrier->copy = *request;
    carrier->copy.body = ngx_pnalloc(pool, request->body_len);

    if (carrier->copy.body == NULL) {
        goto failed;
    }

    ngx_memcpy(carrier->copy.body, request->body, request->body_len);

    if (request->message_id != NULL) {
        len = ngx_strlen(request->message_id) + 1;

        carrier->copy.message_id = ngx_pnalloc(pool, len);
        if (carrier->copy.message_id == NULL) {
            goto failed;
        }

        ngx_memcpy(carrier->copy.message_id, request->message_id, len);
    }

    carrier->request = cr;
    carrier->delivery = d;
    carrier->conf = ctx->conf;
    carrier->own.request = &carrier->copy;
    carrier->own.subrequest = 1;

    carrier->run_event.handler = ngx_http_stories_carrier_run;
    carrier->run_event.data = carrier;
    carrier->run_event.log = c->log;

    carrier->free_event.handler = ngx_http_stories_carrier_free;
    carrier->free_event.data = carrier;
    carrier->free_event.log = c->log;

    c->read->handler = ngx_http_stories_carrier_event;
    c->write->handler = ngx_http_stories_carrier_event;

    ngx_http_set_ctx(cr, carrier, ngx_http_stories_module);

    return carrier;

failed:

    ngx_destroy_pool(pool);
    return NULL;
}


/*
 * Handles an event of the carrier's connection, such as a timer that
 * limit_req set to delay the subrequest, as nginx does for a client
 * connection: by the subrequest's own read or write handler.
 */

static void
ngx_http_stories_carrier_event(ngx_event_t *ev)
{
    ngx_connection_t            *c;
    ngx_http_request_t          *sr;
    ngx_http_stories_carrier_t  *carrier;

    c = ev->data;
    carrier = ngx_http_get_module_ctx((ngx_http_request_t *) c->data,
                                      ngx_http_stories_module);

    sr = carrier->subrequest;

    if (sr == NULL || carrier->done) {
        return;
    }

    ngx_http_set_log_request(c->log, sr);

    if (ev->delayed && ev->timedout) {
        ev->delayed = 0;
        ev->timedout = 0;
    }

    if (ev->write) {
        sr->write_event_handler(sr);

    } else {
        sr->read_event_handler(sr);
    }

    ngx_http_run_posted_requests(c);
}


static void
ngx_http_stories_carrier_run(ngx_event_t *ev)
{
    ngx_http_stories_carrier_t  *carrier = ev->data;

    ngx_http_run_posted_requests(carrier->request->connection);
}


/*
 * Frees a carrier once its subrequest has ended.  It runs as a posted
 * event, after the subrequest's own finalization has let go of it.
 */

static void
ngx_http_stories_carrier_free(ngx_event_t *ev)
{
    ngx_http_stories_carrier_t  *carrier = ev->data;

    ngx_log_debug0(NGX_LOG_DEBUG_HTTP, ev->log, 0, "stories carrier free");

    if (carrier->run_event.posted) {
        ngx_delete_posted_event(&carrier->run_event);
    }

    ngx_http_stories_free_request(carrier->request);
}


/*
 * Frees a request of the module's own, with the events of its connection
 * taken out of the timer tree and the posted queue first: they are freed
 * with the request's pool.
 */

void
ngx_http_stories_free_request(ngx_http_request_t *r)
{
    ngx_event_t  *ev[2];
    ngx_uint_t    i;

    ev[0] = r->connection->read;
    ev[1] = r->connection->write;

    for (i = 0; i < 2; i++) {
        if (ev[i]->timer_set) {
            ngx_del_timer(ev[i]);
        }

        if (ev[i]->posted) {
            ngx_delete_posted_event(ev[i]);
        }
    }

    ngx_http_free_request(r, 0);
}


static void
ngx_http_stories_finish(ngx_http_stories_ctx_t *ctx,
    ngx_http_stories_delivery_t *d)
{
    d->done = 1;
    ctx->finished++;
}


static ngx_int_t
ngx_http_stories_subrequest(ngx_http_stories_carrier_t *carrier)
{
    ngx_buf_t                    *b;
    ngx_str_t                    *uri;
    ngx_chain_t                  *cl;
    stories_request_t            *request;
    ngx_http_request_t           *r, *sr;
    ngx_http_request_body_t      *rb;
    ngx_http_post_subrequest_t   *ps;

    r = carrier->request;
    request = &carrier->copy;

    ps = ngx_palloc(r->pool, sizeof(ngx_http_post_subrequest_t));
    if (ps == NULL) {
        return NGX_ERROR;
    }

    ps->handler = ngx_http_stories_done;
    ps->data = carrier;

    uri = ngx_strcmp(request->path, STORIES_EVENTS_PATH) == 0
          ? &carrier->conf->events_uri : &carrier->conf->users_uri;

    /*
     * Background subrequests run in parallel.  Their response bodies are
     * read whole, so that the upstream connection to Stories can be kept
     * alive, and dropped by ngx_http_stories_body_filter().
     */

    if (ngx_http_subrequest(r, uri, NULL, &sr, ps,
                            NGX_HTTP_SUBREQUEST_BACKGROUND)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    ngx_http_set_ctx(sr, &carrier->own, ngx_http_stories_module);
    carrier->subrequest = sr;

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

    b->start = (u_char *) request->body;
    b->pos = b->start;
    b->last = b->start + request->body_len;
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

    return ngx_http_stories_set_headers(sr, carrier->conf,
                                        request->body_len);
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
 * The post-subrequest handler.  It returns NGX_OK whatever rc is, and
 * hands the outcome to the call unless the call's request has ended.
 */

static ngx_int_t
ngx_http_stories_done(ngx_http_request_t *sr, void *data, ngx_int_t rc)
{
    ngx_http_stories_carrier_t  *carrier = data;

    ngx_log_t                    *log;
    ngx_http_stories_ctx_t       *ctx;
    ngx_http_stories_delivery_t  *d, *own;

    if (carrier->done) {
        return NGX_OK;
    }

    carrier->done = 1;
    own = &carrier->own;
    log = sr->connection->log;

    ngx_http_stories_classify(sr, own, rc);

    ngx_log_debug3(NGX_LOG_DEBUG_HTTP, log, 0,
                   "stories request done rc:%i s:%ui outcome:%d",
                   rc, own->status, own->outcome);

    ngx_post_event(&carrier->free_event, &ngx_posted_events);

    if (own->outcome != NGX_HTTP_STORIES_OK) {
        ngx_http_stories_log_failure(log, own);

        if (carrier->conf->dead_letter != NULL
            && ngx_http_stories_keep(carrier->conf, log, own, NULL) == NGX_OK)
        {
            own->kept = 1;
        }
    }

    d = carrier->delivery;

    if (d == NULL) {
        ngx_queue_remove(&carrier->queue);
        return NGX_OK;
    }

    ctx = d->ctx;

    d->carrier = NULL;
    d->status = own->status;
    d->outcome = own->outcome;
    d->kept = own->kept;

    /* the carrier's pool goes away before the client's response is sent */

    if (own->retry_after.len != 0) {
        d->retry_after.data = ngx_pstrdup(ctx->request->pool,
                                          &own->retry_after);
        d->retry_after.len = d->retry_after.data != NULL
                             ? own->retry_after.len : 0;
    }

    ngx_http_stories_finish(ctx, d);
    ctx->active--;

    ngx_http_stories_start(ctx);

    if (ctx->finished < ctx->result.nrequests) {
        return NGX_OK;
    }

    if (ctx->queued) {
        ngx_queue_remove(&ctx->queue);
        ctx->queued = 0;
    }

    if (ctx->detached) {
        if (!ctx->free_event.posted) {
            ngx_post_event(&ctx->free_event, &ngx_posted_events);
        }

        return NGX_OK;
    }

    /* the endpoint's request waits in ngx_http_stories_endpoint_wake() */

    ngx_post_event(ctx->request->connection->write, &ngx_posted_events);

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

        /*
         * No status line from Stories: the connection failed, timed out,
         * or carried no valid response, or nginx ended the subrequest
         * before it reached the proxy (sr->upstream is then NULL).
         */

        d->status = sr->headers_out.status;

        if (rc == NGX_HTTP_GATEWAY_TIME_OUT) {
            d->outcome = NGX_HTTP_STORIES_TIMED_OUT;

        } else if (sr->upstream != NULL) {
            d->status = 0;
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
ngx_http_stories_keep(ngx_http_stories_loc_conf_t *conf, ngx_log_t *log,
    ngx_http_stories_delivery_t *d, const char *error)
{
    u_char             *line, *p;
    size_t              len;
    ssize_t             n;
    ngx_tm_t            tm;
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

    file = conf->dead_letter;
    request = d->request;

    if (error == NULL) {
        error = errors[d->outcome];
    }

    len = sizeof("{\"time\":\"1970-01-01T00:00:00Z\",\"path\":\"\","
                 "\"status\":,\"error\":\"\",\"messageId\":\"\","
                 "\"body\":}\n")
          + ngx_strlen(request->path) + NGX_INT_T_LEN + ngx_strlen(error)
          + (request->message_id ? ngx_strlen(request->message_id) : 4)
          + request->body_len;

    /* not from the request pool: this also runs while nginx destroys it */

    line = ngx_alloc(len, log);
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

    ngx_free(line);

    if (n != (ssize_t) (p - line)) {
        ngx_log_error(NGX_LOG_ALERT, log, ngx_errno,
                      ngx_write_fd_n " to dead-letter file \"%s\" failed, "
                      "a %s call to \"%s\" is lost",
                      file->name.data, stories_call_name(request->type),
                      request->path);
        return NGX_ERROR;
    }

    return NGX_OK;
}


/*
 * Frees the translation.  A Stories request that never finished means
 * that nginx ended the call's request early: the client went away, or
 * worker_shutdown_timeout ended it.  A request that is
 * running goes on in its carrier, which then logs and keeps its outcome.
 */

void
ngx_http_stories_cleanup(void *data)
{
    ngx_http_stories_ctx_t  *ctx = data;

    ngx_uint_t                    i;
    ngx_http_stories_carrier_t   *carrier;
    ngx_http_stories_delivery_t  *d;

    if (ctx->counted) {
        ngx_http_stories_npending -= ctx->units;
        ctx->counted = 0;
    }

    if (ctx->queued) {
        ngx_queue_remove(&ctx->queue);
        ctx->queued = 0;

        for (i = 0; i < ctx->result.nrequests; i++) {
            d = &ctx->deliveries[i];
            carrier = d->carrier;

            if (d->done || carrier == NULL) {
                continue;
            }

            carrier->delivery = NULL;
            ngx_queue_insert_tail(&ngx_http_stories_orphans, &carrier->queue);

            d->carrier = NULL;
            d->done = 1;
        }

        ngx_http_stories_abandon(ctx, "the client request ended first");
    }

    stories_result_free(&ctx->result);
}


/*
 * Logs each Stories request of ctx that has not finished, and writes it
 * to the dead-letter file when one is set.
 */

static void
ngx_http_stories_abandon(ngx_http_stories_ctx_t *ctx, const char *reason)
{
    ngx_uint_t                    i;
    ngx_http_stories_delivery_t  *d;

    for (i = 0; i < ctx->result.nrequests; i++) {
        d = &ctx->deliveries[i];

        if (!d->done) {
            ngx_http_stories_abandon_one(ctx->conf,
                                         ctx->request->connection->log,
                                         d, reason);
        }
    }
}


static void
ngx_http_stories_abandon_one(ngx_http_stories_loc_conf_t *conf,
    ngx_log_t *log, ngx_http_stories_delivery_t *d, const char *reason)
{
    stories_request_t  *request;

    request = d->request;

    ngx_log_error(NGX_LOG_ERR, log, 0,
                  "stories request to \"%s\" was not delivered: %s, "
                  "%s call, messageId %s%s%s",
                  request->path, reason, stories_call_name(request->type),
                  request->message_id ? "\"" : "",
                  request->message_id ? request->message_id : "none",
                  request->message_id ? "\"" : "");

    if (conf->dead_letter != NULL) {
        (void) ngx_http_stories_keep(conf, log, d, reason);
    }
}


void
ngx_http_stories_init_pending(void)
{
    ngx_queue_init(&ngx_http_stories_pending);
    ngx_queue_init(&ngx_http_stories_orphans);
    ngx_http_stories_npending = 0;
}


/*
 * Logs and keeps every Stories request that has not finished when the
 * worker exits, and closes the connections to Stories that they use.
 * Unlike a client connection, the shutdown timeout does not close them,
 * and nginx reports a socket left open by a worker that was exiting.
 */

void
ngx_http_stories_abandon_pending(void)
{
    ngx_uint_t                   i;
    ngx_queue_t                 *q;
    ngx_http_stories_ctx_t      *ctx;
    ngx_http_stories_carrier_t  *carrier;

    while (!ngx_queue_empty(&ngx_http_stories_pending)) {
        q = ngx_queue_head(&ngx_http_stories_pending);
        ngx_queue_remove(q);

        ctx = ngx_queue_data(q, ngx_http_stories_ctx_t, queue);
        ctx->queued = 0;

        ngx_http_stories_abandon(ctx, "the nginx worker exited first");

        for (i = 0; i < ctx->result.nrequests; i++) {
            if (ctx->deliveries[i].carrier != NULL) {
                ngx_http_stories_carrier_close(ctx->deliveries[i].carrier);
            }
        }
    }

    while (!ngx_queue_empty(&ngx_http_stories_orphans)) {
        q = ngx_queue_head(&ngx_http_stories_orphans);
        ngx_queue_remove(q);

        carrier = ngx_queue_data(q, ngx_http_stories_carrier_t, queue);

        ngx_http_stories_abandon_one(carrier->conf,
                                     carrier->request->connection->log,
                                     &carrier->own,
                                     "the nginx worker exited first");

        ngx_http_stories_carrier_close(carrier);
    }
}


static void
ngx_http_stories_carrier_close(ngx_http_stories_carrier_t *carrier)
{
    ngx_http_upstream_t  *u;

    u = carrier->subrequest->upstream;

    if (u != NULL && u->peer.connection != NULL) {
        ngx_close_connection(u->peer.connection);
        u->peer.connection = NULL;
    }
}


/* Logs each valid message that Stories cannot take, with the reason. */

void
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
