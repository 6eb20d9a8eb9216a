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
)

// Limits bound what one client can hold of the HTTP service. Zero
// durations and counts disable the corresponding bound.
//
// The choices, against the attacks they answer:
//   - slowloris (headers drip-fed): ReadHeaderTimeout, from accept (or
//     from the end of the previous request) to the last header byte.
//   - idle keep-alive floods: IdleTimeout, plus MaxConnections (at the
//     cap the connection idle the longest is closed for a newcomer; when
//     every one is busy, excess connections wait in the kernel's accept
//     queue, holding none of our file descriptors; the last slots are
//     for UnlimitedClients) and MaxConnectionsPerClient (excess
//     connections from one client, an IPv4 address or an IPv6 /64, and
//     under pressure an IPv4 /24 or IPv6 /48, are closed at once, so
//     that one client or network cannot take all of MaxConnections).
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
	// MaxConnectionsPerClient applies to every client (see connLimiter)
	// outside UnlimitedClients. A reverse proxy on the same host carries
	// many clients over its connections, hence the loopback default there.
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
			if cl := s.conns.Load(); cl != nil {
				cl.connState(c, st)
			}
		},
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
}

// Listener applies the connection limits to ln; NewHTTPServer's
// connection-state hook tells it which connections are idle.
func (s *Server) Listener(ln net.Listener) net.Listener {
	l := s.opts.Limits
	if l.MaxConnections <= 0 && l.MaxConnectionsPerClient <= 0 {
		return ln
	}
	cl := &connLimiter{
		Listener: ln, max: l.MaxConnections, perClient: l.MaxConnectionsPerClient,
		exempt: l.UnlimitedClients, reserve: operatorReserve(l.MaxConnections), log: s.log,
		byClient: map[netip.Prefix]int{}, byNetwork: map[netip.Prefix]int{},
		conns: map[*limitedConn]struct{}{}, room: make(chan struct{}, 1), done: make(chan struct{}),
	}
	s.conns.Store(cl)
	return cl
}

// operatorReserve is how many of limit connections only UnlimitedClients
// (the operator on loopback, a local reverse proxy) may take: a node full
// of busy connections still answers its operator.
func operatorReserve(limit int) int {
	return min(16, limit/8)
}

// Keys of the per-client counts. One address of IPv4 is one client, but
// one IPv6 customer gets a /64 (often a /48): its addresses are one
// client. Under pressure (the node at half its cap), a whole IPv4 /24 or
// IPv6 /48 counts as one client too, so that many addresses of one
// network cannot fill the node.
const (
	clientBitsV6  = 64
	networkBitsV4 = 24
	networkBitsV6 = 48
)

func clientKey(a netip.Addr) netip.Prefix {
	if a.Is4() {
		return netip.PrefixFrom(a, 32)
	}
	p, _ := a.Prefix(clientBitsV6)
	return p
}

func networkKey(a netip.Addr) netip.Prefix {
	bits := networkBitsV6
	if a.Is4() {
		bits = networkBitsV4
	}
	p, _ := a.Prefix(bits)
	return p
}

// connLimiter bounds the open connections: MaxConnectionsPerClient per
// client (an IPv4 address or an IPv6 /64; under pressure, an IPv4 /24 or
// IPv6 /48), closing the excess at once; and MaxConnections for all. At
// the cap, the connection idle the longest (no request in flight: keep-alive,
// or no request yet) is closed to make room, so idle floods cannot
// lock anyone out; when every connection is busy, new ones wait in the
// kernel's accept queue, holding none of our file descriptors. The last
// operatorReserve slots are for UnlimitedClients only.
type connLimiter struct {
	net.Listener
	max       int
	perClient int
	exempt    []netip.Prefix
	reserve   int
	log       *slog.Logger

	room      chan struct{} // a slot was freed or a connection went idle
	done      chan struct{} // the listener was closed
	closeOnce sync.Once

	mu          sync.Mutex
	open        int
	byClient    map[netip.Prefix]int
	byNetwork   map[netip.Prefix]int
	conns       map[*limitedConn]struct{}
	refused     int
	evicted     int
	lastWarning time.Time
}

// tooManyConnections is written to a refused connection before closing
// it; the client may not read it (it may not have sent anything yet), so
// it is a courtesy, not a protocol.
const tooManyConnections = "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n" +
	"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 38\r\n\r\n" +
	"too many connections from your address"

const nodeBusy = "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n" +
	"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 33\r\n\r\n" +
	"too many connections on this node"

