package httpapi

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"strings"
	"testing"
	"time"
)

// startLimited serves h behind the guard and listener of a Server with
// limits l, on a loopback port, and returns its address.
func startLimited(t *testing.T, l Limits, h http.Handler) string {
	t.Helper()
	s := New(Options{Version: "test", Limits: l, Logger: quiet})
	srv := s.NewHTTPServer(context.Background())
	srv.Handler = s.guard(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.ServeHTTP(w, r)
	}))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// Serve ends with ErrServerClosed on the cleanup's Close; a failure
	// before that shows as the tests' requests failing.
	go func() { _ = srv.Serve(s.Listener(ln)) }()
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

// readBody answers 200 with the length of the body, or the error's status.
func readBody(s *Server) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		fmt.Fprintf(w, "%d", len(b))
	}
}

// closedWithin reports whether the server closes c within d (reading and
// dropping whatever it sends first).
func closedWithin(c net.Conn, d time.Duration) (bool, string) {
	_ = c.SetReadDeadline(time.Now().Add(d))
	b, err := io.ReadAll(c)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return false, string(b)
	}
	return true, string(b)
}

func TestSlowHeadersAreCut(t *testing.T) {
	addr := startLimited(t, Limits{ReadHeaderTimeout: 300 * time.Millisecond}, http.NotFoundHandler())
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	// One header byte at a time, slower than the timeout allows overall.
	go func() {
		for _, b := range []byte("GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ") {
			if _, err := c.Write([]byte{b}); err != nil {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	if closed, _ := closedWithin(c, 3*time.Second); !closed {
		t.Fatal("connection still open 3 s into a drip-fed header")
	}
	if d := time.Since(start); d > 1500*time.Millisecond {
		t.Errorf("closed after %s, timeout 300ms", d)
	}
}

func TestBodyMinimumRate(t *testing.T) {
	l := Limits{BodyTimeout: 500 * time.Millisecond, BodyMinRate: 1000}
	s := New(Options{Version: "test", Limits: l, Logger: quiet})
	addr := startLimited(t, l, readBody(s))

	t.Run("drip-fed body gets 408 and the connection closes", func(t *testing.T) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
		start := time.Now()
		go func() {
			for range 100 {
				if _, err := c.Write([]byte("x")); err != nil {
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
		}()
		closed, got := closedWithin(c, 5*time.Second)
		if !closed || !strings.HasPrefix(got, "HTTP/1.1 408") {
			t.Fatalf("closed %v, got %q", closed, got)
		}
		// 500 ms of grace, plus 1 s per 1000 bytes received (a few bytes).
		if d := time.Since(start); d > 1200*time.Millisecond {
			t.Errorf("cut after %s", d)
		}
	})

	t.Run("steady body above the rate passes, however long", func(t *testing.T) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		const n = 2000
		fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", n)
		// 2000 bytes in 1.2 s: longer than the grace, faster than the rate.
		for range 12 {
			if _, err := c.Write([]byte(strings.Repeat("y", n/12))); err != nil {
				t.Fatal(err)
			}
			time.Sleep(100 * time.Millisecond)
		}
		_, _ = c.Write([]byte(strings.Repeat("y", n-12*(n/12))))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 || string(b) != fmt.Sprint(n) {
			t.Errorf("%d %q", resp.StatusCode, b)
		}
	})
}

func TestSlowReaderOfTheBodyIsNotChargedToTheClient(t *testing.T) {
	l := Limits{BodyTimeout: 300 * time.Millisecond, BodyMinRate: 1}
	addr := startLimited(t, l, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// A program that takes its time: a cold start, then slow reads.
		time.Sleep(time.Second)
		buf := make([]byte, 10)
		n := 0
		for {
			k, err := r.Body.Read(buf)
			n += k
			if err != nil {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		fmt.Fprintf(w, "%d", n)
	}))
	resp, err := http.Post("http://"+addr+"/", "text/plain", strings.NewReader(strings.Repeat("z", 50)))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || string(b) != "50" {
		t.Errorf("%d %q", resp.StatusCode, b)
	}
}

func TestLongStreamingResponseOutlivesTheWriteTimeout(t *testing.T) {
	l := Limits{WriteTimeout: 200 * time.Millisecond, BodyTimeout: 200 * time.Millisecond, BodyMinRate: 1 << 20}
	addr := startLimited(t, l, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.ReadAll(r.Body)
		for i := range 4 {
			fmt.Fprintf(w, "chunk %d\n", i)
			http.NewResponseController(w).Flush()
			// As the proxy does: a cancelled request ends the response.
			select {
			case <-r.Context().Done():
				return
			case <-time.After(300 * time.Millisecond):
			}
		}
	}))
	client := &http.Client{}
	// Twice on one connection: deadlines of the first request must not
	// leak into the second, with a body (read deadline) and without.
	for _, body := range []io.Reader{strings.NewReader("payload"), nil} {
		req, _ := http.NewRequest("POST", "http://"+addr+"/", body)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || strings.Count(string(b), "chunk") != 4 {
			t.Fatalf("streaming response cut: %v %q", err, b)
		}
	}
}

func TestClientThatDoesNotReadIsCut(t *testing.T) {
	l := Limits{WriteTimeout: 300 * time.Millisecond}
	done := make(chan error, 1)
	addr := startLimited(t, l, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		chunk := []byte(strings.Repeat("w", 64<<10))
		for {
			if _, err := w.Write(chunk); err != nil {
				done <- err
				return
			}
		}
	}))
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	select {
	case err := <-done:
		if !isTimeout(err) {
			t.Errorf("write ended with %v, want a timeout", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("handler still writing to a client that reads nothing")
	}
}

func TestPerClientConnectionLimit(t *testing.T) {
	l := Limits{
		MaxConnectionsPerClient: 3,
		UnlimitedClients:        []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")},
		ReadHeaderTimeout:       10 * time.Second,
	}
	addr := startLimited(t, l, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "ok")
	}))
	dialFrom := func(ip string) net.Conn {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
		c, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	// Three held by 127.0.0.2, the fourth refused at once.
	for range 3 {
		dialFrom("127.0.0.2")
	}
	time.Sleep(100 * time.Millisecond) // let the server accept them
	extra := dialFrom("127.0.0.2")
	closed, got := closedWithin(extra, 2*time.Second)
	if !closed || !strings.Contains(got, "503") {
		t.Errorf("4th connection from one client: closed %v, got %q", closed, got)
	}
	// Another client, and the exempt proxy address, are served.
	for _, ip := range []string{"127.0.0.3", "127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.1"} {
		c := dialFrom(ip)
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil || resp.StatusCode != 200 {
			t.Errorf("from %s: %v %v", ip, resp, err)
		}
	}
}

