package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// Test artefacts come from the environment, else from where `make kernel`
// and `make kernel-custom` put them.
const (
	envKernel       = "ALEPH_TEST_KERNEL"        // Debian cloud bzImage; its modules/ beside it
	envModules      = "ALEPH_TEST_MODULES"       // overrides <dir of kernel>/modules
	envInitrd       = "ALEPH_TEST_INITRD"        // a ready initramfs; default: built here from the current agent
	envKernelCustom = "ALEPH_TEST_KERNEL_CUSTOM" // the custom ELF vmlinux (everything built in)
	envRuntime      = "ALEPH_TEST_RUNTIME"
)

var (
	defaultKernels = []string{
		"/var/cache/aleph-vm-build/kernels/out/debian-cloud/vmlinuz",
	}
	defaultCustomKernels = []string{
		"/var/cache/aleph-vm-build/kernels/out/custom/vmlinux",
	}
)

// Timeouts are generous because without KVM QEMU emulates every guest
// instruction (TCG): the kernel boots in seconds instead of a fraction of
// one, and Python importing FastAPI takes tens of seconds, more when
// other VMs or builds share the two cores.
const (
	bootTimeout    = 3 * time.Minute
	requestTimeout = time.Minute
)

func missing(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatalf("prerequisite missing in CI: "+format, args...)
	}
	t.Skipf("prerequisite missing: "+format, args...)
}

func requireQemu(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("real QEMU VMs as root: skipped with -short")
	}
	if os.Geteuid() != 0 {
		missing(t, "must run as root")
	}
	for _, bin := range []string{DefaultQemuPath, "mksquashfs", "cpio", "gzip"} {
		if _, err := exec.LookPath(bin); err != nil {
			missing(t, "%s not in PATH", bin)
		}
	}
}

// artefact returns the env variable's file, else the first default that
// exists; "" when none.
func artefact(env string, defaults []string) string {
	if p := os.Getenv(env); p != "" {
		return p
	}
	for _, p := range defaults {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}

func moduleRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("go.mod not found")
		}
		dir = parent
	}
}

func runtimeImage(t testing.TB) string {
	t.Helper()
	p := os.Getenv(envRuntime)
	if p == "" {
		p = os.Getenv("ALEPH_VM_TEST_RUNTIME")
	}
	if p == "" {
		p = filepath.Join(moduleRoot(t), "runtimes", "aleph-debian-12-python", "rootfs.squashfs")
	}
	if _, err := os.Stat(p); err != nil {
		missing(t, "runtime image: %v (runtimes/aleph-debian-12-python/create.sh)", err)
	}
	return p
}

var (
	agentOnce sync.Once
	agentBin  string
	agentErr  error
)

// buildAgent builds the current vm-agent once per test binary.
func buildAgent(t testing.TB) string {
	t.Helper()
	agentOnce.Do(func() {
		dir, err := os.MkdirTemp("", "qemu-test-agent-")
		if err != nil {
			agentErr = err
			return
		}
		agentBin = filepath.Join(dir, "vm-agent")
		cmd := exec.Command("go", "build", "-o", agentBin, "./cmd/vm-agent")
		cmd.Dir = moduleRoot(t)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			agentErr = errors.New(err.Error() + ": " + string(out))
		}
	})
	if agentErr != nil {
		t.Fatalf("build vm-agent: %v", agentErr)
	}
	return agentBin
}

// buildInitrd packs the current agent with modulesDir ("none" for a
// kernel with everything built in) using the project's recipe.
func buildInitrd(t testing.TB, modulesDir string) string {
	t.Helper()
	if p := os.Getenv(envInitrd); p != "" {
		return p
	}
	out := filepath.Join(t.TempDir(), "initramfs.cpio.gz")
	script := filepath.Join(moduleRoot(t), "kernels", "initramfs", "build.sh")
	if _, err := os.Stat(script); err != nil {
		missing(t, "initramfs recipe: %v", err)
	}
	cmd := exec.Command(script, buildAgent(t), modulesDir, out)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build initramfs: %v\n%s", err, b)
	}
	return out
}

