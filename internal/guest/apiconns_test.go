package guest

import (
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"testing"
	"time"
)

// Beyond the cap the connection idle for longest is closed at once (its
// reader woken), a busy one never; with every connection busy the new
// one is refused; closed connections give their place back.
func TestAPIConnsCap(t *testing.T) {
	a := newAPIConns()
	a.setMax(3)
	pipe := func() (net.Conn, net.Conn) {
		x, y := net.Pipe()
		t.Cleanup(func() { x.Close(); y.Close() })
		return x, y
	}
	var conns [3]net.Conn
	for i := range conns {
		conns[i], _ = pipe()
		if !a.admit(conns[i]) {
			t.Fatalf("connection %d refused under the cap", i)
		}
		time.Sleep(time.Millisecond) // distinct idle times
	}
	a.state(conns[0], http.StateActive) // busy: never evicted
	read := make(chan error, 1)
	go func() { _, err := conns[1].Read(make([]byte, 1)); read <- err }()
	fourth, _ := pipe()
	if !a.admit(fourth) {
		t.Fatal("a new connection was refused while idle ones were open")
	}
	select {
	case err := <-read:
		if !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, io.ErrClosedPipe) {
			t.Errorf("evicted connection's reader: %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("the oldest idle connection was not closed at once")
	}
	if n := a.count(); n != 3 {
		t.Errorf("%d connections counted, want 3", n)
	}
	a.state(conns[2], http.StateActive)
	a.state(fourth, http.StateActive)
	fifth, _ := pipe()
	if a.admit(fifth) {
		t.Error("admitted beyond the cap with every connection busy")
	}
	a.state(conns[0], http.StateClosed)
	a.state(conns[1], http.StateActive) // evicted already: not counted again
	if !a.admit(fifth) || a.count() != 3 {
		t.Errorf("a closed connection's place was not given back (%d counted)", a.count())
	}
}
