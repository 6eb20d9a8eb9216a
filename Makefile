# VM Supervisor — see README.md.
SHELL := /bin/bash
export PATH := $(PATH):/usr/local/go/bin
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)

RUNTIME_DIR := runtimes/aleph-debian-12-python
RUNTIME := $(RUNTIME_DIR)/rootfs.squashfs

# Where `make run` keeps its state; the supervisor's own defaults are
# /var/lib/aleph/vm and /var/cache/aleph/vm.
RUN_ENV := ALEPH_VM_EXECUTION_ROOT=$${ALEPH_VM_EXECUTION_ROOT:-/var/lib/aleph/vm} \
           ALEPH_VM_CACHE_ROOT=$${ALEPH_VM_CACHE_ROOT:-/var/cache/aleph/vm}

.PHONY: all deps build runtime run test test-short bench fuzz vet fmt clean

all: build

deps:
	@scripts/install-deps.sh

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/vm-supervisor ./cmd/vm-supervisor
	CGO_ENABLED=0 $(GO) build -ldflags "$(LDFLAGS)" -o bin/vm-agent ./cmd/vm-agent

$(RUNTIME): $(RUNTIME_DIR)/create.sh
	$(RUNTIME_DIR)/create.sh $(RUNTIME)

# Builds the default runtime image and registers it in the local store as
# the runtime `program upload` uses by default.
runtime: deps build $(RUNTIME)
	$(RUN_ENV) bin/vm-supervisor runtime add $(RUNTIME) --default

# The README's first command: everything from a fresh Debian machine to a
# running supervisor serving the example program.
run: deps build runtime
	@hash=$$($(RUN_ENV) bin/vm-supervisor program upload examples/example_fastapi main:app | tail -n1); \
	echo; echo "Example program: http://127.0.0.1:4020/vm/$$hash/"; \
	echo "Self-test:       http://127.0.0.1:4020/status/check/fastapi"; echo; \
	exec env $(RUN_ENV) bin/vm-supervisor -v

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l cmd internal examples 2>/dev/null)" || (gofmt -l cmd internal examples; exit 1)

# The whole suite. Integration tests need root, runsc and the runtime image;
# with CI=true a missing prerequisite fails them instead of skipping.
test: deps build $(RUNTIME) vet
	ALEPH_TEST_RUNTIME=$(CURDIR)/$(RUNTIME) ALEPH_TEST_BIN=$(CURDIR)/bin \
		$(GO) test -count=1 -timeout 45m ./...
	$(MAKE) fuzz FUZZTIME=10s

test-short: build
	$(GO) test -count=1 -short ./...

FUZZTIME ?= 30s
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $(FUZZTIME) ./internal/message
	$(GO) test -run '^$$' -fuzz '^FuzzParseRef$$' -fuzztime $(FUZZTIME) ./internal/message

bench: deps build $(RUNTIME)
	ALEPH_TEST_RUNTIME=$(CURDIR)/$(RUNTIME) ALEPH_TEST_BIN=$(CURDIR)/bin \
		$(GO) run ./bench

fmt:
	gofmt -w cmd internal examples

clean:
	rm -rf bin
