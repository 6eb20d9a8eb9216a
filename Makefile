# VM Supervisor — see README.md.
SHELL := /bin/bash
export PATH := $(PATH):/usr/local/go/bin
GO ?= go
# The project's semantic version is written in one place,
# internal/version/VERSION; builds add the commit as a PEP 440 local label
# (1.0.0+g7eb5434, .dirty with uncommitted changes). VERSION=... on the
# command line replaces the whole string (packagers building outside git).
SEMVER := $(shell cat internal/version/VERSION)
COMMIT := $(shell git rev-parse HEAD 2>/dev/null | cut -c1-7)
DIRTY := $(shell test -n "$$(git status --porcelain --untracked-files=no 2>/dev/null)" && echo true)
VERSION_PKG := github.com/aleph-vm-go/vm-supervisor/internal/version
LDFLAGS := -X $(VERSION_PKG).commit=$(COMMIT) -X $(VERSION_PKG).dirty=$(DIRTY) $(if $(VERSION),-X $(VERSION_PKG).override=$(VERSION))

# Slow artefacts (debootstrap tree, kernels) are cached outside the work
# tree so that reruns and fresh clones on the same machine are quick.
BUILD_CACHE ?= /var/cache/aleph-vm-build
KERNEL_DIR := $(BUILD_CACHE)/kernels/out/debian-cloud
CUSTOM_KERNEL_DIR := $(BUILD_CACHE)/kernels/out/custom

RUNTIME_DIR := runtimes/aleph-debian-12-python
RUNTIME := $(RUNTIME_DIR)/rootfs.squashfs
# The same without uvicorn, like aleph-vm's official runtimes: programs are
# then served by the launcher's standard-library server (tests use it).
RUNTIME_NO_UVICORN := $(RUNTIME_DIR)/rootfs-no-uvicorn.squashfs

# Where `make run` keeps its state; the supervisor's own defaults are
# /var/lib/aleph/vm and /var/cache/aleph/vm.
RUN_ENV := ALEPH_VM_EXECUTION_ROOT=$${ALEPH_VM_EXECUTION_ROOT:-/var/lib/aleph/vm} \
           ALEPH_VM_CACHE_ROOT=$${ALEPH_VM_CACHE_ROOT:-/var/cache/aleph/vm}

# The demo never reaches the outside: the Aleph API is a dead loopback
# port (programs come from the local store; no message stream, no status
# polling) and /status/check/host probes loopback. Production keeps
# aleph-vm's public defaults.
DEMO_ENV := ALEPH_VM_API_SERVER=http://127.0.0.1:9 ALEPH_VM_WATCH_FOR_MESSAGES=false \
            ALEPH_VM_WATCH_FOR_UPDATES=false ALEPH_VM_PAYMENT_MONITOR_INTERVAL=0 \
            ALEPH_VM_CONNECTIVITY_IPV4_URL=http://127.0.0.1:4020/status/config \
            ALEPH_VM_CONNECTIVITY_IPV6_URL=http://[::1]:4020/status/config \
            ALEPH_VM_CONNECTIVITY_DNS_HOSTNAME=localhost \
            ALEPH_VM_CONNECTIVITY_HTTP_URLS=http://127.0.0.1:4020/status/config

.PHONY: all deps build runtime runtime-no-uvicorn kernel kernel-custom run test test-short test-qemu bench fuzz vet lint fmt clean install deb

all: build

deps:
	@scripts/install-deps.sh

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/vm-supervisor ./cmd/vm-supervisor
	CGO_ENABLED=0 $(GO) build -ldflags "$(LDFLAGS)" -o bin/vm-agent ./cmd/vm-agent
	# gVisor's runsc, pinned in go.mod as a tool. Static on purpose: the
	# sandbox's chroot has no dynamic loader for its helper re-execs.
	CGO_ENABLED=0 $(GO) build -o bin/runsc gvisor.dev/gvisor/runsc

$(RUNTIME): $(RUNTIME_DIR)/create.sh
	$(RUNTIME_DIR)/create.sh $(RUNTIME)

# Made from the cached tree of $(RUNTIME), a copy with uvicorn purged; after
# it (order only), so that two builds never debootstrap the same cache.
$(RUNTIME_NO_UVICORN): $(RUNTIME_DIR)/create.sh | $(RUNTIME)
	$(RUNTIME_DIR)/create.sh --without-uvicorn $(RUNTIME_NO_UVICORN)

runtime-no-uvicorn: deps $(RUNTIME_NO_UVICORN)

# Builds the default runtime image and registers it in the local store as
# the runtime `program upload` uses by default.
runtime: deps build $(RUNTIME)
	$(RUN_ENV) bin/vm-supervisor runtime add $(RUNTIME) --default

# Debian's cloud kernel (for qemu microvm with ACPI) and an initramfs
# with vm-agent as /init plus the modules it loads. The initramfs embeds
# bin/vm-agent, so it is rebuilt (quickly) every time.
kernel: deps build
	kernels/debian-cloud/fetch.sh $(KERNEL_DIR)
	kernels/initramfs/build.sh bin/vm-agent $(KERNEL_DIR)/modules $(KERNEL_DIR)/initramfs.cpio.gz

