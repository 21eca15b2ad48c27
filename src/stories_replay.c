/*
 * stories-replay: sends the requests in the dead-letter files of
 * ngx_http_stories_module to the Stories API again.
 *
 * Each dead-letter line is a JSON object whose last field is "body", the
 * exact JSON that was to be sent.  The tool posts those bytes to the API
 * URL plus the line's "path" and retries transient failures.  Lines that were
 * not delivered are appended to FILE.failed.  FILE.progress stores the byte
 * offset after the last finished line, so a new run resumes there.  A run
 * holds a lock on FILE.lock, so two runs on one file do not share them.
 */

#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <curl/curl.h>


#define REPLAY_NAME                  "stories-replay"
#define REPLAY_DEFAULT_API           "https://api.getstories.io"
#define REPLAY_DEFAULT_ATTEMPTS      8
#define REPLAY_MAX_ATTEMPTS          1000
#define REPLAY_BACKOFF_BASE_MS       500
#define REPLAY_BACKOFF_MAX_MS        30000
#define REPLAY_RETRY_AFTER_MAX_MS    300000
#define REPLAY_CONNECT_TIMEOUT_S     10
#define REPLAY_TIMEOUT_S             30
#define REPLAY_TIMEOUT_MAX_S         3600
#define REPLAY_KEY_MAX               4096
#define REPLAY_MESSAGE_ID_MAX        80
#define REPLAY_PROGRESS_INTERVAL_MS  100
#define REPLAY_SLEEP_STEP_MS         100

#define REPLAY_NOT_OBJECT            "not a JSON object"

#define REPLAY_EXIT_DELIVERED        0
#define REPLAY_EXIT_FAILED           1
#define REPLAY_EXIT_SETUP            2
#define REPLAY_EXIT_LOCKED           3


typedef enum {
    REPLAY_DELIVERED,
    REPLAY_FAILED,
    REPLAY_INTERRUPTED,
    REPLAY_FATAL
} replay_outcome_t;


typedef enum {
    REPLAY_ACTION_DELIVERED,
    REPLAY_ACTION_RETRY,
    REPLAY_ACTION_PERMANENT,
    REPLAY_ACTION_INTERRUPTED
} replay_action_t;


typedef struct {
    char         *api_url;        /* without a trailing slash */
    size_t        api_url_len;
    const char   *key_file;
    long          max_attempts;
    long          backoff_base_ms;
    long          connect_timeout_s;
    long          timeout_s;
    uint64_t      seed;
    char        **files;
    int           nfiles;
} replay_options_t;


/* Fields of one dead-letter line.  The pointers point into the line. */
typedef struct {
    const char   *path;
    size_t        path_len;
    const char   *body;
    size_t        body_len;
    const char   *message_id;     /* raw JSON value, or NULL */
    size_t        message_id_len;
} replay_line_t;


/* Result of one HTTP attempt. */
typedef struct {
    CURLcode      rc;
    long          status;         /* 0 when no status line was received */
    long          retry_after;    /* seconds, -1 when absent or invalid */
    char          error[CURL_ERROR_SIZE];
} replay_attempt_t;


typedef struct {
    replay_options_t   *options;
    CURL               *curl;
    struct curl_slist  *headers;
    char               *url;
    size_t              url_size;
    uint64_t            random_state;
    int                 show_progress;
    long                last_progress_ms;
    unsigned long       delivered;
    unsigned long       failed;
    unsigned long       incomplete;
} replay_ctx_t;


typedef struct {
    const char     *path;
    char           *progress_path;
    char           *progress_tmp_path;
    char           *failed_path;
    FILE           *file;
    struct stat     st;
    off_t           offset;       /* byte offset after the last finished line */
    unsigned long   lines_done;
    unsigned long   lines_total;
    unsigned long   delivered;
    unsigned long   failed;
} replay_file_t;


static volatile sig_atomic_t  replay_signal;


/* The Stories paths that the module writes to the dead-letter file. */
static const char  *replay_paths[] = { "/v1/events/", "/v1/users", NULL };


static void replay_log_retry(replay_ctx_t *ctx, replay_file_t *rf,
    const char *reason, long number, long delay_ms);


static void
replay_usage(FILE *out)
{
    fprintf(out,
"Usage: " REPLAY_NAME " [--api URL] --api-key-file FILE [--max-attempts N]\n"
"                      DEADLETTER...\n"
"\n"
"Sends the requests stored in dead-letter files of ngx_http_stories_module\n"
"to the Stories API again, one line at a time and in file order.\n"
"\n"
"Options:\n"
"  --api URL            base URL of the Stories API\n"
"                       (default " REPLAY_DEFAULT_API ")\n"
"  --api-key-file FILE  file that contains the Stories API key; one trailing\n"
"                       newline is ignored\n"
"  --max-attempts N     attempts per line, the first one included\n"
"                       (default %d, at most %d)\n"
"  -h, --help           print this help and exit\n"
"\n"
"A 2xx status means delivered.  408, 5xx, timeouts and connection errors\n"
"are retried after an exponential backoff with full jitter (0.5 s doubling,\n"
"at most 30 s).  429 is retried after its Retry-After seconds (at most\n"
"300 s), or after the backoff when that header is missing.  Other statuses\n"
"fail at once.\n"
"\n"
"Lines that were not delivered, and lines that are not valid dead-letter\n"
"lines, are appended to DEADLETTER.failed as JSON objects with a\n"
"\"replay_status\" member in front: the last HTTP status, or 0 when none\n"
"was received.  It replaces the \"replay_status\" members at the front of\n"
"the line, so that file can be replayed in turn.  A line that is not a\n"
"JSON object without control bytes is stored as\n"
"  {\"replay_status\":STATUS,\"replay_error\":\"not a JSON object\",\"line\":LINE}\n"
"with LINE as a JSON string, or with \"line_base64\" and the line in base64\n"
"when it is not valid UTF-8.\n"
"\n"
"DEADLETTER.progress stores the inode and the byte offset after the last\n"
"finished line, so an interrupted run resumes there; a replaced or\n"
"truncated file is replayed from the start.\n"
"\n"
"Before the first request, the tool takes an exclusive lock on\n"
"DEADLETTER.lock, which it creates if needed and never removes, and keeps\n"
"it to the end of the run.  When another process has that lock, the\n"
"tool exits at once with status 3 and sends nothing.\n"
"\n"
"Exit status: 0 when every line was delivered, 1 when some were not, 2 on\n"
"a usage or setup error, 3 when another run has locked a file, 130\n"
"or 143 after SIGINT or SIGTERM.\n"
"\n"
"Environment (meant for tests):\n"
"  STORIES_REPLAY_BACKOFF_MS       first backoff in milliseconds (default %d)\n"
"  STORIES_REPLAY_CONNECT_TIMEOUT  connect timeout in seconds (default %d)\n"
"  STORIES_REPLAY_TIMEOUT          timeout of one attempt in seconds\n"
"                                  (default %d)\n"
"  STORIES_REPLAY_SEED             seed of the jitter (default: time and pid)\n"
"libcurl's proxy variables (https_proxy, no_proxy, ...) apply as usual.\n",
        REPLAY_DEFAULT_ATTEMPTS, REPLAY_MAX_ATTEMPTS, REPLAY_BACKOFF_BASE_MS,
        REPLAY_CONNECT_TIMEOUT_S, REPLAY_TIMEOUT_S);
}


static long
replay_now_ms(void)
{
    struct timespec  ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);

    return (long) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}


