# Builds the module as a dynamic module for Debian 12's nginx 1.22, the
# unit tests of the nginx-free core, and runs both test suites.

NGINX_SRC   ?= /usr/share/nginx/src
NGINX       ?= /usr/sbin/nginx
BUILD       := build
MODULE      := $(BUILD)/ngx_http_stories_module.so
UNIT_TESTS  := $(patsubst t/unit/%.c,$(BUILD)/%,$(wildcard t/unit/*_test.c))
REPLAY      := $(BUILD)/stories-replay
PACKAGES    := nginx nginx-dev libcjson-dev zlib1g-dev libcurl4-openssl-dev \
               gcc libc6-dev make perl ca-certificates

CORE_SRCS   := src/stories_body.c src/stories_segment.c
CORE_DEPS   := $(CORE_SRCS) src/stories_body.h src/stories_segment.h
CFLAGS      ?= -O2 -g
WARNINGS    := -std=c99 -Wall -Wextra -Werror

# make run: the port of the quick start's endpoint and of its Stories sink
RUN_PORT    ?= 8080
SINK_PORT   ?= 8081

FUZZ_TARGET := $(BUILD)/segment_fuzz
FUZZ_SECONDS ?= 60
FUZZ_FLAGS  := -g -O1 -fsanitize=fuzzer,address,undefined \
               -fno-sanitize-recover=undefined

# nginx 1.22 from Debian's source package, with the module compiled in,
# AddressSanitizer and UndefinedBehaviorSanitizer, and NGX_DEBUG_PALLOC so
# that every pool allocation is a separate malloc() the sanitizer sees.
# nginx itself reads unaligned words on x86 and passes NULL with a zero
# length to memcpy(), so those two checks are off.
ASAN_DIR    := $(BUILD)/asan
ASAN_NGINX  := $(ASAN_DIR)/nginx-1.22.1/objs/nginx
ASAN_FLAGS  := -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined \
               -fno-sanitize=alignment,nonnull-attribute \
               -fno-sanitize-recover=undefined -DNGX_DEBUG_PALLOC=1
ASAN_REPORT := $(CURDIR)/$(ASAN_DIR)/reports

.PHONY: all deps test unit run clean fuzz test-asan bench

all: deps $(MODULE) $(UNIT_TESTS) $(REPLAY)

# Installs what is missing when run as root, otherwise names the command.
deps:
	@missing=""; \
	for p in $(PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null \
	        | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ]; then \
	        echo "installing:$$missing"; \
	        apt-get update -qq && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing \
	            >/dev/null || exit 1; \
	    else \
	        echo "missing packages:$$missing"; \
	        echo "run: sudo apt-get install$$missing"; \
	        exit 1; \
	    fi; \
	fi

$(BUILD)/nginx/objs/Makefile: config
	rm -rf $(BUILD)/nginx
	mkdir -p $(BUILD)
	cp -a $(NGINX_SRC) $(BUILD)/nginx
	cd $(BUILD)/nginx && bash -c '. ./conf_flags && \
	    ./configure "$${NGX_CONF_FLAGS[@]}" \
	        --add-dynamic-module=$(CURDIR)' >configure.log 2>&1 \
	    || { tail -n 20 configure.log; exit 1; }

GLUE_DEPS   := ngx_http_stories_module.c $(wildcard src/ngx_http_stories*)

$(MODULE): $(BUILD)/nginx/objs/Makefile $(GLUE_DEPS) $(CORE_DEPS)
	$(MAKE) -C $(BUILD)/nginx -f objs/Makefile modules
	cp $(BUILD)/nginx/objs/ngx_http_stories_module.so $@.tmp
	mv $@.tmp $@

$(BUILD)/%_test: t/unit/%_test.c t/unit/tap.c t/unit/tap.h $(CORE_DEPS)
	mkdir -p $(BUILD)
	$(CC) $(WARNINGS) $(CFLAGS) -Isrc -It/unit -o $@ $< t/unit/tap.c \
	    $(CORE_SRCS) -lcjson -lz -lm

$(REPLAY): src/stories_replay.c
	mkdir -p $(BUILD)
	$(CC) $(WARNINGS) -D_POSIX_C_SOURCE=200809L $(CFLAGS) -o $@ $< \
	    -lcurl -lcjson -lm

test: all
	prove -r t/

# Runs the fuzzer for FUZZ_SECONDS, starting from the seed bodies in
# t/fuzz/seeds; any crash, leak or sanitizer report fails the target.
fuzz: $(FUZZ_TARGET)
	mkdir -p $(BUILD)/fuzz-corpus
	$(FUZZ_TARGET) -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    -artifact_prefix=$(BUILD)/ $(BUILD)/fuzz-corpus t/fuzz/seeds

$(FUZZ_TARGET): t/fuzz/segment_fuzz.c $(CORE_DEPS)
	@command -v clang >/dev/null || { \
	    echo "fuzzing needs clang: apt-get install clang libclang-rt-14-dev"; \
	    exit 1; }
	mkdir -p $(BUILD)
	clang $(FUZZ_FLAGS) -Isrc -o $@ t/fuzz/segment_fuzz.c $(CORE_SRCS) \
	    -lcjson -lz -lm

# Runs the whole t/ suite on the sanitizer build; a report fails it.
# Leak detection is off: nginx -t and the master process exit without
# freeing the configuration, by design.  The fuzzer checks the core for
# leaks instead.
test-asan: $(ASAN_NGINX) $(UNIT_TESTS) $(REPLAY)
	rm -rf $(ASAN_REPORT)
	mkdir -p $(ASAN_REPORT)
	ASAN_OPTIONS=detect_leaks=0:log_path=$(ASAN_REPORT)/asan \
	UBSAN_OPTIONS=print_stacktrace=1:log_path=$(ASAN_REPORT)/ubsan \
	TEST_NGINX_BINARY=$(CURDIR)/$(ASAN_NGINX) TEST_NGINX_MODULE=static \
	    prove -r t/
	@if [ -n "$$(ls -A $(ASAN_REPORT))" ]; then \
	    cat $(ASAN_REPORT)/*; \
	    echo "sanitizer reports in $(ASAN_REPORT)"; exit 1; \
	fi

$(ASAN_DIR)/nginx-1.22.1/configure:
	mkdir -p $(ASAN_DIR)
	./.ci/nginx-source $(ASAN_DIR)

$(ASAN_DIR)/nginx-1.22.1/objs/Makefile: $(ASAN_DIR)/nginx-1.22.1/configure \
                                        config Makefile
	cd $(ASAN_DIR)/nginx-1.22.1 && ./configure \
	    --with-debug --with-threads --with-pcre-jit --with-http_ssl_module \
	    --with-http_v2_module --with-http_auth_request_module \
	    --with-http_realip_module --with-http_stub_status_module \
	    --with-http_sub_module --with-http_addition_module \
	    --with-http_gunzip_module --with-http_dav_module \
	    --with-cc-opt='$(ASAN_FLAGS)' \
	    --with-ld-opt='-fsanitize=address,undefined' \
	    --add-module=$(CURDIR) >../configure.log 2>&1 \
	    || { tail -n 20 ../configure.log; exit 1; }

$(ASAN_NGINX): $(ASAN_DIR)/nginx-1.22.1/objs/Makefile $(GLUE_DEPS) \
               $(CORE_DEPS)
	$(MAKE) -C $(ASAN_DIR)/nginx-1.22.1 -f objs/Makefile

unit: $(UNIT_TESTS)
	for t in $(UNIT_TESTS); do $$t || exit 1; done

# Compares the module with plain proxy_pass of the same body, side by
# side in one run, with wrk on loopback; see bench/README.md.
bench: all
	@command -v wrk >/dev/null || { \
	    echo "the benchmark needs wrk: apt-get install wrk"; exit 1; }
	bench/run

# Starts nginx in the foreground with the quick-start configuration.
run: all
	mkdir -p $(BUILD)/run/logs
	sed -e 's/127\.0\.0\.1:8080/127.0.0.1:$(RUN_PORT)/' \
	    -e 's/127\.0\.0\.1:8081/127.0.0.1:$(SINK_PORT)/' \
	    conf-examples/quickstart.conf > $(BUILD)/run/nginx.conf
	@echo
	@echo "nginx listens on http://127.0.0.1:$(RUN_PORT); send a call with:"
	@echo "  curl -d '{\"userId\":\"u1\",\"event\":\"Signed Up\"}' \\"
	@echo "       -H 'Content-Type: application/json' \\"
	@echo "       http://127.0.0.1:$(RUN_PORT)/v1/track"
	@echo "Stories requests show up in $(BUILD)/run/logs/stories.log"
	@echo "Stop with Ctrl-C."
	@echo
	$(NGINX) -p $(CURDIR)/$(BUILD)/run/ -e stderr \
	    -c $(CURDIR)/$(BUILD)/run/nginx.conf \
	    -g 'daemon off; load_module $(CURDIR)/$(MODULE);'

clean:
	rm -rf $(BUILD)
