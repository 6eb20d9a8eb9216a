// Package pooltest gives tests of the pool and of the HTTP server a
// sandbox without a sandbox: a backend whose "sandboxes" are goroutines,
// each joined to the host by one end of a net.Pipe, with an agent on the
// other end that speaks the real guest protocol (internal/guest: yamux
// with guest.MuxConfig, typed streams, the Config/Status control stream)
// and serves HTTP streams with a handler the test chooses. The pool, the
// guest client and the HTTP server under test are the real ones; only the
// sandbox, which is outside the pool, is stood in for. Nothing here needs
// root, runsc or a runtime image, so these tests run in -short mode.
//
// It also sets up a real local store with a runtime and programs
// (store.go), so that the pool resolves hashes exactly as it does in
// production.
package pooltest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// Agent is how one sandbox's agent behaves once it has read its Config.
// The zero value starts the program at once and answers every request
// with 200 "ok".
type Agent struct {
	// RefuseConfig, when set, is the start failure the agent reports
	// (Status{Error}) before it exits, as the real agent does when the
	// program cannot import.
	RefuseConfig string
	// CrashBeforeReady, when set, kills the sandbox after the Config was
	// read, without an answer (the memory limit during imports, say).
	CrashBeforeReady error
	// ReadyAfter delays the readiness answer (a slow program start).
	ReadyAfter time.Duration
	// Handler is the program. SandboxOf(r) gives it its sandbox, so that
	// it can crash or exit mid-request.
	Handler http.Handler
}

// OK is the default program: 200 "ok".
var OK = http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok") })

// Backend is a backend.Backend whose sandboxes run in-process. Set its
// fields before the pool starts anything.
type Backend struct {
	// StartError, when it returns an error, refuses a start as runsc
	// refusing a spec would.
	StartError func(spec backend.Spec) error
	// Agent chooses the agent's behaviour from the Config the host sent
	// (ProgramHash tells programs apart); nil: the zero Agent.
	Agent func(cfg guest.Config) Agent
	// LoadCodeError, when it returns an error, refuses the code given to
	// a pre-warmed sandbox (backend.CodeLoader).
	LoadCodeError func(spec backend.Spec) error
	// StartDelay is how long each start takes (runsc and the
	// interpreter's imports), so that refills can lag behind demand.
	StartDelay time.Duration
	// WarmAfter is when a spare's agent says its interpreter is warm
	// (guest.StreamWarm), counted from its session's start; negative:
	// never, as an agent that does not pre-warm.
	WarmAfter time.Duration
	Logger    *slog.Logger

	mu        sync.Mutex
	sandboxes []*Sandbox
	refused   int
}

var (
	_ backend.Backend    = (*Backend)(nil)
	_ backend.Instance   = (*Sandbox)(nil)
	_ backend.CodeLoader = (*Sandbox)(nil)
)

// Name is "fake".
func (b *Backend) Name() string { return "fake" }

// MakesSpares implements backend.SpareMaker: its sandboxes take their
// code after they start, as gVisor's do.
func (b *Backend) MakesSpares() {}

// Start starts an in-process sandbox whose agent waits for the host.
func (b *Backend) Start(ctx context.Context, spec backend.Spec) (backend.Instance, error) {
	if err := spec.Check(); err != nil {
		return nil, err
	}
	if b.StartDelay > 0 {
		select {
		case <-time.After(b.StartDelay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if b.StartError != nil {
		if err := b.StartError(spec); err != nil {
			b.mu.Lock()
			b.refused++
			b.mu.Unlock()
			return nil, err
		}
	}
	log := b.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	host, guestEnd := net.Pipe()
	s := &Sandbox{
		Spec: spec, StartedAt: time.Now(), b: b, log: log.With("sandbox", spec.ExecutionID),
		host: host, guest: guestEnd,
		done: make(chan struct{}), ready: make(chan struct{}),
	}
	b.mu.Lock()
	b.sandboxes = append(b.sandboxes, s)
	b.mu.Unlock()
	go s.serve()
	return s, nil
}

// Sandboxes returns every sandbox started so far, in start order.
func (b *Backend) Sandboxes() []*Sandbox {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]*Sandbox(nil), b.sandboxes...)
}

// Sandbox returns the sandbox of an execution id, or nil.
func (b *Backend) Sandbox(executionID string) *Sandbox {
	for _, s := range b.Sandboxes() {
		if s.Spec.ExecutionID == executionID {
			return s
		}
	}
	return nil
}

// Started counts the sandboxes started (refused starts excluded).
func (b *Backend) Started() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.sandboxes)
}