func (l *connLimiter) Accept() (net.Conn, error) {
	for {
		if err := l.waitRoom(); err != nil {
			return nil, err
		}
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		addr := remoteAddr(c)
		exempt := !addr.IsValid() || l.isExempt(addr)
		l.mu.Lock()
		if !exempt {
			if why := l.overClientLimit(addr); why != "" {
				l.refuseLocked(c, addr, why, tooManyConnections)
				continue
			}
		}
		var victim *limitedConn
		if limit := l.limitFor(exempt); limit > 0 && l.open >= limit {
			if victim = l.oldestIdleLocked(); victim == nil {
				// Busy connections fill what this client may take.
				l.refuseLocked(c, addr, "node at its connection cap", nodeBusy)
				continue
			}
			l.releaseLocked(victim)
			l.evicted++
		}
		lc := &limitedConn{Conn: c, l: l, idleSince: time.Now()}
		if !exempt && l.perClient > 0 {
			lc.client, lc.network = clientKey(addr), networkKey(addr)
			l.byClient[lc.client]++
			l.byNetwork[lc.network]++
		}
		l.open++
		l.conns[lc] = struct{}{}
		l.mu.Unlock()
		if victim != nil {
			// The server's goroutine of that connection sees its read fail
			// and closes it (release is done once).
			_ = victim.Conn.Close()
			l.warn("closing the longest idle connections at the connection cap", addr)
		}
		return lc, nil
	}
}

// limitFor is the cap a new connection is held to: exempt clients may
// take the operator's reserve.
func (l *connLimiter) limitFor(exempt bool) int {
	if l.max <= 0 {
		return 0
	}
	if exempt {
		return l.max
	}
	return max(l.max-l.reserve, 1)
}

// overClientLimit says why addr may not open one more connection, or "".
func (l *connLimiter) overClientLimit(addr netip.Addr) string {
	if l.perClient <= 0 {
		return ""
	}
	if l.byClient[clientKey(addr)] >= l.perClient {
		return "per-client limit"
	}
	if l.max > 0 && l.open >= l.max/2 && l.byNetwork[networkKey(addr)] >= l.perClient {
		return "per-network limit under pressure"
	}
	return ""
}

func (l *connLimiter) refuseLocked(c net.Conn, addr netip.Addr, why, answer string) {
	l.refused++
	l.mu.Unlock()
	l.warn("closing connections beyond the "+why, addr)
	// A fresh socket's send buffer is empty: this write does not block.
	_ = c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	_, _ = io.WriteString(c, answer)
	_ = c.Close()
}

// warn logs at most once a minute, with what was refused and evicted since.
func (l *connLimiter) warn(msg string, addr netip.Addr) {
	l.mu.Lock()
	if time.Since(l.lastWarning) < time.Minute {
		l.mu.Unlock()
		return
	}
	refused, evicted := l.refused, l.evicted
	l.lastWarning, l.refused, l.evicted = time.Now(), 0, 0
	l.mu.Unlock()
	l.log.Warn(msg, "client", addr.String(), "limit", l.perClient, "cap", l.max,
		"refused_since_last_warning", refused, "idle_closed_since_last_warning", evicted)
}

// waitRoom returns once a connection can be taken: below the cap, or an
// idle one to close for it.
func (l *connLimiter) waitRoom() error {
	for {
		l.mu.Lock()
		ok := l.max <= 0 || l.open < l.max || l.oldestIdleLocked() != nil
		l.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-l.room:
		case <-l.done:
			return net.ErrClosed
		}
	}
}

func (l *connLimiter) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return l.Listener.Close()
}

func (l *connLimiter) signal() {
	select {
	case l.room <- struct{}{}:
	default:
	}
}

// oldestIdleLocked is the connection idle the longest, or nil.
func (l *connLimiter) oldestIdleLocked() *limitedConn {
	var oldest *limitedConn
	for c := range l.conns {
		if !c.idleSince.IsZero() && (oldest == nil || c.idleSince.Before(oldest.idleSince)) {
			oldest = c
		}
	}
	return oldest
}

// releaseLocked forgets c's slot (once).
func (l *connLimiter) releaseLocked(c *limitedConn) {
	if _, ok := l.conns[c]; !ok {
		return
	}
	delete(l.conns, c)
	l.open--
	if c.client.IsValid() {
		if l.byClient[c.client]--; l.byClient[c.client] <= 0 {
			delete(l.byClient, c.client)
		}
		if l.byNetwork[c.network]--; l.byNetwork[c.network] <= 0 {
			delete(l.byNetwork, c.network)
		}
	}
	l.signal()
}

// connState follows net/http's view of c: a connection with no request
// in flight may be closed for a newcomer at the cap.
func (l *connLimiter) connState(c net.Conn, st http.ConnState) {
	lc, ok := c.(*limitedConn)
	if !ok || lc.l != l {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	switch st {
	case http.StateIdle:
		lc.idleSince = time.Now()
		l.signal()
	case http.StateActive, http.StateHijacked:
		lc.idleSince = time.Time{}
	case http.StateClosed:
		l.releaseLocked(lc)
	}
}

func (l *connLimiter) isExempt(a netip.Addr) bool {
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

// limitedConn holds one slot of its connLimiter until closed.
type limitedConn struct {
	net.Conn
	l               *connLimiter
	client, network netip.Prefix // zero for exempt clients
	idleSince       time.Time    // zero while a request is in flight (guarded by l.mu)
}

func (c *limitedConn) Close() error {
	c.l.mu.Lock()
	c.l.releaseLocked(c)
	c.l.mu.Unlock()
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
