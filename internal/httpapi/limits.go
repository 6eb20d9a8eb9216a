package httpapi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/netutil"
)

// Limits bound what one client can hold of the HTTP service. Zero
// durations and counts disable the corresponding bound.
//
// The choices, against the attacks they answer:
//   - slowloris (headers drip-fed): ReadHeaderTimeout, from accept (or
//     from the end of the previous request) to the last header byte.
//   - idle keep-alive floods: IdleTimeout, plus MaxConnections (excess
//     connections wait in the kernel's accept queue, holding none of our
//     file descriptors) and MaxConnectionsPerClient (excess connections
//     from one address are closed at once, so one client cannot take all
//     of MaxConnections).
//   - drip-fed bodies: a minimum average rate, as Apache's mod_reqtimeout
//     does (body=20,MinRate=500): a body gets BodyTimeout, plus one second
//     per BodyMinRate bytes received. Only time spent waiting for the
//     client counts: a program that reads its upload slowly, or a cold
//     start, is not charged to the client. A whole-request ReadTimeout
//     would cut legitimate large uploads on slow links; a per-read idle
//     timeout alone (nginx's client_body_timeout) lets a client send one
//     byte every few seconds for ever.
//   - clients that do not read the response: WriteTimeout bounds each
//     single write, as nginx's send_timeout does, never the whole
//     response, so a program may stream for hours (server-sent events, long
//     downloads) as long as the client keeps reading. http.Server's own
//     WriteTimeout would cut every response longer than it.
//   - huge headers: MaxHeaderBytes (431). Bodies forwarded to programs are
//     bounded by Options.MaxRequestBodySize (413); the operator pages read
//     no body, and net/http discards at most 256 KiB of an unread one,
//     under the body deadline.
type Limits struct {
	ReadHeaderTimeout time.Duration
	IdleTimeout       time.Duration
	BodyTimeout       time.Duration
	BodyMinRate       int64 // bytes per second
	WriteTimeout      time.Duration
	MaxHeaderBytes    int
	MaxConnections    int
	// MaxConnectionsPerClient applies to every remote address outside
	// UnlimitedClients. A reverse proxy on the same host carries many
	// clients over its connections, hence the loopback default there.
	MaxConnectionsPerClient int
	UnlimitedClients        []netip.Prefix
}

// NewHTTPServer returns the http.Server for this handler, with the
// limits applied; base is the context of every request.
func (s *Server) NewHTTPServer(base context.Context) *http.Server {
	l := s.opts.Limits
	return &http.Server{
		Handler:           s.guard(s),
		ReadHeaderTimeout: l.ReadHeaderTimeout,
		IdleTimeout:       l.IdleTimeout,
		MaxHeaderBytes:    l.MaxHeaderBytes,
		BaseContext:       func(net.Listener) context.Context { return base },
		ConnState: func(c net.Conn, st http.ConnState) {
			// A response's last write was bounded by the deadline guard set;
			// the connection now waits for the next request, bounded by
			// IdleTimeout, and net/http may answer a malformed one.
			if st == http.StateIdle && l.WriteTimeout > 0 {
				_ = c.SetWriteDeadline(time.Time{})
			}
		},
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
}

// Listener applies the connection limits to ln.
func (s *Server) Listener(ln net.Listener) net.Listener {
	l := s.opts.Limits
	if l.MaxConnections > 0 {
		ln = netutil.LimitListener(ln, l.MaxConnections)
	}
	if l.MaxConnectionsPerClient > 0 {
		ln = &perClientListener{
			Listener: ln, max: l.MaxConnectionsPerClient, exempt: l.UnlimitedClients,
			open: map[netip.Addr]int{}, log: s.log,
		}
	}
	return ln
}

// perClientListener closes at once the connections of an address that
// already holds max of them.
type perClientListener struct {
	net.Listener
	max    int
	exempt []netip.Prefix
	log    *slog.Logger

	mu          sync.Mutex
	open        map[netip.Addr]int
	refused     int
	lastWarning time.Time
}

// tooManyConnections is written to a refused connection before closing
// it; the client may not read it (it may not have sent anything yet), so
// it is a courtesy, not a protocol.
const tooManyConnections = "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n" +
	"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 38\r\n\r\n" +
	"too many connections from your address"

func (l *perClientListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		addr := remoteAddr(c)
		if !addr.IsValid() || l.isExempt(addr) {
			return c, nil
		}
		l.mu.Lock()
		if l.open[addr] >= l.max {
			l.refused++
			warn := time.Since(l.lastWarning) > time.Minute
			refused := l.refused
			if warn {
				l.lastWarning, l.refused = time.Now(), 0
			}
			l.mu.Unlock()
			if warn {
				l.log.Warn("closing connections beyond the per-client limit",
					"client", addr.String(), "limit", l.max, "refused_since_last_warning", refused)
			}
			// A fresh socket's send buffer is empty: this write does not block.
			_ = c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			_, _ = io.WriteString(c, tooManyConnections)
			_ = c.Close()
			continue
		}
		l.open[addr]++
		l.mu.Unlock()
		return &countedConn{Conn: c, release: sync.OnceFunc(func() {
			l.mu.Lock()
			defer l.mu.Unlock()
			if l.open[addr]--; l.open[addr] <= 0 {
				delete(l.open, addr)
			}
		})}, nil
	}
}

