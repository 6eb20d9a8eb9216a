package pool_test

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool/pooltest"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

// These tests run the real pool and guest client against in-process
// sandboxes (pooltest): no root, no runsc, a few seconds in all.

var quiet = slog.New(slog.DiscardHandler)

type fixture struct {
	b    *pooltest.Backend
	st   *pooltest.Store
	p    *pool.Pool
	root string // ExecutionRoot
}

func newFixture(t *testing.T, b *pooltest.Backend, tune func(*pool.Options)) *fixture {
	t.Helper()
	return newFixtureOn(t, b, pooltest.NewStore(t), tune)
}

func newFixtureOn(t *testing.T, b *pooltest.Backend, st *pooltest.Store, tune func(*pool.Options)) *fixture {
	t.Helper()
	f := &fixture{b: b, st: st, root: t.TempDir()}
	opts := pool.Options{
		Source:        f.st.Resolver,
		Backend:       b,
		ReuseTimeout:  time.Minute,
		InitTimeout:   5 * time.Second,
		ExecutionRoot: f.root,
		CapacityWait:  200 * time.Millisecond,
		Logger:        quiet,
	}
	if b == nil {
		opts.Backend = nil
	}
	if tune != nil {
		tune(&opts)
	}
	f.p = pool.New(opts)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := f.p.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if b != nil {
			if alive := b.Alive(); len(alive) > 0 {
				t.Errorf("%d sandboxes still running after Shutdown", len(alive))
			}
		}
		if left := f.executionDirs(); len(left) > 0 {
			t.Errorf("execution directories left after Shutdown: %v", left)
		}
	})
	return f
}

