package firecracker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"
)

// ErrHandshake tags a hybrid-vsock peer that answered something other
// than "OK <port>". Firecracker never does that (it closes the connection
// when the guest refuses), so it means a wrong socket: retrying cannot help.
var ErrHandshake = errors.New("hybrid vsock handshake failed")

// Timing of DialVsock's attempts.
const (
	// vsockAttemptTimeout bounds one CONNECT exchange; Firecracker itself
	// gives up on an unanswered guest connection after about 2 s and closes
	// the socket, which ends the attempt earlier.
	vsockAttemptTimeout = 5 * time.Second
	vsockRetryFirst     = 20 * time.Millisecond
	vsockRetryMax       = 250 * time.Millisecond
	// maxHandshakeLine bounds the answer line; "OK 4294967295\n" is 14 bytes.
	maxHandshakeLine = 64
)

// DialVsock connects to port of the guest behind Firecracker's hybrid
// vsock socket udsPath: it connects to the unix socket, writes
// "CONNECT <port>\n" and expects "OK <host port>\n"; the connection is then
// the guest's stream. Until ctx ends it retries what booting looks like —
// the socket not there yet, or Firecracker closing the connection because
// nothing listens on port in the guest yet. A peer answering anything else
// fails at once with ErrHandshake.
//
// The answer is read one byte at a time so that nothing the guest sends
// right after it is consumed here: the returned net.Conn is the raw
// socket, with no buffer in front of it.
func DialVsock(ctx context.Context, udsPath string, port uint32) (net.Conn, error) {
	wait := vsockRetryFirst
	var last error
	for attempt := 1; ; attempt++ {
		conn, err := vsockAttempt(ctx, udsPath, port)
		if err == nil {
			return conn, nil
		}
		if errors.Is(err, ErrHandshake) {
			return nil, err
		}
		last = err
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("vsock %s port %d: gave up after %d attempts: %w (last: %v)", udsPath, port, attempt, ctx.Err(), last)
		case <-t.C:
		}
		wait = min(wait*2, vsockRetryMax)
	}
}

func vsockAttempt(ctx context.Context, udsPath string, port uint32) (net.Conn, error) {
	actx, cancel := context.WithTimeout(ctx, vsockAttemptTimeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(actx, "unix", udsPath)
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			conn.Close()
		}
	}()
	// The deadline ends a read blocked on a silent peer when ctx ends.
	deadline, _ := actx.Deadline()
	// Failing, it means conn is closed already: nothing left to unblock.
	stop := context.AfterFunc(actx, func() { _ = conn.SetDeadline(time.Now()) })
	defer stop()
	if err := conn.SetDeadline(deadline); err != nil {
		return nil, err
	}
	if _, err := fmt.Fprintf(conn, "CONNECT %d\n", port); err != nil {
		return nil, err
	}
	line, err := readLine(conn)
	if err != nil {
		return nil, err
	}
	rest, found := strings.CutPrefix(line, "OK ")
	if !found || rest == "" || strings.Trim(rest, "0123456789") != "" {
		return nil, fmt.Errorf("%w: %s answered %q to CONNECT %d", ErrHandshake, udsPath, line, port)
	}
	if !stop() {
		// ctx ended while we finished: the deadline may already be set.
		return nil, actx.Err()
	}
	if err := conn.SetDeadline(time.Time{}); err != nil {
		return nil, err
	}
	ok = true
	return conn, nil
}

// readLine reads up to and including '\n', one byte per read, and returns
// the line without it.
func readLine(conn net.Conn) (string, error) {
	var buf [maxHandshakeLine]byte
	for n := 0; n < len(buf); {
		m, err := conn.Read(buf[n : n+1])
		if m == 1 {
			if buf[n] == '\n' {
				return string(buf[:n]), nil
			}
			n++
			continue
		}
		if err != nil {
			return "", fmt.Errorf("reading CONNECT answer: %w", err)
		}
	}
	return "", fmt.Errorf("%w: answer longer than %d bytes", ErrHandshake, maxHandshakeLine)
}
