package gvisor

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/loopdev"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// requireSandbox skips (or, in CI, fails) when this host cannot run real
// sandboxes.
func requireSandbox(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("real gVisor sandboxes as root: skipped with -short")
	}
	missing := func(why string) {
		t.Helper()
		if os.Getenv("CI") == "true" {
			t.Fatalf("prerequisite missing in CI: %s", why)
		}
		t.Skipf("prerequisite missing: %s", why)
	}
	if os.Geteuid() != 0 {
		missing("must run as root")
	}
	for _, bin := range []string{"runsc", "mksquashfs", "busybox"} {
		if _, err := exec.LookPath(bin); err != nil {
			missing(bin + " not in PATH")
		}
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		missing("no loop devices")
	}
}

func TestMain(m *testing.M) {
	code := m.Run()
	if runtimeImg != "" {
		os.RemoveAll(filepath.Dir(runtimeImg))
	}
	os.Exit(code)
}

var (
	runtimeOnce sync.Once
	runtimeImg  string
	runtimeErr  error
)

// busyboxRuntime builds, once per test binary, a tiny runtime image: a
// static busybox with one link per applet.
func busyboxRuntime(t *testing.T) string {
	t.Helper()
	runtimeOnce.Do(func() {
		dir, err := os.MkdirTemp("", "gvisor-test-runtime-")
		if err != nil {
			runtimeErr = err
			return
		}
		runtimeErr = buildBusyboxImage(dir)
		runtimeImg = filepath.Join(dir, "rootfs.squashfs")
	})
	if runtimeErr != nil {
		t.Fatalf("build runtime: %v", runtimeErr)
	}
	return runtimeImg
}

func buildBusyboxImage(dir string) error {
	root := filepath.Join(dir, "rootfs")
	for _, d := range []string{"bin", "proc", "dev", "sys", "tmp", "etc", "opt", "run"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return err
		}
	}
	if err := os.Chmod(filepath.Join(root, "tmp"), 0o1777); err != nil {
		return err
	}
	bb, err := exec.LookPath("busybox")
	if err != nil {
		return err
	}
	data, err := os.ReadFile(bb)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(root, "bin", "busybox"), data, 0o755); err != nil {
		return err
	}
	list, err := exec.Command(bb, "--list").Output()
	if err != nil {
		return fmt.Errorf("busybox --list: %w", err)
	}
	for _, applet := range strings.Fields(string(list)) {
		if applet == "busybox" {
			continue
		}
		if err := os.Symlink("busybox", filepath.Join(root, "bin", applet)); err != nil {
			return err
		}
	}
	out, err := exec.Command("mksquashfs", root, filepath.Join(dir, "rootfs.squashfs"), "-noappend", "-quiet", "-no-progress").CombinedOutput()
	if err != nil {
		return fmt.Errorf("mksquashfs: %w: %s", err, out)
	}
	return os.RemoveAll(root)
}

type testEnv struct {
	b         *Backend
	cacheRoot string
	rootDir   string
	execRoot  string
}

func newEnv(t *testing.T, command ...string) *testEnv {
	t.Helper()
	requireSandbox(t)
	base := t.TempDir()
	env := &testEnv{
		cacheRoot: filepath.Join(base, "cache"),
		rootDir:   filepath.Join(base, "exec", "runsc"),
		execRoot:  filepath.Join(base, "exec"),
	}
	b, err := New(Options{
		Command:   command,
		CacheRoot: env.cacheRoot,
		RootDir:   env.rootDir,
		Logger:    slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
		StopGrace: time.Second,
	})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	env.b = b
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return env
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// spec returns a Spec with plain code "main.py" and a fresh state dir.
func (e *testEnv) spec(t *testing.T) backend.Spec {
	t.Helper()
	id := uuid.NewString()
	state := filepath.Join(e.execRoot, id)
	if err := os.MkdirAll(state, 0o700); err != nil {
		t.Fatal(err)
	}
	code := filepath.Join(t.TempDir(), "code.py")
	if err := os.WriteFile(code, []byte("app = 'hello from code'\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return backend.Spec{
		ExecutionID:   id,
		ProgramHash:   "testprogram",
		RuntimePath:   busyboxRuntime(t),
		CodePath:      code,
		CodeEncoding:  message.EncodingPlain,
		Entrypoint:    "main:app",
		VCPUs:         1,
		MemoryMiB:     64,
		StateDir:      state,
		ProgramOutput: testWriter{t},
	}
}

func (e *testEnv) start(t *testing.T, spec backend.Spec) backend.Instance {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	inst, err := e.b.Start(ctx, spec)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { _ = inst.Stop(context.Background()) })
	return inst
}

func stop(t *testing.T, inst backend.Instance) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := inst.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	// Idempotent.
	if err := inst.Stop(ctx); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
}