static char *
replay_concat(const char *a, const char *b)
{
    size_t   alen, blen;
    char    *s;

    alen = strlen(a);
    blen = strlen(b);

    s = malloc(alen + blen + 1);
    if (s == NULL) {
        fprintf(stderr, REPLAY_NAME ": out of memory\n");
        return NULL;
    }

    memcpy(s, a, alen);
    memcpy(s + alen, b, blen + 1);

    return s;
}


/* Parses a decimal integer in [min, max].  Returns -1 for other text. */
static int
replay_parse_long(const char *text, long min, long max, long *value)
{
    char  *end;
    long   n;

    if (text[0] < '0' || text[0] > '9') {
        return -1;
    }

    errno = 0;
    n = strtol(text, &end, 10);

    if (errno != 0 || *end != '\0' || n < min || n > max) {
        return -1;
    }

    *value = n;

    return 0;
}


/*
 * Matches argv[*i] against the option NAME, given as "NAME VALUE" or
 * "NAME=VALUE".  Returns 1 and sets *value on a match, 0 when the argument
 * is another option, -1 when the value is missing.
 */
static int
replay_option_value(int argc, char **argv, int *i, const char *name,
    const char **value)
{
    size_t       len;
    const char  *arg;

    arg = argv[*i];
    len = strlen(name);

    if (strncmp(arg, name, len) != 0) {
        return 0;
    }

    if (arg[len] == '=') {
        *value = arg + len + 1;
        return 1;
    }

    if (arg[len] != '\0') {
        return 0;
    }

    if (*i + 1 >= argc) {
        fprintf(stderr, REPLAY_NAME ": option %s requires a value\n", name);
        return -1;
    }

    (*i)++;
    *value = argv[*i];

    return 1;
}


/* Sets the API URL without a trailing slash, because paths start with "/". */
static int
replay_set_api(replay_options_t *options, const char *url)
{
    size_t  len;

    if (strncmp(url, "http://", 7) != 0 && strncmp(url, "https://", 8) != 0) {
        fprintf(stderr, REPLAY_NAME ": invalid --api \"%s\": expected an "
                "http:// or https:// URL\n", url);
        return -1;
    }

    len = strlen(url);
    while (len > 0 && url[len - 1] == '/') {
        len--;
    }

    free(options->api_url);

    options->api_url = malloc(len + 1);
    if (options->api_url == NULL) {
        fprintf(stderr, REPLAY_NAME ": out of memory\n");
        return -1;
    }

    memcpy(options->api_url, url, len);
    options->api_url[len] = '\0';
    options->api_url_len = len;

    return 0;
}


/*
 * Handles one option at argv[*i].  Returns 0 when it was handled, 1 for
 * --help, -1 on an error.
 */
static int
replay_parse_option(int argc, char **argv, int *i, replay_options_t *options)
{
    int          rc;
    const char  *value;

    if (strcmp(argv[*i], "--help") == 0 || strcmp(argv[*i], "-h") == 0) {
        return 1;
    }

    rc = replay_option_value(argc, argv, i, "--api-key-file", &value);
    if (rc != 0) {
        options->key_file = value;
        return rc < 0 ? -1 : 0;
    }

    rc = replay_option_value(argc, argv, i, "--api", &value);
    if (rc != 0) {
        return rc < 0 ? -1 : replay_set_api(options, value);
    }

    rc = replay_option_value(argc, argv, i, "--max-attempts", &value);
    if (rc < 0) {
        return -1;
    }

    if (rc > 0) {
        if (replay_parse_long(value, 1, REPLAY_MAX_ATTEMPTS,
                              &options->max_attempts) != 0)
        {
            fprintf(stderr, REPLAY_NAME ": invalid --max-attempts \"%s\": "
                    "expected an integer from 1 to %d\n",
                    value, REPLAY_MAX_ATTEMPTS);
            return -1;
        }
        return 0;
    }

    fprintf(stderr, REPLAY_NAME ": unknown option \"%s\"\n", argv[*i]);

    return -1;
}


/* Returns 0 to go on, 1 after --help, -1 on a usage error. */
static int
replay_parse_args(int argc, char **argv, replay_options_t *options)
{
    int  i, rc, files_only;

    files_only = 0;

    for (i = 1; i < argc; i++) {

        if (!files_only && strcmp(argv[i], "--") == 0) {
            files_only = 1;
            continue;
        }

        if (!files_only && argv[i][0] == '-' && argv[i][1] != '\0') {
            rc = replay_parse_option(argc, argv, &i, options);
            if (rc != 0) {
                return rc;
            }
            continue;
        }

        if (strcmp(argv[i], "-") == 0) {
            fprintf(stderr, REPLAY_NAME ": reading standard input is not "
                    "supported; name a dead-letter file\n");
            return -1;
        }

        options->files[options->nfiles++] = argv[i];
    }

    if (options->api_url == NULL
        && replay_set_api(options, REPLAY_DEFAULT_API) != 0)
    {
        return -1;
    }

    if (options->key_file == NULL) {
        fprintf(stderr, REPLAY_NAME ": missing --api-key-file\n");
        return -1;
    }

    if (options->nfiles == 0) {
        fprintf(stderr, REPLAY_NAME ": missing DEADLETTER file\n");
        return -1;
    }

    return 0;
}


static int
replay_env_long(const char *name, long min, long max, long *value)
{
    const char  *text;

    text = getenv(name);
    if (text == NULL || text[0] == '\0') {
        return 0;
    }

    if (replay_parse_long(text, min, max, value) != 0) {
        fprintf(stderr, REPLAY_NAME ": invalid %s \"%s\": expected an "
                "integer from %ld to %ld\n", name, text, min, max);
        return -1;
    }

    return 0;
}


static int
replay_read_env(replay_options_t *options)
{
    long         seed;
    const char  *text;

    if (replay_env_long("STORIES_REPLAY_BACKOFF_MS", 0, REPLAY_BACKOFF_MAX_MS,
                        &options->backoff_base_ms) != 0
        || replay_env_long("STORIES_REPLAY_CONNECT_TIMEOUT", 1,
                           REPLAY_TIMEOUT_MAX_S,
                           &options->connect_timeout_s) != 0
        || replay_env_long("STORIES_REPLAY_TIMEOUT", 1, REPLAY_TIMEOUT_MAX_S,
                           &options->timeout_s) != 0)
    {
        return -1;
    }

    options->seed = (uint64_t) time(NULL) ^ ((uint64_t) getpid() << 32)
                    ^ (uint64_t) replay_now_ms();

    text = getenv("STORIES_REPLAY_SEED");
    if (text != NULL && text[0] != '\0') {
        if (replay_env_long("STORIES_REPLAY_SEED", 0, 0x7fffffffL, &seed)
            != 0)
        {
            return -1;
        }
        options->seed = (uint64_t) seed;
    }

    return 0;
}


/*
 * Reads the API key and builds the Authorization header from it.  Messages
 * name the file but never contain its content.
 */
