package httpapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool/pooltest"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

// These tests send real HTTP requests to the real server, in front of a
// real pool whose sandboxes are pooltest's in-process ones: every status
// a client can get from a program route, without root.

// program is one test program: how its sandbox behaves.
type program struct {
	agent    pooltest.Agent
	startErr error
	upload   store.UploadOptions
}

type live struct {
	url    string
	srv    *Server
	hs     *http.Server
	pool   *pool.Pool
	b      *pooltest.Backend
	hashes map[string]string
}

func startLive(t *testing.T, programs map[string]program, tune func(*pool.Options)) *live {
	t.Helper()
	return startLiveOn(t, pooltest.NewStore(t), programs, tune, nil)
}

// startLiveOn is startLive on a given store, with the server's options
// tuned too (tuneAPI may be nil).
func startLiveOn(t *testing.T, st *pooltest.Store, programs map[string]program, tune func(*pool.Options), tuneAPI func(*Options)) *live {
	t.Helper()
	byHash := map[string]program{}
	l := &live{hashes: map[string]string{}}
	for name, prog := range programs {
		h := st.Program(t, name, prog.upload)
		l.hashes[name] = h
		byHash[h] = prog
	}
	l.b = &pooltest.Backend{
		Agent: func(cfg guest.Config) pooltest.Agent { return byHash[cfg.ProgramHash].agent },
		StartError: func(spec backend.Spec) error {
			return byHash[spec.ProgramHash].startErr
		},
	}
	opts := pool.Options{
		Source: st.Resolver, Backend: l.b, ReuseTimeout: time.Minute, InitTimeout: 5 * time.Second,
		ExecutionRoot: t.TempDir(), CapacityWait: 200 * time.Millisecond, Logger: quiet,
	}
	if tune != nil {
		tune(&opts)
	}
	l.pool = pool.New(opts)
	apiOpts := Options{Version: "test", DomainName: "node.example", Pool: l.pool, MaxRequestBodySize: 1000, Logger: quiet}
	if tuneAPI != nil {
		tuneAPI(&apiOpts)
	}
	l.srv = New(apiOpts)
	hs := l.srv.NewHTTPServer(context.Background())
	l.hs = hs
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = hs.Serve(l.srv.Listener(ln)) }()
	l.url = "http://" + ln.Addr().String()
	t.Cleanup(func() {
		hs.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := l.pool.Shutdown(ctx); err != nil {
			t.Errorf("pool shutdown: %v", err)
		}
		if alive := l.b.Alive(); len(alive) > 0 {
			t.Errorf("%d sandboxes left running", len(alive))
		}
	})
	return l
}

type answer struct {
	code   int
	body   string
	header http.Header
}

func (l *live) do(t *testing.T, method, path string, body io.Reader) answer {
	t.Helper()
	req, err := http.NewRequest(method, l.url+path, body)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = "node.example"
	c := &http.Client{Timeout: 15 * time.Second}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return answer{resp.StatusCode, string(b), resp.Header}
}

// errorOf is the "error" of a JSON error body, or "" if the body is not one.
func errorOf(a answer) string {
	var m map[string]string
	if a.header.Get("Content-Type") != "application/json; charset=utf-8" || json.Unmarshal([]byte(a.body), &m) != nil {
		return ""
	}
	return m["error"]
}

