package integration

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// Limits of the supervisor under attack, low so that the test is quick.
const (
	hostileHeaderTimeout = time.Second
	hostileIdleTimeout   = 2 * time.Second
	hostileBodyTimeout   = time.Second
	hostileBodyMinRate   = 1000 // bytes/s
	hostileMaxConns      = 64
	hostilePerClient     = 16
	hostileMaxHeader     = 8192
	hostileMaxBody       = 1 << 20
)

// TestHostileClients attacks one supervisor as a hostile client would
// and checks each attack is bounded: slowloris, drip-fed bodies, idle
// floods past the connection cap, one client hogging connections,
// request smuggling, oversized headers and bodies, and attempts to
// obtain the operator's credentials through a program.
func TestHostileClients(t *testing.T) {
	backendIndependent(t)
	s := startSupervisor(t,
		fmt.Sprintf("ALEPH_VM_HTTP_READ_HEADER_TIMEOUT=%g", hostileHeaderTimeout.Seconds()),
		fmt.Sprintf("ALEPH_VM_HTTP_IDLE_TIMEOUT=%g", hostileIdleTimeout.Seconds()),
		fmt.Sprintf("ALEPH_VM_HTTP_BODY_TIMEOUT=%g", hostileBodyTimeout.Seconds()),
		fmt.Sprintf("ALEPH_VM_HTTP_BODY_MIN_RATE=%d", hostileBodyMinRate),
		"ALEPH_VM_HTTP_WRITE_TIMEOUT=2",
		fmt.Sprintf("ALEPH_VM_HTTP_MAX_CONNECTIONS=%d", hostileMaxConns),
		fmt.Sprintf("ALEPH_VM_HTTP_MAX_CONNECTIONS_PER_CLIENT=%d", hostilePerClient),
		// 127.0.0.1 plays the local reverse proxy (and the harness);
		// attackers come from other loopback addresses.
		"ALEPH_VM_HTTP_UNLIMITED_CLIENTS=127.0.0.1/32",
		fmt.Sprintf("ALEPH_VM_HTTP_MAX_HEADER_BYTES=%d", hostileMaxHeader),
		fmt.Sprintf("ALEPH_VM_MAX_REQUEST_BODY_SIZE=%d", hostileMaxBody),
	)
	hash := s.upload("testdata/probe", "main:app")
	expect(t, s.get("/vm/"+hash+"/"), http.StatusOK) // warm: cold starts are not the subject
	addr := strings.TrimPrefix(s.base, "http://")
	pid := s.cmd.Process.Pid
	baseFDs := countFDs(t, pid)
	t.Logf("supervisor pid %d holds %d fds at rest", pid, baseFDs)

	t.Run("slowloris", func(t *testing.T) { hostileSlowloris(t, addr, hash) })
	t.Run("idle keep-alive connection", func(t *testing.T) { hostileIdleKeepAlive(t, addr) })
	t.Run("drip-fed body", func(t *testing.T) { hostileDripFedBody(t, s, addr, hash) })
	t.Run("bodies within the limit pass, beyond it 413", func(t *testing.T) { hostileBodyLimit(t, s, addr, hash) })
	t.Run("oversized headers", func(t *testing.T) { hostileOversizedHeaders(t, addr, hash) })
	t.Run("smuggling", func(t *testing.T) { hostileSmuggling(t, addr, hash) })
	t.Run("idle flood past the connection cap", func(t *testing.T) { hostileIdleFlood(t, s, addr, hash, pid, baseFDs) })
	t.Run("one client hogging connections", func(t *testing.T) { hostileHogging(t, addr, hash) })
	t.Run("operator credentials never reach programs", func(t *testing.T) { hostileCredentials(t, s, hash) })

	if !strings.Contains(s.logs.String(), "file descriptor limit") {
		t.Errorf("the supervisor did not log its file descriptor limit")
	}
	if n := countFDs(t, pid); n > baseFDs+16 {
		t.Errorf("after the attacks the supervisor holds %d fds, %d at rest", n, baseFDs)
	}
}

