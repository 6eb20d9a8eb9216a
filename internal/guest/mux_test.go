package guest

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/yamux"
)

// countingConn records the size of every write that reaches the channel.
type countingConn struct {
	net.Conn
	mu     sync.Mutex
	writes []int
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.writes = append(c.writes, len(p))
	c.mu.Unlock()
	return c.Conn.Write(p)
}

// TestCoalescedFrames: data frames reach the channel in one write each
// (header and body together), big bodies still pass whole, and the other
// end, a plain yamux session, reads them unchanged.
func TestCoalescedFrames(t *testing.T) {
	a, b := net.Pipe()
	counted := &countingConn{Conn: a}
	log := slog.New(slog.DiscardHandler)
	client, err := yamux.Client(coalesceFrames(counted), MuxConfig(log, time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := yamux.Server(b, MuxConfig(log, time.Second))
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()

	small := bytes.Repeat([]byte("x"), 100)
	big := bytes.Repeat([]byte("y"), 300<<10) // above maxCoalesce and one window
	got := make(chan []byte, 1)
	go func() {
		s, err := server.AcceptStream()
		if err != nil {
			got <- nil
			return
		}
		data, _ := io.ReadAll(s)
		got <- data
	}()
	s, err := client.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	counted.mu.Lock()
	counted.writes = nil // the stream's opening frame
	counted.mu.Unlock()
	if _, err := s.Write(small); err != nil {
		t.Fatal(err)
	}
	counted.mu.Lock()
	first := append([]int(nil), counted.writes...)
	counted.mu.Unlock()
	if len(first) != 1 || first[0] != yamuxHeaderSize+len(small) {
		t.Errorf("a 100-byte frame reached the channel as writes %v, want one of %d bytes", first, yamuxHeaderSize+len(small))
	}
	if _, err := s.Write(big); err != nil {
		t.Fatal(err)
	}
	s.Close()
	select {
	case data := <-got:
		if !bytes.Equal(data, append(small, big...)) {
			t.Fatalf("peer read %d bytes, want %d unchanged", len(data), len(small)+len(big))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("peer read nothing")
	}
}