static char *
replay_read_key(const char *path)
{
    FILE    *f;
    char     key[REPLAY_KEY_MAX + 3], *header;
    size_t   len, i;

    f = fopen(path, "r");
    if (f == NULL) {
        fprintf(stderr, REPLAY_NAME ": cannot open API key file %s: %s\n",
                path, strerror(errno));
        return NULL;
    }

    /* The buffer has room for the key, "\r\n" and one byte more. */
    len = fread(key, 1, sizeof(key), f);

    if (ferror(f)) {
        fprintf(stderr, REPLAY_NAME ": cannot read API key file %s: %s\n",
                path, strerror(errno));
        fclose(f);
        return NULL;
    }

    fclose(f);

    if (len == sizeof(key)) {
        len = REPLAY_KEY_MAX + 1;

    } else if (len > 0 && key[len - 1] == '\n') {
        len--;
        if (len > 0 && key[len - 1] == '\r') {
            len--;
        }
    }

    if (len == 0) {
        fprintf(stderr, REPLAY_NAME ": API key file %s is empty\n", path);
        return NULL;
    }

    if (len > REPLAY_KEY_MAX) {
        fprintf(stderr, REPLAY_NAME ": API key file %s is longer than %d "
                "bytes\n", path, REPLAY_KEY_MAX);
        return NULL;
    }

    for (i = 0; i < len; i++) {
        if ((unsigned char) key[i] <= ' ' || key[i] == 0x7f) {
            fprintf(stderr, REPLAY_NAME ": API key file %s contains "
                    "whitespace or a control character; it must contain "
                    "only the key\n", path);
            return NULL;
        }
    }

    key[len] = '\0';
    header = replay_concat("Authorization: Bearer ", key);
    memset(key, 0, sizeof(key));

    return header;
}


static void
replay_on_signal(int signo)
{
    struct sigaction  sa;

    if (replay_signal == 0) {
        replay_signal = signo;
        return;
    }

    /* A second signal ends the process at once. */
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = SIG_DFL;
    sigemptyset(&sa.sa_mask);
    sigaction(signo, &sa, NULL);
    raise(signo);
}


static void
replay_install_signals(void)
{
    struct sigaction  sa;

    memset(&sa, 0, sizeof(sa));
    sigemptyset(&sa.sa_mask);

    /* No SA_RESTART, so a signal cuts short nanosleep() and poll(). */
    sa.sa_handler = replay_on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
}


/* Sleeps in short steps so that SIGINT or SIGTERM end the wait quickly. */
static int
replay_sleep_ms(long ms)
{
    long             deadline, left;
    struct timespec  ts;

    deadline = replay_now_ms() + ms;

    while (replay_signal == 0) {
        left = deadline - replay_now_ms();
        if (left <= 0) {
            return 0;
        }

        if (left > REPLAY_SLEEP_STEP_MS) {
            left = REPLAY_SLEEP_STEP_MS;
        }

        ts.tv_sec = 0;
        ts.tv_nsec = left * 1000000;
        nanosleep(&ts, NULL);
    }

    return -1;
}


/* Returns a pseudo-random number in [0, 1) from the splitmix64 generator. */
static double
replay_random(replay_ctx_t *ctx)
{
    uint64_t  z;

    ctx->random_state += 0x9e3779b97f4a7c15ULL;
    z = ctx->random_state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;

    return (double) (z >> 11) / 9007199254740992.0;
}


/*
 * Returns the wait after failed attempt number ATTEMPT (from 1): a uniform
 * random time up to base * 2^(ATTEMPT - 1), capped at 30 s ("full jitter").
 */
static long
replay_backoff_ms(replay_ctx_t *ctx, long attempt)
{
    long  cap, i;

    cap = ctx->options->backoff_base_ms;

    for (i = 1; i < attempt && cap < REPLAY_BACKOFF_MAX_MS; i++) {
        cap *= 2;
    }

    if (cap > REPLAY_BACKOFF_MAX_MS) {
        cap = REPLAY_BACKOFF_MAX_MS;
    }

    return (long) (replay_random(ctx) * (double) (cap + 1));
}


static size_t
replay_discard_body(char *data, size_t size, size_t nmemb, void *user)
{
    (void) data;
    (void) user;

    return size * nmemb;
}


/*
 * Stores a Retry-After value given in delta-seconds.  An HTTP date is
 * ignored, so the backoff applies instead.
 */
static size_t
replay_read_header(char *data, size_t size, size_t nmemb, void *user)
{
    size_t             len, i;
    long               seconds;
    replay_attempt_t  *attempt;

    attempt = user;
    len = size * nmemb;

    if (len >= 5 && memcmp(data, "HTTP/", 5) == 0) {
        attempt->retry_after = -1;
        return len;
    }

    if (len < 12 || strncasecmp(data, "Retry-After:", 12) != 0) {
        return len;
    }

    for (i = 12; i < len && (data[i] == ' ' || data[i] == '\t'); i++) {
        /* void */
    }

    seconds = -1;

    for ( /* void */ ; i < len && data[i] >= '0' && data[i] <= '9'; i++) {
        if (seconds < 0) {
            seconds = 0;
        }
        /* Larger values stay above the cap, which applies later. */
        if (seconds <= REPLAY_RETRY_AFTER_MAX_MS / 1000) {
            seconds = seconds * 10 + (data[i] - '0');
        }
    }

    for ( /* void */ ; i < len; i++) {
        if (data[i] != ' ' && data[i] != '\t' && data[i] != '\r'
            && data[i] != '\n')
        {
            return len;
        }
    }

    attempt->retry_after = seconds;

    return len;
}


/* Aborts the transfer after SIGINT or SIGTERM. */
static int
replay_check_signal(void *user, curl_off_t dltotal, curl_off_t dlnow,
    curl_off_t ultotal, curl_off_t ulnow)
{
    (void) user;
    (void) dltotal;
    (void) dlnow;
    (void) ultotal;
    (void) ulnow;

    return replay_signal != 0;
}


static int
replay_curl_init(replay_ctx_t *ctx, const char *auth_header)
{
    CURL               *curl;
    replay_options_t   *options;

    options = ctx->options;

    ctx->headers = curl_slist_append(ctx->headers, auth_header);
    ctx->headers = curl_slist_append(ctx->headers,
                                     "Content-Type: application/json");
    /*
     * libcurl adds "Expect: 100-continue" to POST bodies larger than 1 MB and
     * then waits up to 1 s for a 100 response (everything.curl.dev, "Expect
     * 100-continue").  The empty header turns that off.
     */
    ctx->headers = curl_slist_append(ctx->headers, "Expect:");

    ctx->curl = curl_easy_init();

    if (ctx->headers == NULL || ctx->curl == NULL) {
        fprintf(stderr, REPLAY_NAME ": cannot initialize libcurl\n");
        return -1;
    }

    curl = ctx->curl;

    /* Verbose output would print the Authorization header. */
    curl_easy_setopt(curl, CURLOPT_VERBOSE, 0L);
    curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
#if LIBCURL_VERSION_NUM >= 0x075500
    curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
#else
    curl_easy_setopt(curl, CURLOPT_PROTOCOLS,
                     (long) (CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
    curl_easy_setopt(curl, CURLOPT_USERAGENT, REPLAY_NAME);
    curl_easy_setopt(curl, CURLOPT_POST, 1L);
    curl_easy_setopt(curl, CURLOPT_HTTPHEADER, ctx->headers);
    curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, replay_discard_body);
    curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, replay_read_header);
    curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, replay_check_signal);
    curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT,
                     options->connect_timeout_s);
    curl_easy_setopt(curl, CURLOPT_TIMEOUT, options->timeout_s);

    return 0;
}


/* Sets the URL: the API URL followed by the line's path. */
static int
replay_set_url(replay_ctx_t *ctx, const replay_line_t *line)
{
    size_t   size;
    char    *url;

    size = ctx->options->api_url_len + line->path_len + 1;

    if (size > ctx->url_size) {
        url = realloc(ctx->url, size);
        if (url == NULL) {
            fprintf(stderr, REPLAY_NAME ": out of memory\n");
            return -1;
        }
        ctx->url = url;
        ctx->url_size = size;
    }

    memcpy(ctx->url, ctx->options->api_url, ctx->options->api_url_len);
    memcpy(ctx->url + ctx->options->api_url_len, line->path, line->path_len);
    ctx->url[size - 1] = '\0';

    curl_easy_setopt(ctx->curl, CURLOPT_URL, ctx->url);

    return 0;
}