func TestProgramRouteStatuses(t *testing.T) {
	oom := errors.New("sandbox abc: memory limit reached (128 MiB)")
	full := &fs.PathError{Op: "write", Path: "/var/lib/aleph/vm/executions/x/code", Err: syscall.ENOSPC}
	programs := map[string]program{
		"ok": {agent: pooltest.Agent{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			n, err := io.Copy(io.Discard, r.Body)
			if err != nil {
				http.Error(w, err.Error(), 500)
				return
			}
			w.Header().Set("X-Program", "yes")
			fmt.Fprintf(w, "%s %s?%s read %d", r.Method, r.URL.Path, r.URL.RawQuery, n)
		})}},
		"refuses":       {agent: pooltest.Agent{RefuseConfig: "Traceback: ImportError: no module named fastapi"}},
		"dies at start": {agent: pooltest.Agent{CrashBeforeReady: oom}},
		"slow": {agent: pooltest.Agent{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-time.After(5 * time.Second):
			case <-r.Context().Done():
			}
		})}},
		"killed": {agent: pooltest.Agent{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			pooltest.SandboxOf(r).Crash(oom)
		})}},
		"exits": {agent: pooltest.Agent{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			pooltest.SandboxOf(r).ProgramExit("exit status 3; last output: ValueError")
		})}},
		"resets": {agent: pooltest.Agent{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			c, _, err := http.NewResponseController(w).Hijack()
			if err == nil {
				c.Close()
			}
		})}},
		"bad code":  {startErr: errkind.New(errkind.InvalidInput, "zip entry ../x escapes the code directory")},
		"disk full": {startErr: fmt.Errorf("extracting code: %w", full)},
		"no runsc":  {startErr: errors.New("runsc: exit status 128")},
	}
	l := startLive(t, programs, func(o *pool.Options) { o.MaxRequestTimeout = 500 * time.Millisecond })
	vm := func(name string) string { return "/vm/" + l.hashes[name] }

	cases := []struct {
		name   string
		method string
		path   string
		body   io.Reader
		code   int
		// has is what the body holds: the program's answer for 200, the
		// JSON error's text otherwise.
		has string
	}{
		{name: "answer", method: "GET", path: vm("ok") + "/some/path?q=1", code: 200, has: "GET /some/path?q=1 read 0"},
		{name: "body passed", method: "POST", path: vm("ok") + "/", body: strings.NewReader("hello"), code: 200, has: "POST /? read 5"},
		{name: "malformed ref", method: "GET", path: "/vm/nothash/", code: 400, has: "nothash"},
		{name: "unknown program", method: "GET", path: "/vm/" + strings.Repeat("0", 64) + "/", code: 404, has: "not in the local store"},
		{name: "declared body too large", method: "POST", path: vm("ok") + "/", body: strings.NewReader(strings.Repeat("x", 1001)), code: 413, has: "exceeds the limit of 1000 bytes"},
		{name: "streamed body too large", method: "POST", path: vm("ok") + "/", body: io.MultiReader(strings.NewReader(strings.Repeat("x", 1001))), code: 413, has: "request body exceeds the limit of 1000 bytes"},
		{name: "code refused", method: "GET", path: vm("bad code") + "/", code: 400, has: "escapes the code directory"},
		{name: "program fails to start", method: "GET", path: vm("refuses") + "/", code: 502, has: "program failed to start: Traceback: ImportError"},
		{name: "sandbox dies at start", method: "GET", path: vm("dies at start") + "/", code: 502, has: "memory limit reached"},
		{name: "backend cannot start", method: "GET", path: vm("no runsc") + "/", code: 502, has: "starting sandbox: runsc: exit status 128"},
		{name: "too slow", method: "GET", path: vm("slow") + "/", code: 504, has: "did not answer within 500ms"},
		{name: "killed mid-request", method: "GET", path: vm("killed") + "/", code: 502, has: "memory limit reached"},
		{name: "exits mid-request", method: "GET", path: vm("exits") + "/", code: 502, has: "ended: program exited by itself: exit status 3; last output: ValueError"},
		{name: "connection reset", method: "GET", path: vm("resets") + "/", code: 502, has: "gave no response"},
		{name: "disk full", method: "GET", path: vm("disk full") + "/", code: 507, has: "insufficient storage: no space left on device on this node"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			a := l.do(t, c.method, c.path, c.body)
			got := a.body
			if c.code != 200 {
				got = errorOf(a)
				if got == "" {
					t.Errorf("error body is not JSON {\"error\": ...}: %q", a.body)
				}
			}
			if a.code != c.code || !strings.Contains(got, c.has) {
				t.Errorf("%s %s: %d %q, want %d with %q", c.method, c.path, a.code, a.body, c.code, c.has)
			}
			if a.code == 200 {
				if a.header.Get("X-Program") != "yes" || a.header.Get("Aleph-Program-ItemHash") == "" {
					t.Errorf("response headers %v", a.header)
				}
			}
			if strings.Contains(a.body, "/var/lib/aleph") {
				t.Errorf("a host path reached the client: %q", a.body)
			}
		})
	}
}

