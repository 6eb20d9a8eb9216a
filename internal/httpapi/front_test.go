package httpapi

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool/pooltest"
)

// countingResolver is the DNS: the resolver is infrastructure, so a fake
// function stands for it, counting the queries that reach it.
type countingResolver struct {
	mu      sync.Mutex
	records map[string][]string
	queries map[string]int
	block   bool // wait for the lookup's context, as an unreachable server would
}

func (r *countingResolver) lookup(ctx context.Context, name string) ([]string, error) {
	r.mu.Lock()
	r.queries[name]++
	txt, ok := r.records[name]
	r.mu.Unlock()
	if r.block {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	if !ok {
		return nil, &net.DNSError{Err: "no such host", Name: name, IsNotFound: true}
	}
	return txt, nil
}

func (r *countingResolver) count(name string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.queries[name]
}

func TestTXTRoutesAreCached(t *testing.T) {
	hash := strings.Repeat("ab", 32)
	res := &countingResolver{records: map[string][]string{"_aleph-id.app.example": {hash}}, queries: map[string]int{}}
	c := newTXTRoutes(res.lookup)
	now := time.Unix(1000, 0)
	c.now = func() time.Time { return now }
	ctx := context.Background()
	for range 10 {
		if h, err := c.hash(ctx, "App.Example"); err != nil || h != hash {
			t.Fatalf("app.example: %q %v", h, err)
		}
		if h, err := c.hash(ctx, "unknown.example"); err != nil || h != "" {
			t.Fatalf("unknown.example: %q %v", h, err)
		}
	}
	if n := res.count("_aleph-id.app.example"); n != 1 {
		t.Errorf("%d lookups of a known host, want 1", n)
	}
	if n := res.count("_aleph-id.unknown.example"); n != 1 {
		t.Errorf("%d lookups of an unknown host, want 1 (negative cache)", n)
	}
	// The negative answer expires first, the positive one later.
	now = now.Add(txtNotFoundTTL + time.Second)
	_, _ = c.hash(ctx, "app.example")
	_, _ = c.hash(ctx, "unknown.example")
	if a, u := res.count("_aleph-id.app.example"), res.count("_aleph-id.unknown.example"); a != 1 || u != 2 {
		t.Errorf("after the negative TTL: %d and %d lookups, want 1 and 2", a, u)
	}
	now = now.Add(txtFoundTTL)
	_, _ = c.hash(ctx, "app.example")
	if n := res.count("_aleph-id.app.example"); n != 2 {
		t.Errorf("after the positive TTL: %d lookups, want 2", n)
	}
	// Names the DNS cannot carry are neither asked nor kept.
	if h, err := c.hash(ctx, strings.Repeat("a", 300)+".example"); h != "" || err != nil {
		t.Errorf("overlong name: %q %v", h, err)
	}
	if len(res.queries) != 2 {
		t.Errorf("queries %v", res.queries)
	}
}

func TestTXTRoutesBounded(t *testing.T) {
	res := &countingResolver{records: map[string][]string{}, queries: map[string]int{}}
	c := newTXTRoutes(res.lookup)
	c.limiter.SetLimit(1e9)
	c.limiter.SetBurst(1e9)
	for i := range txtMaxEntries + 500 {
		if _, err := c.hash(context.Background(), fmt.Sprintf("h%d.example", i)); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(c.entries); n > txtMaxEntries {
		t.Errorf("%d entries, bound %d", n, txtMaxEntries)
	}
}

// A resolver that does not answer costs a request txtTimeout, not its
// default ten seconds; beyond the rate, unknown hosts are refused without
// a query.
func TestTXTLookupTimeoutAndRate(t *testing.T) {
	res := &countingResolver{records: map[string][]string{}, queries: map[string]int{}, block: true}
	c := newTXTRoutes(res.lookup)
	start := time.Now()
	if h, err := c.hash(context.Background(), "slow.example"); h != "" || err != nil {
		t.Errorf("slow.example: %q %v", h, err)
	}
	if d := time.Since(start); d > txtTimeout+time.Second {
		t.Errorf("lookup took %s, bound %s", d, txtTimeout)
	}
	res.block = false
	c.limiter.SetBurst(3)
	c.limiter.SetLimit(0)
	refused := 0
	for i := range 10 {
		_, err := c.hash(context.Background(), fmt.Sprintf("r%d.example", i))
		if errkind.HTTPStatus(err) == http.StatusServiceUnavailable {
			refused++
		}
	}
	total := 0
	for _, n := range res.queries {
		total += n
	}
	if refused < 7 || total > 4 {
		t.Errorf("%d refused, %d queries reached the resolver", refused, total)
	}
}

func TestRedactHostPaths(t *testing.T) {
	roots := []string{"/var", "/tmp", "/run", "/dev", "/srv/aleph"}
	for _, c := range []struct{ in, want string }{
		{`e2fsck vol.ext4: exit status 8: /var/lib/aleph/vm/volumes/persistent/ab/data.ext4: bad superblock`,
			`e2fsck vol.ext4: exit status 8: <host path>: bad superblock`},
		{`mount /dev/loop3 (ext4) on /run/aleph/x/mnt: invalid argument`, `mount <host path> (ext4) on <host path>: invalid argument`},
		{`open "/tmp/avm-1/exec/x": permission denied`, `open "<host path>": permission denied`},
		{`stat /srv/aleph/cache/y: no such file`, `stat <host path>: no such file`},
		// Paths of requests and of the program's own tree stay.
		{`no route for /about/x`, `no route for /about/x`},
		{`GET /vm/abc/var/lib failed`, `GET /vm/abc/var/lib failed`},
		{`mount point /opt/packages: must be empty`, `mount point /opt/packages: must be empty`},
		{`/variable is not /var`, `/variable is not <host path>`},
	} {
		if got := redactHostPaths(c.in, roots); got != c.want {
			t.Errorf("redactHostPaths(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

// A volume error naming host paths reaches the client without them; the
// log keeps them.
func TestErrorBodiesHideHostPaths(t *testing.T) {
	e2fsck := errkind.Wrap(errkind.ResourceMissing,
		errors.New("persistent volume data: e2fsck /srv/node/exec/volumes/persistent/ab/data.ext4: exit status 8: /dev/loop7: bad magic"))
	programs := map[string]program{"vol": {startErr: e2fsck}}
	l := startLiveOn(t, pooltest.NewStore(t), programs, nil, func(o *Options) { o.HostPaths = []string{"/srv/node/exec"} })
	a := l.do(t, "GET", "/vm/"+l.hashes["vol"]+"/", nil)
	msg := errorOf(a)
	if a.code != 400 || !strings.Contains(msg, "e2fsck <host path>: exit status 8: <host path>: bad magic") ||
		strings.Contains(a.body, "/srv/node") || strings.Contains(a.body, "/dev/loop") {
		t.Errorf("%d %q", a.code, a.body)
	}
}

// rawAnswer sends raw bytes to the server and reads its answer.
func rawAnswer(t *testing.T, url, raw string, halfClose bool) (int, string) {
	t.Helper()
	c, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	_, _ = io.WriteString(c, raw)
	if halfClose {
		_ = c.(*net.TCPConn).CloseWrite()
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("reading the answer: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// What the client sent wrong is 400, not the program's 502; an answer
// whose head is too large is 502 with its cause.
func TestClientAndProgramFaultsAreToldApart(t *testing.T) {
	var answered atomic.Int32
	programs := map[string]program{
		"ok": {agent: pooltest.Agent{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			answered.Add(1)
			_, _ = io.Copy(io.Discard, r.Body)
			_, _ = io.WriteString(w, "ok")
		})}},
		"big head": {agent: pooltest.Agent{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.Copy(io.Discard, r.Body)
			for i := range 200 {
				w.Header().Set(fmt.Sprintf("X-H%d", i), strings.Repeat("h", 1000))
			}
		})}},
	}
	l := startLive(t, programs, nil)
	ok, big := l.hashes["ok"], l.hashes["big head"]
	for _, c := range []struct {
		name, raw string
		half      bool
		code      int
		has       string
	}{
		{"malformed chunk", "POST /vm/" + ok + "/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", false, 400, "reading the request body"},
		{"malformed trailer", "POST /vm/" + ok + "/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX\x01: y\r\n\r\n", false, 400, "reading the request body"},
		{"body shorter than announced", "POST /vm/" + ok + "/ HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc", true, 400, "reading the request body"},
		{"oversized head, bodiless GET", "GET /vm/" + big + "/ HTTP/1.1\r\nHost: x\r\n\r\n", false, 502, "response header from the program exceeds 65536 bytes"},
		{"oversized head, POST", "POST /vm/" + big + "/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na", false, 502, "response header from the program exceeds 65536 bytes"},
	} {
		start := time.Now()
		code, body := rawAnswer(t, l.url, c.raw, c.half)
		if code != c.code || !strings.Contains(body, c.has) {
			t.Errorf("%s: %d %q, want %d with %q", c.name, code, body, c.code, c.has)
		}
		// Neither waits for the program to die (WaitDied's 3 s).
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("%s: answered after %s", c.name, d)
		}
	}
}

// The client's forwarding headers never reach the program: the
// supervisor sets X-Real-IP and X-Forwarded-For itself.
func TestForwardingHeadersSetBySupervisor(t *testing.T) {
	seen := make(chan http.Header, 1)
	programs := map[string]program{"echo": {agent: pooltest.Agent{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen <- r.Header.Clone()
	})}}}
	l := startLive(t, programs, nil)
	code, _ := rawAnswer(t, l.url, "GET /vm/"+l.hashes["echo"]+"/ HTTP/1.1\r\nHost: x\r\nX-Real-IP: 6.6.6.6\r\n"+
		"X-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-Port: 1\r\nTrue-Client-IP: 6.6.6.6\r\nX-Client-IP: 6.6.6.6\r\n\r\n", false)
	h := <-seen
	if code != 200 {
		t.Fatalf("status %d", code)
	}
	if got := h.Values("X-Real-Ip"); len(got) != 1 || got[0] != "127.0.0.1" {
		t.Errorf("X-Real-IP %q, want the supervisor's view of the client", got)
	}
	for k, vs := range h {
		for _, v := range vs {
			if strings.Contains(v, "6.6.6.6") || k == "X-Forwarded-Port" {
				t.Errorf("program saw the client's %s: %s", k, v)
			}
		}
	}
}

// A diagnostic check keeps at most maxCheckAnswer of an answer, however
// much the program sends, and fails the check rather than the page.
func TestCheckAnswerIsBounded(t *testing.T) {
	programs := map[string]program{"flood": {agent: pooltest.Agent{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		chunk := []byte(strings.Repeat("x", 64<<10))
		for range 64 { // 4 MiB
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	})}}}
	l := startLive(t, programs, nil)
	// Under a real server's request, as /status/check/fastapi runs.
	ctx := context.WithValue(context.Background(), http.ServerContextKey, l.hs)
	c := &checker{s: l.srv, ctx: ctx, host: "node.example", hash: l.hashes["flood"]}
	code, body := c.get("/")
	if code != http.StatusBadGateway || len(body) > maxCheckAnswer || !strings.Contains(string(body), "exceeds") {
		t.Errorf("check of a 4 MiB answer: %d, %d bytes kept", code, len(body))
	}
}