// Alive returns the sandboxes that have not exited.
func (b *Backend) Alive() []*Sandbox {
	var out []*Sandbox
	for _, s := range b.Sandboxes() {
		if !s.Exited() {
			out = append(out, s)
		}
	}
	return out
}

// Sandbox is one running fake sandbox.
type Sandbox struct {
	Spec      backend.Spec
	StartedAt time.Time
	b         *Backend
	log       *slog.Logger

	host, guest net.Conn
	done        chan struct{}
	exitOnce    sync.Once
	err         error // set before done closes
	stop        backend.StopOnce
	stopped     atomic.Bool // Stop was called

	ready    chan struct{} // closed once the agent answered Ready
	warm     atomic.Bool   // the agent said its interpreter is warm
	requests atomic.Int64

	mu   sync.Mutex
	cfg  guest.Config
	code *backend.Spec // what LoadCode gave
	ctrl *guest.ControlConn
	sess *yamux.Session

	usageMu sync.Mutex
	usage   backend.Usage
}

// Channel returns the host's end of the pipe.
func (s *Sandbox) Channel(context.Context) (io.ReadWriteCloser, error) { return s.host, nil }

// Stop kills the sandbox; its exit is clean.
func (s *Sandbox) Stop(ctx context.Context) error {
	s.stopped.Store(true)
	return s.stop.Do(ctx, func(context.Context) error {
		s.exit(nil)
		return nil
	})
}

// Done is closed when the sandbox exited.
func (s *Sandbox) Done() <-chan struct{} { return s.done }

// Err is why the sandbox exited (nil before, or after a clean exit).
func (s *Sandbox) Err() error {
	select {
	case <-s.done:
		return s.err
	default:
		return nil
	}
}

// Usage is what SetUsage last gave (zero: nothing is measured).
func (s *Sandbox) Usage() backend.Usage {
	s.usageMu.Lock()
	defer s.usageMu.Unlock()
	return s.usage
}

// SetUsage sets the figures Usage reports, as a backend's sampling would.
func (s *Sandbox) SetUsage(u backend.Usage) {
	s.usageMu.Lock()
	s.usage = u
	s.usageMu.Unlock()
}

// LoadCode takes a pre-warmed sandbox's code, or refuses it per
// Backend.LoadCodeError. Like gVisor's, it works on a dead sandbox too
// (it only places files).
func (s *Sandbox) LoadCode(_ context.Context, spec backend.Spec) error {
	if !s.Spec.DeferCode {
		return errors.New("fake: LoadCode on a sandbox that already has its code")
	}
	if s.b.LoadCodeError != nil {
		if err := s.b.LoadCodeError(spec); err != nil {
			return err
		}
	}
	s.mu.Lock()
	s.code = &spec
	s.mu.Unlock()
	return nil
}

// Crash kills the sandbox without a word from its agent, as the memory
// limit or a kill -9 of runsc would: the host sees its channel end and
// the sandbox exit with err.
func (s *Sandbox) Crash(err error) {
	if err == nil {
		err = errors.New("killed")
	}
	s.exit(err)
}

// ProgramExit makes the program end by itself: the agent reports
// Status{Exited} with desc, closes the session and the sandbox exits 1,
// as the real agent does.
func (s *Sandbox) ProgramExit(desc string) {
	s.mu.Lock()
	ctrl, sess := s.ctrl, s.sess
	s.mu.Unlock()
	if ctrl != nil {
		_ = ctrl.Send(guest.Status{Exited: true, Error: desc})
	}
	if sess != nil {
		sess.Close()
	}
	s.exit(errors.New("exit status 1"))
}

// Exited reports whether the sandbox exited.
func (s *Sandbox) Exited() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}

// Warm reports whether the agent said its interpreter is warm.
func (s *Sandbox) Warm() bool { return s.warm.Load() }

// Stopped reports whether the pool called Stop.
func (s *Sandbox) Stopped() bool { return s.stopped.Load() }

// Ready is closed once the agent told the host the program serves.
func (s *Sandbox) Ready() <-chan struct{} { return s.ready }

// Config is the Config the host sent (zero before).
func (s *Sandbox) Config() guest.Config {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cfg
}

// Code is the spec LoadCode received, or nil.
func (s *Sandbox) Code() *backend.Spec {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.code
}