func (f *fixture) executionDirs() []string {
	entries, err := os.ReadDir(filepath.Join(f.root, "executions"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		panic(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// get sends one request through the execution's transport, the way
// httpapi's proxy does.
func get(t *testing.T, e *pool.Execution, path string) (int, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://program"+path, nil)
	resp, err := e.Transport().RoundTrip(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}

// serveOnce acquires, sends one request and releases.
func serveOnce(t *testing.T, p *pool.Pool, hash string) (*pool.Execution, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	e, err := p.Acquire(ctx, hash)
	if err != nil {
		t.Fatalf("Acquire: %v", err)
	}
	defer e.Release()
	code, body, err := get(t, e, "/")
	if err != nil || code != 200 {
		t.Fatalf("request: %d %q %v", code, body, err)
	}
	return e, body
}

func eventually(t *testing.T, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", within, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestSharedColdStart(t *testing.T) {
	b := &pooltest.Backend{Agent: func(guest.Config) pooltest.Agent {
		return pooltest.Agent{ReadyAfter: 200 * time.Millisecond}
	}}
	f := newFixture(t, b, nil)
	hash := f.st.Program(t, "shared", store.UploadOptions{})

	const n = 20
	execs := make([]*pool.Execution, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			execs[i], errs[i] = f.p.Acquire(context.Background(), hash)
		}()
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("request %d: %v", i, errs[i])
		}
		if execs[i] != execs[0] {
			t.Errorf("request %d got another execution", i)
		}
	}
	if got := b.Started(); got != 1 {
		t.Errorf("%d sandboxes started for %d concurrent cold requests, want 1", got, n)
	}
	if l := f.p.List(); len(l) != 1 || l[0].InFlight != n || l[0].Backend != "fake" {
		t.Errorf("List = %+v, want one execution with %d in flight", l, n)
	}
	if code, body, err := get(t, execs[0], "/"); code != 200 || body != "ok" {
		t.Errorf("request: %d %q %v", code, body, err)
	}
	cfg := b.Sandboxes()[0].Config()
	if cfg.ProgramHash != hash || cfg.Interface != guest.InterfaceASGI || cfg.Entrypoint != "main:app" ||
		cfg.StartTimeoutMS != (5*time.Second).Milliseconds() {
		t.Errorf("agent got Config %+v", cfg)
	}
	for _, e := range execs {
		e.Release()
	}
	// Warm now: no further start.
	serveOnce(t, f.p, hash)
	if got := b.Started(); got != 1 {
		t.Errorf("a warm request started a sandbox (%d started)", got)
	}
}

// A start that fails leaves nothing behind (sandbox, directory, entry),
// tells the caller why with the right kind, and the next request starts
// afresh.
func TestStartFailures(t *testing.T) {
	cases := []struct {
		name      string
		agent     pooltest.Agent
		startErr  error
		init      time.Duration
		kind      errkind.Kind
		msg       string
		noSandbox bool
	}{
		{name: "program refuses to start", agent: pooltest.Agent{RefuseConfig: "Traceback: broken on purpose at import"},
			kind: errkind.BadGateway, msg: "program failed to start: Traceback: broken on purpose at import"},
		{name: "sandbox dies before serving", agent: pooltest.Agent{CrashBeforeReady: errors.New("memory limit reached")},
			kind: errkind.BadGateway, msg: "memory limit reached"},
		{name: "slower than INIT_TIMEOUT", agent: pooltest.Agent{ReadyAfter: 10 * time.Second}, init: 300 * time.Millisecond,
			kind: errkind.BadGateway, msg: "did not start within INIT_TIMEOUT (300ms)"},
		{name: "backend refuses the sandbox", startErr: errors.New("runsc: exit status 128"),
			kind: errkind.BadGateway, msg: "starting sandbox: runsc: exit status 128", noSandbox: true},
		{name: "backend refuses the code", startErr: errkind.New(errkind.InvalidInput, "code archive escapes its root"),
			kind: errkind.InvalidInput, msg: "code archive escapes its root", noSandbox: true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			var failing atomic.Bool
			failing.Store(true)
			b := &pooltest.Backend{
				Agent: func(guest.Config) pooltest.Agent {
					if failing.Load() {
						return c.agent
					}
					return pooltest.Agent{}
				},
				StartError: func(backend.Spec) error {
					if failing.Load() {
						return c.startErr
					}
					return nil
				},
			}
			f := newFixture(t, b, func(o *pool.Options) {
				if c.init > 0 {
					o.InitTimeout = c.init
				}
			})
			hash := f.st.Program(t, "p", store.UploadOptions{})
			began := time.Now()
			_, err := f.p.Acquire(context.Background(), hash)
			if errkind.Of(err) != c.kind || err == nil || !strings.Contains(err.Error(), c.msg) {
				t.Fatalf("Acquire = %v (kind %v), want %v containing %q", err, errkind.Of(err), c.kind, c.msg)
			}
			if took := time.Since(began); took > 4*time.Second {
				t.Errorf("failure took %s to report", took)
			}
			if c.noSandbox != (b.Started() == 0) {
				t.Errorf("%d sandboxes started", b.Started())
			}
			for _, s := range b.Sandboxes() {
				if !s.Exited() {
					t.Error("the failed sandbox still runs")
				}
			}
			if l := f.p.List(); len(l) != 0 {
				t.Errorf("failed execution listed: %+v", l)
			}
			if left := f.executionDirs(); len(left) != 0 {
				t.Errorf("execution directory left: %v", left)
			}

			failing.Store(false)
			before := b.Started()
			e, _ := serveOnce(t, f.p, hash)
			if b.Started() != before+1 {
				t.Errorf("the next request did not start a fresh sandbox")
			}
			if ended(e) {
				t.Error("fresh execution reports dead")
			}
		})
	}
}

func TestUnknownProgramAndNoBackend(t *testing.T) {
	f := newFixture(t, &pooltest.Backend{}, nil)
	_, err := f.p.Acquire(context.Background(), strings.Repeat("0", 64))
	if errkind.Of(err) != errkind.NotFound {
		t.Errorf("unknown hash: %v, want NotFound", err)
	}
	if f.b.Started() != 0 {
		t.Error("a sandbox started for an unknown program")
	}

	nb := newFixture(t, nil, func(o *pool.Options) { o.BackendError = errors.New("runsc not found") })
	hash := nb.st.Program(t, "p", store.UploadOptions{})
	if _, err := nb.p.Acquire(context.Background(), hash); errkind.Of(err) != errkind.NoBackend || !strings.Contains(err.Error(), "runsc not found") {
		t.Errorf("no backend: %v", err)
	}
	if nb.p.BackendName() != "none" {
		t.Errorf("BackendName = %q", nb.p.BackendName())
	}
}

// A sandbox that dies after it served: the pool drops it at once (the
// caller learns why) and the next request starts a fresh one.
func TestSandboxDiesWhileServing(t *testing.T) {
	cases := []struct {
		name    string
		handler func(release chan struct{}) http.HandlerFunc
		// die, when set, kills the sandbox while idle instead.
		die   func(s *pooltest.Sandbox)
		cause string
	}{
		{name: "killed while idle", die: func(s *pooltest.Sandbox) { s.Crash(errors.New("OOM killed")) }, cause: "OOM killed"},
		{name: "program exits while idle", die: func(s *pooltest.Sandbox) { s.ProgramExit("exit status 3: ValueError") }},
		{name: "killed mid-request", cause: "OOM killed", handler: func(chan struct{}) http.HandlerFunc {
			return func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/die" {
					pooltest.SandboxOf(r).Crash(errors.New("OOM killed"))
					return
				}
				_, _ = io.WriteString(w, "ok")
			}
		}},
		{name: "program exits mid-request", handler: func(chan struct{}) http.HandlerFunc {
			return func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/die" {
					w.Header().Set("Content-Length", "100")
					_, _ = io.WriteString(w, "partial")
					w.(http.Flusher).Flush()
					pooltest.SandboxOf(r).ProgramExit("exit status 3: ValueError")
					return
				}
				_, _ = io.WriteString(w, "ok")
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			b := &pooltest.Backend{Agent: func(guest.Config) pooltest.Agent {
				if c.handler == nil {
					return pooltest.Agent{}
				}
				return pooltest.Agent{Handler: c.handler(nil)}
			}}
			f := newFixture(t, b, nil)
			hash := f.st.Program(t, "p", store.UploadOptions{})
			e, _ := serveOnce(t, f.p, hash)
			sb := b.Sandboxes()[0]

			if c.die != nil {
				c.die(sb)
			} else {
				e2, err := f.p.Acquire(context.Background(), hash)
				if err != nil || e2 != e {
					t.Fatalf("Acquire: %v (same execution: %v)", err, e2 == e)
				}
				code, body, err := get(t, e, "/die")
				e.Release()
				if err == nil {
					t.Fatalf("request to a dying program: %d %q, want an error", code, body)
				}
			}
			if !e.WaitDied(3 * time.Second) {
				t.Fatal("the pool did not notice the sandbox's death")
			}
			if c.cause != "" {
				if cause := e.Cause(); cause == nil || !strings.Contains(cause.Error(), c.cause) {
					t.Errorf("Cause = %v, want it to name %q", cause, c.cause)
				}
			} else if e.Cause() == nil {
				t.Error("Cause is nil after the program ended by itself")
			}
			eventually(t, "execution removed", 3*time.Second, func() bool { return len(f.p.List()) == 0 })
			eventually(t, "execution directory removed", 3*time.Second, func() bool { return len(f.executionDirs()) == 0 })

			e2, body := serveOnce(t, f.p, hash)
			if e2 == e || b.Started() != 2 || body != "ok" {
				t.Errorf("the next request did not get a fresh sandbox (started %d)", b.Started())
			}
		})
	}
}

