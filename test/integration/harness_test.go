// Package integration drives the real supervisor binary, the real vm-agent
// and real gVisor sandboxes through the HTTP API, as a user would.
//
// Prerequisites: root, runsc, the binaries from `make build` (ALEPH_TEST_BIN)
// and the runtime image from `make runtime` (ALEPH_TEST_RUNTIME). Without
// them the tests skip, except when CI=true, where they fail.
package integration

import (
	"bytes"
	"encoding/json"
	"flag"
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

	"github.com/aleph-vm-go/vm-supervisor/internal/loopdev"
)

var (
	binDir      string
	runtimeFile string
	prereqErr   error
	// hypervisor is the backend under test: ALEPH_TEST_HYPERVISOR, gvisor
	// by default. `make test` runs the suite once per backend that runs
	// here (qemu under TCG emulation, with each guest kernel).
	hypervisor = envOr("ALEPH_TEST_HYPERVISOR", "gvisor")
)

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func TestMain(m *testing.M) {
	// Every test here runs the supervisor end to end, as root.
	flag.Parse()
	if testing.Short() {
		fmt.Println("end-to-end suite skipped with -short")
		os.Exit(0)
	}
	prereqErr = findPrerequisites()
	os.Exit(m.Run())
}

func findPrerequisites() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("integration tests need root")
	}
	switch hypervisor {
	case "gvisor":
		if _, err := exec.LookPath("runsc"); err != nil {
			return fmt.Errorf("runsc not installed: %w", err)
		}
	case "qemu":
		if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
			return fmt.Errorf("qemu not installed: %w", err)
		}
		kernel := os.Getenv("ALEPH_VM_LINUX_PATH")
		if _, err := os.Stat(kernel); err != nil {
			return fmt.Errorf("guest kernel ALEPH_VM_LINUX_PATH=%q (make kernel): %w", kernel, err)
		}
	default:
		return fmt.Errorf("ALEPH_TEST_HYPERVISOR=%q: the suite runs gvisor or qemu", hypervisor)
	}
	binDir = os.Getenv("ALEPH_TEST_BIN")
	if binDir == "" {
		binDir, _ = filepath.Abs("../../bin")
	}
	for _, b := range []string{"vm-supervisor", "vm-agent"} {
		if _, err := os.Stat(filepath.Join(binDir, b)); err != nil {
			return fmt.Errorf("%s not built (make build): %w", b, err)
		}
	}
	runtimeFile = os.Getenv("ALEPH_TEST_RUNTIME")
	if runtimeFile == "" {
		runtimeFile, _ = filepath.Abs("../../runtimes/aleph-debian-12-python/rootfs.squashfs")
	}
	if _, err := os.Stat(runtimeFile); err != nil {
		return fmt.Errorf("runtime image missing (make runtime): %w", err)
	}
	return nil
}

// requirePrerequisites skips (or, in CI, fails) a test that cannot run here.
func requirePrerequisites(t *testing.T) {
	t.Helper()
	if prereqErr == nil {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("prerequisite missing in CI: %v", prereqErr)
	}
	t.Skipf("prerequisite missing: %v", prereqErr)
}

// backendIndependent skips a test when the suite runs under a VM backend:
// what it attacks (the HTTP front, the guest cache, admission, the pool)
// is the same code whatever the backend, and under TCG emulation each of
// its many cold starts takes 10–35 s. The gVisor pass of `make test` runs it.
func backendIndependent(t *testing.T) {
	t.Helper()
	if hypervisor != "gvisor" {
		t.Skipf("backend-independent: covered by the gVisor pass (this pass: %s)", hypervisor)
	}
}

