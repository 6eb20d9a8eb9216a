// Package guesttest runs the real vm-agent for tests: built from source,
// chrooted into the runtime image (extracted once, with a private overlay
// per test) in its own PID, mount and network namespaces, the guest
// channel on its stdin/stdout as under gVisor.
//
// It needs root, unshare(1), unsquashfs(1), overlayfs and the runtime
// image (runtimes/aleph-debian-12-python/create.sh). Tests skip when one is
// missing, unless CI=true, where a missing prerequisite fails them.
package guesttest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// ImageEnv overrides the runtime image the tests use.
const ImageEnv = "ALEPH_VM_TEST_RUNTIME"

// Require skips (or fails under CI=true) when the agent cannot be run.
func Require(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("runs the real agent as root: skipped with -short")
	}
	missing := func(format string, args ...any) {
		t.Helper()
		msg := fmt.Sprintf(format, args...)
		if os.Getenv("CI") == "true" {
			t.Fatal("prerequisite missing: " + msg)
		}
		t.Skip("prerequisite missing: " + msg)
	}
	if os.Geteuid() != 0 {
		missing("must run as root (chroot, namespaces, overlayfs)")
	}
	for _, tool := range []string{"unshare", "unsquashfs", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing("%s not found", tool)
		}
	}
	if _, err := os.Stat(ImagePath(t)); err != nil {
		missing("runtime image: %v (build it with runtimes/aleph-debian-12-python/create.sh)", err)
	}
}

// ModuleRoot is the directory holding go.mod.
func ModuleRoot(t testing.TB) string {
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
			t.Fatal("go.mod not found above the working directory")
		}
		dir = parent
	}
}

// ImagePath is the runtime squashfs the tests run in.
func ImagePath(t testing.TB) string {
	if p := os.Getenv(ImageEnv); p != "" {
		return p
	}
	return filepath.Join(ModuleRoot(t), "runtimes", "aleph-debian-12-python", "rootfs.squashfs")
}

// BuildAgent compiles cmd/vm-agent statically, as it ships.
func BuildAgent(t testing.TB) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "vm-agent")
	cmd := exec.Command("go", "build", "-o", out, "./cmd/vm-agent")
	cmd.Dir = ModuleRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build vm-agent: %v\n%s", err, b)
	}
	return out
}

var extractMu sync.Mutex

// extractedImage unpacks the image once per image version into a cache
// shared by test runs; concurrent test binaries race to a rename.
func extractedImage(t testing.TB) string {
	t.Helper()
	extractMu.Lock()
	defer extractMu.Unlock()
	image := ImagePath(t)
	st, err := os.Stat(image)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(fmt.Sprintf("%s|%d|%d", image, st.Size(), st.ModTime().UnixNano())))
	base := os.Getenv("ALEPH_VM_BUILD_CACHE")
	if base == "" {
		base = "/var/cache/aleph-vm-build"
	}
	dir := filepath.Join(base, "test-rootfs", hex.EncodeToString(sum[:8]))
	if _, err := os.Stat(filepath.Join(dir, "usr", "bin", "python3")); err == nil {
		return dir
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
		t.Fatal(err)
	}
	tmp := fmt.Sprintf("%s.tmp%d", dir, os.Getpid())
	os.RemoveAll(tmp)
	t.Logf("extracting %s to %s", image, dir)
	if b, err := exec.Command("unsquashfs", "-q", "-no-progress", "-d", tmp, image).CombinedOutput(); err != nil {
		os.RemoveAll(tmp)
		t.Fatalf("unsquashfs: %v\n%s", err, b)
	}
	if err := os.Rename(tmp, dir); err != nil {
		// Another test binary won the race; use its copy.
		os.RemoveAll(tmp)
		if _, serr := os.Stat(dir); serr != nil {
			t.Fatalf("rename extracted image: %v", err)
		}
	}
	return dir
}

// Agent is one running vm-agent.
type Agent struct {
	// Root is the sandbox's root filesystem as seen from the host.
	Root string
	Cmd  *exec.Cmd
	// Log holds the agent's stderr: its logs and the program's output.
	Log *SyncBuffer

	stdin  io.WriteCloser
	stdout io.ReadCloser
	exited chan struct{}
	err    error
}

