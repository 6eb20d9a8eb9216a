package integration

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// metricsOf GETs /metrics and parses it with Prometheus's text parser.
func metricsOf(t *testing.T, s *supervisor) map[string]*dto.MetricFamily {
	t.Helper()
	r := s.get("/metrics")
	expect(t, r, 200)
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(r.Body))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	return fams
}

// metricValue is the value of the series of name with the label pair
// (label may be ""), a histogram's count, or -1 when absent.
func metricValue(fams map[string]*dto.MetricFamily, name, label, value string) float64 {
	for _, m := range fams[name].GetMetric() {
		match := label == ""
		for _, lp := range m.GetLabel() {
			match = match || (lp.GetName() == label && lp.GetValue() == value)
		}
		if !match {
			continue
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue()
		case m.Gauge != nil:
			return m.GetGauge().GetValue()
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount())
		}
	}
	return -1
}

// The sandbox figures of /metrics come from the real sandbox: its memory
// and CPU time are there while it runs, and the counters move with real
// requests.
func TestMetricsFromRealSandboxes(t *testing.T) {
	backendIndependent(t)
	s := startSupervisor(t)
	hash := s.upload("testdata/probe", "main:app")
	before := metricsOf(t, s)
	expect(t, s.get("/vm/"+hash+"/"), 200)
	expect(t, s.get("/vm/"+hash+"/"), 200)
	after := metricsOf(t, s)

	if got := metricValue(after, "aleph_vm_executions", "state", "running"); got != 1 {
		t.Errorf("running executions = %v, want 1", got)
	}
	coldStarts := func(f map[string]*dto.MetricFamily) float64 {
		return max(0, metricValue(f, "aleph_vm_cold_start_seconds", "source", "spare")) +
			max(0, metricValue(f, "aleph_vm_cold_start_seconds", "source", "fresh"))
	}
	if coldStarts(after)-coldStarts(before) != 1 {
		t.Errorf("cold starts moved from %v to %v, want +1", coldStarts(before), coldStarts(after))
	}
	if got, was := metricValue(after, "aleph_vm_request_duration_seconds", "outcome", "2xx"), max(0, metricValue(before, "aleph_vm_request_duration_seconds", "outcome", "2xx")); got-was != 2 {
		t.Errorf("2xx requests moved from %v to %v, want +2", was, got)
	}
	// A Python process with FastAPI imported holds tens of MiB.
	if mem := metricValue(after, "aleph_vm_sandbox_memory_bytes", "kind", "execution"); mem < 10<<20 {
		t.Errorf("execution memory = %v bytes, want the sandbox's (> 10 MiB)", mem)
	}
	if cpu := metricValue(after, "aleph_vm_sandbox_cpu_seconds_total", "", ""); cpu <= 0 {
		t.Errorf("sandbox CPU seconds = %v, want > 0", cpu)
	}
}