type testWriter struct {
	t      testing.TB
	prefix string
}

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Logf("%s%s", w.prefix, strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// stopInstance stops a VM at the end of a test; a failed cleanup (a socket
// or image left behind) fails the test.
func stopInstance(t testing.TB, inst backend.Instance) {
	t.Helper()
	if err := inst.Stop(context.Background()); err != nil {
		t.Errorf("Stop: %v", err)
	}
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t, ""}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type vmKernel struct {
	name, kernel, modules string
	acpi                  ACPI
}

// kernels lists the kernels this host has artefacts for.
func kernels(t testing.TB) []vmKernel {
	t.Helper()
	var ks []vmKernel
	if k := artefact(envKernel, defaultKernels); k != "" {
		mods := os.Getenv(envModules)
		if mods == "" {
			mods = filepath.Join(filepath.Dir(k), "modules")
		}
		ks = append(ks, vmKernel{name: "debian-acpi", kernel: k, modules: mods, acpi: ACPIOn})
	}
	if k := artefact(envKernelCustom, defaultCustomKernels); k != "" {
		// The ELF vmlinux with devices on the command line: Firecracker's
		// guest boot path.
		ks = append(ks, vmKernel{name: "custom-noacpi", kernel: k, modules: "none", acpi: ACPIOff})
	}
	if len(ks) == 0 {
		missing(t, "no guest kernel: set %s (make kernel) or %s (make kernel-custom)", envKernel, envKernelCustom)
	}
	return ks
}

func newBackend(t testing.TB, k vmKernel) *Backend {
	t.Helper()
	for _, p := range []string{k.kernel, k.modules} {
		if p == "none" {
			continue
		}
		if _, err := os.Stat(p); err != nil {
			missing(t, "kernel artefact: %v", err)
		}
	}
	b, err := New(Options{
		KernelPath: k.kernel,
		InitrdPath: buildInitrd(t, k.modules),
		ACPI:       k.acpi,
		CacheRoot:  t.TempDir(),
		Logger:     testLogger(t),
		// For experiments with guest settings (aleph.halt=..., loglevel).
		KernelArgs:      strings.Fields(os.Getenv("ALEPH_TEST_KERNEL_ARGS")),
		PrintSystemLogs: os.Getenv("ALEPH_TEST_SYSTEM_LOGS") == "1",
	})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return b
}

func fastapiSpec(t testing.TB) backend.Spec {
	t.Helper()
	id := uuid.NewString()
	return backend.Spec{
		ExecutionID:   id,
		ProgramHash:   "test-" + id[:8],
		RuntimePath:   runtimeImage(t),
		CodePath:      filepath.Join(moduleRoot(t), "examples", "example_fastapi", "main.py"),
		CodeEncoding:  message.EncodingPlain,
		Entrypoint:    "main:app",
		VCPUs:         1,
		MemoryMiB:     message.DefaultMemory,
		StateDir:      t.TempDir(),
		ProgramOutput: testWriter{t, "vm: "},
		Logger:        testLogger(t),
	}
}

func get(t testing.TB, hc *http.Client, path string) (int, []byte) {
	t.Helper()
	resp, err := hc.Get("http://program" + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: body: %v", path, err)
	}
	return resp.StatusCode, body
}

func TestMain(m *testing.M) {
	code := m.Run()
	if agentBin != "" {
		os.RemoveAll(filepath.Dir(agentBin))
	}
	os.Exit(code)
}

// TestBootFastAPI boots the real agent in a VM for each kernel there is,
// runs the example program and stops it.
func TestBootFastAPI(t *testing.T) {
	requireQemu(t)
	for _, k := range kernels(t) {
		t.Run(k.name, func(t *testing.T) {
			b := newBackend(t, k)
			spec := fastapiSpec(t)
			ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
			defer cancel()

			began := time.Now()
			inst, err := b.Start(ctx, spec)
			if err != nil {
				t.Fatalf("Start: %v", err)
			}
			pid := inst.(*instance).Pid()
			stopped := false
			defer func() {
				if !stopped {
					stopInstance(t, inst)
				}
			}()
			ch, err := inst.Channel(ctx)
			if err != nil {
				t.Fatalf("Channel: %v", err)
			}
			bootToAgent := time.Since(began)
			cfg := guest.Config{
				ProgramHash: spec.ProgramHash,
				Interface:   guest.InterfaceASGI,
				Entrypoint:  spec.Entrypoint,
				Encoding:    string(spec.CodeEncoding),
				Hostname:    "vm-" + spec.ExecutionID[:8],
			}
			inst.(backend.GuestConfigurer).ConfigureGuest(&cfg)
			if cfg.CodeDevice != "/dev/vdb" {
				t.Errorf("code device %q, want /dev/vdb", cfg.CodeDevice)
			}
			c, err := guest.Connect(ctx, ch, cfg, testLogger(t))
			if err != nil {
				t.Fatalf("Connect: %v", err)
			}
			defer c.Close()
			coldStart := time.Since(began)
			t.Logf("%s (%s, acpi=%s): boot to agent %s, cold start (Start to program ready) %s",
				k.name, b.Accel(), b.ACPI(), bootToAgent.Round(time.Millisecond), coldStart.Round(time.Millisecond))

			hc := &http.Client{
				Timeout: requestTimeout,
				Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
					return c.DialHTTP(ctx)
				}},
			}
			code, body := get(t, hc, "/")
			var index map[string]any // it also lists its endpoints
			if code != http.StatusOK || json.Unmarshal(body, &index) != nil || index["Example"] != "example_fastapi" {
				t.Errorf("GET /: %d %s", code, body)
			}
			code, body = get(t, hc, "/lifespan")
			var ls map[string]bool
			if code != http.StatusOK || json.Unmarshal(body, &ls) != nil || !ls["Lifespan"] {
				t.Errorf("GET /lifespan: %d %s", code, body)
			}
			code, body = get(t, hc, "/raise")
			if code != http.StatusInternalServerError || !bytes.Contains(body, []byte("raised on purpose")) {
				t.Errorf("GET /raise: %d %s", code, body)
			}
			if u := inst.Usage(); u.CPUTimeUser <= 0 {
				t.Errorf("no CPU time in usage: %+v", u)
			}

			stopCtx, cancelStop := context.WithTimeout(context.Background(), time.Minute)
			defer cancelStop()
			if err := c.Stop(stopCtx); err != nil {
				t.Errorf("guest Stop: %v", err)
			}
			stopBegan := time.Now()
			if err := inst.Stop(stopCtx); err != nil {
				t.Errorf("Stop: %v", err)
			}
			stopped = true
			t.Logf("Stop took %s", time.Since(stopBegan).Round(time.Millisecond))
			select {
			case <-inst.Done():
			default:
				t.Error("Done not closed after Stop")
			}
			if err := inst.Err(); err != nil {
				t.Errorf("Err after a clean stop: %v", err)
			}
			// The guest powered off by itself: QEMU ended without QMP quit
			// or signals.
			if !strings.Contains(consoleOf(t, inst), "powering off") {
				t.Log("the agent's power-off line was not seen on the console")
			}
			if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
				t.Errorf("QEMU (pid %d) still exists after Stop: %v", pid, err)
			}
			entries, _ := os.ReadDir(spec.StateDir)
			for _, e := range entries {
				t.Errorf("left in the state directory: %s", e.Name())
			}
		})
	}
}