// supervisor is one running vm-supervisor process with private state.
type supervisor struct {
	t        *testing.T
	cmd      *exec.Cmd
	env      []string
	base     string // http://127.0.0.1:port
	port     int
	execRoot string
	cache    string
	api      *alephAPI
	logs     *syncBuffer
	waitErr  chan error
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// startSupervisor starts the supervisor with the default runtime registered
// and returns once it answers HTTP. extraEnv are ALEPH_VM_* assignments.
func startSupervisor(t *testing.T, extraEnv ...string) *supervisor {
	t.Helper()
	requirePrerequisites(t)
	// A short root: VM backends put unix sockets in the execution
	// directories, and sun_path holds 107 bytes.
	dir, err := os.MkdirTemp("", "avm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := &supervisor{
		t:        t,
		port:     freePort(t),
		execRoot: filepath.Join(dir, "exec"),
		cache:    filepath.Join(dir, "cache"),
		logs:     &syncBuffer{},
		waitErr:  make(chan error, 1),
		api:      newAlephAPI(t),
	}
	s.base = fmt.Sprintf("http://127.0.0.1:%d", s.port)
	s.env = append(os.Environ(),
		"ALEPH_VM_EXECUTION_ROOT="+s.execRoot,
		"ALEPH_VM_CACHE_ROOT="+s.cache,
		fmt.Sprintf("ALEPH_VM_SUPERVISOR_PORT=%d", s.port),
		"ALEPH_VM_HYPERVISOR="+hypervisor,
		"ALEPH_VM_API_SERVER="+s.api.srv.URL,
		// Generous: under TCG emulation a VM takes 10–35 s to boot and
		// import FastAPI on these 2-core machines.
		"ALEPH_VM_INIT_TIMEOUT=180",
	)
	if hypervisor != "gvisor" {
		// Spare VMs would share the cores with the VM a test measures
		// under TCG; the tests of VM spares turn them on.
		s.env = append(s.env, "ALEPH_VM_PREWARM=false")
	}
	s.env = append(s.env, extraEnv...)
	s.cli("runtime", "add", runtimeFile, "--default")
	t.Cleanup(func() {
		s.shutdown()
		if t.Failed() {
			t.Logf("supervisor log:\n%s", tail(s.logs.String(), 200))
		}
	})
	s.launch()
	return s
}

// launch starts the supervisor process with s.env and waits until it
// answers HTTP.
func (s *supervisor) launch() {
	t := s.t
	t.Helper()
	s.waitErr = make(chan error, 1)
	s.cmd = exec.Command(filepath.Join(binDir, "vm-supervisor"), "-vv")
	s.cmd.Env = s.env
	s.cmd.Dir = filepath.Dir(s.execRoot)
	s.cmd.Stdout = s.logs
	s.cmd.Stderr = s.logs
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ourPIDs.Store(s.cmd.Process.Pid, struct{}{})
	cmd, waitErr := s.cmd, s.waitErr
	go func() { waitErr <- cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(s.base + "/status/check/version")
		if err == nil {
			resp.Body.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("supervisor did not answer: %v\n%s", err, s.logs.String())
		}
		select {
		case err := <-waitErr:
			s.cmd = nil
			t.Fatalf("supervisor exited: %v\n%s", err, s.logs.String())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// kill9 kills the supervisor as a crash would (SIGKILL): nothing of its
// own clean-up runs. Its sandboxes, links and rules stay until a restart
// sweeps them.
func (s *supervisor) kill9() {
	s.t.Helper()
	if s.cmd == nil || s.cmd.Process == nil {
		s.t.Fatal("kill9: supervisor not running")
	}
	_ = s.cmd.Process.Kill()
	s.noteExit("SIGKILL", <-s.waitErr)
	s.cmd = nil
}

// noteExit writes how the supervisor process ended into its log, which a
// failed test prints.
func (s *supervisor) noteExit(after string, err error) {
	status := "exit status 0"
	if err != nil {
		status = err.Error()
	}
	fmt.Fprintf(s.logs, "\n--- after %s: %s ---\n", after, status)
}

// restart starts the supervisor again on the same EXECUTION_ROOT,
// CACHE_ROOT, port and Aleph API, after kill9 or shutdown; extraEnv
// override earlier settings.
func (s *supervisor) restart(extraEnv ...string) {
	s.t.Helper()
	if s.cmd != nil {
		s.t.Fatal("restart: supervisor still running")
	}
	s.env = append(s.env, extraEnv...)
	fmt.Fprintf(s.logs, "\n--- restart %v ---\n", extraEnv)
	s.launch()
}

// cli runs a supervisor sub-command with this supervisor's settings and
// returns its stdout.
func (s *supervisor) cli(args ...string) string {
	s.t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "vm-supervisor"), args...)
	cmd.Env = s.env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		s.t.Fatalf("vm-supervisor %v: %v\n%s", args, err, stderr.String())
	}
	return string(out)
}

// upload publishes a program into the local store and returns its hash.
func (s *supervisor) upload(path, entrypoint string, flags ...string) string {
	s.t.Helper()
	out := s.cli(append([]string{"program", "upload", path, entrypoint}, flags...)...)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	hash := strings.TrimSpace(lines[len(lines)-1])
	if len(hash) != 64 {
		s.t.Fatalf("upload printed %q, want a hash on the last line", out)
	}
	return hash
}

// shutdown sends SIGTERM and checks that nothing of the sandboxes is left.
func (s *supervisor) shutdown() {
	t := s.t
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-s.waitErr:
		s.noteExit("SIGTERM", err)
	case <-time.After(90 * time.Second):
		_ = s.cmd.Process.Kill()
		t.Errorf("supervisor did not exit within 90s of SIGTERM")
		s.noteExit("SIGTERM, then SIGKILL at 90 s", <-s.waitErr)
	}
	s.cmd = nil
	s.assertNothingLeft()
}