// hostileSlowloris: 10 connections drip-feed their headers; each is cut
// at the header timeout.
func hostileSlowloris(t *testing.T, addr, hash string) {
	// 10 connections drip-feed their headers, one byte every 200 ms.
	const n = 10
	var wg sync.WaitGroup
	closedAfter := make([]time.Duration, n)
	for i := range n {
		c := dial(t, addr, fmt.Sprintf("127.0.1.%d", i+1))
		wg.Go(func() {
			start := time.Now()
			go drip(c, "GET /vm/"+hash+"/ HTTP/1.1\r\nHost: x\r\nX-Slow: "+strings.Repeat("a", 100), 200*time.Millisecond)
			if closed, _ := closedWithin(c, 10*time.Second); closed {
				closedAfter[i] = time.Since(start)
			}
		})
	}
	wg.Wait()
	for i, d := range closedAfter {
		if d == 0 || d > hostileHeaderTimeout+time.Second {
			t.Errorf("connection %d: closed after %s (0 = still open at 10 s), bound %s", i, d, hostileHeaderTimeout)
		}
	}
	t.Logf("bound %s, observed closed after %s..%s", hostileHeaderTimeout, minDur(closedAfter), maxDur(closedAfter))
}

// hostileIdleKeepAlive: a keep-alive connection left idle is closed at the
// idle timeout.
func hostileIdleKeepAlive(t *testing.T, addr string) {
	c := dial(t, addr, "127.0.2.1")
	fmt.Fprintf(c, "GET /status/check/version HTTP/1.1\r\nHost: x\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	start := time.Now()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("idle connection: %v, want EOF", err)
	}
	d := time.Since(start)
	if d > hostileIdleTimeout+time.Second {
		t.Errorf("idle connection closed after %s, bound %s", d, hostileIdleTimeout)
	}
	t.Logf("bound %s, observed closed after %s", hostileIdleTimeout, d)
}

// hostileDripFedBody: a body sent too slowly gets 408 and the connection
// closed within the body timeout.
func hostileDripFedBody(t *testing.T, s *supervisor, addr, hash string) {
	c := dial(t, addr, "127.0.3.1")
	fmt.Fprintf(c, "POST /vm/%s/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n", hash)
	start := time.Now()
	go drip(c, strings.Repeat("x", 1000), 100*time.Millisecond)
	closed, got := closedWithin(c, 15*time.Second)
	d := time.Since(start)
	if !closed || !strings.HasPrefix(got, "HTTP/1.1 408") {
		t.Fatalf("closed %v after %s, got %q", closed, d, head(got))
	}
	// The grace, plus one second per HTTP_BODY_MIN_RATE bytes (a few
	// bytes here).
	if d > hostileBodyTimeout+time.Second {
		t.Errorf("drip-fed body cut after %s, bound %s", d, hostileBodyTimeout)
	}
	t.Logf("bound %s + received/%d B/s, observed 408 and close after %s", hostileBodyTimeout, hostileBodyMinRate, d)
	// The program is still there for others.
	expect(t, s.get("/vm/"+hash+"/"), http.StatusOK)
}

// hostileBodyLimit: bodies up to the limit reach the program; beyond it,
// declared or chunked, 413.
func hostileBodyLimit(t *testing.T, s *supervisor, addr, hash string) {
	body := strings.Repeat("b", hostileMaxBody)
	r := s.do("POST", "/vm/"+hash+"/echo", strings.NewReader(body))
	expect(t, r, http.StatusOK)
	sum := sha256.Sum256([]byte(body))
	if m := r.json(t); m["length"] != float64(len(body)) || m["sha256"] != hex.EncodeToString(sum[:]) {
		t.Errorf("echo: %v", m)
	}
	// Declared too large: refused before the body is read.
	c := dial(t, addr, "127.0.4.1")
	fmt.Fprintf(c, "POST /vm/%s/echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", hash, hostileMaxBody+1)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Errorf("declared oversized body: %v %v", resp, err)
	}
	// Chunked, without a length: cut at the limit.
	r = s.do("POST", "/vm/"+hash+"/echo", io.MultiReader(strings.NewReader(body), strings.NewReader("one too many")))
	expect(t, r, http.StatusRequestEntityTooLarge)
}

// hostileOversizedHeaders: headers beyond the limit get 431.
func hostileOversizedHeaders(t *testing.T, addr, hash string) {
	c := dial(t, addr, "127.0.5.1")
	fmt.Fprintf(c, "GET /vm/%s/ HTTP/1.1\r\nHost: x\r\nX-Big: %s\r\n\r\n", hash, strings.Repeat("h", 2*hostileMaxHeader))
	closed, got := closedWithin(c, 5*time.Second)
	if !closed || !strings.HasPrefix(got, "HTTP/1.1 431") {
		t.Errorf("closed %v, got %q", closed, head(got))
	}
}