// Start runs vm-agent chrooted into a fresh overlay of the runtime image,
// with codeDir copied to /opt/code. Extra args go to the agent.
func Start(t testing.TB, agentBin, codeDir string, args ...string) *Agent {
	t.Helper()
	lower := extractedImage(t)
	tmp := t.TempDir()
	upper, work, merged := filepath.Join(tmp, "upper"), filepath.Join(tmp, "work"), filepath.Join(tmp, "root")
	for _, d := range []string{upper, work, merged} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lower, upper, work)
	if b, err := exec.Command("mount", "-t", "overlay", "overlay", "-o", opts, merged).CombinedOutput(); err != nil {
		t.Fatalf("mount overlay: %v\n%s", err, b)
	}
	t.Cleanup(func() {
		// Lazy: a process that outlived the test must not make it leak
		// the mount; the test itself checks no process is left.
		if b, err := exec.Command("umount", "-l", merged).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v\n%s", merged, err, b)
		}
	})

	if codeDir != "" {
		if b, err := exec.Command("cp", "-a", codeDir+"/.", filepath.Join(merged, "opt", "code")).CombinedOutput(); err != nil {
			t.Fatalf("copy code: %v\n%s", err, b)
		}
	}
	agentPath := filepath.Join(merged, "opt", "aleph", "vm-agent")
	if err := os.MkdirAll(filepath.Dir(agentPath), 0o755); err != nil {
		t.Fatal(err)
	}
	if b, err := exec.Command("cp", agentBin, agentPath).CombinedOutput(); err != nil {
		t.Fatalf("copy agent: %v\n%s", err, b)
	}

	// unshare makes the agent PID 1 of its own PID namespace, as in gVisor,
	// so it reaps orphans and a stop can kill everything.
	unshareArgs := []string{
		"--fork", "--pid", "--mount", "--net", "--uts", "--ipc", "--kill-child",
		"--root=" + merged, "--mount-proc=/proc",
		"--", "/opt/aleph/vm-agent", "--channel", "stdio", "--log-level", "debug",
	}
	cmd := exec.Command("unshare", append(unshareArgs, args...)...)
	cmd.Env = []string{"AGENT_SECRET_SHOULD_NOT_LEAK=1", "PATH=/usr/bin:/bin"}
	a := &Agent{Root: merged, Cmd: cmd, Log: &SyncBuffer{}, exited: make(chan struct{})}
	cmd.Stderr = io.MultiWriter(a.Log, testWriter{t})
	var err error
	if a.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if a.stdout, err = cmd.StdoutPipe(); err != nil {
		t.Fatal(err)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start agent: %v", err)
	}
	go func() {
		a.err = cmd.Wait()
		close(a.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-a.exited:
		default:
			_ = cmd.Process.Kill() // fails only if it exited meanwhile
			<-a.exited
		}
	})
	return a
}

// HTTPClient sends requests to the program through c, one stream per
// connection, as the supervisor does.
func HTTPClient(c *guest.Client) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return c.DialHTTP(ctx)
		},
		DisableCompression: true,
	}}
}

// Channel is the guest channel: the agent's stdin and stdout.
func (a *Agent) Channel() io.ReadWriteCloser { return channel{a} }

type channel struct{ a *Agent }

func (c channel) Read(p []byte) (int, error)  { return c.a.stdout.Read(p) }
func (c channel) Write(p []byte) (int, error) { return c.a.stdin.Write(p) }
func (c channel) Close() error {
	c.a.stdin.Close()
	return nil // stdout is closed by Wait once the agent exits
}

// Wait waits for the agent to exit, at most timeout.
func (a *Agent) Wait(timeout time.Duration) error {
	select {
	case <-a.exited:
		return a.err
	case <-time.After(timeout):
		return fmt.Errorf("agent still running after %s", timeout)
	}
}

// ProcessesInRoot lists host PIDs whose root directory is the sandbox's:
// after a stop there must be none.
func (a *Agent) ProcessesInRoot() []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		root, err := os.Readlink(filepath.Join("/proc", e.Name(), "root"))
		if err == nil && (root == a.Root || strings.HasPrefix(root, a.Root+"/")) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// SyncBuffer is a bytes.Buffer safe for one writer and many readers.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// testWriter streams the agent's stderr into the test log as it comes.
type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Logf("agent: %s", strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