func (l *perClientListener) isExempt(a netip.Addr) bool {
	for _, p := range l.exempt {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func remoteAddr(c net.Conn) netip.Addr {
	if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return ta.AddrPort().Addr().Unmap()
	}
	return netip.Addr{}
}

type countedConn struct {
	net.Conn
	release func()
}

func (c *countedConn) Close() error {
	c.release()
	return c.Conn.Close()
}

// guard applies the per-request deadlines of Limits (body rate, write
// timeout) around h.
func (s *Server) guard(h http.Handler) http.Handler {
	l := s.opts.Limits
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		if l.WriteTimeout > 0 {
			// Clear what an earlier response on this connection left.
			_ = rc.SetWriteDeadline(time.Time{})
			w = &deadlineWriter{ResponseWriter: w, rc: rc, timeout: l.WriteTimeout}
			// net/http writes the end of the response after h returns.
			defer func() { _ = rc.SetWriteDeadline(time.Now().Add(l.WriteTimeout)) }()
		}
		if l.BodyTimeout > 0 && r.Body != nil && r.Body != http.NoBody && r.ContentLength != 0 && !isUpgrade(r) {
			rb := &rateBody{ReadCloser: r.Body, rc: rc, grace: l.BodyTimeout, rate: max(l.BodyMinRate, 1)}
			// On a copy: net/http looks at its own request's body after the
			// handler (what is left unread, whether it was closed) to decide
			// whether to keep the connection.
			r = r.WithContext(context.WithValue(r.Context(), rateBodyKey{}, rb))
			r.Body = rb
			// net/http reads what is left of an unread body (up to 256 KiB)
			// before answering, to reuse the connection: bound that too, for
			// handlers that answer without reading, now and after h.
			_ = rc.SetReadDeadline(time.Now().Add(l.BodyTimeout))
			defer func() {
				switch {
				case rb.tooSlow.Load() != nil:
					// No point reading more of it: answer and close now.
					_ = rc.SetReadDeadline(time.Unix(1, 0))
				case !rb.done.Load():
					_ = rc.SetReadDeadline(time.Now().Add(l.BodyTimeout))
				}
			}()
		}
		h.ServeHTTP(w, r)
	})
}

// deadlineWriter gives each write to the client WriteTimeout to complete.
// It unwraps for http.ResponseController (flush, hijack for websockets).
type deadlineWriter struct {
	http.ResponseWriter
	rc      *http.ResponseController
	timeout time.Duration
}

func (d *deadlineWriter) arm() { _ = d.rc.SetWriteDeadline(time.Now().Add(d.timeout)) }

func (d *deadlineWriter) WriteHeader(code int) {
	d.arm() // 1xx headers are written at once
	d.ResponseWriter.WriteHeader(code)
}

func (d *deadlineWriter) Write(p []byte) (int, error) {
	d.arm()
	return d.ResponseWriter.Write(p)
}

func (d *deadlineWriter) FlushError() error {
	d.arm()
	return d.rc.Flush()
}

func (d *deadlineWriter) Flush() { _ = d.FlushError() }

func (d *deadlineWriter) Unwrap() http.ResponseWriter { return d.ResponseWriter }

type rateBodyKey struct{}

// errBodyTooSlow is the error of a request body that fell below the
// minimum rate; statusFor answers it 408.
var errBodyTooSlow = errors.New("request body arrives too slowly")

// BodyTooSlowError reports a request body below the minimum rate.
type BodyTooSlowError struct {
	Received int64
	Waited   time.Duration
}

func (e *BodyTooSlowError) Error() string {
	return fmt.Sprintf("%v: %d bytes in %s", errBodyTooSlow, e.Received, e.Waited.Round(time.Millisecond))
}

func (e *BodyTooSlowError) Unwrap() error { return errBodyTooSlow }

// rateBody enforces the minimum average rate of a request body through
// the connection's read deadline.
type rateBody struct {
	io.ReadCloser
	rc    *http.ResponseController
	grace time.Duration
	rate  int64

	received int64
	waited   time.Duration // time spent blocked on the client
	done     atomic.Bool   // the body was read to its end
	tooSlow  atomic.Pointer[BodyTooSlowError]
}

func (b *rateBody) fail() error {
	e := &BodyTooSlowError{Received: b.received, Waited: b.waited}
	b.tooSlow.Store(e)
	return e
}

func (b *rateBody) Read(p []byte) (int, error) {
	if b.done.Load() {
		return b.ReadCloser.Read(p)
	}
	allowed := b.grace + time.Duration(float64(b.received)/float64(b.rate)*float64(time.Second))
	left := allowed - b.waited
	if left <= 0 {
		return 0, b.fail()
	}
	start := time.Now()
	_ = b.rc.SetReadDeadline(start.Add(left))
	n, err := b.ReadCloser.Read(p)
	b.waited += time.Since(start)
	b.received += int64(n)
	switch {
	case errors.Is(err, io.EOF):
		b.done.Store(true)
		// The connection now waits for the next request or the client's
		// hang-up; a deadline left here would cancel long responses
		// (net/http clears it too, as it starts watching for a hang-up).
		_ = b.rc.SetReadDeadline(time.Time{})
	case err != nil && isTimeout(err):
		return n, b.fail()
	}
	return n, err
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// bodyTooSlow returns the error of the request of ctx if its body was cut
// for arriving too slowly (the error the proxy sees may then be a mere
// cancellation of the request), or nil.
func bodyTooSlow(ctx context.Context) error {
	if rb, ok := ctx.Value(rateBodyKey{}).(*rateBody); ok {
		if e := rb.tooSlow.Load(); e != nil {
			return e
		}
	}
	return nil
}