func (s *supervisor) assertNothingLeft() {
	t := s.t
	t.Helper()
	mounts, err := os.ReadFile("/proc/mounts")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(mounts), "\n") {
		if strings.Contains(line, s.execRoot) || strings.Contains(line, s.cache) {
			t.Errorf("mount left behind: %s", line)
		}
	}
	out, _ := exec.Command("runsc", "--root", filepath.Join(s.execRoot, "runsc"), "list", "-quiet").Output()
	if strings.TrimSpace(string(out)) != "" {
		t.Errorf("runsc containers left behind: %s", out)
	}
	entries, _ := os.ReadDir(filepath.Join(s.execRoot, "executions"))
	if len(entries) > 0 {
		t.Errorf("execution directories left behind: %d", len(entries))
	}
	// Loop devices bound to files of this supervisor (runtime, volume
	// images): each would pin its file and a device number forever.
	for _, dir := range []string{s.execRoot, s.cache} {
		devs, err := loopdev.BackedUnder(dir)
		if err != nil {
			t.Errorf("listing loop devices: %v", err)
		}
		for _, d := range devs {
			t.Errorf("loop device left behind: /dev/%s on %s", d.Name, d.Backing)
		}
	}
	procs, _ := exec.Command("pgrep", "-f", s.execRoot).Output()
	if strings.TrimSpace(string(procs)) != "" {
		t.Errorf("processes left behind: %s", procs)
	}
	left := ourNetworkState(t)
	for _, l := range left.Links {
		t.Errorf("network link left behind: %s", l)
	}
	for _, n := range left.Netns {
		t.Errorf("network namespace left behind: %s", n)
	}
	for _, r := range left.Tables {
		t.Errorf("nftables table left behind: %s", r)
	}
	for _, l := range left.Leases {
		t.Errorf("network lease left behind: %s", l)
	}
}

// Names of what the supervisor's networking creates on the host.
const (
	ourLinkPrefix  = "avm"           // every host-side link
	ourNetnsPrefix = "avm-"          // every network namespace
	ourTable       = "inet aleph_vm" // the nftables table (family and name)
	leaseDir       = "/run/aleph-vm/network/leases"
)

// networkState is what of the supervisor's networking exists on the host.
type networkState struct {
	Links  []string // host links named avm*
	Netns  []string // network namespaces named avm-*
	Tables []string // our nftables table, when present
	Leases []string // lease files
}

// ourPIDs are the supervisors this package started, to tell their
// networks from those of a supervisor someone else runs on this host.
var ourPIDs sync.Map // pid → struct{}

// foreignSupervisor reports whether pid is a live vm-supervisor this
// package did not start.
func foreignSupervisor(pid int) bool {
	if _, ours := ourPIDs.Load(pid); ours || pid <= 0 {
		return false
	}
	comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return err == nil && strings.TrimSpace(string(comm)) == "vm-supervisor"
}

// foreignSupervisors lists the live vm-supervisor processes this package
// did not start.
func foreignSupervisors() []int {
	var out []int
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		if pid, err := strconv.Atoi(p.Name()); err == nil && foreignSupervisor(pid) {
			out = append(out, pid)
		}
	}
	return out
}