// A crashed program is replaced: the request after a 502 is served by a
// fresh sandbox.
func TestRequestAfterCrashGetsFreshSandbox(t *testing.T) {
	programs := map[string]program{"flaky": {agent: pooltest.Agent{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/crash" {
			pooltest.SandboxOf(r).Crash(errors.New("segfault"))
			return
		}
		_, _ = io.WriteString(w, "fine")
	})}}}
	l := startLive(t, programs, nil)
	vm := "/vm/" + l.hashes["flaky"]
	if a := l.do(t, "GET", vm+"/crash", nil); a.code != 502 || !strings.Contains(errorOf(a), "segfault") {
		t.Fatalf("crash: %d %q", a.code, a.body)
	}
	if a := l.do(t, "GET", vm+"/", nil); a.code != 200 || a.body != "fine" {
		t.Fatalf("after the crash: %d %q", a.code, a.body)
	}
	if n := l.b.Started(); n != 2 {
		t.Errorf("%d sandboxes started, want 2", n)
	}
}

// A full node answers 503 with aleph-vm's "Insufficient capacity"; a
// draining one answers 503 too.
func TestCapacityAndShutdownStatuses(t *testing.T) {
	l := startLive(t, map[string]program{"a": {}, "b": {}}, func(o *pool.Options) { o.MaxExecutions = 1 })
	busy, err := l.pool.Acquire(context.Background(), l.hashes["a"])
	if err != nil {
		t.Fatal(err)
	}
	a := l.do(t, "GET", "/vm/"+l.hashes["b"]+"/", nil)
	if a.code != 503 || !strings.Contains(errorOf(a), "Insufficient capacity: This CRN cannot host the requested workload at this time.") {
		t.Errorf("full node: %d %q", a.code, a.body)
	}
	busy.Release()
	if a := l.do(t, "GET", "/vm/"+l.hashes["b"]+"/", nil); a.code != 200 {
		t.Errorf("after the busy execution idled: %d %q", a.code, a.body)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := l.pool.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if a := l.do(t, "GET", "/vm/"+l.hashes["a"]+"/", nil); a.code != 503 || !strings.Contains(errorOf(a), "shutting down") {
		t.Errorf("draining: %d %q", a.code, a.body)
	}
}

// An error the supervisor cannot classify is a 500 whose body says
// nothing of it.
func TestInternalErrorHidesDetail(t *testing.T) {
	root := filepath.Join(t.TempDir(), "not-a-dir")
	if err := os.WriteFile(root, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	l := startLive(t, map[string]program{"a": {}}, func(o *pool.Options) { o.ExecutionRoot = root })
	a := l.do(t, "GET", "/vm/"+l.hashes["a"]+"/", nil)
	if a.code != 500 || errorOf(a) != "internal error" {
		t.Errorf("%d %q, want 500 \"internal error\"", a.code, a.body)
	}
}

// classifyProxyError on what only the proxy's context shows (a reset by
// a live program is in TestProgramRouteStatuses).
func TestClassifyProxyError(t *testing.T) {
	l := startLive(t, map[string]program{"a": {}}, nil)
	exec, err := l.pool.Acquire(context.Background(), l.hashes["a"])
	if err != nil {
		t.Fatal(err)
	}
	defer exec.Release()
	expired, cancel := context.WithDeadline(context.Background(), time.Now().Add(-time.Second))
	defer cancel()
	gone, cancel2 := context.WithCancel(context.Background())
	cancel2()
	cases := []struct {
		name string
		ctx  context.Context
		err  error
		code int
		has  string
	}{
		{"request timeout", expired, context.DeadlineExceeded, 504, "did not answer within 1s"},
		{"client went away", gone, context.Canceled, 502, "client went away"},
		{"body over the limit", context.Background(), &http.MaxBytesError{Limit: 10}, 413, "limit of 10 bytes"},
	}
	for _, c := range cases {
		err := l.srv.classifyProxyError(c.ctx, exec, time.Second, c.err)
		if statusFor(err) != c.code || !strings.Contains(err.Error(), c.has) {
			t.Errorf("%s: %v (%d), want %d with %q", c.name, err, statusFor(err), c.code, c.has)
		}
	}
}