static void
replay_attempt(replay_ctx_t *ctx, const replay_line_t *line,
    replay_attempt_t *attempt)
{
    CURL  *curl;

    curl = ctx->curl;

    attempt->status = 0;
    attempt->retry_after = -1;
    attempt->error[0] = '\0';

    curl_easy_setopt(curl, CURLOPT_HEADERDATA, attempt);
    curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, attempt->error);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDSIZE_LARGE,
                     (curl_off_t) line->body_len);
    curl_easy_setopt(curl, CURLOPT_POSTFIELDS, line->body);

    attempt->rc = curl_easy_perform(curl);

    curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &attempt->status);

    curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, NULL);
    curl_easy_setopt(curl, CURLOPT_HEADERDATA, NULL);
}


/* Returns 1 for libcurl errors that a later attempt may not hit. */
static int
replay_curl_error_is_transient(CURLcode rc)
{
    switch (rc) {
    case CURLE_COULDNT_RESOLVE_PROXY:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_CONNECT:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
        return 1;
    default:
        return 0;
    }
}


/*
 * A 2xx status line counts as delivered even when reading the rest of the
 * response failed, because Stories had accepted the request by then.
 */
static replay_action_t
replay_classify(const replay_attempt_t *attempt)
{
    long  status;

    status = attempt->status;

    if (status >= 200 && status < 300) {
        return REPLAY_ACTION_DELIVERED;
    }

    if (attempt->rc == CURLE_ABORTED_BY_CALLBACK && replay_signal != 0) {
        return REPLAY_ACTION_INTERRUPTED;
    }

    if (status == 0) {
        return replay_curl_error_is_transient(attempt->rc)
               ? REPLAY_ACTION_RETRY : REPLAY_ACTION_PERMANENT;
    }

    if (status == 408 || status == 429 || status >= 500) {
        return REPLAY_ACTION_RETRY;
    }

    return REPLAY_ACTION_PERMANENT;
}


static void
replay_describe(const replay_attempt_t *attempt, char *text, size_t size)
{
    if (attempt->status != 0) {
        snprintf(text, size, "Stories answered %ld", attempt->status);

    } else if (attempt->error[0] != '\0') {
        snprintf(text, size, "%s", attempt->error);

    } else {
        snprintf(text, size, "%s", curl_easy_strerror(attempt->rc));
    }
}


static long
replay_retry_delay_ms(replay_ctx_t *ctx, const replay_attempt_t *attempt,
    long number)
{
    if (attempt->status == 429 && attempt->retry_after >= 0) {
        if (attempt->retry_after >= REPLAY_RETRY_AFTER_MAX_MS / 1000) {
            return REPLAY_RETRY_AFTER_MAX_MS;
        }
        return attempt->retry_after * 1000;
    }

    return replay_backoff_ms(ctx, number);
}


/*
 * Sends one line, retrying as the options allow.  On REPLAY_FAILED, *status
 * is the last HTTP status (0 when none) and REASON describes the failure.
 */
static replay_outcome_t
replay_send_line(replay_ctx_t *ctx, replay_file_t *rf,
    const replay_line_t *line, long *status, char *reason, size_t size)
{
    long              number, max, delay_ms;
    char              text[CURL_ERROR_SIZE + 64];
    replay_action_t   action;
    replay_attempt_t  attempt;

    max = ctx->options->max_attempts;

    if (replay_set_url(ctx, line) != 0) {
        return REPLAY_FATAL;
    }

    for (number = 1; /* void */ ; number++) {

        replay_attempt(ctx, line, &attempt);
        action = replay_classify(&attempt);

        if (action == REPLAY_ACTION_DELIVERED) {
            return REPLAY_DELIVERED;
        }

        if (action == REPLAY_ACTION_INTERRUPTED) {
            return REPLAY_INTERRUPTED;
        }

        *status = attempt.status;
        replay_describe(&attempt, text, sizeof(text));

        if (action == REPLAY_ACTION_PERMANENT) {
            snprintf(reason, size, "%s, not retried", text);
            return REPLAY_FAILED;
        }

        if (number >= max) {
            snprintf(reason, size, "%s, gave up after %ld attempts",
                     text, number);
            return REPLAY_FAILED;
        }

        delay_ms = replay_retry_delay_ms(ctx, &attempt, number);
        replay_log_retry(ctx, rf, text, number, delay_ms);

        if (replay_sleep_ms(delay_ms) != 0) {
            return REPLAY_INTERRUPTED;
        }
    }
}


static const char *
replay_skip_space(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')) {
        p++;
    }

    return p;
}


/* Returns the position after the JSON string whose opening quote is at P. */
static const char *
replay_skip_string(const char *p, const char *end)
{
    for (p++; p < end; p++) {
        if (*p == '\\') {
            /* The for loop's p++ steps over the escaped character. */
            if (++p == end) {
                return NULL;
            }
            continue;
        }
        if (*p == '"') {
            return p + 1;
        }
    }

    return NULL;
}


/*
 * Skips one JSON value: a string, an object or array matched by bracket
 * depth, or a scalar token.  Only the structure needed to find the end of
 * the value is checked.
 */
static const char *
replay_skip_value(const char *p, const char *end)
{
    long         depth;
    const char  *start;

    if (p == end) {
        return NULL;
    }

    if (*p == '"') {
        return replay_skip_string(p, end);
    }

    if (*p == '{' || *p == '[') {
        depth = 0;

        while (p < end) {
            if (*p == '"') {
                p = replay_skip_string(p, end);
                if (p == NULL) {
                    return NULL;
                }
                continue;
            }

            if (*p == '{' || *p == '[') {
                depth++;

            } else if ((*p == '}' || *p == ']') && --depth == 0) {
                return p + 1;
            }

            p++;
        }

        return NULL;
    }

    start = p;

    while (p < end && *p != ',' && *p != '}' && *p != ']' && *p != ' '
           && *p != '\t' && *p != '\r' && *p != '\n' && *p != '"'
           && *p != '{' && *p != '[')
    {
        p++;
    }

    return p == start ? NULL : p;
}


static const char *
replay_check_path(const replay_line_t *line)
{
    size_t  i;

    if (line->path == NULL) {
        return "missing \"path\"";
    }

    /* the module writes only these two, and the key goes with each line */

    for (i = 0; replay_paths[i] != NULL; i++) {
        if (line->path_len == strlen(replay_paths[i])
            && memcmp(line->path, replay_paths[i], line->path_len) == 0)
        {
            return NULL;
        }
    }

    return "\"path\" is neither \"/v1/events/\" nor \"/v1/users\"";

    return NULL;
}


/*
 * Stores the value of the field NAME, which starts at VALUE and ends before
 * END, in LINE when it is "path" or "messageId".
 */
static const char *
replay_store_field(replay_line_t *line, const char *name, size_t name_len,
    const char *value, const char *end)
{
    if (name_len == 4 && memcmp(name, "path", 4) == 0) {
        if (*value != '"') {
            return "\"path\" is not a string";
        }
        line->path = value + 1;
        line->path_len = end - value - 2;

    } else if (name_len == 9 && memcmp(name, "messageId", 9) == 0) {
        line->message_id = value;
        line->message_id_len = end - value;
    }

    return NULL;
}


/*
 * Reads a field name and the ':' after it.  Returns the start of the value,
 * or NULL with *error set.
 */