// Requests counts the HTTP requests the program received.
func (s *Sandbox) Requests() int { return int(s.requests.Load()) }

func (s *Sandbox) exit(err error) {
	s.exitOnce.Do(func() {
		s.err = err
		// The guest's end going away is what the host reads as EOF.
		s.guest.Close()
		close(s.done)
		s.log.Debug("sandbox exited", "err", err)
	})
}

type sandboxKey struct{}

// SandboxOf returns the sandbox whose program serves r.
func SandboxOf(r *http.Request) *Sandbox {
	s, _ := r.Context().Value(sandboxKey{}).(*Sandbox)
	return s
}

// serve is the agent: the real protocol's server side, in the order of
// cmd/vm-agent's serve.
func (s *Sandbox) serve() {
	sess, err := yamux.Server(s.guest, guest.MuxConfig(s.log, time.Minute))
	if err != nil {
		s.exit(fmt.Errorf("agent: start multiplexer: %w", err))
		return
	}
	defer sess.Close()
	if s.Spec.DeferCode && s.b.WarmAfter >= 0 {
		go func() {
			select {
			case <-time.After(s.b.WarmAfter):
			case <-sess.CloseChan():
				return
			}
			if st, err := guest.OpenStream(context.Background(), sess, guest.StreamWarm); err == nil {
				s.warm.Store(true)
				_ = st.Close()
			}
		}()
	}
	stream, err := sess.AcceptStream()
	if err != nil {
		s.exit(nil) // the host went away (or the sandbox was stopped) before configuring it
		return
	}
	if kind, err := guest.ReadStreamType(stream, 10*time.Second); err != nil || kind != guest.StreamControl {
		s.exit(fmt.Errorf("agent: first stream %q, %v", kind, err))
		return
	}
	ctrl := guest.NewControlConn(stream)
	var cfg guest.Config
	if err := ctrl.Receive(&cfg); err != nil {
		s.exit(nil)
		return
	}
	a := Agent{}
	if s.b.Agent != nil {
		a = s.b.Agent(cfg)
	}
	if a.Handler == nil {
		a.Handler = OK
	}
	s.mu.Lock()
	s.cfg, s.ctrl, s.sess = cfg, ctrl, sess
	s.mu.Unlock()

	switch {
	case a.CrashBeforeReady != nil:
		s.exit(a.CrashBeforeReady)
		return
	case a.RefuseConfig != "":
		_ = ctrl.Send(guest.Status{Error: a.RefuseConfig})
		closeSoon(sess)
		s.exit(errors.New("exit status 1"))
		return
	}
	if a.ReadyAfter > 0 {
		select {
		case <-time.After(a.ReadyAfter):
		case <-sess.CloseChan():
			s.exit(nil)
			return
		case <-s.done:
			return
		}
	}

	ln := guest.NewStreamListener(sess)
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			s.requests.Add(1)
			a.Handler.ServeHTTP(w, r)
		}),
		ConnContext: func(ctx context.Context, _ net.Conn) context.Context {
			return context.WithValue(ctx, sandboxKey{}, s)
		},
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()
	go s.acceptHTTP(sess, ln)

	if err := ctrl.Send(guest.Status{Ready: true}); err != nil {
		s.exit(nil)
		return
	}
	close(s.ready)
	for {
		var cmd guest.Command
		if err := ctrl.Receive(&cmd); err != nil {
			// The host closed the control stream, or the session ended.
			s.exit(nil)
			return
		}
		if cmd.Op == guest.OpStop {
			_ = ctrl.Send(guest.Status{Stopped: true})
			closeSoon(sess)
			s.exit(nil)
			return
		}
	}
}

// closeSoon closes the session once the host had a moment to read the
// last status line, as the real agent's exit does.
func closeSoon(sess *yamux.Session) {
	done := make(chan struct{})
	go func() {
		sess.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
	}
}

// acceptHTTP hands host-initiated HTTP streams to the program's server.
func (s *Sandbox) acceptHTTP(sess *yamux.Session, ln *guest.StreamListener) {
	defer ln.Close()
	for {
		st, err := sess.AcceptStream()
		if err != nil {
			return
		}
		go func() {
			kind, err := guest.ReadStreamType(st, 10*time.Second)
			if err != nil || kind != guest.StreamHTTP {
				st.Close()
				return
			}
			ln.Push(st)
		}()
	}
}
