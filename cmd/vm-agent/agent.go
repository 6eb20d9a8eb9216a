package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// agentCloseTimeout bounds a half-closed stream waiting for the host's FIN;
// longer than the host's because the host may still be reading a response
// body after the program finished writing it.
const agentCloseTimeout = time.Minute

type agent struct {
	o      options
	log    *slog.Logger
	reaper *reaper // non-nil when the agent is PID 1 and must reap orphans
	// setup, when set, runs once the Config is known and before the
	// program starts: in VMs it mounts the code and volume drives and
	// configures the network the Config describes. Its error is reported
	// to the host as a start failure.
	setup func(ctx context.Context, cfg guest.Config, log *slog.Logger) error

	// held is the interpreter warmed before the channel opened (--hold).
	held *preloaded

	mu   sync.Mutex
	prog *program
}

func newAgent(o options, log *slog.Logger) *agent {
	a := &agent{o: o, log: log}
	if os.Getpid() == 1 {
		a.reaper = newReaper(log)
	}
	return a
}

func (a *agent) programSocket() string {
	if a.o.programSocket != "" {
		return a.o.programSocket
	}
	return filepath.Join(a.o.socketDir, filepath.Base(guest.ProgramSocket))
}
func (a *agent) apiSocket() string {
	return filepath.Join(a.o.socketDir, filepath.Base(guest.GuestAPISocket))
}

var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// tellWarm tells the host, once warm is closed, that this pre-warmed
// sandbox is done with its heavy imports (guest.StreamWarm).
func tellWarm(ctx context.Context, sess *yamux.Session, warm <-chan struct{}, log *slog.Logger) {
	select {
	case <-warm:
	case <-sess.CloseChan():
		return
	}
	s, err := guest.OpenStream(ctx, sess, guest.StreamWarm)
	if err != nil {
		log.Debug("could not say the interpreter is warm", "err", err)
		return
	}
	_ = s.Close()
}

// preloadInterpreter starts the interpreter that warms up while the host
// connects and sends the Config (or takes the one warmed before the
// session, --hold), and tells the host once it is warm. In VMs the root is
// final before the channel opens; only the code (and no volumes: spares
// take none) is mounted by the set-up, before the interpreter is handed
// the program. It returns nil without --preload, or when the interpreter
// could not start.
func (a *agent) preloadInterpreter(ctx context.Context, sess *yamux.Session) *preloaded {
	if a.held != nil {
		pre := a.held
		a.held = nil
		go tellWarm(ctx, sess, closedChan, a.log)
		return pre
	}
	if !a.o.preload {
		return nil
	}
	pre, err := startPreload(a.programSpec(), a.reaper, a.log)
	if err != nil {
		a.log.Warn("could not preload the interpreter", "err", err)
		go tellWarm(ctx, sess, closedChan, a.log)
		return nil
	}
	go tellWarm(ctx, sess, pre.warm, a.log)
	return pre
}