static const char *
replay_read_field_name(const char *p, const char *last, const char **name,
    size_t *name_len, const char **error)
{
    p = replay_skip_space(p, last);

    if (p == last || *p != '"') {
        *error = (p == last) ? "missing \"body\"" : "expected a field name";
        return NULL;
    }

    *name = p + 1;

    p = replay_skip_string(p, last);
    if (p == NULL) {
        *error = "unterminated field name";
        return NULL;
    }

    *name_len = p - 1 - *name;

    p = replay_skip_space(p, last);
    if (p == last || *p != ':') {
        *error = "expected \":\" after a field name";
        return NULL;
    }

    return replay_skip_space(p + 1, last);
}


/*
 * Finds "path" and "body" in one line without its newline.  The body is
 * everything from the value after "body": up to the final '}', and its value
 * must end there.  Returns NULL, or a message that explains why the line is
 * invalid.
 */
static const char *
replay_parse_line(const char *text, size_t len, replay_line_t *line)
{
    size_t       name_len;
    const char  *p, *end, *last, *name, *value, *error;

    memset(line, 0, sizeof(replay_line_t));

    end = text + len;

    if (len == 0 || text[0] != '{') {
        return "the line does not start with \"{\"";
    }

    last = end;
    while (last > text && (last[-1] == ' ' || last[-1] == '\t')) {
        last--;
    }

    if (last - text < 2 || last[-1] != '}') {
        return "the line does not end with \"}\"";
    }

    last--;

    for (p = text + 1; /* void */ ; p++) {

        value = replay_read_field_name(p, last, &name, &name_len, &error);
        if (value == NULL) {
            return error;
        }

        if (name_len == 4 && memcmp(name, "body", 4) == 0) {
            p = replay_skip_value(value, last);
            if (p == NULL || replay_skip_space(p, last) != last) {
                return "\"body\" is not a single JSON value or not the "
                       "last field";
            }
            line->body = value;
            line->body_len = last - value;
            break;
        }

        p = replay_skip_value(value, last);
        if (p == NULL) {
            return "invalid field value";
        }

        error = replay_store_field(line, name, name_len, value, p);
        if (error != NULL) {
            return error;
        }

        p = replay_skip_space(p, last);
        if (p == last) {
            return "missing \"body\"";
        }

        if (*p != ',') {
            return "expected \",\" between fields";
        }
    }

    return replay_check_path(line);
}


static int
replay_write_all(int fd, const char *data, size_t len)
{
    ssize_t  n;

    while (len > 0) {
        n = write(fd, data, len);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        data += n;
        len -= n;
    }

    return 0;
}


/* Appends TEXT to OUT as a JSON string, quotes included. */
static char *
replay_escape_json(char *out, const char *text, size_t len)
{
    size_t          i;
    unsigned char   c;
    static const char  hex[] = "0123456789abcdef";

    *out++ = '"';

    for (i = 0; i < len; i++) {
        c = (unsigned char) text[i];

        if (c == '"' || c == '\\') {
            *out++ = '\\';
            *out++ = c;

        } else if (c < 0x20) {
            memcpy(out, "\\u00", 4);
            out[4] = hex[c >> 4];
            out[5] = hex[c & 0xf];
            out += 6;

        } else {
            *out++ = c;
        }
    }

    *out++ = '"';

    return out;
}


/*
 * Returns the length of the UTF-8 sequence at P, or 0 when the bytes are
 * not well-formed UTF-8 (RFC 3629, section 4): overlong forms, surrogates
 * and code points above U+10FFFF are rejected.
 */
static size_t
replay_utf8_length(const char *p, const char *end)
{
    size_t          n, i;
    unsigned char   c, min, max;

    c = (unsigned char) p[0];

    /* min and max bound the second byte */

    if (c < 0x80) {
        return 1;

    } else if (c >= 0xc2 && c <= 0xdf) {
        n = 2;
        min = 0x80;
        max = 0xbf;

    } else if (c == 0xe0) {
        n = 3;
        min = 0xa0;
        max = 0xbf;

    } else if (c == 0xed) {
        n = 3;
        min = 0x80;
        max = 0x9f;

    } else if (c >= 0xe1 && c <= 0xef) {
        n = 3;
        min = 0x80;
        max = 0xbf;

    } else if (c == 0xf0) {
        n = 4;
        min = 0x90;
        max = 0xbf;

    } else if (c >= 0xf1 && c <= 0xf3) {
        n = 4;
        min = 0x80;
        max = 0xbf;

    } else if (c == 0xf4) {
        n = 4;
        min = 0x80;
        max = 0x8f;

    } else {
        return 0;
    }

    if ((size_t) (end - p) < n) {
        return 0;
    }

    c = (unsigned char) p[1];
    if (c < min || c > max) {
        return 0;
    }

    for (i = 2; i < n; i++) {
        c = (unsigned char) p[i];
        if (c < 0x80 || c > 0xbf) {
            return 0;
        }
    }

    return n;
}


static int
replay_utf8_valid(const char *p, const char *end)
{
    size_t  n;

    while (p < end) {
        n = replay_utf8_length(p, end);
        if (n == 0) {
            return 0;
        }
        p += n;
    }

    return 1;
}


/*
 * Tells whether TEXT is one JSON object that can be copied into a .failed
 * line as it is: cJSON reads it, and it is UTF-8 without control bytes,
 * which cJSON lets through in strings but stricter readers reject.
 */
static int
replay_is_object(const char *text, size_t len)
{
    int          object;
    size_t       i;
    cJSON       *root;
    const char  *end;

    for (i = 0; i < len; i++) {
        if ((unsigned char) text[i] < 0x20) {
            return 0;
        }
    }

    if (!replay_utf8_valid(text, text + len)) {
        return 0;
    }

    end = NULL;
    root = cJSON_ParseWithLengthOpts(text, len, &end, 0);

    object = cJSON_IsObject(root)
             && replay_skip_space(end, text + len) == text + len;

    cJSON_Delete(root);

    return object;
}


/*
 * Returns the position after the '{' of a JSON object line and after the
 * "replay_status" members that earlier runs put first.
 */
static const char *
replay_after_status(const char *text, const char *end)
{
    const char  *p, *q;

    static const char  name[] = "\"replay_status\":";

    p = replay_skip_space(text + 1, end);

    for ( ;; ) {
        if ((size_t) (end - p) < sizeof(name) - 1
            || memcmp(p, name, sizeof(name) - 1) != 0)
        {
            return p;
        }

        q = p + sizeof(name) - 1;

        if (q < end && *q == '-') {
            q++;
        }

        while (q < end && *q >= '0' && *q <= '9') {
            q++;
        }

        q = replay_skip_space(q, end);

        if (q < end && *q == '}') {
            return q;
        }

        if (q == end || *q != ',') {
            return p;
        }

        p = replay_skip_space(q + 1, end);
    }
}


/* Appends DATA in standard base64 (RFC 4648), with padding. */
static char *
replay_base64(char *out, const char *data, size_t len)
{
    size_t          i;
    uint32_t        group;
    const uint8_t  *in;

    static const char  alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    in = (const uint8_t *) data;

    for (i = 0; i + 3 <= len; i += 3) {
        group = (uint32_t) in[i] << 16 | (uint32_t) in[i + 1] << 8 | in[i + 2];
        *out++ = alphabet[group >> 18];
        *out++ = alphabet[(group >> 12) & 0x3f];
        *out++ = alphabet[(group >> 6) & 0x3f];
        *out++ = alphabet[group & 0x3f];
    }

    if (len - i == 1) {
        group = (uint32_t) in[i] << 16;
        *out++ = alphabet[group >> 18];
        *out++ = alphabet[(group >> 12) & 0x3f];
        *out++ = '=';
        *out++ = '=';

    } else if (len - i == 2) {
        group = (uint32_t) in[i] << 16 | (uint32_t) in[i + 1] << 8;
        *out++ = alphabet[group >> 18];
        *out++ = alphabet[(group >> 12) & 0x3f];
        *out++ = alphabet[(group >> 6) & 0x3f];
        *out++ = '=';
    }

    return out;
}


