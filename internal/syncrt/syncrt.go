// Package syncrt is an http.RoundTripper for the supervisor's hop to a
// program: a request without a body is written and its answer read on the
// caller's goroutine, over a kept-alive connection, where net/http's
// Transport hands every request to a writer goroutine and every answer
// back from a reader goroutine. On two cores those hand-offs were a
// quarter of the supervisor's CPU per warm request (pprof: goroutine
// wake-ups). Everything else (bodies, upgrades) goes to the fallback
// Transport, which reads an early answer while the body is still being
// sent and hands upgraded connections over.
package syncrt

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"
)

// DefaultMaxResponseHeaderBytes bounds a program's status line and
// headers when Transport.MaxResponseHeaderBytes is zero: the client's own
// request headers get as much (HTTP_MAX_HEADER_BYTES), and aleph-vm's
// aiohttp refuses any header line beyond 8 KiB.
const DefaultMaxResponseHeaderBytes = 64 << 10

// max1xxResponses bounds the informational answers dropped before the
// final one, as net/http's Transport does.
const max1xxResponses = 5

// HeaderTooLargeError is a program's answer whose head (status line,
// headers, informational answers before it) exceeds the bound: the
// supervisor stops reading it rather than hold it in memory.
type HeaderTooLargeError struct {
	Limit int64
}

func (e *HeaderTooLargeError) Error() string {
	return fmt.Sprintf("response header from the program exceeds %d bytes", e.Limit)
}

// BadResponseError is an answer that is not HTTP/1.1 net/http accepts
// (a malformed status line or header, too many informational answers).
type BadResponseError struct {
	Err error
}

func (e *BadResponseError) Error() string {
	return "malformed response from the program: " + e.Err.Error()
}
func (e *BadResponseError) Unwrap() error { return e.Err }

// Transport sends bodiless GET, HEAD and OPTIONS requests itself and
// everything else through Fallback.
type Transport struct {
	// Dial opens a new connection to the program.
	Dial func(ctx context.Context) (net.Conn, error)
	// Fallback carries what this transport does not.
	Fallback http.RoundTripper
	// MaxIdle bounds the connections kept for reuse.
	MaxIdle int
	// IdleTimeout closes a connection left unused this long (it should be
	// below the program server's keep-alive, so that we close first).
	IdleTimeout time.Duration
	// MaxResponseHeaderBytes bounds the head of an answer read here (0:
	// DefaultMaxResponseHeaderBytes). Give the Fallback the same bound
	// (http.Transport.MaxResponseHeaderBytes): its oversized answers are
	// reported as HeaderTooLargeError too.
	MaxResponseHeaderBytes int64

	mu   sync.Mutex
	idle []*conn // most recently used last
}

type conn struct {
	net.Conn
	lr       *limitReader // under br: bounds what an answer's head may take
	br       *bufio.Reader
	bw       *bufio.Writer
	lastUsed time.Time
}

// RoundTrip implements http.RoundTripper.
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	if !t.handles(req) {
		resp, err := t.Fallback.RoundTrip(req)
		return resp, t.fallbackError(err)
	}
	// A kept connection the program closed while idle fails before any
	// byte of answer: such a request was not processed and, being
	// idempotent, is sent once more on a fresh connection.
	for attempt := 0; ; attempt++ {
		c, reused, err := t.get(req.Context(), attempt > 0)
		if err != nil {
			return nil, err
		}
		resp, unanswered, err := t.exchange(req, c)
		if err == nil {
			return resp, nil
		}
		_ = c.Close()
		if !reused || !unanswered || req.Context().Err() != nil {
			return nil, err
		}
	}
}

// handles reports whether the request can go out and come back in one
// goroutine: nothing to send after the headers, nothing to hand over.
func (t *Transport) handles(req *http.Request) bool {
	switch req.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
	default:
		return false
	}
	return (req.Body == nil || req.Body == http.NoBody) && req.ContentLength == 0 &&
		req.Header.Get("Upgrade") == "" && !req.Close
}

