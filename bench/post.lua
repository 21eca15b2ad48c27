-- wrk script for bench/run: POSTs the JSON body in the file BENCH_BODY_FILE
-- on every request and prints one "bench:" summary line that bench/run parses.
-- Latencies in that line are in microseconds, the duration too.

local body_path = os.getenv("BENCH_BODY_FILE")
if body_path == nil or body_path == "" then
    error("BENCH_BODY_FILE is not set; start the benchmark with bench/run")
end

local body_file = assert(io.open(body_path, "rb"))
local body = body_file:read("*a")
body_file:close()

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
    local errors = summary.errors
    local socket_errors = errors.connect + errors.read + errors.write
                          + errors.timeout

    io.write(string.format(
        "bench: requests=%d duration_us=%d p50_us=%d p99_us=%d"
        .. " non_2xx_3xx=%d socket_errors=%d body_bytes=%d\n",
        summary.requests, summary.duration,
        latency:percentile(50), latency:percentile(99),
        errors.status, socket_errors, #body))
end
