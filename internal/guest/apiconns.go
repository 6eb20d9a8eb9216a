package guest

import (
	"net"
	"net/http"
	"sync"
	"time"
)

// Guest API connection bounds used until ServeGuestAPI's handler gives
// its own (guestapi.ConnLimits): a program could otherwise hold any number
// of idle connections open, each costing the supervisor memory.
const (
	defaultAPIConns             = 64
	defaultAPIReadHeaderTimeout = 10 * time.Second
	defaultAPIIdleTimeout       = 60 * time.Second
)

// ConnectionLimiter is implemented by a guest API handler that bounds its
// connections: how many may be open at once, how long one may take to
// send a request's headers, how long one may stay idle between requests.
type ConnectionLimiter interface {
	ConnectionLimits() (maxConns int, readHeaderTimeout, idleTimeout time.Duration)
}

// apiConns counts the guest API connections of one session. Beyond max,
// the connection idle for longest (no request in progress) is closed to
// make room, so a program that hoards connections cannot lock itself or
// anything else out; when every connection is busy the new one is closed.
type apiConns struct {
	mu    sync.Mutex
	max   int
	conns map[net.Conn]*apiConn
}

type apiConn struct {
	busy  bool      // a request is being read or answered
	since time.Time // when it last became idle
}

func newAPIConns() *apiConns {
	return &apiConns{max: defaultAPIConns, conns: map[net.Conn]*apiConn{}}
}

func (a *apiConns) setMax(n int) {
	if n > 0 {
		a.mu.Lock()
		a.max = n
		a.mu.Unlock()
	}
}

// admit counts c in, evicting an idle connection if needed; false means c
// has to be refused (every connection busy).
func (a *apiConns) admit(c net.Conn) bool {
	a.mu.Lock()
	var victim net.Conn
	if len(a.conns) >= a.max {
		var oldest time.Time
		for k, v := range a.conns {
			if !v.busy && (victim == nil || v.since.Before(oldest)) {
				victim, oldest = k, v.since
			}
		}
		if victim == nil {
			a.mu.Unlock()
			return false
		}
		delete(a.conns, victim)
	}
	a.conns[c] = &apiConn{since: time.Now()}
	a.mu.Unlock()
	if victim != nil {
		closeNow(victim)
	}
	return true
}

// state follows http.Server's ConnState for the connections admitted.
func (a *apiConns) state(c net.Conn, s http.ConnState) {
	a.mu.Lock()
	defer a.mu.Unlock()
	e, ok := a.conns[c]
	if !ok {
		return // evicted already
	}
	switch s {
	case http.StateActive:
		e.busy = true
	case http.StateIdle:
		e.busy, e.since = false, time.Now()
	case http.StateHijacked, http.StateClosed:
		delete(a.conns, c)
	}
}

func (a *apiConns) count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.conns)
}

// closeNow ends a connection that a server goroutine may be reading: the
// expired deadline wakes the reader at once (a yamux stream's Close alone
// only half-closes it until the guest answers).
func closeNow(c net.Conn) {
	_ = c.SetDeadline(time.Now())
	_ = c.Close()
}
