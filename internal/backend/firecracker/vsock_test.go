package firecracker

import (
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// readConnect reads the CONNECT line byte by byte, as Firecracker does not
// buffer past it either.
func readConnect(c net.Conn) (string, error) {
	var b []byte
	one := make([]byte, 1)
	for {
		if _, err := c.Read(one); err != nil {
			return "", err
		}
		if one[0] == '\n' {
			return string(b), nil
		}
		b = append(b, one[0])
	}
}

// send writes the fake peer's answer. A failed write shows on the dialing
// side as a handshake error or a wrong stream, which each test checks.
func send(c net.Conn, s string) { _, _ = io.WriteString(c, s) }

func listenPeer(t *testing.T, path string, handle func(c net.Conn, line string)) net.Listener {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		// Error, not Fatal: some tests listen from a goroutine of their own.
		t.Error(err)
		return nil
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				line, err := readConnect(c)
				if err != nil {
					return
				}
				handle(c, line)
			}()
		}
	}()
	return l
}

// echoPeer accepts CONNECT 52, then answers the guest stream's first four
// bytes with "echo:" and them.
func echoPeer(c net.Conn, line string) {
	if line != "CONNECT 52" {
		send(c, "BAD "+line+"\n")
		return
	}
	send(c, "OK 1073741824\n")
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil {
		return
	}
	send(c, "echo:"+string(buf))
}

func TestDialVsock(t *testing.T) {
	for _, tc := range []struct {
		name    string
		handle  func(c net.Conn, line string)
		timeout time.Duration
		wantErr error
		check   func(t *testing.T, c net.Conn)
	}{
		{
			name:   "handshake then guest stream",
			handle: echoPeer,
			check: func(t *testing.T, c net.Conn) {
				if _, err := c.Write([]byte("ping")); err != nil {
					t.Fatal(err)
				}
				got, _ := io.ReadAll(c)
				if string(got) != "echo:ping" {
					t.Errorf("stream = %q", got)
				}
			},
		},
		{
			name: "bytes right after OK are not lost",
			handle: func(c net.Conn, _ string) {
				// One write: the guest's first bytes share a segment with OK.
				send(c, "OK 1073741825\nGUEST-HELLO\x00more")
			},
			check: func(t *testing.T, c net.Conn) {
				got, _ := io.ReadAll(c)
				if string(got) != "GUEST-HELLO\x00more" {
					t.Errorf("after handshake read %q", got)
				}
			},
		},
		{
			name:    "error line",
			handle:  func(c net.Conn, _ string) { send(c, "ERR no such port\n") },
			timeout: 5 * time.Second,
			wantErr: ErrHandshake,
		},
		{
			name:    "OK without port",
			handle:  func(c net.Conn, _ string) { send(c, "OK \n") },
			timeout: 5 * time.Second,
			wantErr: ErrHandshake,
		},
		{
			name:    "endless line",
			handle:  func(c net.Conn, _ string) { send(c, strings.Repeat("x", 200)) },
			timeout: 5 * time.Second,
			wantErr: ErrHandshake,
		},
		{
			// Firecracker closes the connection when the guest is not
			// listening yet: retried until ctx ends.
			name:    "guest never listens",
			handle:  func(net.Conn, string) {},
			timeout: 300 * time.Millisecond,
			wantErr: context.DeadlineExceeded,
		},
		{
			name: "silent peer",
			handle: func(c net.Conn, _ string) {
				time.Sleep(2 * time.Second)
			},
			timeout: 300 * time.Millisecond,
			wantErr: context.DeadlineExceeded,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "v.sock")
			listenPeer(t, path, tc.handle)
			timeout := tc.timeout
			if timeout == 0 {
				timeout = 5 * time.Second
			}
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			began := time.Now()
			c, err := DialVsock(ctx, path, GuestVsockPort)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				if time.Since(began) > timeout+time.Second {
					t.Errorf("took %v with a %v context", time.Since(began), timeout)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			tc.check(t, c)
		})
	}
}

// TestDialVsockRetriesUntilPeerAppears covers a VM still booting: the
// socket is missing at first, then the guest refuses twice, then answers.
func TestDialVsockRetriesUntilPeerAppears(t *testing.T) {
	path := filepath.Join(t.TempDir(), "v.sock")
	var refusals atomic.Int32
	refusals.Store(2)
	go func() {
		time.Sleep(150 * time.Millisecond)
		listenPeer(t, path, func(c net.Conn, _ string) {
			if refusals.Add(-1) >= 0 {
				return // closed without OK, as Firecracker does
			}
			send(c, "OK 1073741826\nready")
		})
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := DialVsock(ctx, path, GuestVsockPort)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got, _ := io.ReadAll(c)
	if string(got) != "ready" {
		t.Errorf("read %q", got)
	}
}

func TestDialVsockCanceled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	go func() { time.Sleep(100 * time.Millisecond); cancel() }()
	_, err := DialVsock(ctx, filepath.Join(t.TempDir(), "never"), GuestVsockPort)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v", err)
	}
}