// assertNothingLeft checks every trace a sandbox can leave on the host.
func (e *testEnv) assertNothingLeft(t *testing.T, spec backend.Spec) {
	t.Helper()
	out, err := exec.Command("runsc", "--root", e.rootDir, "list", "-quiet").CombinedOutput()
	if err != nil {
		t.Fatalf("runsc list: %v: %s", err, out)
	}
	if s := strings.TrimSpace(string(out)); s != "" {
		t.Errorf("runsc containers left: %q", s)
	}
	mps, err := mountPoints()
	if err != nil {
		t.Fatal(err)
	}
	for mp := range mps {
		if strings.HasPrefix(mp, spec.StateDir) || strings.HasPrefix(mp, filepath.Join(e.cacheRoot, "runtimes")) {
			t.Errorf("mount left: %s", mp)
		}
	}
	entries, err := os.ReadDir(spec.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	for _, en := range entries {
		t.Errorf("file left in state dir: %s", en.Name())
	}
	for _, dir := range []string{spec.StateDir, e.cacheRoot} {
		devs, err := loopdev.BackedUnder(dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range devs {
			t.Errorf("loop device left: /dev/%s on %s", d.Name, d.Backing)
		}
	}
	if dirs := newCgroup(DefaultCgroupParent, spec.ExecutionID).existingDirs(); len(dirs) > 0 {
		t.Errorf("cgroups left: %v", dirs)
	}
}

// readAll reads r to EOF, bounded in time.
func readAll(t *testing.T, r io.Reader, d time.Duration) string {
	t.Helper()
	type result struct {
		b   []byte
		err error
	}
	ch := make(chan result, 1)
	go func() {
		b, err := io.ReadAll(r)
		ch <- result{b, err}
	}()
	select {
	case res := <-ch:
		if res.err != nil && !errors.Is(res.err, os.ErrClosed) {
			t.Fatalf("read: %v", res.err)
		}
		return string(res.b)
	case <-time.After(d):
		t.Fatal("timed out reading sandbox output")
		return ""
	}
}

func TestNewFailsWithoutRunsc(t *testing.T) {
	_, err := New(Options{RunscPath: "/nonexistent/runsc", Command: []string{"true"}, CacheRoot: t.TempDir(), RootDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "runsc not found") {
		t.Fatalf("want a runsc not found error, got %v", err)
	}
}

func TestChannelRoundTrip(t *testing.T) {
	env := newEnv(t, "/bin/sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exec cat")
	spec := env.spec(t)
	inst := env.start(t, spec)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ch, err := inst.Channel(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := inst.Channel(ctx); err == nil {
		t.Error("second Channel call should fail")
	}
	payload := make([]byte, 4<<20)
	if _, err := rand.Read(payload); err != nil {
		t.Fatal(err)
	}
	go func() {
		_, _ = ch.Write(payload)
	}()
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(ch, got); err != nil {
		t.Fatalf("read back: %v", err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatal("bytes changed on their way through the sandbox")
	}
	if u := inst.Usage(); u.CPUTimeUser+u.CPUTimeSystem == 0 {
		t.Errorf("no CPU usage reported: %+v", u)
	} else {
		t.Logf("usage: %+v", u)
	}
	select {
	case <-inst.Done():
		t.Fatal("sandbox ended early")
	default:
	}
	stop(t, inst)
	<-inst.Done()
	if err := inst.Err(); err != nil {
		t.Errorf("Err after Stop = %v, want nil", err)
	}
	env.assertNothingLeft(t, spec)
}

func TestIsolationAndMounts(t *testing.T) {
	// A host file the sandbox must not see.
	secretDir := t.TempDir()
	secret := filepath.Join(secretDir, "host-secret")
	if err := os.WriteFile(secret, []byte("secret"), 0o644); err != nil {
		t.Fatal(err)
	}
	persistent := filepath.Join(t.TempDir(), "prog", "persist.ext4")
	immutable := filepath.Join(t.TempDir(), "vol.squashfs")
	volSrc := t.TempDir()
	if err := os.WriteFile(filepath.Join(volSrc, "data.txt"), []byte("immutable data"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mksquashfs", volSrc, immutable, "-noappend", "-quiet", "-no-progress").CombinedOutput(); err != nil {
		t.Fatalf("mksquashfs: %v: %s", err, out)
	}

	script := strings.Join([]string{
		`echo "code=$(cat /opt/code/main.py)"`,
		`if echo x > /opt/code/new 2>/dev/null; then echo code-writable; else echo code-readonly; fi`,
		`if [ -e ` + secret + ` ] || [ -e ` + secretDir + ` ]; then echo secret-visible; else echo secret-hidden; fi`,
		`echo "procs=$(ls /proc | grep -cE '^[0-9]+$')"`,
		// Bracketed patterns never match their own command line.
		`if cat /proc/[0-9]*/cmdline | tr '\0' ' ' | grep -qE "gvisor[.]test|run[s]c"; then echo host-procs-visible; else echo host-procs-hidden; fi`,
		fmt.Sprintf(`if [ -e /proc/%d ]; then echo host-pid-visible; else echo host-pid-hidden; fi`, os.Getpid()),
		`echo rootdata > /written-to-root && echo "root=$(cat /written-to-root)"`,
		`echo "hostname=$(hostname)"`,
		`echo run > /run/aleph/x && echo "run=$(cat /run/aleph/x)"`,
		`echo "netdevs=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort | tr '\n' ,)"`,
		`echo "imm=$(cat /data/imm/data.txt)"`,
		`if echo x > /data/imm/new 2>/dev/null; then echo imm-writable; else echo imm-readonly; fi`,
		`echo eph > /data/eph/f && echo "eph=$(cat /data/eph/f)"`,
		`echo persisted > /data/persist/f && echo persist-ok`,
		`echo "agent=$([ -e ` + AgentGuestPath + ` ] && echo present || echo absent)"`,
	}, "\n")
	env := newEnv(t, "/bin/sh", "-c", script)
	spec := env.spec(t)
	spec.Volumes = []backend.Volume{
		{Mount: "/data/imm", Kind: message.VolumeImmutable, Path: immutable, ReadOnly: true},
		{Mount: "/data/eph", Kind: message.VolumeEphemeral, SizeMiB: 8},
		{Mount: "/data/persist", Kind: message.VolumePersistent, Path: persistent, SizeMiB: 8},
	}
	imageSum := fileSum(t, spec.RuntimePath)
	inst := env.start(t, spec)
	ch, err := inst.Channel(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	out := readAll(t, ch, time.Minute)
	t.Logf("sandbox said:\n%s", out)
	for _, want := range []string{
		"code=app = 'hello from code'",
		"code-readonly",
		"secret-hidden",
		"host-procs-hidden",
		"host-pid-hidden",
		"root=rootdata",
		"hostname=" + hostnameFor(spec.ExecutionID),
		"run=run",
		"netdevs=lo,",
		"imm=immutable data",
		"imm-readonly",
		"eph=eph",
		"persist-ok",
	} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("missing %q in sandbox output", want)
		}
	}
	// sh, the subshell and the pipeline of `ls | grep`: a handful at most.
	var procs int
	if _, err := fmt.Sscanf(out[strings.Index(out, "procs="):], "procs=%d", &procs); err != nil || procs > 6 {
		t.Errorf("sandbox sees %d processes (%v)", procs, err)
	}
	select {
	case <-inst.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("sandbox did not end after its process exited")
	}
	if err := inst.Err(); err == nil || !strings.Contains(err.Error(), "exit status 0") {
		t.Errorf("Err = %v, want a report of the exit by itself", err)
	}
	stop(t, inst)

	// The immutable volume's and the persistent volume's loop devices went
	// with their mounts (autoclear).
	for _, img := range []string{immutable, persistent} {
		if devs, err := loopdev.BackedBy(img); err != nil || len(devs) > 0 {
			t.Errorf("loop devices left on %s: %v %v", img, devs, err)
		}
	}
	if got := imageFile(t, persistent, "/f"); got != "persisted\n" {
		t.Errorf("persistent volume write did not reach its image: %q", got)
	}
	if got := fileSum(t, spec.RuntimePath); got != imageSum {
		t.Error("runtime image changed")
	}
	env.assertNothingLeft(t, spec)
}

func fileSum(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", sha256.Sum256(b))
}

func TestMemoryHogIsKilled(t *testing.T) {
	env := newEnv(t, "/bin/sh", "-c", "cat")
	neighbour := env.start(t, env.spec(t))

	// In the shell's own memory: /tmp is a tmpfs of bounded size now, which
	// would stop the hog with ENOSPC before the memory limit.
	hogEnv := newEnv(t, "/bin/sh", "-c", "hog=$(head -c 400000000 /dev/zero | tr '\\0' x); echo survived")
	spec := hogEnv.spec(t)
	spec.MemoryMiB = 32
	hog := hogEnv.start(t, spec)
	select {
	case <-hog.Done():
	case <-time.After(2 * time.Minute):
		t.Fatal("memory hog still running")
	}
	if err := hog.Err(); !errors.Is(err, ErrMemoryLimit) {
		t.Errorf("Err = %v, want ErrMemoryLimit", err)
	}
	stop(t, hog)
	hogEnv.assertNothingLeft(t, spec)

	// The neighbour is unaffected and still answers.
	ch, err := neighbour.Channel(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ch.Write([]byte("ping\n")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(ch, buf); err != nil || string(buf) != "ping\n" {
		t.Fatalf("neighbour: %q, %v", buf, err)
	}
	stop(t, neighbour)
}

func TestSharedRuntimeMount(t *testing.T) {
	env := newEnv(t, "/bin/sh", "-c", "exec cat")
	specA, specB := env.spec(t), env.spec(t)
	specA.RuntimeHash, specB.RuntimeHash = "runtimehash1", "runtimehash1"
	mp := filepath.Join(env.cacheRoot, "runtimes", "runtimehash1")

	// A stale mount, as a crashed supervisor would leave it.
	if err := os.MkdirAll(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := loopdev.Mount(specA.RuntimePath, mp, "squashfs", true, 0, ""); err != nil {
		t.Fatal(err)
	}

	a := env.start(t, specA)
	b := env.start(t, specB)
	if n := mountCount(t, mp); n != 1 {
		t.Fatalf("runtime mounted %d times, want 1", n)
	}
	stop(t, a)
	if n := mountCount(t, mp); n != 1 {
		t.Fatalf("runtime mounted %d times after first stop, want 1", n)
	}
	select {
	case <-b.Done():
		t.Fatal("second sandbox died when the first stopped")
	default:
	}
	stop(t, b)
	if n := mountCount(t, mp); n != 0 {
		t.Fatalf("runtime still mounted after last stop")
	}
	if _, err := os.Stat(mp); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("runtime mount point left: %v", err)
	}
	env.assertNothingLeft(t, specA)
	env.assertNothingLeft(t, specB)
}

func mountCount(t *testing.T, path string) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == path {
			n++
		}
	}
	return n
}

func TestStopKillsUnresponsiveSandbox(t *testing.T) {
	// Ignores stdin EOF and SIGTERM: only the kill path ends it.
	env := newEnv(t, "/bin/sh", "-c", "trap '' TERM INT HUP; while true; do sleep 1; done")
	spec := env.spec(t)
	inst := env.start(t, spec)
	began := time.Now()
	stop(t, inst)
	if d := time.Since(began); d > 20*time.Second {
		t.Errorf("stop took %v", d)
	}
	select {
	case <-inst.Done():
	default:
		t.Fatal("Done not closed after Stop")
	}
	env.assertNothingLeft(t, spec)
}

func TestStartFailureCleansUp(t *testing.T) {
	env := newEnv(t, "/bin/true")
	spec := env.spec(t)
	// The persistent volume is mounted and locked before the missing one
	// fails the start: both must be undone.
	img := filepath.Join(t.TempDir(), "p.ext4")
	spec.Volumes = []backend.Volume{
		{Mount: "/data/p", Kind: message.VolumePersistent, Path: img, SizeMiB: 4},
		{Mount: "/data/missing", Kind: message.VolumeImmutable, Path: "/nonexistent/volume.squashfs", ReadOnly: true},
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := env.b.Start(ctx, spec); err == nil {
		t.Fatal("Start with a missing volume succeeded")
	}
	env.assertNothingLeft(t, spec)
	assertImageFree(t, img)
	mp := filepath.Join(env.cacheRoot, "runtimes")
	if entries, _ := os.ReadDir(mp); len(entries) > 0 {
		t.Errorf("runtime mount left after failed start: %v", entries)
	}
}
