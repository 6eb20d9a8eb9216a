package httpapi

import (
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"
)

// pipeListener hands out one end of in-memory connections that claim the
// remote address they were dialled "from": the kernel's part of a
// listener, for addresses loopback cannot have (many IPv6 addresses).
type pipeListener struct {
	conns chan net.Conn
	done  chan struct{}
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn, 1024), done: make(chan struct{})}
}

type addrConn struct {
	net.Conn
	remote net.Addr
}

func (c addrConn) RemoteAddr() net.Addr { return c.remote }

func (p *pipeListener) dial(t *testing.T, from string) net.Conn {
	t.Helper()
	server, client := net.Pipe()
	t.Cleanup(func() { client.Close(); server.Close() })
	p.conns <- addrConn{Conn: server, remote: &net.TCPAddr{IP: net.ParseIP(from), Port: 40000}}
	return client
}

func (p *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-p.conns:
		return c, nil
	case <-p.done:
		return nil, net.ErrClosed
	}
}
func (p *pipeListener) Close() error   { return nil }
func (p *pipeListener) Addr() net.Addr { return &net.TCPAddr{} }

// acceptOne dials from "from" and reports whether the limiter kept the
// connection (and returns it) or refused it (503 on the pipe, closed).
func acceptOne(t *testing.T, accepted <-chan net.Conn, p *pipeListener, from string) (net.Conn, bool) {
	t.Helper()
	client := p.dial(t, from)
	refused := make(chan bool, 1)
	go func() {
		buf := make([]byte, 256)
		n, _ := client.Read(buf)
		refused <- strings.Contains(string(buf[:n]), "503")
	}()
	select {
	case c := <-accepted:
		return c, true
	case r := <-refused:
		if !r {
			t.Fatalf("connection from %s closed without a 503", from)
		}
		return nil, false
	case <-time.After(2 * time.Second):
		t.Fatalf("accept from %s blocked", from)
		return nil, false
	}
}

func newLimiter(t *testing.T, l Limits) (<-chan net.Conn, *pipeListener, *Server) {
	p := newPipeListener()
	s := New(Options{Version: "test", Limits: l, Logger: quiet})
	ln := s.Listener(p)
	accepted := make(chan net.Conn)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	t.Cleanup(func() { close(p.done) })
	return accepted, p, s
}

// All addresses of one IPv6 /64 are one client.
func TestPerClientLimitKeysIPv6By64(t *testing.T) {
	accepted, p, _ := newLimiter(t, Limits{MaxConnections: 1000, MaxConnectionsPerClient: 4})
	for i := range 4 {
		if _, ok := acceptOne(t, accepted, p, "2001:db8:1:2::"+string(rune('a'+i))); !ok {
			t.Fatalf("connection %d refused", i)
		}
	}
	if _, ok := acceptOne(t, accepted, p, "2001:db8:1:2:ffff::1"); ok {
		t.Errorf("a 5th address of the same /64 was accepted")
	}
	if _, ok := acceptOne(t, accepted, p, "2001:db8:1:3::1"); !ok {
		t.Errorf("another /64 was refused")
	}
}

// Under pressure (half the cap), an IPv4 /24 is one client: many
// addresses of one network cannot fill the node, another network and the
// operator still get in.
func TestPerNetworkLimitUnderPressure(t *testing.T) {
	accepted, p, _ := newLimiter(t, Limits{MaxConnections: 40, MaxConnectionsPerClient: 4,
		UnlimitedClients: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}})
	kept := 0
	for a := range 20 {
		for range 4 {
			if _, ok := acceptOne(t, accepted, p, "198.51.100."+itoa(a+1)); ok {
				kept++
			}
		}
	}
	// 20 (the pressure line) from the network freely, then none: a /24
	// already holds 4 or more.
	if kept != 20 {
		t.Errorf("one /24 opened %d connections, want 20 (half the cap of 40)", kept)
	}
	if _, ok := acceptOne(t, accepted, p, "203.0.113.7"); !ok {
		t.Errorf("another network was refused")
	}
	if _, ok := acceptOne(t, accepted, p, "127.0.0.1"); !ok {
		t.Errorf("the operator was refused")
	}
}

// At the cap, the connection idle the longest gives way to a newcomer;
// connections with a request in flight never do; the last slots are the
// operator's.
func TestCapClosesLongestIdleAndKeepsOperatorSlots(t *testing.T) {
	accepted, p, s := newLimiter(t, Limits{MaxConnections: 16, MaxConnectionsPerClient: 100,
		UnlimitedClients: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}})
	cl := s.conns.Load()
	if cl.reserve != 2 {
		t.Fatalf("reserve %d, want 2 of 16", cl.reserve)
	}
	var conns []net.Conn
	for i := range 14 {
		c, ok := acceptOne(t, accepted, p, "192.0.2."+itoa(i+1))
		if !ok {
			t.Fatalf("connection %d refused", i)
		}
		conns = append(conns, c)
		time.Sleep(time.Millisecond)
	}
	// All busy: a client is refused, the operator gets the reserve.
	for _, c := range conns {
		cl.connState(c, http.StateActive)
	}
	if _, ok := acceptOne(t, accepted, p, "192.0.2.200"); ok {
		t.Errorf("a client took an operator slot")
	}
	op, ok := acceptOne(t, accepted, p, "127.0.0.1")
	if !ok {
		t.Fatalf("the operator was refused with %d of 16 busy", len(conns))
	}
	cl.connState(op, http.StateActive)
	// Two go idle: the one idle longer is closed for the next newcomer.
	cl.connState(conns[5], http.StateIdle)
	time.Sleep(2 * time.Millisecond)
	cl.connState(conns[9], http.StateIdle)
	if _, ok := acceptOne(t, accepted, p, "192.0.2.201"); !ok {
		t.Fatalf("newcomer refused though a connection was idle")
	}
	if !closedPipe(conns[5]) || closedPipe(conns[9]) || closedPipe(conns[0]) {
		t.Errorf("closed: longest idle %v, other idle %v, busy %v; want true false false",
			closedPipe(conns[5]), closedPipe(conns[9]), closedPipe(conns[0]))
	}
	// 14 for clients (one closed, one new), 1 for the operator.
	if cl.open != 15 {
		t.Errorf("%d open, want 15", cl.open)
	}
	// Closing releases the slot.
	conns[0].Close()
	if cl.open != 14 {
		t.Errorf("%d open after a close, want 14", cl.open)
	}
}

// closedPipe reports whether the server end of a pipe was closed (its
// own Write then fails with io.ErrClosedPipe).
func closedPipe(c net.Conn) bool {
	_ = c.SetWriteDeadline(time.Now().Add(10 * time.Millisecond))
	_, err := c.(*limitedConn).Write([]byte("x"))
	return err != nil && strings.Contains(err.Error(), "closed")
}

func itoa(i int) string { return strconv.Itoa(i) }
