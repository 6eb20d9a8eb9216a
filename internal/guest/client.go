package guest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// ErrClosed is returned when the guest channel ended before an answer came.
var ErrClosed = errors.New("guest channel closed")

// StartError is a program that could not start by its own fault and said
// why: Traceback is what clients read (aleph-vm answers it too).
type StartError struct {
	Detail    string // the agent's account: exit status, last output lines
	Traceback string
}

func (e *StartError) Error() string { return "program failed to start: " + e.Detail }

// hostCloseTimeout is short because net/http only closes a connection once
// it is done with it entirely: a half-closed stream on the host side never
// needs to wait long for the rest of the guest's output.
const hostCloseTimeout = 10 * time.Second

// Client is the host's end of one guest channel.
type Client struct {
	log  *slog.Logger
	sess *yamux.Session
	ctrl *ControlConn

	first   chan Status // the answer to Config
	stopped chan Status // the answer to OpStop
	// done closes once the control stream has been read to its end, after
	// the session closed: by then any last Status (Exited, Stopped, an
	// Error) has been seen, so Err and Stop never race the agent's exit.
	done chan struct{}

	mu      sync.Mutex
	exitErr error // why the program ended by itself, if it did
	srv     *http.Server

	api      *StreamListener
	apiConns *apiConns // the guest API connections open

	warm     chan struct{} // closed when the agent says its interpreter is warm
	warmOnce sync.Once
}

// Connect starts the multiplexer over ch, sends cfg and waits for the
// agent's readiness, bounded by ctx. On error ch is closed.
func Connect(ctx context.Context, ch io.ReadWriteCloser, cfg Config, log *slog.Logger) (*Client, error) {
	c, err := Dial(ch, log)
	if err != nil {
		return nil, err
	}
	if err := c.Start(ctx, cfg); err != nil {
		return nil, err
	}
	return c, nil
}

// Dial starts the multiplexer over ch without configuring the program
// yet. The session answers the agent's keepalives from then on, so a
// pre-warmed sandbox can wait for its program for as long as it likes;
// Start sends the Config later. On error ch is closed.
func Dial(ch io.ReadWriteCloser, log *slog.Logger) (*Client, error) {
	if log == nil {
		log = slog.Default()
	}
	sess, err := yamux.Client(coalesceFrames(ch), MuxConfig(log, hostCloseTimeout))
	if err != nil {
		ch.Close()
		return nil, fmt.Errorf("start multiplexer: %w", err)
	}
	c := &Client{
		log:      log,
		sess:     sess,
		first:    make(chan Status, 1),
		stopped:  make(chan Status, 1),
		done:     make(chan struct{}),
		api:      NewStreamListener(sess),
		apiConns: newAPIConns(),
		warm:     make(chan struct{}),
	}
	// Accept from the start: the program may call the guest API during its
	// lifespan startup, before the caller had a chance to ServeGuestAPI,
	// and an unaccepted stream would make the agent's yamux drop the session.
	go c.acceptLoop()
	return c, nil
}

// Warm is closed once a pre-warmed agent said that its interpreter
// finished its imports; never for an agent that does not pre-warm.
func (c *Client) Warm() <-chan struct{} { return c.warm }

// Closed is closed as soon as the multiplexed session ends, whether or not
// Start was called: how an idle spare's death is noticed.
func (c *Client) Closed() <-chan struct{} { return c.sess.CloseChan() }

// Start sends cfg and waits for the agent's readiness, bounded by ctx. On
// error the session is closed.
func (c *Client) Start(ctx context.Context, cfg Config) error {
	stream, err := OpenStream(ctx, c.sess, StreamControl)
	if err != nil {
		c.sess.Close()
		return fmt.Errorf("open control stream: %w", err)
	}
	c.ctrl = NewControlConn(stream)
	// As in Stop: an agent that fails at once may close the session before
	// our write is confirmed, yet its answer is there to read.
	sendErr := c.ctrl.Send(cfg)
	go func() {
		c.readControl()
		// Without its control stream the session is of no use.
		c.sess.Close()
		close(c.done)
	}()

	var st Status
	select {
	case st = <-c.first:
	case <-c.done:
		select {
		case st = <-c.first:
		default:
			if sendErr != nil {
				return fmt.Errorf("send config: %w", errors.Join(ErrClosed, sendErr))
			}
			return fmt.Errorf("waiting for program start: %w", ErrClosed)
		}
	case <-ctx.Done():
		c.sess.Close()
		return fmt.Errorf("waiting for program start: %w", ctx.Err())
	}
	if st.Error != "" {
		c.sess.Close()
		if st.Traceback != "" {
			return errkind.Wrap(errkind.ProgramFailed, &StartError{Detail: st.Error, Traceback: st.Traceback})
		}
		return fmt.Errorf("program failed to start: %s", st.Error)
	}
	if !st.Ready {
		c.sess.Close()
		return fmt.Errorf("unexpected first status %+v", st)
	}
	return nil
}

