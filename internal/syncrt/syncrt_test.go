package syncrt

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// program is a real HTTP server on loopback and a transport to it that
// counts the connections it dials and the requests it passes on.
type program struct {
	srv      *httptest.Server
	t        *Transport
	dials    atomic.Int32
	fallback atomic.Int32
}

type countingRT struct {
	rt http.RoundTripper
	n  *atomic.Int32
}

func (c countingRT) RoundTrip(r *http.Request) (*http.Response, error) {
	c.n.Add(1)
	return c.rt.RoundTrip(r)
}

func newProgram(t *testing.T, h http.Handler, configure ...func(*http.Server)) *program {
	t.Helper()
	p := &program{srv: httptest.NewUnstartedServer(h)}
	for _, c := range configure {
		c(p.srv.Config)
	}
	p.srv.Start()
	t.Cleanup(p.srv.Close)
	addr := p.srv.Listener.Addr().String()
	dial := func(ctx context.Context) (net.Conn, error) {
		p.dials.Add(1)
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr)
	}
	p.t = &Transport{
		Dial: dial,
		Fallback: countingRT{&http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dial(ctx)
		}}, &p.fallback},
		MaxIdle:     4,
		IdleTimeout: time.Minute,
	}
	t.Cleanup(p.t.CloseIdleConnections)
	return p
}

func (p *program) do(ctx context.Context, t *testing.T, method, path string, body io.Reader) (*http.Response, string, error) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, method, "http://program"+path, body)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := p.t.RoundTrip(req)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, string(b), err
}

func TestKeepsTheConnectionAcrossRequests(t *testing.T) {
	p := newProgram(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/chunked":
			_, _ = w.Write([]byte("one "))
			w.(http.Flusher).Flush()
			_, _ = w.Write([]byte("two"))
		case "/empty":
			w.WriteHeader(http.StatusNoContent)
		default:
			w.Header().Set("X-Method", r.Method)
			_, _ = io.WriteString(w, "hello "+r.URL.RawQuery)
		}
	}))
	ctx := context.Background()
	for i, c := range []struct{ method, path, want string }{
		{"GET", "/?a=1", "hello a=1"},
		{"HEAD", "/", ""},
		{"GET", "/chunked", "one two"},
		{"OPTIONS", "/", "hello "},
		{"GET", "/empty", ""},
		{"GET", "/?b=2", "hello b=2"},
	} {
		resp, body, err := p.do(ctx, t, c.method, c.path, nil)
		if err != nil {
			t.Fatalf("request %d (%s %s): %v", i, c.method, c.path, err)
		}
		if body != c.want {
			t.Errorf("%s %s: body %q, want %q", c.method, c.path, body, c.want)
		}
		if c.method == "HEAD" && resp.Header.Get("X-Method") != "HEAD" {
			t.Errorf("HEAD answered with headers %v", resp.Header)
		}
	}
	if n := p.dials.Load(); n != 1 {
		t.Errorf("6 bodiless requests dialled %d connections, want 1", n)
	}
	if n := p.fallback.Load(); n != 0 {
		t.Errorf("%d requests went to the fallback", n)
	}
}

func TestBodiesAndUpgradesGoToTheFallback(t *testing.T) {
	p := newProgram(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		_, _ = w.Write(b)
	}))
	_, body, err := p.do(context.Background(), t, "POST", "/", strings.NewReader("payload"))
	if err != nil || body != "payload" {
		t.Fatalf("POST: %q, %v", body, err)
	}
	// A bodiless POST is not idempotent: it is not retried, so the
	// fallback's rules apply.
	if _, _, err := p.do(context.Background(), t, "POST", "/", nil); err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest("GET", "http://program/ws", nil)
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Connection", "Upgrade")
	resp, err := p.t.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if n := p.fallback.Load(); n != 3 {
		t.Errorf("fallback carried %d requests, want 3", n)
	}
}

func TestAStaleConnectionIsRetriedOnAFreshOne(t *testing.T) {
	var conns atomic.Pointer[net.Conn]
	p := newProgram(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "ok")
	}), func(s *http.Server) {
		s.ConnState = func(c net.Conn, s http.ConnState) {
			if s == http.StateIdle {
				conns.Store(&c)
			}
		}
	})
	ctx := context.Background()
	if _, _, err := p.do(ctx, t, "GET", "/", nil); err != nil {
		t.Fatal(err)
	}
	// The program closes its end while the connection waits in our pool,
	// as a server's keep-alive timeout does.
	deadline := time.Now().Add(5 * time.Second)
	for conns.Load() == nil && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	(*conns.Load()).Close()
	time.Sleep(20 * time.Millisecond)
	_, body, err := p.do(ctx, t, "GET", "/", nil)
	if err != nil || body != "ok" {
		t.Fatalf("after the program closed the idle connection: %q, %v", body, err)
	}
	if n := p.dials.Load(); n != 2 {
		t.Errorf("dialled %d connections, want 2 (the first, then a fresh one)", n)
	}
}

func TestAnAnswerNotReadToItsEndClosesItsConnection(t *testing.T) {
	p := newProgram(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/close" {
			w.Header().Set("Connection", "close")
		}
		_, _ = io.WriteString(w, strings.Repeat("x", 100_000))
	}))
	req, _ := http.NewRequest("GET", "http://program/", nil)
	resp, err := p.t.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := resp.Body.Read(make([]byte, 10)); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	// A program that asks to close after its answer is obeyed too.
	if _, _, err := p.do(context.Background(), t, "GET", "/close", nil); err != nil {
		t.Fatal(err)
	}
	if _, _, err := p.do(context.Background(), t, "GET", "/", nil); err != nil {
		t.Fatal(err)
	}
	if n := p.dials.Load(); n != 3 {
		t.Errorf("dialled %d connections, want 3: neither a half-read answer's nor a closing one's connection is reused", n)
	}
}