// MAX_EXECUTIONS: busy executions make the next start wait, then refuse
// with NoCapacity (503); idle ones are evicted, least recently used first,
// and their sandboxes stopped.
func TestAdmissionWithSandboxes(t *testing.T) {
	b := &pooltest.Backend{}
	f := newFixture(t, b, func(o *pool.Options) { o.MaxExecutions = 2 })
	ha := f.st.Program(t, "a", store.UploadOptions{})
	hb := f.st.Program(t, "b", store.UploadOptions{})
	hc := f.st.Program(t, "c", store.UploadOptions{})
	hd := f.st.Program(t, "d", store.UploadOptions{})
	ctx := context.Background()

	ea, err := f.p.Acquire(ctx, ha)
	if err != nil {
		t.Fatal(err)
	}
	eb, err := f.p.Acquire(ctx, hb)
	if err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	_, err = f.p.Acquire(ctx, hc)
	if errkind.Of(err) != errkind.NoCapacity || errkind.HTTPStatus(err) != http.StatusServiceUnavailable ||
		!strings.Contains(err.Error(), "Insufficient capacity") || !strings.Contains(err.Error(), "executions: 2 running, limit 2") {
		t.Fatalf("third program on a full node: %v", err)
	}
	if waited := time.Since(began); waited < 200*time.Millisecond {
		t.Errorf("refused after %s, before CapacityWait", waited)
	}
	if b.Started() != 2 {
		t.Errorf("%d sandboxes started", b.Started())
	}

	// b idles first, then a: b is the least recently used.
	eb.Release()
	time.Sleep(20 * time.Millisecond)
	ea.Release()
	sa, sb := b.Sandboxes()[0], b.Sandboxes()[1]
	serveOnce(t, f.p, hc)
	if !sb.Stopped() || !ended(eb) {
		t.Error("the least recently used idle execution was not evicted")
	}
	if sa.Exited() || ended(ea) {
		t.Error("the more recently used execution was evicted too")
	}

	// A busy execution that becomes idle while a start waits makes room
	// without a refusal.
	ec, err := f.p.Acquire(ctx, hc)
	if err != nil {
		t.Fatal(err)
	}
	ea2, err := f.p.Acquire(ctx, ha)
	if err != nil || ea2 != ea {
		t.Fatalf("warm a: %v", err)
	}
	go func() {
		time.Sleep(50 * time.Millisecond)
		ec.Release()
	}()
	ed, err := f.p.Acquire(ctx, hd)
	if err != nil {
		t.Fatalf("start while an execution became idle: %v", err)
	}
	ed.Release()
	ea2.Release()
	if !ended(ec) || ended(ea) {
		t.Errorf("evicted c: %v, a: %v; want c only", ended(ec), ended(ea))
	}
}