// readControl dispatches the agent's status lines for the session's life.
func (c *Client) readControl() {
	gotFirst := false
	for {
		var st Status
		if err := c.ctrl.Receive(&st); err != nil {
			if !errors.Is(err, io.EOF) && !c.sess.IsClosed() {
				c.log.Warn("control stream", "err", err)
			}
			return
		}
		switch {
		case !gotFirst:
			gotFirst = true
			c.first <- st
		case st.Stopped:
			select {
			case c.stopped <- st:
			default:
			}
		case st.Exited:
			c.mu.Lock()
			c.exitErr = errors.New(st.Error)
			c.mu.Unlock()
			c.log.Warn("program exited", "status", st.Error)
		default:
			c.log.Warn("unexpected status from agent", "status", st)
		}
	}
}

// DialHTTP opens a stream to the program: one plain HTTP/1.1 connection.
// Its signature fits http.Transport.DialContext (ignore network, addr).
func (c *Client) DialHTTP(ctx context.Context) (net.Conn, error) {
	return OpenStream(ctx, c.sess, StreamHTTP)
}

// ServeGuestAPI serves the program's guest API calls with h until Close.
// Calls made before it was called wait for it. A handler that is a
// ConnectionLimiter bounds the connections (else the defaults do).
func (c *Client) ServeGuestAPI(h http.Handler) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.srv != nil {
		return
	}
	maxConns, header, idle := defaultAPIConns, defaultAPIReadHeaderTimeout, defaultAPIIdleTimeout
	if l, ok := h.(ConnectionLimiter); ok {
		maxConns, header, idle = l.ConnectionLimits()
	}
	c.apiConns.setMax(maxConns)
	c.srv = &http.Server{
		Handler:           h,
		ReadHeaderTimeout: header,
		IdleTimeout:       idle,
		ConnState:         c.apiConns.state,
		ErrorLog:          slog.NewLogLogger(c.log.Handler(), slog.LevelDebug),
	}
	go func() {
		if err := c.srv.Serve(c.api); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
			c.log.Warn("guest API server", "err", err)
		}
	}()
}

// Stop asks the agent to stop the program and waits for its answer.
func (c *Client) Stop(ctx context.Context) error {
	if c.ctrl == nil {
		return nil // never started: there is no program to stop
	}
	select {
	case <-c.done:
		return nil // the agent already ended, and with it the program
	default:
	}
	// A failed send does not mean the agent missed the command: a quick
	// agent can answer and close the session before yamux confirms our
	// write. Any send error also ends the session, so waiting is bounded.
	sendErr := c.ctrl.Send(Command{Op: OpStop})
	select {
	case <-c.stopped:
		return nil
	case <-c.done:
		select {
		case <-c.stopped:
			return nil
		default:
			if sendErr != nil {
				return fmt.Errorf("send stop: %w", errors.Join(ErrClosed, sendErr))
			}
			return fmt.Errorf("waiting for stop: %w", ErrClosed)
		}
	case <-ctx.Done():
		return fmt.Errorf("waiting for stop: %w", ctx.Err())
	}
}

// Done is closed when the session ended (agent exited, sandbox died,
// Close) and the agent's last words were read.
func (c *Client) Done() <-chan struct{} { return c.done }

// Err tells why the program ended by itself, as reported by the agent; nil
// if it did not (or it died without a word, e.g. the sandbox was killed).
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.exitErr
}

// Close tears the session down without asking the agent anything.
func (c *Client) Close() error {
	c.mu.Lock()
	srv := c.srv
	c.mu.Unlock()
	if srv != nil {
		srv.Close()
	}
	c.api.Close()
	return c.sess.Close()
}

// acceptLoop takes every guest-initiated stream; only guest API streams
// are valid in that direction.
func (c *Client) acceptLoop() {
	for {
		s, err := c.sess.AcceptStream()
		if err != nil {
			c.api.Close()
			return
		}
		go func() {
			kind, err := ReadStreamType(s, 10*time.Second)
			if err == nil && kind == StreamWarm {
				s.Close()
				c.warmOnce.Do(func() { close(c.warm) })
				return
			}
			if err != nil || kind != StreamGuestAPI {
				c.log.Warn("rejecting guest stream", "type", kind, "err", err)
				s.Close()
				return
			}
			if !c.apiConns.admit(s) {
				// Debug: a program's doing, which must not flood the log.
				c.log.Debug("guest API connection refused: every connection is busy", "open", c.apiConns.count())
				closeNow(s)
				return
			}
			c.api.Push(s)
		}()
	}
}

// StreamListener adapts accepted streams to net.Listener for http.Server:
// whoever accepts streams of a session pushes the ones an HTTP server
// should serve.
type StreamListener struct {
	addr   net.Addr
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
}

// NewStreamListener returns a listener for streams of sess.
func NewStreamListener(sess *yamux.Session) *StreamListener {
	return &StreamListener{
		addr:   sess.LocalAddr(),
		conns:  make(chan net.Conn, 64),
		closed: make(chan struct{}),
	}
}

// Push hands c to Accept, or closes it once the listener is closed.
func (l *StreamListener) Push(c net.Conn) {
	select {
	case l.conns <- c:
	case <-l.closed:
		c.Close()
	}
}

// Accept implements net.Listener.
func (l *StreamListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

// Close implements net.Listener.
func (l *StreamListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

// Addr implements net.Listener.
func (l *StreamListener) Addr() net.Addr { return l.addr }