# Our minimal micro-VM kernel, everything built in, virtio-mmio devices
# from the command line: what Firecracker v1.0.0 boots (vmlinux), and qemu
# microvm with acpi=off exercises the same guest path. Cached by config.
kernel-custom: deps build
	kernels/custom/build.sh $(CUSTOM_KERNEL_DIR)
	kernels/initramfs/build.sh bin/vm-agent none $(CUSTOM_KERNEL_DIR)/initramfs.cpio.gz

# The README's first command: everything from a fresh Debian machine to a
# running supervisor serving the example program.
run: deps build runtime
	@hash=$$($(RUN_ENV) bin/vm-supervisor program upload examples/example_fastapi main:app | tail -n1); \
	echo; echo "Example program: http://127.0.0.1:4020/vm/$$hash/"; \
	echo "Self-test:       http://127.0.0.1:4020/status/check/fastapi"; echo; \
	exec env $(RUN_ENV) $(DEMO_ENV) bin/vm-supervisor -v

# golangci-lint, pinned here and installed once into the build cache (a
# tool line in go.mod would pull its hundreds of modules into ours).
GOLANGCI_LINT_VERSION := v2.15.0
GOLANGCI_LINT := $(BUILD_CACHE)/bin/golangci-lint-$(GOLANGCI_LINT_VERSION)
$(GOLANGCI_LINT):
	mkdir -p $(BUILD_CACHE)/bin/tmp-golangci
	GOBIN=$(BUILD_CACHE)/bin/tmp-golangci $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION)
	mv $(BUILD_CACHE)/bin/tmp-golangci/golangci-lint $@
	rmdir $(BUILD_CACHE)/bin/tmp-golangci

lint: $(GOLANGCI_LINT)
	$(GOLANGCI_LINT) run --allow-parallel-runners ./...

vet:
	$(GO) vet ./...
	@$(GO) mod tidy -diff >/dev/null || (echo "go.mod/go.sum are not tidy: run go mod tidy"; $(GO) mod tidy -diff; exit 1)
	@test -z "$$(gofmt -l cmd internal examples 2>/dev/null)" || (gofmt -l cmd internal examples; exit 1)

# The whole suite. Integration tests need root, runsc, qemu, the runtime
# image and the kernels; with CI=true a missing prerequisite fails them
# instead of skipping. The end-to-end suite runs once per backend that runs
# here: gVisor, then qemu under TCG with each kernel (slow: emulation).
TEST_ENV := PATH=$(CURDIR)/bin:$$PATH ALEPH_TEST_RUNTIME=$(CURDIR)/$(RUNTIME) ALEPH_TEST_BIN=$(CURDIR)/bin \
	ALEPH_TEST_RUNTIME_NO_UVICORN=$(CURDIR)/$(RUNTIME_NO_UVICORN) \
	ALEPH_TEST_KERNEL=$(KERNEL_DIR)/vmlinuz ALEPH_TEST_KERNEL_CUSTOM=$(CUSTOM_KERNEL_DIR)/vmlinux
test: deps build $(RUNTIME) $(RUNTIME_NO_UVICORN) kernel kernel-custom vet lint
	$(TEST_ENV) $(GO) test -count=1 -timeout 45m ./...
	$(GO) test -count=1 -race -short ./internal/pool/... ./internal/httpapi/...
	$(MAKE) test-qemu
	$(MAKE) fuzz FUZZ_PARSE_EXECS=20000x FUZZ_PARSE_REF_EXECS=300000x

test-qemu:
	$(TEST_ENV) ALEPH_TEST_HYPERVISOR=qemu ALEPH_VM_LINUX_PATH=$(CUSTOM_KERNEL_DIR)/vmlinux \
		$(GO) test -count=1 -timeout 40m ./test/integration
	$(TEST_ENV) ALEPH_TEST_HYPERVISOR=qemu ALEPH_VM_LINUX_PATH=$(KERNEL_DIR)/vmlinuz \
		$(GO) test -count=1 -timeout 40m -run 'TestEncodingsAndExecutable|TestLimits|TestNetworkInternet' ./test/integration

# Without root, sandboxes or images: the suites that need them skip with
# -short, and the pool and HTTP server run on in-process sandboxes
# (internal/pool/pooltest). A minute or so.
test-short:
	$(GO) test -count=1 -short ./...

# Budgets in executions, not durations: Go 1.26's fuzz coordinator can
# fail a run with a bare "context deadline exceeded" when the duration
# ends while a worker is busy (golang/go#75804, fixed in Go 1.27); a count
# sets no deadline. About 30 s each here; `make test` runs about 10 s each.
FUZZ_PARSE_EXECS ?= 70000x
FUZZ_PARSE_REF_EXECS ?= 1000000x
fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $(FUZZ_PARSE_EXECS) ./internal/message
	$(GO) test -run '^$$' -fuzz '^FuzzParseRef$$' -fuzztime $(FUZZ_PARSE_REF_EXECS) ./internal/message

bench: deps build $(RUNTIME) kernel kernel-custom
	$(TEST_ENV) $(GO) run ./bench
	$(TEST_ENV) $(GO) test -run '^$$' -bench ColdStart -benchtime 3x ./internal/backend/qemu