/*
 * Builds the .failed line, which is always a JSON object.  A line that is
 * a JSON object gets "replay_status":STATUS as its first member, in place
 * of those an earlier run put first, and keeps the rest byte for byte, so
 * "body" stays last.  Any other line becomes
 * {"replay_status":STATUS,"replay_error":"not a JSON object","line":LINE}
 * with the line as a JSON string, or with "line_base64" in place of "line"
 * when the line is not UTF-8.
 */
static char *
replay_failed_line(const char *text, size_t len, long status, size_t *size)
{
    int          n;
    char        *out, *p;
    const char  *end, *rest;

    end = text + len;

    /* an escaped byte takes at most 6 bytes, and base64 takes 4 for 3 */

    out = malloc(len * 6 + 128);
    if (out == NULL) {
        return NULL;
    }

    n = sprintf(out, "{\"replay_status\":%ld", status);
    p = out + n;

    if (replay_is_object(text, len)) {
        rest = replay_after_status(text, end);

        if (*rest != '}') {
            *p++ = ',';
        }

        memcpy(p, rest, end - rest);
        p += end - rest;

    } else if (replay_utf8_valid(text, end)) {
        n = sprintf(p, ",\"replay_error\":\"%s\",\"line\":",
                    REPLAY_NOT_OBJECT);
        p = replay_escape_json(p + n, text, len);
        *p++ = '}';

    } else {
        n = sprintf(p, ",\"replay_error\":\"%s\",\"line_base64\":\"",
                    REPLAY_NOT_OBJECT);
        p = replay_base64(p + n, text, len);
        *p++ = '"';
        *p++ = '}';
    }

    *p++ = '\n';
    *size = p - out;

    return out;
}


static int
replay_append_failed(replay_file_t *rf, const char *text, size_t len,
    long status)
{
    int      fd, rc;
    char    *out;
    size_t   size;

    out = replay_failed_line(text, len, status, &size);
    if (out == NULL) {
        fprintf(stderr, REPLAY_NAME ": out of memory\n");
        return -1;
    }

    rc = -1;

    fd = open(rf->failed_path, O_WRONLY | O_APPEND | O_CREAT,
              rf->st.st_mode & 0666);

    if (fd >= 0 && replay_write_all(fd, out, size) == 0 && fsync(fd) == 0) {
        rc = 0;
    }

    if (rc != 0) {
        fprintf(stderr, REPLAY_NAME ": cannot append to %s: %s\n",
                rf->failed_path, strerror(errno));
    }

    if (fd >= 0) {
        close(fd);
    }

    free(out);

    return rc;
}


/* Writes "INODE OFFSET\n" to a temporary file and renames it over .progress. */
static int
replay_save_progress(replay_file_t *rf)
{
    int   fd, n, rc;
    char  text[64];

    n = snprintf(text, sizeof(text), "%llu %lld\n",
                 (unsigned long long) rf->st.st_ino, (long long) rf->offset);

    rc = -1;

    fd = open(rf->progress_tmp_path, O_WRONLY | O_CREAT | O_TRUNC,
              rf->st.st_mode & 0666);

    if (fd >= 0 && replay_write_all(fd, text, n) == 0 && fsync(fd) == 0) {
        rc = 0;
    }

    if (fd >= 0 && close(fd) != 0) {
        rc = -1;
    }

    if (rc == 0 && rename(rf->progress_tmp_path, rf->progress_path) != 0) {
        rc = -1;
    }

    if (rc != 0) {
        fprintf(stderr, REPLAY_NAME ": cannot write %s: %s\n",
                rf->progress_path, strerror(errno));
    }

    return rc;
}


/* Returns 1 when OFFSET is 0 or the byte before it is a newline. */
static int
replay_at_line_start(replay_file_t *rf, off_t offset)
{
    char  c;

    if (offset == 0) {
        return 1;
    }

    return pread(fileno(rf->file), &c, 1, offset - 1) == 1 && c == '\n';
}


/*
 * Reads .progress and moves to its offset.  The file is replayed from the
 * start when its inode differs, it is shorter than the offset, or the
 * offset is not at the start of a line.
 * NOTE: a new file that got the inode number of a deleted one and is long
 * enough passes these checks, and its first OFFSET bytes are then skipped.
 */
static int
replay_load_progress(replay_file_t *rf)
{
    int                  n;
    FILE                *f;
    unsigned long long   inode;
    long long            offset;

    f = fopen(rf->progress_path, "r");
    if (f == NULL) {
        if (errno == ENOENT) {
            return 0;
        }
        fprintf(stderr, REPLAY_NAME ": cannot read %s: %s\n",
                rf->progress_path, strerror(errno));
        return -1;
    }

    n = fscanf(f, "%llu %lld", &inode, &offset);
    fclose(f);

    if (n != 2 || offset < 0) {
        fprintf(stderr, REPLAY_NAME ": invalid %s: expected \"INODE OFFSET\"; "
                "delete it to replay %s from the start\n",
                rf->progress_path, rf->path);
        return -1;
    }

    if (inode != (unsigned long long) rf->st.st_ino
        || offset > (long long) rf->st.st_size
        || !replay_at_line_start(rf, (off_t) offset))
    {
        fprintf(stderr, REPLAY_NAME ": %s was replaced or truncated since "
                "the last run; replaying it from the start\n", rf->path);
        return 0;
    }

    rf->offset = (off_t) offset;

    if (fseeko(rf->file, rf->offset, SEEK_SET) != 0) {
        fprintf(stderr, REPLAY_NAME ": cannot seek in %s: %s\n",
                rf->path, strerror(errno));
        return -1;
    }

    return 0;
}


/* Counts the newlines from the current offset to the end of the file. */
static unsigned long
replay_count_lines(replay_file_t *rf)
{
    char            buf[65536];
    off_t           pos;
    ssize_t         n, i;
    unsigned long   count;

    count = 0;
    pos = rf->offset;

    while ((n = pread(fileno(rf->file), buf, sizeof(buf), pos)) > 0) {
        for (i = 0; i < n; i++) {
            count += (buf[i] == '\n');
        }
        pos += n;
    }

    return count;
}


static void
replay_progress_clear(replay_ctx_t *ctx)
{
    if (ctx->show_progress) {
        fputs("\r\033[K", stderr);
    }
}


/* Redraws the status line on a terminal, at most every 100 ms unless FORCE. */
static void
replay_progress_show(replay_ctx_t *ctx, replay_file_t *rf, int force)
{
    long  now;

    if (!ctx->show_progress) {
        return;
    }

    now = replay_now_ms();

    if (!force && now - ctx->last_progress_ms < REPLAY_PROGRESS_INTERVAL_MS) {
        return;
    }

    ctx->last_progress_ms = now;

    if (rf->lines_done > rf->lines_total) {
        rf->lines_total = rf->lines_done;
    }

    fprintf(stderr, "\r\033[K%s: %lu/%lu lines, %lu delivered, %lu failed",
            rf->path, rf->lines_done, rf->lines_total, rf->delivered,
            rf->failed);
    fflush(stderr);
}