// ourNetworkState lists the supervisor's links, namespaces, nftables
// table and leases on this host. What belongs to a live supervisor that
// this package did not start (a developer's, while the suite runs) is
// left out: its lease names its owner, and its links and namespace carry
// the lease's index; the shared table is then not looked at. Without the
// ip or nft binary that part is not looked at, except in CI, where that
// is an error.
func ourNetworkState(t *testing.T) networkState {
	t.Helper()
	var st networkState
	foreign := map[string]int{} // lease index → live foreign owner
	leases, _ := os.ReadDir(leaseDir)
	for _, e := range leases {
		var l struct {
			OwnerPID int `json:"owner_pid"`
		}
		if b, err := os.ReadFile(filepath.Join(leaseDir, e.Name())); err == nil && json.Unmarshal(b, &l) == nil && foreignSupervisor(l.OwnerPID) {
			foreign[e.Name()] = l.OwnerPID
			t.Logf("not counting network %s: it belongs to supervisor %d, which this test did not start", e.Name(), l.OwnerPID)
			continue
		}
		st.Leases = append(st.Leases, filepath.Join(leaseDir, e.Name()))
	}
	isForeign := func(name, prefix string) bool {
		_, ok := foreign[strings.TrimPrefix(name, prefix)]
		return ok
	}

	var out []byte
	if _, err := exec.LookPath("ip"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Errorf("ip not installed (iproute2): cannot check for leftover links")
		}
	} else if out, err = exec.Command("ip", "-br", "link").Output(); err != nil {
		t.Errorf("ip -br link: %v", err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		name, _, _ := strings.Cut(f[0], "@")
		if strings.HasPrefix(name, ourLinkPrefix) && !isForeign(name, ourLinkPrefix) {
			st.Links = append(st.Links, name)
		}
	}
	// ip netns list reads /run/netns; read it directly so that a missing
	// directory (no namespace ever made) is not an error.
	entries, _ := os.ReadDir("/run/netns")
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), ourNetnsPrefix) && !isForeign(e.Name(), ourNetnsPrefix) {
			st.Netns = append(st.Netns, e.Name())
		}
	}

	if others := foreignSupervisors(); len(others) > 0 {
		t.Logf("not looking for nftables table %q: supervisors %v, which this test did not start, are running", ourTable, others)
	} else if _, err := exec.LookPath("nft"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Errorf("nft not installed (scripts/install-deps.sh installs nftables): cannot check for leftover rules")
		}
	} else {
		out, err := exec.Command("nft", "list", "tables").CombinedOutput()
		if err != nil {
			t.Errorf("nft list tables: %v: %s", err, out)
		}
		for _, line := range strings.Split(string(out), "\n") {
			if strings.TrimSpace(line) == "table "+ourTable {
				st.Tables = append(st.Tables, ourTable)
			}
		}
	}
	return st
}

type response struct {
	Status int
	Header http.Header
	Body   []byte
}

func (r response) json(t *testing.T) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.Body, &m); err != nil {
		t.Fatalf("status %d, body is not JSON: %v: %q", r.Status, err, r.Body)
	}
	return m
}

var client = &http.Client{Timeout: 3 * time.Minute}

func (s *supervisor) do(method, path string, body io.Reader) response {
	s.t.Helper()
	req, err := http.NewRequest(method, s.base+path, body)
	if err != nil {
		s.t.Fatal(err)
	}
	resp, err := client.Do(req)
	if err != nil {
		s.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		s.t.Fatalf("%s %s: reading body: %v", method, path, err)
	}
	return response{Status: resp.StatusCode, Header: resp.Header, Body: b}
}

func (s *supervisor) get(path string) response { return s.do(http.MethodGet, path, nil) }

// expect fails the test unless the response has the wanted status.
func expect(t *testing.T, r response, status int) {
	t.Helper()
	if r.Status != status {
		t.Fatalf("status %d, want %d; body: %s", r.Status, status, tail(string(r.Body), 40))
	}
}

func tail(s string, lines int) string {
	parts := strings.Split(s, "\n")
	if len(parts) > lines {
		parts = parts[len(parts)-lines:]
	}
	return strings.Join(parts, "\n")
}

// loginCookie logs in as an operator would, with the token the supervisor
// wrote to EXECUTION_ROOT/login_token.
func (s *supervisor) loginCookie() *http.Cookie {
	s.t.Helper()
	token, err := os.ReadFile(filepath.Join(s.execRoot, "login_token"))
	if err != nil {
		s.t.Fatal(err)
	}
	// Login answers 302 to /about/config with the cookie: read the 302.
	noFollow := &http.Client{Timeout: client.Timeout, CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	}}
	resp, err := noFollow.Get(s.base + "/about/login?token=" + strings.TrimSpace(string(token)))
	if err != nil {
		s.t.Fatal(err)
	}
	resp.Body.Close()
	for _, c := range resp.Cookies() {
		return c
	}
	s.t.Fatalf("login gave no cookie: %s", resp.Status)
	return nil
}

func decodeList(t *testing.T, resp *http.Response) []map[string]any {
	t.Helper()
	var list []map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		t.Fatalf("%s: %v", resp.Request.URL.Path, err)
	}
	return list
}

// runningExecutions counts the executions the supervisor reports on its
// operator page (pre-warmed spares are not executions).
func (s *supervisor) runningExecutions() int {
	s.t.Helper()
	return len(s.executions(s.t))
}

// executions returns the operator page's list of running executions; t is
// the (sub)test asking.
func (s *supervisor) executions(t *testing.T) []map[string]any {
	t.Helper()
	req, _ := http.NewRequest("GET", s.base+"/about/executions", nil)
	req.AddCookie(s.loginCookie())
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	return decodeList(t, resp)
}