// Shutdown lets requests in flight finish, refuses new ones, and stops
// every sandbox through the agent.
func TestShutdownWithRequestsInFlight(t *testing.T) {
	entered := make(chan struct{}, 1)
	finish := make(chan struct{})
	b := &pooltest.Backend{Agent: func(guest.Config) pooltest.Agent {
		return pooltest.Agent{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/slow" {
				entered <- struct{}{}
				<-finish
			}
			_, _ = io.WriteString(w, "done")
		})}
	}}
	f := newFixture(t, b, nil)
	slow := f.st.Program(t, "slow", store.UploadOptions{})
	idle := f.st.Program(t, "idle", store.UploadOptions{})
	other := f.st.Program(t, "other", store.UploadOptions{})
	serveOnce(t, f.p, idle)

	e, err := f.p.Acquire(context.Background(), slow)
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		code int
		body string
		err  error
	}
	res := make(chan result, 1)
	go func() {
		defer e.Release()
		code, body, err := get(t, e, "/slow")
		res <- result{code, body, err}
	}()
	<-entered

	shut := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		shut <- f.p.Shutdown(ctx)
	}()
	eventually(t, "idle execution stopped", 3*time.Second, func() bool { return b.Sandboxes()[0].Exited() })
	for _, h := range []string{slow, idle, other} {
		if _, err := f.p.Acquire(context.Background(), h); errkind.Of(err) != errkind.ShuttingDown {
			t.Errorf("Acquire during shutdown: %v, want ShuttingDown", err)
		}
	}
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned (%v) with a request in flight", err)
	case <-time.After(100 * time.Millisecond):
	}
	if b.Sandboxes()[1].Exited() {
		t.Fatal("the sandbox serving a request was stopped under it")
	}
	close(finish)
	if r := <-res; r.err != nil || r.code != 200 || r.body != "done" {
		t.Errorf("in-flight request: %d %q %v", r.code, r.body, r.err)
	}
	if err := <-shut; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	for i, s := range b.Sandboxes() {
		if !s.Exited() || s.Err() != nil {
			t.Errorf("sandbox %d: exited %v, err %v; want a clean stop", i, s.Exited(), s.Err())
		}
	}
}