static void
replay_log_failure(replay_ctx_t *ctx, replay_file_t *rf, off_t offset,
    const replay_line_t *line, const char *reason)
{
    int            i, id_len;
    char           id[REPLAY_MESSAGE_ID_MAX];
    unsigned char  c;

    replay_progress_clear(ctx);

    id_len = (int) line->message_id_len;
    if (id_len > REPLAY_MESSAGE_ID_MAX) {
        id_len = REPLAY_MESSAGE_ID_MAX;
    }

    /* A null messageId is left out. */
    if (line->message_id != NULL && line->message_id[0] == '"') {

        /* terminal control sequences in the file must not reach stderr */

        for (i = 0; i < id_len; i++) {
            c = line->message_id[i];
            id[i] = (c >= 0x20 && c < 0x7f) ? (char) c : '?';
        }

        fprintf(stderr, REPLAY_NAME ": %s: line at byte %lld, messageId "
                "%.*s: %s; appended to %s\n", rf->path, (long long) offset,
                id_len, id, reason, rf->failed_path);

    } else {
        fprintf(stderr, REPLAY_NAME ": %s: line at byte %lld: %s; "
                "appended to %s\n", rf->path, (long long) offset, reason,
                rf->failed_path);
    }
}


static void
replay_log_retry(replay_ctx_t *ctx, replay_file_t *rf, const char *reason,
    long number, long delay_ms)
{
    replay_progress_clear(ctx);

    fprintf(stderr, REPLAY_NAME ": %s: line at byte %lld: attempt %ld of %ld "
            "failed (%s), retrying in %.2f s\n", rf->path,
            (long long) rf->offset, number, ctx->options->max_attempts,
            reason, (double) delay_ms / 1000.0);

    replay_progress_show(ctx, rf, 1);
}


/* Sends one non-empty line, or appends it to .failed when it fails. */
static replay_outcome_t
replay_handle_line(replay_ctx_t *ctx, replay_file_t *rf, const char *text,
    size_t len)
{
    long               status;
    char               reason[CURL_ERROR_SIZE + 128];
    const char        *error;
    replay_line_t      line;
    replay_outcome_t   outcome;

    status = 0;

    error = replay_parse_line(text, len, &line);

    if (error != NULL) {
        snprintf(reason, sizeof(reason), "invalid dead-letter line: %s",
                 error);

    } else {
        outcome = replay_send_line(ctx, rf, &line, &status, reason,
                                   sizeof(reason));

        if (outcome == REPLAY_DELIVERED) {
            rf->delivered++;
            ctx->delivered++;
        }

        if (outcome != REPLAY_FAILED) {
            return outcome;
        }
    }

    if (replay_append_failed(rf, text, len, status) != 0) {
        return REPLAY_FATAL;
    }

    rf->failed++;
    ctx->failed++;

    replay_log_failure(ctx, rf, rf->offset, &line, reason);

    return REPLAY_FAILED;
}


/*
 * Handles one line read with getline(), N bytes with its newline, and
 * records the offset after it unless the line was interrupted.
 */
static replay_outcome_t
replay_process_line(replay_ctx_t *ctx, replay_file_t *rf, const char *text,
    size_t n)
{
    size_t             len;
    replay_outcome_t   outcome;

    len = n - 1;
    if (len > 0 && text[len - 1] == '\r') {
        len--;
    }

    outcome = REPLAY_DELIVERED;

    if (len > 0) {
        outcome = replay_handle_line(ctx, rf, text, len);

        if (outcome == REPLAY_INTERRUPTED || outcome == REPLAY_FATAL) {
            return outcome;
        }

        rf->lines_done++;
    }

    rf->offset += n;

    if (replay_save_progress(rf) != 0) {
        return REPLAY_FATAL;
    }

    /* A failure message has cleared the status line. */
    replay_progress_show(ctx, rf, outcome == REPLAY_FAILED);

    return outcome;
}


static void
replay_file_close(replay_file_t *rf)
{
    if (rf->file != NULL) {
        fclose(rf->file);
    }

    free(rf->progress_path);
    free(rf->progress_tmp_path);
    free(rf->failed_path);
}


static int
replay_file_open(replay_ctx_t *ctx, replay_file_t *rf, const char *path)
{
    memset(rf, 0, sizeof(replay_file_t));

    rf->path = path;
    rf->progress_path = replay_concat(path, ".progress");
    rf->progress_tmp_path = replay_concat(path, ".progress.tmp");
    rf->failed_path = replay_concat(path, ".failed");

    if (rf->progress_path == NULL || rf->progress_tmp_path == NULL
        || rf->failed_path == NULL)
    {
        return -1;
    }

    rf->file = fopen(path, "r");

    if (rf->file == NULL || fstat(fileno(rf->file), &rf->st) != 0) {
        fprintf(stderr, REPLAY_NAME ": cannot open %s: %s\n",
                path, strerror(errno));
        return -1;
    }

    if (!S_ISREG(rf->st.st_mode)) {
        fprintf(stderr, REPLAY_NAME ": %s is not a regular file\n", path);
        return -1;
    }

    if (replay_load_progress(rf) != 0) {
        return -1;
    }

    if (ctx->show_progress) {
        rf->lines_total = replay_count_lines(rf);
    }

    return 0;
}


static const char *
replay_signal_name(int signo)
{
    return signo == SIGINT ? "SIGINT" : signo == SIGTERM ? "SIGTERM"
                                                        : "a signal";
}


/*
 * Replays one dead-letter file from its saved offset to its end, including
 * lines appended while it runs.  A last line without a newline may still be
 * being written, so it is left for the next run.
 */
static replay_outcome_t
replay_run_file(replay_ctx_t *ctx, const char *path)
{
    char              *text;
    size_t             cap;
    ssize_t            n;
    replay_file_t      rf;
    replay_outcome_t   outcome;

    if (replay_file_open(ctx, &rf, path) != 0) {
        replay_file_close(&rf);
        return REPLAY_FATAL;
    }

    text = NULL;
    cap = 0;
    outcome = REPLAY_DELIVERED;

    replay_progress_show(ctx, &rf, 1);

    while (replay_signal == 0) {
        n = getline(&text, &cap, rf.file);

        if (n < 0) {
            if (ferror(rf.file)) {
                replay_progress_clear(ctx);
                fprintf(stderr, REPLAY_NAME ": cannot read %s: %s\n",
                        path, strerror(errno));
                outcome = REPLAY_FATAL;
            }
            break;
        }

        if (text[n - 1] != '\n') {
            replay_progress_clear(ctx);
            fprintf(stderr, REPLAY_NAME ": %s: the last line, at byte %lld, "
                    "has no newline yet; it is left for the next run\n",
                    path, (long long) rf.offset);
            ctx->incomplete++;
            break;
        }

        outcome = replay_process_line(ctx, &rf, text, (size_t) n);
        if (outcome == REPLAY_INTERRUPTED || outcome == REPLAY_FATAL) {
            break;
        }
    }

    if (replay_signal != 0 && outcome != REPLAY_FATAL) {
        outcome = REPLAY_INTERRUPTED;
        replay_progress_clear(ctx);
        fprintf(stderr, REPLAY_NAME ": interrupted by %s; the next run "
                "resumes %s after the last finished line\n",
                replay_signal_name(replay_signal), path);

    } else if (ctx->show_progress) {
        replay_progress_show(ctx, &rf, 1);
        fputc('\n', stderr);
    }

    free(text);
    replay_file_close(&rf);

    return outcome;
}