func consoleOf(t *testing.T, inst backend.Instance) string {
	t.Helper()
	return inst.(*instance).console.String()
}

// A runtime that is not a squashfs: the agent reports the failed set-up
// on the channel, and the host gets it as a start error, not a timeout.
func TestBadRuntimeIsReported(t *testing.T) {
	requireQemu(t)
	k := kernels(t)[0]
	b := newBackend(t, k)
	spec := fastapiSpec(t)
	bogus := filepath.Join(t.TempDir(), "not-a-squashfs")
	if err := os.WriteFile(bogus, bytes.Repeat([]byte("x"), 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	spec.RuntimePath = bogus
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	inst, err := b.Start(ctx, spec)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	defer stopInstance(t, inst)
	ch, err := inst.Channel(ctx)
	if err != nil {
		t.Fatalf("Channel: %v", err)
	}
	cfg := guest.Config{Interface: guest.InterfaceASGI, Entrypoint: "main:app"}
	inst.(backend.GuestConfigurer).ConfigureGuest(&cfg)
	_, err = guest.Connect(ctx, ch, cfg, testLogger(t))
	if err == nil || !strings.Contains(err.Error(), "mount runtime") {
		t.Fatalf("Connect = %v, want the runtime mount failure", err)
	}
	t.Logf("reported: %v", err)
	select {
	case <-inst.Done():
	case <-time.After(time.Minute):
		t.Error("the VM did not end after the failed start")
	}
}

func TestNewReportsMissingArtefacts(t *testing.T) {
	qemu, err := exec.LookPath(DefaultQemuPath)
	if err != nil {
		qemu = "/bin/true" // enough to reach the kernel check
	}
	existing := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(existing, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		opts Options
		want string
	}{
		{"qemu", Options{QemuPath: "/nonexistent/qemu-system-x86_64", KernelPath: existing, InitrdPath: existing}, "not found"},
		{"no kernel", Options{QemuPath: qemu, InitrdPath: existing}, "no guest kernel"},
		{"kernel", Options{QemuPath: qemu, KernelPath: "/nonexistent/vmlinuz", InitrdPath: existing}, "guest kernel"},
		{"initrd", Options{QemuPath: qemu, KernelPath: existing, InitrdPath: "/nonexistent/initrd"}, "initramfs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.opts.CacheRoot = t.TempDir()
			began := time.Now()
			_, err := New(tc.opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New = %v, want an error about %q", err, tc.want)
			}
			if time.Since(began) > 5*time.Second {
				t.Errorf("New took %s", time.Since(began))
			}
		})
	}
}

func TestKernelArgs(t *testing.T) {
	b := &Backend{opts: Options{KernelArgs: []string{"extra=1"}}, accel: AccelTCG, channel: ChannelSerial, tscKHz: 2300000}
	got := strings.Join(b.kernelArgs(), " ")
	for _, want := range []string{"console=ttyS0", "panic=-1", "loglevel=1", "tsc_early_khz=2300000", "aleph.channel=serial:" + GuestPortName, "extra=1"} {
		if !strings.Contains(got, want) {
			t.Errorf("kernel args %q lack %q", got, want)
		}
	}
	b = &Backend{opts: Options{PrintSystemLogs: true}, accel: AccelKVM, channel: ChannelVsock}
	got = strings.Join(b.kernelArgs(), " ")
	if strings.Contains(got, "loglevel=1") || strings.Contains(got, "tsc_early_khz") || !strings.Contains(got, "aleph.channel=vsock:52") {
		t.Errorf("kernel args with system logs under KVM: %q", got)
	}
}

// Volumes reach the guest as drives that the agent mounts where the
// message says; a writable ext4 volume is left clean by the power-off.
func TestVolumesAndHostname(t *testing.T) {
	requireQemu(t)
	ks := kernels(t)
	k := ks[len(ks)-1] // the quickest to boot when both exist
	b := newBackend(t, k)
	spec := fastapiSpec(t)

	dir := t.TempDir()
	tree := filepath.Join(dir, "tree")
	if err := os.MkdirAll(tree, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tree, "hello.txt"), []byte("from an immutable volume"), 0o644); err != nil {
		t.Fatal(err)
	}
	imm := filepath.Join(dir, "imm.squashfs")
	if out, err := exec.Command("mksquashfs", tree, imm, "-noappend", "-quiet", "-all-root").CombinedOutput(); err != nil {
		t.Fatalf("mksquashfs: %v: %s", err, out)
	}
	pers := filepath.Join(dir, "persistent.ext4")
	spec.Volumes = []backend.Volume{
		{Mount: "/data/imm", Kind: message.VolumeImmutable, Path: imm, Encoding: message.EncodingSquashfs, ReadOnly: true},
		{Mount: "/data/pers", Kind: message.VolumePersistent, Path: pers, SizeMiB: 16},
		{Mount: "/data/eph", Kind: message.VolumeEphemeral, SizeMiB: 8},
	}

	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	inst, err := b.Start(ctx, spec)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	defer stopInstance(t, inst)
	ch, err := inst.Channel(ctx)
	if err != nil {
		t.Fatalf("Channel: %v", err)
	}
	cfg := guest.Config{Interface: guest.InterfaceASGI, Entrypoint: "main:app", Hostname: "vol-test"}
	inst.(backend.GuestConfigurer).ConfigureGuest(&cfg)
	c, err := guest.Connect(ctx, ch, cfg, testLogger(t))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	defer c.Close()
	hc := &http.Client{Timeout: requestTimeout, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return c.DialHTTP(ctx) },
	}}
	readFile := func(path string) string {
		t.Helper()
		code, body := get(t, hc, "/read-file?path="+path)
		var r struct{ Content, Error string }
		if code != http.StatusOK || json.Unmarshal(body, &r) != nil {
			t.Fatalf("read %s: %d %s", path, code, body)
		}
		if r.Error != "" {
			t.Errorf("read %s: %s", path, r.Error)
		}
		return r.Content
	}
	if got := readFile("/data/imm/hello.txt"); got != "from an immutable volume" {
		t.Errorf("immutable volume: %q", got)
	}
	mounts := readFile("/proc/mounts")
	for _, want := range []string{" /data/imm squashfs ro", " /data/pers ext4 rw", " /data/eph ext4 rw", " /opt/code squashfs ro", "overlay / overlay rw"} {
		if !strings.Contains(mounts, want) {
			t.Errorf("/proc/mounts lacks %q:\n%s", want, mounts)
		}
	}
	if got := strings.TrimSpace(readFile("/proc/sys/kernel/hostname")); got != "vol-test" {
		t.Errorf("hostname %q", got)
	}

	// No stop command this time: closing the channel alone must make the
	// agent stop the program and power the VM off cleanly.
	stopCtx, cancelStop := context.WithTimeout(context.Background(), time.Minute)
	defer cancelStop()
	if err := inst.Stop(stopCtx); err != nil {
		t.Errorf("Stop: %v", err)
	}
	if !strings.Contains(consoleOf(t, inst), "shutdown event ran") {
		t.Error("the program's lifespan shutdown did not run")
	}
	// Unmounted before the power-off: the journal needs no recovery.
	if out, err := exec.Command("e2fsck", "-n", "-f", pers).CombinedOutput(); err != nil {
		t.Errorf("persistent volume not clean after stop: %v\n%s", err, out)
	}
	if entries, _ := os.ReadDir(spec.StateDir); len(entries) > 0 {
		for _, e := range entries {
			t.Errorf("left in the state directory: %s", e.Name())
		}
	}
}