// A request that outlives Shutdown's deadline does not hold it up.
func TestShutdownDeadline(t *testing.T) {
	b := &pooltest.Backend{Agent: func(guest.Config) pooltest.Agent {
		return pooltest.Agent{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			<-r.Context().Done()
		})}
	}}
	f := newFixture(t, b, nil)
	hash := f.st.Program(t, "hang", store.UploadOptions{})
	e, err := f.p.Acquire(context.Background(), hash)
	if err != nil {
		t.Fatal(err)
	}
	reqDone := make(chan error, 1)
	go func() {
		defer e.Release()
		_, _, err := get(t, e, "/")
		reqDone <- err
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	began := time.Now()
	_ = f.p.Shutdown(ctx)
	if took := time.Since(began); took > 3*time.Second {
		t.Errorf("Shutdown took %s past its deadline", took)
	}
	if err := <-reqDone; err == nil {
		t.Error("the hanging request succeeded after its sandbox was stopped")
	}
	if !b.Sandboxes()[0].Exited() {
		t.Error("sandbox still runs")
	}
}

func TestIdleTimeout(t *testing.T) {
	b := &pooltest.Backend{}
	f := newFixture(t, b, func(o *pool.Options) { o.ReuseTimeout = 600 * time.Millisecond })
	hash := f.st.Program(t, "p", store.UploadOptions{})
	e, _ := serveOnce(t, f.p, hash)
	// Requests keep it warm...
	for range 3 {
		time.Sleep(200 * time.Millisecond)
		if e2, _ := serveOnce(t, f.p, hash); e2 != e {
			t.Fatal("a request within REUSE_TIMEOUT got a new execution")
		}
	}
	// ...and it stops once idle for REUSE_TIMEOUT, through the agent.
	if !e.WaitDied(3 * time.Second) {
		t.Fatal("idle execution not stopped")
	}
	s := b.Sandboxes()[0]
	eventually(t, "sandbox exited", time.Second, s.Exited)
	if e.Cause() != nil || s.Err() != nil {
		t.Errorf("idle stop: cause %v, sandbox err %v; want a clean stop", e.Cause(), s.Err())
	}
	if b.Started() != 1 {
		t.Errorf("%d sandboxes started", b.Started())
	}
}

// Pool.Stop lets the in-flight request finish.
func TestStopWaitsForRequests(t *testing.T) {
	finish := make(chan struct{})
	b := &pooltest.Backend{Agent: func(guest.Config) pooltest.Agent {
		return pooltest.Agent{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			<-finish
			_, _ = io.WriteString(w, "finished")
		})}
	}}
	f := newFixture(t, b, nil)
	hash := f.st.Program(t, "p", store.UploadOptions{})
	if err := f.p.Stop(context.Background(), hash); errkind.Of(err) != errkind.NotFound {
		t.Errorf("Stop of a program not running: %v", err)
	}
	e, err := f.p.Acquire(context.Background(), hash)
	if err != nil {
		t.Fatal(err)
	}
	body := make(chan string, 1)
	go func() {
		defer e.Release()
		_, b, _ := get(t, e, "/")
		body <- b
	}()
	stopped := make(chan error, 1)
	go func() { stopped <- f.p.Stop(context.Background(), hash) }()
	time.Sleep(100 * time.Millisecond)
	if ended(e) {
		t.Fatal("stopped under a request in flight")
	}
	close(finish)
	if got := <-body; got != "finished" {
		t.Errorf("in-flight request got %q", got)
	}
	if err := <-stopped; err != nil || !ended(e) {
		t.Errorf("Stop: %v, died %v", err, ended(e))
	}
}

// ended tells whether the execution has ended: an ended one answers
// WaitDied at once, long before the 1 ms timer.
func ended(e *pool.Execution) bool { return e.WaitDied(time.Millisecond) }