// hostileSmuggling: ambiguous framings are refused, and nothing smuggled
// after them reaches the program.
func hostileSmuggling(t *testing.T, addr, hash string) {
	smuggled := fmt.Sprintf("GET /vm/%s/path/smuggled HTTP/1.1\r\nHost: x\r\n\r\n", hash)
	// Transfer-Encoding forms that a front proxy might read otherwise
	// than we do: refused, the connection closed, nothing after them
	// processed.
	for _, te := range []string{
		"Transfer-Encoding: xchunked",
		"Transfer-Encoding: chunked, identity",
		"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
		"Transfer-Encoding : chunked",
		"Transfer-Encoding:\x0bchunked",
		"Content-Length: 5\r\nContent-Length: 6",
		"Content-Length: +5",
	} {
		c := dial(t, addr, "127.0.6.1")
		fmt.Fprintf(c, "POST /vm/%s/echo HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n0\r\n\r\n%s", hash, te, smuggled)
		closed, got := closedWithin(c, 5*time.Second)
		if !closed || !(strings.HasPrefix(got, "HTTP/1.1 400") || strings.HasPrefix(got, "HTTP/1.1 501")) ||
			strings.Count(got, "HTTP/1.") != 1 || strings.Contains(got, "smuggled") {
			t.Errorf("%q: closed %v, got %q", te, closed, got)
		}
	}
	// Content-Length and chunked together: RFC 9112 §6.3 has chunked
	// win and the length dropped before forwarding (net/http does just
	// that and cannot be told to refuse). The program must read the
	// chunked body (empty), not the Content-Length bytes: it cannot
	// frame the message otherwise than we did.
	c := dial(t, addr, "127.0.6.2")
	fmt.Fprintf(c, "POST /vm/%s/echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
		hash, 5+len(smuggled))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	var echo map[string]any
	err = json.NewDecoder(resp.Body).Decode(&echo)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 200 || echo["length"] != float64(0) {
		t.Errorf("CL+TE: %d %v %v, want the empty chunked body forwarded", resp.StatusCode, echo, err)
	}
}

// hostileIdleFlood: idle connections past the cap wait in the listen
// queue, not in our fds, and a fresh request still gets through.
func hostileIdleFlood(t *testing.T, s *supervisor, addr, hash string, pid, baseFDs int) {
	// From the proxy's address, exempt from the per-client limit, so
	// that the global cap is what holds.
	const n = hostileMaxConns + 100
	var conns []net.Conn
	for range n {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			t.Fatalf("dial %d: %v", len(conns), err)
		}
		conns = append(conns, c)
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	// Watch the fds while the flood is held.
	maxFDs := 0
	for range 10 {
		maxFDs = max(maxFDs, countFDs(t, pid))
		time.Sleep(100 * time.Millisecond)
	}
	// A fresh request, on a connection of its own, waits in the queue
	// and gets through once idle connections are dropped.
	start := time.Now()
	fresh := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := fresh.Get(s.base + "/vm/" + hash + "/")
	if err != nil {
		t.Fatalf("fresh request during the flood: %v", err)
	}
	resp.Body.Close()
	waited := time.Since(start)
	if resp.StatusCode != 200 {
		t.Errorf("fresh request: %d", resp.StatusCode)
	}
	if waited > time.Duration(n/hostileMaxConns+1)*(hostileHeaderTimeout+time.Second) {
		t.Errorf("fresh request answered after %s", waited)
	}
	// Every idle connection is closed by the supervisor: the first
	// cap-full within the header timeout, the rest as slots free up.
	var closedCount int
	deadline := time.Now().Add(time.Duration(n/hostileMaxConns+3) * (hostileHeaderTimeout + time.Second))
	for _, c := range conns {
		maxFDs = max(maxFDs, countFDs(t, pid))
		if closed, _ := closedWithin(c, time.Until(deadline)); closed {
			closedCount++
		}
	}
	if closedCount != n {
		t.Errorf("%d of %d idle connections closed by the supervisor", closedCount, n)
	}
	// The listener's queue holds the excess, not our fds.
	if maxFDs < baseFDs+hostileMaxConns-8 {
		t.Errorf("the flood never filled the cap: at most %d fds, %d at rest", maxFDs, baseFDs)
	}
	if maxFDs > baseFDs+hostileMaxConns+16 {
		t.Errorf("supervisor held %d fds during the flood: %d at rest, cap %d connections", maxFDs, baseFDs, hostileMaxConns)
	}
	t.Logf("%d idle connections, cap %d: at most %d fds (%d at rest); fresh request answered after %s; all %d closed",
		n, hostileMaxConns, maxFDs, baseFDs, waited.Round(time.Millisecond), closedCount)
	expect(t, s.get("/vm/"+hash+"/"), http.StatusOK)
}

