package guest

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

// MuxConfig returns the yamux settings of one end of the guest channel.
//
// closeTimeout bounds how long a half-closed stream waits for the peer's
// FIN before it is reset: it is what eventually frees a stream whose other
// end stopped reading (a client that went away mid-stream).
func MuxConfig(log *slog.Logger, closeTimeout time.Duration) *yamux.Config {
	cfg := yamux.DefaultConfig()
	// Bigger windows than the 256 KiB default keep large bodies moving over
	// a channel whose round trip can be slow (ptrace, TCG).
	cfg.MaxStreamWindowSize = 1 << 20
	cfg.KeepAliveInterval = 15 * time.Second
	cfg.StreamCloseTimeout = closeTimeout
	cfg.LogOutput = nil
	cfg.Logger = yamuxLogger{log}
	return cfg
}

// Serve starts the agent's end of the multiplexer over ch.
func Serve(ch io.ReadWriteCloser, log *slog.Logger, closeTimeout time.Duration) (*yamux.Session, error) {
	return yamux.Server(coalesceFrames(ch), MuxConfig(log, closeTimeout))
}

// coalesceFrames wraps the channel so that each yamux data frame reaches it
// in one write. yamux writes a frame's 12-byte header and its body with two
// calls; on a channel where every write is a trapped system call (the
// agent's stdout under gVisor) that doubled the writes per request, the
// largest share of the agent's CPU in a profile of warm requests. Both ends
// use it; it knows only the header layout of yamux's spec (version, type,
// flags, stream id, length; type 0 is data, whose length is the body's).
func coalesceFrames(ch io.ReadWriteCloser) io.ReadWriteCloser {
	return &frameWriter{ReadWriteCloser: ch}
}

const (
	yamuxHeaderSize = 12
	// maxCoalesce bounds the copy: a bigger body is written on its own,
	// where one more small write no longer matters.
	maxCoalesce = 64 << 10
)

// frameWriter is only written by yamux's send loop, one frame at a time.
type frameWriter struct {
	io.ReadWriteCloser
	held bool // buf holds a data frame header whose body comes next
	buf  []byte
}

func (f *frameWriter) Write(p []byte) (int, error) {
	if f.held {
		f.held = false
		f.buf = append(f.buf, p...)
		n, err := f.ReadWriteCloser.Write(f.buf)
		f.buf = f.buf[:0]
		return max(n-yamuxHeaderSize, 0), err
	}
	if len(p) == yamuxHeaderSize && p[0] == 0 && p[1] == 0 {
		if n := binary.BigEndian.Uint32(p[8:]); n > 0 && n <= maxCoalesce {
			f.buf = append(f.buf[:0], p...)
			f.held = true
			return len(p), nil
		}
	}
	return f.ReadWriteCloser.Write(p)
}

// yamuxLogger routes yamux's printf logs to slog at debug level: they are
// mostly "session closed" noise at the end of every sandbox.
type yamuxLogger struct{ log *slog.Logger }

func (l yamuxLogger) Print(v ...any) { l.log.Debug(fmt.Sprint(v...), "component", "yamux") }
func (l yamuxLogger) Printf(format string, v ...any) {
	l.log.Debug(fmt.Sprintf(format, v...), "component", "yamux")
}
func (l yamuxLogger) Println(v ...any) { l.log.Debug(fmt.Sprint(v...), "component", "yamux") }

// OpenStream opens a stream on sess and writes its type byte. ctx bounds
// the wait for a free slot among in-flight stream openings.
func OpenStream(ctx context.Context, sess *yamux.Session, kind byte) (net.Conn, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	type result struct {
		s   *yamux.Stream
		err error
	}
	res := make(chan result, 1)
	go func() {
		s, err := sess.OpenStream()
		res <- result{s, err}
	}()
	select {
	case r := <-res:
		if r.err != nil {
			return nil, fmt.Errorf("open stream: %w", r.err)
		}
		if _, err := r.s.Write([]byte{kind}); err != nil {
			r.s.Close()
			return nil, fmt.Errorf("write stream type: %w", err)
		}
		return r.s, nil
	case <-ctx.Done():
		go func() {
			if r := <-res; r.s != nil {
				r.s.Close()
			}
		}()
		return nil, ctx.Err()
	}
}

// ReadStreamType reads the type byte of an accepted stream, bounded by
// timeout so a peer that opens streams and stays silent cannot pile them up.
func ReadStreamType(c net.Conn, timeout time.Duration) (byte, error) {
	if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return 0, err
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return 0, fmt.Errorf("read stream type: %w", err)
	}
	return b[0], c.SetReadDeadline(time.Time{})
}

// Splice copies bytes both ways between a and b until both directions
// ended. An EOF in one direction is passed on as a half-close, so a request
// body can end while the response keeps streaming (and websockets work);
// an error in either direction tears both connections down.
func Splice(a, b net.Conn) error {
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	copyHalf := func(dst, src net.Conn) {
		defer wg.Done()
		_, err := io.Copy(dst, src)
		if err == nil {
			if err = closeWrite(dst); err == nil {
				return
			}
		}
		mu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		mu.Unlock()
		// Unblock the other direction: nobody will read its output.
		a.Close()
		b.Close()
	}
	wg.Add(2)
	go copyHalf(a, b)
	go copyHalf(b, a)
	wg.Wait()
	a.Close()
	b.Close()
	if errors.Is(firstErr, net.ErrClosed) || errors.Is(firstErr, yamux.ErrStreamClosed) {
		return nil
	}
	return firstErr
}

func closeWrite(c net.Conn) error {
	switch c := c.(type) {
	case *yamux.Stream:
		// A yamux Close is a half-close: it sends FIN and keeps reading.
		return c.Close()
	case interface{ CloseWrite() error }:
		return c.CloseWrite()
	default:
		return c.Close()
	}
}

// lineWriter writes JSON lines on a control stream; one writer at a time.
type lineWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lineWriter) send(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	_, err = l.w.Write(append(b, '\n'))
	return err
}

// maxControlLine bounds a control message; a Config with many variables is
// still far below it.
const maxControlLine = 1 << 20

// readLine reads one JSON line from a control stream into v.
func readLine(r *bufio.Reader, v any) error {
	var line []byte
	for {
		chunk, isPrefix, err := r.ReadLine()
		if err != nil {
			return err
		}
		line = append(line, chunk...)
		if len(line) > maxControlLine {
			return errors.New("control line too long")
		}
		if !isPrefix {
			break
		}
	}
	if err := json.Unmarshal(line, v); err != nil {
		return fmt.Errorf("decode control line: %w", err)
	}
	return nil
}

// ControlConn is one end of the control stream: JSON lines both ways.
type ControlConn struct {
	c net.Conn
	r *bufio.Reader
	w lineWriter
}

// NewControlConn wraps a control stream whose type byte was already handled.
func NewControlConn(c net.Conn) *ControlConn {
	return &ControlConn{c: c, r: bufio.NewReader(c), w: lineWriter{w: c}}
}

// Send writes v as one JSON line. Safe for concurrent use.
func (cc *ControlConn) Send(v any) error { return cc.w.send(v) }

// Receive reads one JSON line into v. Not safe for concurrent use.
func (cc *ControlConn) Receive(v any) error { return readLine(cc.r, v) }

// Close closes the underlying stream.
func (cc *ControlConn) Close() error { return cc.c.Close() }