// On SIGTERM a request in flight finishes, a new program request gets
// aleph-vm's 503 while the status pages still answer, and the supervisor
// exits once the request is done.
func TestDrainOnSIGTERM(t *testing.T) {
	backendIndependent(t)
	s := startSupervisor(t, "ALEPH_VM_DRAIN_TIMEOUT=30")
	hash := s.upload("testdata/probe", "main:app")
	expect(t, s.get("/vm/"+hash+"/"), 200)

	slow := make(chan response, 1)
	go func() {
		resp, err := client.Get(s.base + "/vm/" + hash + "/sleep?seconds=4")
		if err != nil {
			slow <- response{Status: -1, Body: []byte(err.Error())}
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		slow <- response{Status: resp.StatusCode, Body: b}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for inFlight := 0.0; inFlight != 1; {
		if time.Now().After(deadline) {
			t.Fatal("the slow request never showed in flight")
		}
		for _, e := range s.executions(t) {
			inFlight, _ = e["in_flight"].(float64)
		}
		time.Sleep(50 * time.Millisecond)
	}

	signalled := time.Now()
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	var refused response
	for {
		refused = s.get("/vm/" + hash + "/")
		if refused.Status != 200 || time.Since(signalled) > 3*time.Second {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if refused.Status != 503 || string(refused.Body) != `{"error": "Server is draining, try another node"}` {
		t.Errorf("new program request while draining: %d %s", refused.Status, refused.Body)
	}
	if st := s.get("/status/check/version?reference=0"); st.Status != 200 {
		t.Errorf("status page while draining: %d %s", st.Status, st.Body)
	}
	r := <-slow
	if r.Status != 200 || !strings.Contains(string(r.Body), `"slept":4`) {
		t.Errorf("request in flight at SIGTERM: %d %s", r.Status, r.Body)
	}
	select {
	case err := <-s.waitErr:
		s.noteExit("SIGTERM", err)
		if err != nil {
			t.Errorf("supervisor exit after drain: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("supervisor did not exit after the drain")
	}
	s.cmd = nil
	if took := time.Since(signalled); took < 2*time.Second {
		t.Errorf("the supervisor exited %s after SIGTERM, before the request in flight could finish", took)
	}
	s.assertNothingLeft()
}

// repoRoot is the module's root, where the Makefile is.
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	return root
}

func requireTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s missing in CI (scripts/install-deps.sh): %v", tool, err)
			}
			t.Skipf("%s missing: %v", tool, err)
		}
	}
}

func run(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

const installPrefix = "/opt/aleph-vm-go"

// `make install` into a temporary root gives a unit that systemd-analyze
// verify accepts, and a tree that runs: the unit's own commands, with the
// installed settings file, serve a program with the installed runsc,
// agent and runtime, and stop on SIGTERM.
func TestInstallAsService(t *testing.T) {
	backendIndependent(t)
	requirePrerequisites(t)
	requireTools(t, "make", "systemd-analyze", "dpkg-deb")
	dest := t.TempDir()
	run(t, repoRoot(t), "make", "--no-print-directory", "install", "DESTDIR="+dest,
		"INSTALL_BIN="+binDir, "INSTALL_RUNTIME="+runtimeFile)
	unit := filepath.Join(dest, "usr/lib/systemd/system/aleph-vm-supervisor.service")
	envFile := filepath.Join(dest, "etc/aleph-vm/supervisor.env")
	for _, f := range []string{"bin/vm-supervisor", "bin/vm-agent", "bin/runsc",
		"share/runtimes/aleph-debian-12-python/rootfs.squashfs"} {
		if _, err := os.Stat(filepath.Join(dest, installPrefix, f)); err != nil {
			t.Errorf("not installed: %v", err)
		}
	}

	t.Run("verify", func(t *testing.T) { verifyUnit(t, dest, unit) })

	// A second install keeps the operator's settings.
	if err := os.WriteFile(envFile, []byte("# edited\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	run(t, repoRoot(t), "make", "--no-print-directory", "install", "DESTDIR="+dest,
		"INSTALL_BIN="+binDir, "INSTALL_RUNTIME="+runtimeFile)
	if b, _ := os.ReadFile(envFile); string(b) != "# edited\n" {
		t.Errorf("make install overwrote the settings file: %q", b)
	}
	if err := os.Remove(envFile); err != nil {
		t.Fatal(err)
	}
	run(t, repoRoot(t), "make", "--no-print-directory", "install", "DESTDIR="+dest,
		"INSTALL_BIN="+binDir, "INSTALL_RUNTIME="+runtimeFile)

	t.Run("runs", func(t *testing.T) { runInstalled(t, dest, unit, envFile) })
}

// verifyUnit runs systemd-analyze verify on the installed unit, with the
// install tree as root (so ExecStart must exist there) beside a copy of
// the host's system units (sysinit.target and the rest the unit's
// dependencies reach). Any warning fails too.
func verifyUnit(t *testing.T, dest, unit string) {
	root := t.TempDir()
	run(t, "", "cp", "-a", dest+"/.", root)
	run(t, "", "cp", "-rn", "/lib/systemd/system", filepath.Join(root, "usr/lib/systemd"))
	rel, _ := filepath.Rel(dest, unit)
	cmd := exec.Command("systemd-analyze", "verify", "--root="+root, filepath.Join(root, rel))
	out, err := cmd.CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
	// The check is real: a unit whose ExecStart is missing fails it.
	bad := filepath.Join(root, "usr/lib/systemd/system/aleph-vm-broken.service")
	b, _ := os.ReadFile(unit)
	if err := os.WriteFile(bad, bytes.ReplaceAll(b, []byte("ExecStart="+installPrefix), []byte("ExecStart=/nonexistent")), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("systemd-analyze", "verify", "--root="+root, bad).CombinedOutput(); err == nil {
		t.Errorf("systemd-analyze verify accepted a unit with a missing ExecStart:\n%s", out)
	}
}

// unitCommand reads key= (ExecStart, ExecStartPre) of the unit, with the
// install prefix moved under dest.
func unitCommand(t *testing.T, unit, key, dest string) []string {
	t.Helper()
	f, err := os.Open(unit)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), key+"="); ok {
			args := strings.Fields(v)
			for i, a := range args {
				if strings.HasPrefix(a, installPrefix+"/") {
					args[i] = dest + a
				}
			}
			return args
		}
	}
	t.Fatalf("%s has no %s=", unit, key)
	return nil
}

// installedEnv is the installed settings file as the unit's environment,
// with installed paths under dest and this test's state, port and API.
func installedEnv(t *testing.T, envFile, dest string, overrides ...string) []string {
	t.Helper()
	b, err := os.ReadFile(envFile)
	if err != nil {
		t.Fatal(err)
	}
	env := []string{"PATH=" + os.Getenv("PATH")}
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("settings file line %q", line)
		}
		if strings.HasPrefix(v, installPrefix+"/") {
			v = dest + v
		}
		env = append(env, k+"="+v)
	}
	return append(env, overrides...)
}