static int
replay_run(replay_options_t *options, const char *auth_header)
{
    int                i, status;
    long               start;
    replay_ctx_t       ctx;
    replay_outcome_t   outcome;

    memset(&ctx, 0, sizeof(replay_ctx_t));
    ctx.options = options;
    ctx.random_state = options->seed;
    ctx.show_progress = isatty(STDERR_FILENO);

    start = replay_now_ms();
    status = REPLAY_EXIT_SETUP;

    if (replay_curl_init(&ctx, auth_header) == 0) {
        status = REPLAY_EXIT_DELIVERED;

        for (i = 0; i < options->nfiles; i++) {
            outcome = replay_run_file(&ctx, options->files[i]);

            if (outcome == REPLAY_FATAL) {
                status = REPLAY_EXIT_SETUP;
                break;
            }

            if (outcome == REPLAY_INTERRUPTED) {
                status = 128 + replay_signal;
                break;
            }
        }
    }

    if (status == REPLAY_EXIT_DELIVERED
        && (ctx.failed > 0 || ctx.incomplete > 0))
    {
        status = REPLAY_EXIT_FAILED;
    }

    fprintf(stderr, "delivered %lu, failed %lu, elapsed %.1fs\n",
            ctx.delivered, ctx.failed,
            (double) (replay_now_ms() - start) / 1000.0);

    curl_easy_cleanup(ctx.curl);
    curl_slist_free_all(ctx.headers);
    free(ctx.url);

    return status;
}


/* Checks every file before the first request, so a typo stops the run early. */
static int
replay_check_files(replay_options_t *options)
{
    int          i;
    struct stat  st;

    for (i = 0; i < options->nfiles; i++) {
        if (stat(options->files[i], &st) != 0) {
            fprintf(stderr, REPLAY_NAME ": cannot open %s: %s\n",
                    options->files[i], strerror(errno));
            return -1;
        }

        if (!S_ISREG(st.st_mode)) {
            fprintf(stderr, REPLAY_NAME ": %s is not a regular file\n",
                    options->files[i]);
            return -1;
        }
    }

    return 0;
}


/* Opens PATH.lock for the dead-letter file PATH, creating it if needed. */
static int
replay_open_lock(const char *path, const char *lock_path)
{
    int          fd;
    struct stat  st;

    if (stat(path, &st) != 0) {
        fprintf(stderr, REPLAY_NAME ": cannot open %s: %s\n",
                path, strerror(errno));
        return -1;
    }

    fd = open(lock_path, O_RDONLY | O_CREAT | O_CLOEXEC, st.st_mode & 0666);

    if (fd < 0) {
        fprintf(stderr, REPLAY_NAME ": cannot open %s: %s\n",
                lock_path, strerror(errno));
    }

    return fd;
}


/*
 * Returns 1 when FD is the same lock file as one of the first N descriptors
 * in FDS.  A file named twice, maybe spelled differently, has one lock
 * file.  A flock() lock belongs to an open file description, and each
 * open() makes a new one, so a second flock() on that file would fail.
 */
static int
replay_lock_is_held(int fd, const int *fds, int n)
{
    int          i;
    struct stat  st, other;

    if (fstat(fd, &st) != 0) {
        return 0;
    }

    for (i = 0; i < n; i++) {
        if (fds[i] >= 0 && fstat(fds[i], &other) == 0
            && st.st_dev == other.st_dev && st.st_ino == other.st_ino)
        {
            return 1;
        }
    }

    return 0;
}


/*
 * Locks every dead-letter file before the first request, so that a second
 * run on any of them sends nothing, and keeps the locks to the end of the
 * run.  FILE.lock is locked rather than FILE itself, because FILE.progress,
 * FILE.progress.tmp and FILE.failed are found by path.  After a rotation,
 * a run on the new FILE and a run still on the old one would lock two
 * inodes and share those files.  FILE.lock is never removed, because a run
 * could then lock a new FILE.lock while another still holds the old one.
 * Returns 0, or the exit status.
 */
static int
replay_lock_files(replay_options_t *options, int *fds)
{
    int    i, status;
    char  *lock_path;

    for (i = 0; i < options->nfiles; i++) {
        fds[i] = -1;
    }

    for (i = 0; i < options->nfiles; i++) {
        lock_path = replay_concat(options->files[i], ".lock");
        if (lock_path == NULL) {
            return REPLAY_EXIT_SETUP;
        }

        fds[i] = replay_open_lock(options->files[i], lock_path);
        status = (fds[i] < 0) ? REPLAY_EXIT_SETUP : 0;

        if (status == 0 && replay_lock_is_held(fds[i], fds, i)) {
            close(fds[i]);
            fds[i] = -1;

        } else if (status == 0 && flock(fds[i], LOCK_EX | LOCK_NB) != 0) {
            if (errno == EWOULDBLOCK) {
                fprintf(stderr, REPLAY_NAME ": %s is being replayed by "
                        "another stories-replay process, which holds the "
                        "lock on %s; run again after it ends\n",
                        options->files[i], lock_path);
                status = REPLAY_EXIT_LOCKED;

            } else {
                fprintf(stderr, REPLAY_NAME ": cannot lock %s: %s\n",
                        lock_path, strerror(errno));
                status = REPLAY_EXIT_SETUP;
            }
        }

        free(lock_path);

        if (status != 0) {
            return status;
        }
    }

    return 0;
}


/* Reads the key, sends every file and returns the exit status. */
static int
replay_main(replay_options_t *options)
{
    int    i, rc, *lock_fds;
    char  *auth_header;

    if (replay_read_env(options) != 0 || replay_check_files(options) != 0) {
        return REPLAY_EXIT_SETUP;
    }

    lock_fds = malloc(options->nfiles * sizeof(int));
    if (lock_fds == NULL) {
        fprintf(stderr, REPLAY_NAME ": out of memory\n");
        return REPLAY_EXIT_SETUP;
    }

    rc = replay_lock_files(options, lock_fds);
    if (rc != 0) {
        goto done;
    }

    rc = REPLAY_EXIT_SETUP;

    auth_header = replay_read_key(options->key_file);
    if (auth_header == NULL) {
        goto done;
    }

    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
        fprintf(stderr, REPLAY_NAME ": cannot initialize libcurl\n");
        free(auth_header);
        goto done;
    }

    replay_install_signals();

    rc = replay_run(options, auth_header);

    curl_global_cleanup();
    free(auth_header);

done:

    for (i = 0; i < options->nfiles; i++) {
        if (lock_fds[i] >= 0) {
            close(lock_fds[i]);
        }
    }

    free(lock_fds);

    return rc;
}


int
main(int argc, char **argv)
{
    int                rc;
    replay_options_t   options;

    memset(&options, 0, sizeof(replay_options_t));
    options.max_attempts = REPLAY_DEFAULT_ATTEMPTS;
    options.backoff_base_ms = REPLAY_BACKOFF_BASE_MS;
    options.connect_timeout_s = REPLAY_CONNECT_TIMEOUT_S;
    options.timeout_s = REPLAY_TIMEOUT_S;

    options.files = calloc(argc, sizeof(char *));
    if (options.files == NULL) {
        fprintf(stderr, REPLAY_NAME ": out of memory\n");
        return REPLAY_EXIT_SETUP;
    }

    rc = replay_parse_args(argc, argv, &options);

    if (rc > 0) {
        replay_usage(stdout);
        rc = REPLAY_EXIT_DELIVERED;

    } else if (rc < 0) {
        fprintf(stderr, "Try \"" REPLAY_NAME " --help\".\n");
        rc = REPLAY_EXIT_SETUP;

    } else {
        rc = replay_main(&options);
    }

    free(options.api_url);
    free(options.files);

    return rc;
}
