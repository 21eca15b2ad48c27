# Builds the module as a dynamic module for Debian 12's nginx 1.22, the
# unit tests of the nginx-free core, and runs both test suites.

NGINX_SRC   ?= /usr/share/nginx/src
NGINX       ?= /usr/sbin/nginx
BUILD       := build
MODULE      := $(BUILD)/ngx_http_stories_module.so
UNIT_TEST   := $(BUILD)/segment_test
PACKAGES    := nginx nginx-dev libcjson-dev zlib1g-dev gcc libc6-dev make perl ca-certificates

CORE_SRCS   := src/stories_body.c src/stories_segment.c
CORE_DEPS   := $(CORE_SRCS) src/stories_body.h src/stories_segment.h
CFLAGS      ?= -O2 -g
WARNINGS    := -std=c99 -Wall -Wextra -Werror

.PHONY: all deps test unit run clean

all: deps $(MODULE) $(UNIT_TEST)

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

$(BUILD)/nginx/Makefile: config
	rm -rf $(BUILD)/nginx
	mkdir -p $(BUILD)
	cp -a $(NGINX_SRC) $(BUILD)/nginx
	cd $(BUILD)/nginx && bash -c '. ./conf_flags && \
	    ./configure "$${NGX_CONF_FLAGS[@]}" \
	        --add-dynamic-module=$(CURDIR)' >configure.log 2>&1 \
	    || { tail -n 20 $(BUILD)/nginx/configure.log; exit 1; }

$(MODULE): $(BUILD)/nginx/Makefile ngx_http_stories_module.c $(CORE_DEPS)
	$(MAKE) -C $(BUILD)/nginx -f objs/Makefile modules
	cp $(BUILD)/nginx/objs/ngx_http_stories_module.so $@

$(UNIT_TEST): t/unit/segment_test.c $(CORE_DEPS)
	mkdir -p $(BUILD)
	$(CC) $(WARNINGS) $(CFLAGS) -Isrc -o $@ t/unit/segment_test.c \
	    $(CORE_SRCS) -lcjson -lz -lm

test: all
	prove -r t/

unit: $(UNIT_TEST)
	$(UNIT_TEST)

# Starts nginx in the foreground with the quick-start configuration.
run: all
	mkdir -p $(BUILD)/run/logs
	@echo
	@echo "nginx listens on http://127.0.0.1:8080; send a call with:"
	@echo "  curl -d '{\"userId\":\"u1\",\"event\":\"Signed Up\"}' \\"
	@echo "       -H 'Content-Type: application/json' \\"
	@echo "       http://127.0.0.1:8080/v1/track"
	@echo "Stories requests show up in $(BUILD)/run/logs/stories.log"
	@echo "Stop with Ctrl-C."
	@echo
	$(NGINX) -p $(CURDIR)/$(BUILD)/run/ -e stderr \
	    -c $(CURDIR)/conf-examples/quickstart.conf \
	    -g 'daemon off; load_module $(CURDIR)/$(MODULE);'

clean:
	rm -rf $(BUILD)