func runInstalled(t *testing.T, dest, unit, envFile string) {
	dir, err := os.MkdirTemp("", "avm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := &supervisor{
		t: t, port: freePort(t), execRoot: filepath.Join(dir, "exec"), cache: filepath.Join(dir, "cache"),
		logs: &syncBuffer{}, waitErr: make(chan error, 1), api: newAlephAPI(t),
	}
	s.base = fmt.Sprintf("http://127.0.0.1:%d", s.port)
	s.env = installedEnv(t, envFile, dest,
		"ALEPH_VM_EXECUTION_ROOT="+s.execRoot, "ALEPH_VM_CACHE_ROOT="+s.cache,
		fmt.Sprintf("ALEPH_VM_SUPERVISOR_PORT=%d", s.port), "ALEPH_VM_API_SERVER="+s.api.srv.URL,
		"ALEPH_VM_HYPERVISOR="+hypervisor)
	supervisorBin := filepath.Join(dest, installPrefix, "bin/vm-supervisor")
	settings := runWithEnv(t, s.env, supervisorBin, "--print-settings", "--do-not-run")
	for _, want := range []string{filepath.Join(dest, installPrefix, "bin/runsc"), filepath.Join(dest, installPrefix, "bin/vm-agent")} {
		if !strings.Contains(settings, want) {
			t.Errorf("the installed supervisor does not use %s:\n%s", want, settings)
		}
	}
	runWithEnv(t, s.env, unitCommand(t, unit, "ExecStartPre", dest)...)

	start := unitCommand(t, unit, "ExecStart", dest)
	s.cmd = exec.Command(start[0], start[1:]...)
	s.cmd.Env, s.cmd.Stdout, s.cmd.Stderr = s.env, s.logs, s.logs
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ourPIDs.Store(s.cmd.Process.Pid, struct{}{})
	go func(cmd *exec.Cmd) { s.waitErr <- cmd.Wait() }(s.cmd)
	t.Cleanup(func() {
		s.shutdown()
		if t.Failed() {
			t.Logf("installed supervisor log:\n%s", tail(s.logs.String(), 100))
		}
	})
	waitHTTP(t, s)
	out := runWithEnv(t, s.env, supervisorBin, "program", "upload", "testdata/probe", "main:app")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	hash := lines[len(lines)-1]
	expect(t, s.get("/vm/"+hash+"/"), 200)
}