// hostileHogging: one client past its connection limit is refused at once
// while another is served.
func hostileHogging(t *testing.T, addr, hash string) {
	for range hostilePerClient {
		dial(t, addr, "127.0.7.1")
	}
	time.Sleep(200 * time.Millisecond)
	start := time.Now()
	closed, got := closedWithin(dial(t, addr, "127.0.7.1"), 5*time.Second)
	if d := time.Since(start); !closed || d > time.Second || !strings.Contains(got, "503") {
		t.Errorf("connection %d from one client: closed %v after %s, got %q", hostilePerClient+1, closed, d, head(got))
	}
	// Another client is served meanwhile.
	c := dial(t, addr, "127.0.7.2")
	fmt.Fprintf(c, "GET /vm/%s/ HTTP/1.1\r\nHost: x\r\n\r\n", hash)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil || resp.StatusCode != 200 {
		t.Errorf("other client: %v %v", resp, err)
	}
}

// hostileCredentials: the login token and session cookie never reach a
// program, its log or the supervisor's log; the program's own cookies and
// Authorization pass.
func hostileCredentials(t *testing.T, s *supervisor, hash string) {
	token, err := os.ReadFile(filepath.Join(s.execRoot, "login_token"))
	if err != nil {
		t.Fatal(err)
	}
	tok := strings.TrimSpace(string(token))
	session := s.loginCookie()
	if session.Value == tok || strings.Contains(session.Value, tok) {
		t.Fatalf("the login cookie carries the token")
	}
	// The session works for the operator pages.
	req, _ := http.NewRequest("GET", s.base+"/about/config", nil)
	req.AddCookie(session)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("operator page with the session cookie: %d", resp.StatusCode)
	}

	// A browser that sends everything it has to the program.
	req, _ = http.NewRequest("GET", s.base+"/vm/"+hash+"/path/echo", nil)
	req.Header.Set("Cookie", "theme=dark; "+session.Name+"="+session.Value+"; app_session=\"s=1\"")
	req.Header.Set("Authorization", "Bearer "+tok)
	req.Header.Set("Referer", s.base+"/about/login?token="+tok)
	resp, err = client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var seen struct {
		Headers map[string]string `json:"headers"`
	}
	err = json.NewDecoder(resp.Body).Decode(&seen)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("echo: %d %v", resp.StatusCode, err)
	}
	for k, v := range seen.Headers {
		if strings.Contains(v, tok) || strings.Contains(v, session.Value) || strings.Contains(v, session.Name) {
			t.Errorf("program saw %s: %s", k, v)
		}
	}
	if got := seen.Headers["cookie"]; got != "theme=dark; app_session=\"s=1\"" {
		t.Errorf("program's own cookies: %q, want them intact", got)
	}
	if _, ok := seen.Headers["authorization"]; ok {
		t.Errorf("program saw the operator's Authorization")
	}
	// A program's own Authorization passes.
	req, _ = http.NewRequest("GET", s.base+"/vm/"+hash+"/path/echo", nil)
	req.Header.Set("Authorization", "Bearer program-api-key")
	resp, err = client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	err = json.NewDecoder(resp.Body).Decode(&seen)
	resp.Body.Close()
	if err != nil || seen.Headers["authorization"] != "Bearer program-api-key" {
		t.Errorf("program's own Authorization: %v %v", seen.Headers, err)
	}
	// Nothing secret in the supervisor's log, at debug level.
	logs := s.logs.String()
	if strings.Contains(logs, tok) || strings.Contains(logs, session.Value) {
		t.Errorf("the supervisor's log holds the token or the session id")
	}
}

// dial connects to addr from the loopback address local, so that each
// attacker is a client of its own.
func dial(t *testing.T, addr, local string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial from %s: %v", local, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// drip writes s one byte every interval, until a write fails.
func drip(c net.Conn, s string, interval time.Duration) {
	for i := range len(s) {
		if _, err := c.Write([]byte{s[i]}); err != nil {
			return
		}
		time.Sleep(interval)
	}
}

// closedWithin reads c until the server closes it or d passes; it
// returns whether the server closed it and what it sent.
func closedWithin(c net.Conn, d time.Duration) (bool, string) {
	_ = c.SetReadDeadline(time.Now().Add(d))
	b, err := io.ReadAll(c)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return false, string(b)
	}
	return true, string(b)
}

func countFDs(t *testing.T, pid int) int {
	t.Helper()
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

func head(s string) string {
	if len(s) > 300 {
		return s[:300] + "…"
	}
	return s
}

func minDur(ds []time.Duration) time.Duration {
	m := ds[0]
	for _, d := range ds {
		m = min(m, d)
	}
	return m
}

func maxDur(ds []time.Duration) time.Duration {
	m := ds[0]
	for _, d := range ds {
		m = max(m, d)
	}
	return m
}