func TestCancellingUnblocksAStalledAnswer(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	p := newProgram(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/head-then-stall" {
			w.Header().Set("Content-Length", "10")
			w.WriteHeader(200)
			w.(http.Flusher).Flush()
		}
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	for _, path := range []string{"/stall", "/head-then-stall"} {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		start := time.Now()
		_, _, err := p.do(ctx, t, "GET", path, nil)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("%s: want the deadline, got %v", path, err)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("%s: the deadline took %s to end the request", path, d)
		}
	}
	if n := p.dials.Load(); n != 2 {
		t.Errorf("dialled %d, want 2: a cancelled request's connection is not reused", n)
	}
}

func TestEarlyHintsAreDropped(t *testing.T) {
	p := newProgram(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</style.css>; rel=preload")
		w.WriteHeader(http.StatusEarlyHints)
		_, _ = io.WriteString(w, "final")
	}))
	resp, body, err := p.do(context.Background(), t, "GET", "/", nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 || body != "final" {
		t.Errorf("got %d %q, want 200 \"final\"", resp.StatusCode, body)
	}
	if _, _, err := p.do(context.Background(), t, "GET", "/", nil); err != nil {
		t.Fatal(err)
	}
	if n := p.dials.Load(); n != 1 {
		t.Errorf("dialled %d, want 1", n)
	}
}

// rawProgram answers every request on a plain TCP listener with what
// answer writes; read counts the bytes the transport read from it.
func rawProgram(t *testing.T, answer func(c net.Conn)) (dial func(ctx context.Context) (net.Conn, error), read *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 4096)
				_, _ = c.Read(buf) // the request's head
				answer(c)
			}()
		}
	}()
	read = &atomic.Int64{}
	return func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", ln.Addr().String())
		if err != nil {
			return nil, err
		}
		return &countingConn{Conn: c, n: read}, nil
	}, read
}

type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// endlessHeader never ends its header section.
func endlessHeader(c net.Conn) {
	if _, err := io.WriteString(c, "HTTP/1.1 200 OK\r\n"); err != nil {
		return
	}
	line := "X-Endless: " + strings.Repeat("a", 1000) + "\r\n"
	for {
		if _, err := io.WriteString(c, line); err != nil {
			return
		}
	}
}

// A program that never ends its header section is cut at the bound, on
// both paths (bodiless GET here, POST through the fallback), and the
// transport reads little more than the bound.
func TestEndlessResponseHeaderIsBounded(t *testing.T) {
	const limit = 32 << 10
	dial, read := rawProgram(t, endlessHeader)
	tr := &Transport{
		Dial: dial,
		Fallback: &http.Transport{
			DialContext:            func(ctx context.Context, _, _ string) (net.Conn, error) { return dial(ctx) },
			MaxResponseHeaderBytes: limit,
		},
		MaxResponseHeaderBytes: limit,
	}
	defer tr.CloseIdleConnections()
	for _, method := range []string{http.MethodGet, http.MethodPost} {
		read.Store(0)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		var body io.Reader
		if method == http.MethodPost {
			body = strings.NewReader("x")
		}
		req, _ := http.NewRequestWithContext(ctx, method, "http://program/", body)
		resp, err := tr.RoundTrip(req)
		cancel()
		if resp != nil {
			resp.Body.Close()
		}
		var tooLarge *HeaderTooLargeError
		if !errors.As(err, &tooLarge) || tooLarge.Limit != limit {
			t.Fatalf("%s: got %v, want a HeaderTooLargeError of %d bytes", method, err, limit)
		}
		if !strings.Contains(err.Error(), "response header from the program exceeds 32768 bytes") {
			t.Errorf("%s: error %q does not name the cause", method, err)
		}
		if n := read.Load(); n > limit+16<<10 {
			t.Errorf("%s: read %d bytes of an endless header, bound %d", method, n, limit)
		}
	}
}

// A header within the bound passes, and the connection is reused after
// it: the bound applies to each answer's head, not to the connection.
func TestHeaderBoundIsPerAnswer(t *testing.T) {
	big := strings.Repeat("b", 20<<10)
	p := newProgram(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Big", big)
		_, _ = w.Write([]byte(strings.Repeat("body", 50<<10)))
	}))
	p.t.MaxResponseHeaderBytes = 32 << 10
	for i := range 5 {
		resp, body, err := p.do(context.Background(), t, http.MethodGet, "/", nil)
		if err != nil || resp.Header.Get("X-Big") != big || len(body) != 200<<10 {
			t.Fatalf("request %d: %v, body %d bytes", i, err, len(body))
		}
	}
	if n := p.dials.Load(); n != 1 {
		t.Errorf("%d connections dialled for 5 requests, want 1", n)
	}
}

// Endless informational answers end in an error, not a loop.
func TestEndlessInformationalAnswers(t *testing.T) {
	dial, _ := rawProgram(t, func(c net.Conn) {
		for {
			if _, err := io.WriteString(c, "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"); err != nil {
				return
			}
		}
	})
	tr := &Transport{Dial: dial, Fallback: http.DefaultTransport, MaxResponseHeaderBytes: 1 << 20}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://program/", nil)
	_, err := tr.RoundTrip(req)
	var bad *BadResponseError
	if !errors.As(err, &bad) {
		t.Fatalf("got %v, want a BadResponseError", err)
	}
}