func runWithEnv(t *testing.T, env []string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Env = env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%v: %v\n%s", args, err, stderr.String())
	}
	return string(out)
}

func waitHTTP(t *testing.T, s *supervisor) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		req, _ := http.NewRequestWithContext(ctx, "GET", s.base+"/status/check/version", nil)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			resp.Body.Close()
			return
		}
		select {
		case err := <-s.waitErr:
			s.cmd = nil
			t.Fatalf("installed supervisor exited: %v\n%s", err, s.logs.String())
		case <-ctx.Done():
			t.Fatalf("installed supervisor did not answer\n%s", s.logs.String())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// `make deb` builds a package dpkg-deb reads, with the installed tree,
// the settings file as a conffile, and maintainer scripts that reload
// systemd.
func TestDebianPackage(t *testing.T) {
	backendIndependent(t)
	requirePrerequisites(t)
	requireTools(t, "make", "dpkg-deb")
	out := t.TempDir()
	log := run(t, repoRoot(t), "make", "--no-print-directory", "deb", "DEB_OUT="+out,
		"INSTALL_BIN="+binDir, "INSTALL_RUNTIME="+runtimeFile)
	debs, _ := filepath.Glob(filepath.Join(out, "aleph-vm-go_*.deb"))
	if len(debs) != 1 {
		t.Fatalf("make deb made %v\n%s", debs, log)
	}
	info := run(t, "", "dpkg-deb", "--info", debs[0])
	for _, want := range []string{"Package: aleph-vm-go", "Architecture: ", "Version: ", "conffiles", "postinst"} {
		if !strings.Contains(info, want) {
			t.Errorf("dpkg-deb --info lacks %q:\n%s", want, info)
		}
	}
	contents := run(t, "", "dpkg-deb", "--contents", debs[0])
	for _, want := range []string{
		"./opt/aleph-vm-go/bin/vm-supervisor", "./opt/aleph-vm-go/bin/vm-agent", "./opt/aleph-vm-go/bin/runsc",
		"./opt/aleph-vm-go/share/runtimes/aleph-debian-12-python/rootfs.squashfs",
		"./usr/lib/systemd/system/aleph-vm-supervisor.service", "./etc/aleph-vm/supervisor.env",
	} {
		if !strings.Contains(contents, want+"\n") {
			t.Errorf("package lacks %s:\n%s", want, contents)
		}
	}
	if strings.Contains(contents, "/tmp") || !strings.Contains(contents, "root/root") {
		t.Errorf("package paths or owners are wrong:\n%s", contents)
	}
	conffiles := run(t, "", "dpkg-deb", "--info", debs[0], "conffiles")
	if strings.TrimSpace(conffiles) != "/etc/aleph-vm/supervisor.env" {
		t.Errorf("conffiles = %q", conffiles)
	}
	if postinst := run(t, "", "dpkg-deb", "--info", debs[0], "postinst"); !strings.Contains(postinst, "systemctl daemon-reload") {
		t.Errorf("postinst does not reload systemd:\n%s", postinst)
	}
	// The project's own release (internal/version/VERSION) with the
	// commit's UTC time and hash, so that later commits upgrade earlier
	// ones; never 0.0~git….
	semver, _ := os.ReadFile(filepath.Join(repoRoot(t), "internal", "version", "VERSION"))
	want := regexp.MustCompile(`^` + regexp.QuoteMeta(strings.TrimSpace(string(semver))) + `\+git\d{14}\.g[0-9a-f]{7}$`)
	if v := strings.TrimSpace(run(t, "", "dpkg-deb", "--field", debs[0], "Version")); len(semver) == 0 || !want.MatchString(v) {
		t.Errorf("deb version %q, want %s", v, want)
	}
}