// serve runs one sandbox's life: read the Config, start the program, serve
// streams until told to stop or the program or the host goes away. It
// returns the agent's exit code.
func (a *agent) serve(ctx context.Context, ch io.ReadWriteCloser) (int, error) {
	ensureLoopbackUp(a.log)
	sess, err := guest.Serve(ch, a.log, agentCloseTimeout)
	if err != nil {
		return 1, fmt.Errorf("start multiplexer: %w", err)
	}
	defer closeWithin(sess, 2*time.Second, a.log)

	pre := a.preloadInterpreter(ctx, sess)
	defer func() {
		if pre != nil {
			pre.prog.stop(a.o.stopTimeout)
		}
	}()

	ctrl, err := acceptControl(ctx, sess)
	if err != nil {
		if sess.IsClosed() {
			// A spare the host discarded, or a host that stopped: nothing
			// failed here.
			a.log.Info("the host left before sending a program")
			return 0, nil
		}
		return 1, err
	}
	var cfg guest.Config
	if err := ctrl.Receive(&cfg); err != nil {
		return 1, fmt.Errorf("read config: %w", err)
	}
	log := a.log.With("program", cfg.ProgramHash)
	log.Info("config received", "interface", cfg.Interface, "entrypoint", cfg.Entrypoint)

	// Cancelled when the host goes away, so a slow start is abandoned.
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-sess.CloseChan():
			cancel()
		case <-runCtx.Done():
		}
	}()
	go a.acceptStreams(runCtx, sess)
	commands := readCommands(ctrl, log)

	fail := func(err error) (int, error) {
		if serr := ctrl.Send(guest.Status{Error: err.Error()}); serr != nil {
			log.Warn("could not report start failure", "err", serr)
		}
		return 1, err
	}

	if a.setup != nil {
		if err := a.setup(runCtx, cfg, log); err != nil {
			return fail(err)
		}
	} else if err := writeResolvConf(cfg.DNS); err != nil {
		return fail(fmt.Errorf("network: %w", err))
	}
	if err := unpackData(runCtx, guest.DataSourceDir, cfg.Data); err != nil {
		return fail(err)
	}

	closeAPI, err := a.listenGuestAPI(runCtx, sess)
	if err != nil {
		return fail(err)
	}
	defer closeAPI()

	prog, err := a.launch(cfg, pre, log)
	pre = nil // adopted or stopped by launch
	if err != nil {
		return fail(err)
	}
	a.mu.Lock()
	a.prog = prog
	a.mu.Unlock()
	defer prog.stop(a.o.stopTimeout)

	timeout := time.Duration(cfg.StartTimeoutMS) * time.Millisecond
	if timeout <= 0 {
		timeout = guest.DefaultStartTimeoutMS * time.Millisecond
	}
	started := time.Now()
	if err := prog.waitReady(runCtx, timeout); err != nil {
		// Stopped before answering: the host tears the sandbox down as
		// soon as it reads the error.
		prog.stop(a.o.stopTimeout)
		st := guest.Status{Error: err.Error(), Traceback: startError(a.programSpec())}
		if serr := ctrl.Send(st); serr != nil {
			log.Warn("could not report start failure", "err", serr)
		}
		return 1, err
	}
	log.Info("program ready", "after", time.Since(started).Round(time.Millisecond))
	if err := ctrl.Send(guest.Status{Ready: true}); err != nil {
		// The host may read the answer and close the channel before yamux
		// confirms the write: a host that went away, not an agent failure.
		log.Info("host closed the channel while the program started; stopping", "err", err)
		prog.stop(a.o.stopTimeout)
		return 0, nil
	}

	return a.supervise(ctx, sess, ctrl, commands, prog, log)
}

// launch adopts the preloaded interpreter when it can run the program
// (it is stopped otherwise), or starts the program afresh.
func (a *agent) launch(cfg guest.Config, pre *preloaded, log *slog.Logger) (*program, error) {
	if pre != nil {
		prog, err := pre.adopt(cfg, a.programSpec(), log)
		if prog != nil && err == nil {
			return prog, nil
		}
		pre.prog.stop(a.o.stopTimeout)
		if err != nil {
			return nil, err
		}
	}
	return startProgram(cfg, a.programSpec(), a.reaper, log)
}

// listenGuestAPI serves the guest API on our socket and on aleph-vm's,
// before the program starts: programs may call it from their startup
// code. The returned func closes both.
func (a *agent) listenGuestAPI(ctx context.Context, sess *yamux.Session) (func(), error) {
	apiLn, err := listenUnix(a.apiSocket())
	if err != nil {
		return nil, fmt.Errorf("guest API socket: %w", err)
	}
	go a.serveGuestAPI(ctx, sess, apiLn)
	// aleph-vm's path, which programs hard-code. Made now, after set-up
	// has mounted /tmp in VMs; under gVisor /tmp is the sandbox's tmpfs.
	p := a.o.compatAPISocket
	if p == "" {
		return func() { _ = apiLn.Close() }, nil
	}
	compatLn, err := listenUnix(p)
	if err != nil {
		_ = apiLn.Close()
		return nil, fmt.Errorf("guest API socket %s: %w", p, err)
	}
	go a.serveGuestAPI(ctx, sess, compatLn)
	return func() { _ = apiLn.Close(); _ = compatLn.Close() }, nil
}