fmt:
	gofmt -w cmd internal examples

# Install as a service: binaries, runtime and guest kernel under PREFIX,
# the systemd unit, and the settings file (kept when it exists). It
# installs what is built (make build runtime, and make kernel-custom for
# VM backends) and builds nothing, so `sudo make install` after a build
# never rebuilds as root; INSTALL_* name other artefacts.
PREFIX ?= /opt/aleph-vm-go
SYSCONFDIR ?= /etc
UNITDIR ?= /usr/lib/systemd/system
DESTDIR ?=
INSTALL_BIN ?= bin
INSTALL_RUNTIME ?= $(RUNTIME)
INSTALL_KERNEL ?= $(CUSTOM_KERNEL_DIR)/vmlinux
INSTALL_INITRD ?= $(CUSTOM_KERNEL_DIR)/initramfs.cpio.gz
SUBST = sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@SYSCONFDIR@|$(SYSCONFDIR)|g'
install:
	@for f in $(INSTALL_BIN)/vm-supervisor $(INSTALL_BIN)/vm-agent $(INSTALL_BIN)/runsc; do \
		test -x $$f || { echo "$$f missing: run make build first" >&2; exit 1; }; done
	@test -f $(INSTALL_RUNTIME) || { echo "$(INSTALL_RUNTIME) missing: run make runtime first" >&2; exit 1; }
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/runtimes/aleph-debian-12-python \
		$(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSCONFDIR)/aleph-vm
	install -m 0755 $(INSTALL_BIN)/vm-supervisor $(INSTALL_BIN)/vm-agent $(INSTALL_BIN)/runsc $(DESTDIR)$(PREFIX)/bin/
	install -m 0644 $(INSTALL_RUNTIME) $(DESTDIR)$(PREFIX)/share/runtimes/aleph-debian-12-python/rootfs.squashfs
	@if [ -f $(INSTALL_KERNEL) ] && [ -f $(INSTALL_INITRD) ]; then \
		install -d $(DESTDIR)$(PREFIX)/share/kernel && \
		install -m 0644 $(INSTALL_KERNEL) $(DESTDIR)$(PREFIX)/share/kernel/vmlinux && \
		install -m 0644 $(INSTALL_INITRD) $(DESTDIR)$(PREFIX)/share/kernel/initramfs.cpio.gz && \
		echo "installed the guest kernel and initramfs"; \
	else echo "note: no guest kernel ($(INSTALL_KERNEL)): only gVisor will run; make kernel-custom, then install again"; fi
	$(SUBST) packaging/aleph-vm-supervisor.service > $(DESTDIR)$(UNITDIR)/aleph-vm-supervisor.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/aleph-vm-supervisor.service
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/aleph-vm/supervisor.env ]; then \
		echo "kept $(DESTDIR)$(SYSCONFDIR)/aleph-vm/supervisor.env"; \
	else $(SUBST) packaging/supervisor.env > $(DESTDIR)$(SYSCONFDIR)/aleph-vm/supervisor.env && \
		chmod 0640 $(DESTDIR)$(SYSCONFDIR)/aleph-vm/supervisor.env; fi

# A Debian package of the same tree, built with dpkg-deb alone. Its
# version is internal/version/VERSION with the commit's date and hash
# (1.0.0+git20261207.g7eb5434), so that later commits upgrade earlier ones.
DEB_OUT ?= dist
# zstd: a tenth of xz's time on 200 MB; dpkg reads it since Debian 12.
DEB_COMPRESS ?= zstd
DEB_ARCH := $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
DEB_VERSION ?= $(SEMVER)$(if $(COMMIT),+git$(shell TZ=UTC git log -1 --format=%cd --date=format-local:%Y%m%d%H%M%S 2>/dev/null).g$(COMMIT))
DEB_ROOT = $(abspath $(DEB_OUT))/aleph-vm-go_$(DEB_VERSION)_$(DEB_ARCH)
deb:
	rm -rf $(DEB_ROOT)
	$(MAKE) --no-print-directory install DESTDIR=$(DEB_ROOT) PREFIX=/opt/aleph-vm-go SYSCONFDIR=/etc UNITDIR=/usr/lib/systemd/system
	install -d $(DEB_ROOT)/DEBIAN
	install -m 0644 packaging/debian/conffiles $(DEB_ROOT)/DEBIAN/conffiles
	install -m 0755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm $(DEB_ROOT)/DEBIAN/
	sed -e 's|@VERSION@|$(DEB_VERSION)|' -e 's|@ARCH@|$(DEB_ARCH)|' \
		-e "s|@SIZE@|$$(du -sk --exclude=DEBIAN $(DEB_ROOT) | cut -f1)|" \
		packaging/debian/control.in > $(DEB_ROOT)/DEBIAN/control
	dpkg-deb --root-owner-group -Z$(DEB_COMPRESS) --build $(DEB_ROOT) $(DEB_ROOT).deb
	rm -rf $(DEB_ROOT)
	@echo $(DEB_ROOT).deb

clean:
	rm -rf bin dist