// BenchmarkColdStart measures, per kernel, the time from Start to the
// agent's channel (boot to agent) and to the program's first answer
// (cold start), with the example FastAPI program:
//
//	go test -run '^$' -bench ColdStart -benchtime 3x ./internal/backend/qemu
func BenchmarkColdStart(b *testing.B) {
	requireQemu(b)
	for _, k := range kernels(b) {
		b.Run(k.name, func(b *testing.B) {
			be := newBackend(b, k)
			quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
			be.log = quiet
			var boot, cold time.Duration
			for n := 0; n < b.N; n++ {
				spec := fastapiSpec(b)
				spec.Logger, spec.ProgramOutput = quiet, io.Discard
				ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
				began := time.Now()
				inst, err := be.Start(ctx, spec)
				if err != nil {
					b.Fatal(err)
				}
				ch, err := inst.Channel(ctx)
				if err != nil {
					b.Fatal(err)
				}
				boot += time.Since(began)
				cfg := guest.Config{Interface: guest.InterfaceASGI, Entrypoint: spec.Entrypoint}
				inst.(backend.GuestConfigurer).ConfigureGuest(&cfg)
				c, err := guest.Connect(ctx, ch, cfg, quiet)
				if err != nil {
					b.Fatal(err)
				}
				hc := &http.Client{Timeout: requestTimeout, Transport: &http.Transport{
					DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return c.DialHTTP(ctx) },
				}}
				if code, body := get(b, hc, "/"); code != http.StatusOK {
					b.Fatalf("GET /: %d %s", code, body)
				}
				cold += time.Since(began)
				if err := c.Stop(ctx); err != nil {
					b.Fatal(err)
				}
				if err := inst.Stop(ctx); err != nil {
					b.Fatal(err)
				}
				cancel()
			}
			b.ReportMetric(float64(boot.Milliseconds())/float64(b.N), "boot-to-agent-ms")
			b.ReportMetric(float64(cold.Milliseconds())/float64(b.N), "cold-start-ms")
			b.ReportMetric(0, "ns/op")
		})
	}
}