// exchange sends the request and reads the head of the answer;
// unanswered says that no byte of it came (the connection was closed or
// failed before).
func (t *Transport) exchange(req *http.Request, c *conn) (resp *http.Response, unanswered bool, err error) {
	ctx := req.Context()
	// Cancelling the request (the client left, the program's time ran out)
	// unblocks whatever read or write is under way.
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer func() {
		if err != nil {
			stop()
			err = fmt.Errorf("program connection: %w", ctxOr(ctx, err))
		}
	}()
	if err := req.Write(c.bw); err != nil {
		return nil, false, err
	}
	if err := c.bw.Flush(); err != nil {
		return nil, true, err
	}
	if _, err := c.br.Peek(1); err != nil {
		return nil, true, err
	}
	// Informational answers (103 Early Hints) are dropped: the client
	// gets the final one. All of them and the final head share one
	// budget; net/http's ReadResponse has none of its own.
	limit := t.maxHeaderBytes()
	c.lr.n = limit
	for n1xx := 0; ; n1xx++ {
		resp, err = http.ReadResponse(c.br, req)
		if err != nil {
			if c.lr.n <= 0 {
				return nil, false, &HeaderTooLargeError{Limit: limit}
			}
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || isNetError(err) {
				return nil, false, err
			}
			return nil, false, &BadResponseError{Err: err}
		}
		if resp.StatusCode >= 200 || resp.StatusCode == http.StatusSwitchingProtocols {
			break
		}
		if n1xx >= max1xxResponses {
			return nil, false, &BadResponseError{Err: fmt.Errorf("more than %d informational answers", max1xxResponses)}
		}
	}
	// The body streams through to the client: no bound here.
	c.lr.n = math.MaxInt64
	resp.Body = &body{ReadCloser: resp.Body, ctx: ctx, t: t, c: c, stop: stop, reusable: !resp.Close}
	return resp, false, nil
}

func (t *Transport) maxHeaderBytes() int64 {
	if t.MaxResponseHeaderBytes > 0 {
		return t.MaxResponseHeaderBytes
	}
	return DefaultMaxResponseHeaderBytes
}

// fallbackError names an oversized head the fallback refused as this
// package does. net/http's Transport reports it only as text
// ("net/http: server response headers exceeded N bytes; aborted").
func (t *Transport) fallbackError(err error) error {
	if err != nil && strings.Contains(err.Error(), "server response headers exceeded") {
		limit := t.maxHeaderBytes()
		if ht, ok := t.Fallback.(*http.Transport); ok && ht.MaxResponseHeaderBytes > 0 {
			limit = ht.MaxResponseHeaderBytes
		}
		return fmt.Errorf("%w (%v)", &HeaderTooLargeError{Limit: limit}, err)
	}
	return err
}

func isNetError(err error) bool {
	var ne net.Error
	return errors.As(err, &ne)
}

// limitReader returns io.EOF once n bytes were read.
type limitReader struct {
	r io.Reader
	n int64
}

func (l *limitReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.r.Read(p)
	l.n -= int64(n)
	return n, err
}

// ctxOr prefers the request's own end to the I/O error it caused.
func ctxOr(ctx context.Context, err error) error {
	if cerr := ctx.Err(); cerr != nil {
		return cerr
	}
	return err
}

// body gives its connection back once the answer was read to its end,
// and closes it if the reader stops early.
type body struct {
	io.ReadCloser
	ctx      context.Context
	t        *Transport
	c        *conn
	stop     func() bool
	reusable bool
	once     sync.Once
	eof      bool
}

func (b *body) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	switch {
	case errors.Is(err, io.EOF):
		b.eof = true
		b.finish()
	case err != nil:
		err = ctxOr(b.ctx, err)
	}
	return n, err
}

func (b *body) Close() error {
	err := b.ReadCloser.Close()
	b.finish()
	return err
}

func (b *body) finish() {
	b.once.Do(func() {
		// The deadline may already be set by a cancellation that raced
		// with the end of the answer: such a connection is not reused.
		if b.stop() && b.eof && b.reusable {
			b.t.put(b.c)
			return
		}
		_ = b.c.Close()
	})
}

func (t *Transport) get(ctx context.Context, fresh bool) (*conn, bool, error) {
	if !fresh {
		now := time.Now()
		t.mu.Lock()
		for len(t.idle) > 0 {
			c := t.idle[len(t.idle)-1]
			t.idle = t.idle[:len(t.idle)-1]
			if t.IdleTimeout > 0 && now.Sub(c.lastUsed) > t.IdleTimeout {
				_ = c.Close()
				continue
			}
			t.mu.Unlock()
			return c, true, nil
		}
		t.mu.Unlock()
	}
	nc, err := t.Dial(ctx)
	if err != nil {
		return nil, false, err
	}
	lr := &limitReader{r: nc, n: math.MaxInt64}
	return &conn{Conn: nc, lr: lr, br: bufio.NewReader(lr), bw: bufio.NewWriter(nc)}, false, nil
}

func (t *Transport) put(c *conn) {
	if c.br.Buffered() > 0 {
		// Bytes past the answer: the program does not speak plain
		// request/answer on this connection.
		_ = c.Close()
		return
	}
	c.lastUsed = time.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.idle) >= max(t.MaxIdle, 1) {
		_ = c.Close()
		return
	}
	t.idle = append(t.idle, c)
}

// CloseIdleConnections closes the kept connections, here and in the
// fallback; later requests dial again.
func (t *Transport) CloseIdleConnections() {
	t.mu.Lock()
	idle := t.idle
	t.idle = nil
	t.mu.Unlock()
	for _, c := range idle {
		_ = c.Close()
	}
	if ci, ok := t.Fallback.(interface{ CloseIdleConnections() }); ok {
		ci.CloseIdleConnections()
	}
}