// supervise waits, once the program is ready, for whichever comes first:
// the host's stop, the program's exit, the channel's end or a signal. It
// returns the agent's exit code.
func (a *agent) supervise(ctx context.Context, sess *yamux.Session, ctrl *guest.ControlConn, commands <-chan guest.Command, prog *program, log *slog.Logger) (int, error) {
	for {
		select {
		case cmd, ok := <-commands:
			if !ok {
				log.Info("host closed the control stream; stopping")
				prog.stop(a.o.stopTimeout)
				return 0, nil
			}
			if cmd.Op != guest.OpStop {
				log.Warn("unknown command", "op", cmd.Op)
				continue
			}
			log.Info("stopping on request")
			prog.stop(a.o.stopTimeout)
			if err := ctrl.Send(guest.Status{Stopped: true}); err != nil {
				// The program did stop; a host that stopped listening first
				// changes nothing about that.
				log.Info("could not report the stop; host already gone", "err", err)
			}
			return 0, nil
		case <-prog.exited:
			desc := prog.describeExit()
			log.Warn("program exited", "status", desc)
			if err := ctrl.Send(guest.Status{Exited: true, Error: desc}); err != nil {
				log.Warn("could not report exit", "err", err)
			}
			return 1, nil
		case <-sess.CloseChan():
			log.Info("guest channel closed; stopping")
			prog.stop(a.o.stopTimeout)
			return 0, nil
		case <-ctx.Done():
			log.Info("signalled; stopping")
			prog.stop(a.o.stopTimeout)
			return 0, nil
		}
	}
}

// closeWithin closes the session without letting a channel that ignores
// Close (a file descriptor outside Go's poller) hold up the agent's exit.
func closeWithin(sess *yamux.Session, timeout time.Duration, log *slog.Logger) {
	done := make(chan struct{})
	go func() {
		sess.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(timeout):
		log.Warn("guest channel did not close in time")
	}
}

// acceptControl waits for the host's first stream, which must be control.
func acceptControl(ctx context.Context, sess *yamux.Session) (*guest.ControlConn, error) {
	s, err := sess.AcceptStreamWithContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("accept control stream: %w", err)
	}
	kind, err := guest.ReadStreamType(s, 30*time.Second)
	if err != nil {
		s.Close()
		return nil, err
	}
	if kind != guest.StreamControl {
		s.Close()
		return nil, fmt.Errorf("first stream has type %q, want control", kind)
	}
	return guest.NewControlConn(s), nil
}

// readCommands delivers the host's commands; the channel closes when the
// control stream ends.
func readCommands(ctrl *guest.ControlConn, log *slog.Logger) <-chan guest.Command {
	out := make(chan guest.Command)
	go func() {
		defer close(out)
		for {
			var cmd guest.Command
			if err := ctrl.Receive(&cmd); err != nil {
				if !errors.Is(err, io.EOF) {
					log.Debug("control stream ended", "err", err)
				}
				return
			}
			out <- cmd
		}
	}()
	return out
}

// acceptStreams serves host-initiated streams: only HTTP is valid here.
func (a *agent) acceptStreams(ctx context.Context, sess *yamux.Session) {
	for {
		s, err := sess.AcceptStream()
		if err != nil {
			return
		}
		go func() {
			kind, err := guest.ReadStreamType(s, 10*time.Second)
			if err != nil || kind != guest.StreamHTTP {
				a.log.Warn("rejecting stream", "type", kind, "err", err)
				s.Close()
				return
			}
			a.proxyHTTP(ctx, s)
		}()
	}
}

func (a *agent) proxyHTTP(ctx context.Context, s net.Conn) {
	a.mu.Lock()
	prog := a.prog
	a.mu.Unlock()
	if prog == nil {
		a.log.Warn("HTTP stream before the program started")
		s.Close()
		return
	}
	c, err := prog.dial(ctx)
	if err != nil {
		a.log.Warn("cannot reach the program", "err", err)
		s.Close()
		return
	}
	if err := guest.Splice(s, c); err != nil {
		a.log.Debug("HTTP stream ended", "err", err)
	}
}

// serveGuestAPI forwards each connection the program makes to the guest
// API socket as a stream to the host.
func (a *agent) serveGuestAPI(ctx context.Context, sess *yamux.Session, ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			s, err := guest.OpenStream(ctx, sess, guest.StreamGuestAPI)
			if err != nil {
				a.log.Warn("guest API stream", "err", err)
				c.Close()
				return
			}
			if err := guest.Splice(c, s); err != nil {
				a.log.Debug("guest API connection ended", "err", err)
			}
		}()
	}
}

// listenUnix listens on path, replacing a stale socket left by an earlier
// run (the image's /run is shared between runs in tests and debugging).
func listenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	// The program may drop privileges; the socket is only reachable inside
	// the sandbox anyway.
	if err := os.Chmod(path, 0o666); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// isNotListening tells dial errors worth retrying while a program starts.
func isNotListening(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT)
}