func TestConnectionCapAndHeaderSize(t *testing.T) {
	l := Limits{MaxConnections: 2, ReadHeaderTimeout: 500 * time.Millisecond, MaxHeaderBytes: 4096}
	addr := startLimited(t, l, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "ok")
	}))
	var idle []net.Conn
	for range 4 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		idle = append(idle, c)
	}
	// The 5th is served at once: at the cap, the connections idle the
	// longest (these sent nothing) are closed to make room.
	start := time.Now()
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get("http://" + addr + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if d := time.Since(start); d > 300*time.Millisecond {
		t.Errorf("served after %s: idle connections were not closed for it", d)
	}
	// The four idle ones are gone: two closed for newcomers (the other two
	// waited in the backlog), all of them by the header timeout at the latest.
	for i, c := range idle {
		if closed, _ := closedWithin(c, 2*time.Second); !closed {
			t.Errorf("idle connection %d still open", i)
		}
	}

	req, _ := http.NewRequest("GET", "http://"+addr+"/", nil)
	req.Header.Set("X-Big", strings.Repeat("h", 8192))
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("oversized header: %d, want 431", resp.StatusCode)
	}
}

// TestOversizedBodyRefusedWithoutWaitingForIt: a body declared too large
// is refused at once, even if the client never sends it.
func TestOversizedBodyRefusedWithoutWaitingForIt(t *testing.T) {
	api, hash := newTestServer(t)
	api.opts.MaxRequestBodySize = 10
	addr := startLimited(t, Limits{BodyTimeout: 5 * time.Second, BodyMinRate: 1}, api)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	fmt.Fprintf(c, "POST /vm/%s/ HTTP/1.1\r\nHost: node.example\r\nContent-Length: 300000\r\n\r\n", hash)
	closed, got := closedWithin(c, 3*time.Second)
	if !closed || !strings.HasPrefix(got, "HTTP/1.1 413") || time.Since(start) > time.Second {
		t.Errorf("closed %v after %s: %q", closed, time.Since(start), got)
	}
}

// TestUpgradedConnectionsOutliveTheTimeouts: a websocket-style upgrade
// through a reverse proxy, as forward does, behind the guard, lives
// longer than every per-request bound.
func TestUpgradedConnectionsOutliveTheTimeouts(t *testing.T) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		defer c.Close()
		fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
		brw.Flush()
		for {
			line, err := brw.ReadString('\n')
			if err != nil {
				return
			}
			if _, err := brw.WriteString("echo " + line); err != nil {
				return
			}
			brw.Flush()
		}
	}))
	defer backend.Close()
	target, _ := url.Parse(backend.URL)
	l := Limits{WriteTimeout: 200 * time.Millisecond, BodyTimeout: 200 * time.Millisecond, BodyMinRate: 1 << 20,
		ReadHeaderTimeout: 200 * time.Millisecond, IdleTimeout: 200 * time.Millisecond}
	addr := startLimited(t, l, httputil.NewSingleHostReverseProxy(target))

	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	for i := range 4 {
		time.Sleep(300 * time.Millisecond)
		fmt.Fprintf(c, "ping %d\n", i)
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		line, err := br.ReadString('\n')
		if err != nil || line != fmt.Sprintf("echo ping %d\n", i) {
			t.Fatalf("after %d pings: %q %v", i, line, err)
		}
	}
}
