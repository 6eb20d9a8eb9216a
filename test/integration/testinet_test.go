package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/vishvananda/netns"
)

// testInternet is an internet of the test's own: a network namespace
// reached from the host through a veth pair, with an HTTP server and a DNS
// server inside. Nothing it serves is outside this machine, and nothing of
// it is named like the supervisor's own links and namespaces (avm*), so
// assertNothingLeft never mistakes it for a leak.
//
//	host  tinet<pid> 198.18.0.1/24  ── veth ──  eth0 198.18.0.2/24  namespace tinet-<pid>
//	      10.99.0.0/24, 169.254.169.254/32 via 198.18.0.2            lo 10.99.0.2/32, 169.254.169.254/32
//
// The HTTP server listens on port 80 of every address of the namespace and
// answers "hello from the test internet <address it was reached on>" and
// "client <remote address>"; the DNS server (UDP and TCP port 53) answers
// inet.test. → 198.18.0.2 and private.test. → 10.99.0.2.
type testInternet struct {
	t        *testing.T
	NS       string     // the namespace
	HostLink string     // host side of the veth: what NETWORK_INTERFACE names
	HostAddr netip.Addr // 198.18.0.1, the host side of the link
	Addr     netip.Addr // 198.18.0.2, the servers' public address
	Private  netip.Addr // 10.99.0.2, a private-range address served from the namespace
	Metadata netip.Addr // 169.254.169.254, where clouds put their metadata service

	mu      sync.Mutex
	hits    []inetHit
	queries []dnsQuery
	stops   []func()
	closed  bool
}

// inetHit is one HTTP request the test internet served.
type inetHit struct {
	Local  netip.Addr     // address it was reached on
	Remote netip.AddrPort // where it came from
	Path   string
}

// dnsQuery is one question the test internet's DNS server answered.
type dnsQuery struct {
	Name   string // fully qualified, lower case
	Type   string
	Remote string
}

// inetIPv6 is inet.test.'s AAAA record, from the documentation range.
var inetIPv6 = netip.MustParseAddr("2001:db8::2")

const (
	inetName    = "inet.test."
	privateName = "private.test."
)

// requireNetworkTools skips (or, in CI, fails) a test that needs root and
// iproute2 to build its test internet.
func requireNetworkTools(t *testing.T) {
	t.Helper()
	var err error
	if os.Geteuid() != 0 {
		err = errors.New("the test internet needs root")
	} else if _, lerr := exec.LookPath("ip"); lerr != nil {
		err = fmt.Errorf("iproute2 not installed: %w", lerr)
	}
	if err == nil {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("prerequisite missing in CI: %v", err)
	}
	t.Skipf("prerequisite missing: %v", err)
}

// ipCmd runs ip(8) and returns its output; it fails the test on error.
func ipCmd(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// newTestInternet builds the test internet; it is removed when the test
// ends (or earlier with close).
func newTestInternet(t *testing.T) *testInternet {
	t.Helper()
	requireNetworkTools(t)
	// One test internet per host at a time (its addresses and routes are
	// fixed): a second test process, e.g. the suite under another
	// backend, waits for the first's to go.
	lock := lockTestInternet(t)
	sweepStaleTestInternets(t)
	pid := os.Getpid()
	n := &testInternet{
		t:        t,
		NS:       fmt.Sprintf("tinet-%d", pid),
		HostLink: fmt.Sprintf("tinet%d", pid),
		HostAddr: netip.MustParseAddr("198.18.0.1"),
		Addr:     netip.MustParseAddr("198.18.0.2"),
		Private:  netip.MustParseAddr("10.99.0.2"),
		Metadata: netip.MustParseAddr("169.254.169.254"),
	}
	n.stops = append(n.stops, func() { lock.Close() })
	t.Cleanup(n.close)
	// Fixed addresses: anything else holding them would take the traffic.
	if out, _ := exec.Command("ip", "-br", "-4", "addr", "show", "to", "198.18.0.0/24").Output(); strings.TrimSpace(string(out)) != "" {
		t.Fatalf("198.18.0.0/24 is already on a host link (not a test internet of this suite):\n%s", out)
	}
	for _, dst := range []string{"10.99.0.0/24", n.Metadata.String()} {
		if out := ipCmd(t, "route", "show", "exact", dst); strings.TrimSpace(out) != "" {
			t.Fatalf("the host already routes %s (not through a test internet of this suite): %s", dst, out)
		}
	}

	ipCmd(t, "netns", "add", n.NS)
	n.stops = append(n.stops, func() { _ = exec.Command("ip", "netns", "del", n.NS).Run() })
	ipCmd(t, "link", "add", n.HostLink, "type", "veth", "peer", "name", "eth0", "netns", n.NS)
	n.stops = append(n.stops, func() { _ = exec.Command("ip", "link", "del", n.HostLink).Run() })
	ipCmd(t, "addr", "add", n.HostAddr.String()+"/24", "dev", n.HostLink)
	ipCmd(t, "link", "set", n.HostLink, "up")
	ipCmd(t, "-n", n.NS, "link", "set", "lo", "up")
	ipCmd(t, "-n", n.NS, "addr", "add", n.Addr.String()+"/24", "dev", "eth0")
	ipCmd(t, "-n", n.NS, "addr", "add", n.Private.String()+"/32", "dev", "lo")
	ipCmd(t, "-n", n.NS, "addr", "add", n.Metadata.String()+"/32", "dev", "lo")
	ipCmd(t, "-n", n.NS, "link", "set", "eth0", "up")
	// Only for diagnostics: a connection that was not masqueraded still
	// gets an answer, and the server reports the address it came from.
	ipCmd(t, "-n", n.NS, "route", "add", "default", "via", n.HostAddr.String())
	ipCmd(t, "route", "add", "10.99.0.0/24", "via", n.Addr.String(), "dev", n.HostLink)
	ipCmd(t, "route", "add", n.Metadata.String()+"/32", "via", n.Addr.String(), "dev", n.HostLink)

	n.serveHTTP()
	n.serveDNS()
	return n
}

// testInternetLock is held by the process whose test internet is up.
const testInternetLock = "/run/lock/aleph-vm-test-internet.lock"

// lockTestInternet takes the host-wide test internet lock, waiting up to
// 30 minutes for another test process to release it. The lock goes with
// the process, so a killed test never holds it.
func lockTestInternet(t *testing.T) *os.File {
	t.Helper()
	_ = os.MkdirAll(filepath.Dir(testInternetLock), 0o755)
	f, err := os.OpenFile(testInternetLock, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatalf("test internet lock: %v", err)
	}
	deadline := time.Now().Add(30 * time.Minute)
	for logged := false; ; {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return f
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			t.Fatalf("test internet lock: %v", err)
		}
		if time.Now().After(deadline) {
			f.Close()
			t.Fatalf("another test process has held %s for 30 minutes", testInternetLock)
		}
		if !logged {
			t.Logf("waiting for another test process's test internet to go (%s)", testInternetLock)
			logged = true
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// sweepStaleTestInternets removes the test internets of test processes
// that died before their cleanup ran.
func sweepStaleTestInternets(t *testing.T) {
	out, _ := exec.Command("ip", "netns", "list").Output()
	for _, line := range strings.Split(string(out), "\n") {
		name, _, _ := strings.Cut(strings.TrimSpace(line), " ")
		pidStr, ok := strings.CutPrefix(name, "tinet-")
		if !ok {
			continue
		}
		pid, err := strconv.Atoi(pidStr)
		if err != nil || pid == os.Getpid() {
			continue
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
			continue
		}
		t.Logf("removing the test internet of dead process %d", pid)
		_ = exec.Command("ip", "link", "del", "tinet"+pidStr).Run()
		_ = exec.Command("ip", "netns", "del", name).Run()
	}
}

// inNamespace runs fn on an OS thread switched into the namespace ns:
// sockets fn creates belong to ns for their whole life.
func inNamespace(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		target, err := netns.GetFromName(ns)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer target.Close()
		if err := netns.Set(target); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering %s: %w", ns, err)
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			// The thread stays locked and dies with this goroutine, so
			// nothing else ever runs in the wrong namespace.
			errc <- fmt.Errorf("leaving %s: %w", ns, err)
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

func (n *testInternet) serveHTTP() {
	t := n.t
	t.Helper()
	var ln net.Listener
	if err := inNamespace(n.NS, func() (err error) {
		ln, err = net.Listen("tcp4", "0.0.0.0:80")
		return err
	}); err != nil {
		t.Fatalf("test internet HTTP server: %v", err)
	}
	srv := &http.Server{
		ReadHeaderTimeout: 5 * time.Second,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			local := netip.Addr{}
			if a, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
				if ap, err := netip.ParseAddrPort(a.String()); err == nil {
					local = ap.Addr().Unmap()
				}
			}
			remote, _ := netip.ParseAddrPort(r.RemoteAddr)
			n.mu.Lock()
			n.hits = append(n.hits, inetHit{Local: local, Remote: remote, Path: r.URL.Path})
			n.mu.Unlock()
			w.Header().Set("Content-Type", "text/plain")
			fmt.Fprintf(w, "hello from the test internet %s\nclient %s\n", local, r.RemoteAddr)
		}),
	}
	go func() { _ = srv.Serve(ln) }()
	n.stops = append(n.stops, func() { _ = srv.Close() })
}

func (n *testInternet) serveDNS() {
	t := n.t
	t.Helper()
	records := map[string]netip.Addr{inetName: n.Addr, privateName: n.Private}
	handler := dns.HandlerFunc(func(w dns.ResponseWriter, req *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(req)
		m.Authoritative = true
		for _, q := range req.Question {
			name := strings.ToLower(q.Name)
			n.mu.Lock()
			n.queries = append(n.queries, dnsQuery{Name: name, Type: dns.TypeToString[q.Qtype], Remote: w.RemoteAddr().String()})
			n.mu.Unlock()
			addr, ok := records[name]
			switch {
			case !ok:
				m.Rcode = dns.RcodeNameError
			case q.Qtype == dns.TypeA || q.Qtype == dns.TypeANY:
				m.Answer = append(m.Answer, &dns.A{
					Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 5},
					A:   net.IP(addr.AsSlice()),
				})
			case q.Qtype == dns.TypeAAAA && name == inetName:
				// An address to resolve only (nothing routes it): the
				// diagnostic program's /dns wants both families.
				m.Answer = append(m.Answer, &dns.AAAA{
					Hdr:  dns.RR_Header{Name: q.Name, Rrtype: dns.TypeAAAA, Class: dns.ClassINET, Ttl: 5},
					AAAA: net.IP(inetIPv6.AsSlice()),
				})
			}
			// Other types of a known name: an empty answer (NODATA).
		}
		_ = w.WriteMsg(m)
	})
	var pc net.PacketConn
	var ln net.Listener
	if err := inNamespace(n.NS, func() (err error) {
		if pc, err = net.ListenPacket("udp4", "0.0.0.0:53"); err != nil {
			return err
		}
		ln, err = net.Listen("tcp4", "0.0.0.0:53")
		return err
	}); err != nil {
		t.Fatalf("test internet DNS server: %v", err)
	}
	for _, srv := range []*dns.Server{{PacketConn: pc, Handler: handler}, {Listener: ln, Handler: handler}} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go func() { _ = srv.ActivateAndServe() }()
		select {
		case <-started:
		case <-time.After(10 * time.Second):
			t.Fatal("test internet DNS server did not start")
		}
		n.stops = append(n.stops, func() { _ = srv.Shutdown() })
	}
}

// close stops the servers and removes the namespace, the link and its
// routes. It may be called more than once.
func (n *testInternet) close() {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return
	}
	n.closed = true
	n.mu.Unlock()
	for i := len(n.stops) - 1; i >= 0; i-- {
		n.stops[i]()
	}
}

// Hits returns the HTTP requests served so far.
func (n *testInternet) Hits() []inetHit {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]inetHit(nil), n.hits...)
}

// HitsOn returns the HTTP requests that reached addr.
func (n *testInternet) HitsOn(addr netip.Addr) []inetHit {
	var out []inetHit
	for _, h := range n.Hits() {
		if h.Local == addr {
			out = append(out, h)
		}
	}
	return out
}

// Queries returns the DNS questions answered so far.
func (n *testInternet) Queries() []dnsQuery {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]dnsQuery(nil), n.queries...)
}

// Asked reports whether the DNS server was asked about name.
func (n *testInternet) Asked(name string) bool {
	name = strings.ToLower(dns.Fqdn(name))
	for _, q := range n.Queries() {
		if q.Name == name {
			return true
		}
	}
	return false
}

// hostHTTP is a client for the test itself: no proxy from the environment.
var hostHTTP = &http.Client{
	Timeout:   5 * time.Second,
	Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true},
}

// fetchFromHost gets http://addr/ from the host.
func fetchFromHost(addr netip.Addr) (string, error) {
	resp, err := hostHTTP.Get("http://" + addr.String() + "/")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return string(b), fmt.Errorf("status %s", resp.Status)
	}
	return string(b), err
}

// resolveAt asks the DNS server at server for the A record of name.
func resolveAt(server netip.Addr, network, name string) ([]netip.Addr, int, error) {
	c := &dns.Client{Net: network, Timeout: 3 * time.Second}
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), dns.TypeA)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r, _, err := c.ExchangeContext(ctx, m, netip.AddrPortFrom(server, 53).String())
	if err != nil {
		return nil, 0, err
	}
	var out []netip.Addr
	for _, rr := range r.Answer {
		if a, ok := rr.(*dns.A); ok {
			addr, _ := netip.AddrFromSlice(a.A.To4())
			out = append(out, addr)
		}
	}
	return out, r.Rcode, nil
}

// The test internet on its own, before any supervisor uses it: reachable
// from the host on each of its addresses, its DNS server answers over UDP
// and TCP, and closing it leaves nothing behind.
func TestTestInternet(t *testing.T) {
	n := newTestInternet(t)

	for _, addr := range []netip.Addr{n.Addr, n.Private, n.Metadata} {
		body, err := fetchFromHost(addr)
		if err != nil {
			t.Fatalf("GET http://%s/ from the host: %v %s", addr, err, body)
		}
		want := "hello from the test internet " + addr.String() + "\nclient " + n.HostAddr.String() + ":"
		if !strings.HasPrefix(body, want) {
			t.Errorf("GET http://%s/ answered %q, want it to start with %q", addr, body, want)
		}
		if hits := n.HitsOn(addr); len(hits) != 1 || hits[0].Remote.Addr() != n.HostAddr {
			t.Errorf("hits on %s: %+v", addr, hits)
		}
	}

	for _, c := range []struct {
		network, name string
		want          netip.Addr
	}{
		{"udp", inetName, n.Addr},
		{"tcp", inetName, n.Addr},
		{"udp", privateName, n.Private},
		{"tcp", "PRIVATE.test", n.Private},
	} {
		got, rcode, err := resolveAt(n.Addr, c.network, c.name)
		if err != nil || rcode != dns.RcodeSuccess || len(got) != 1 || got[0] != c.want {
			t.Errorf("%s %s: %v rcode %s err %v, want %v", c.network, c.name, got, dns.RcodeToString[rcode], err, c.want)
		}
	}
	if got, rcode, err := resolveAt(n.Addr, "udp", "unknown.test"); err != nil || rcode != dns.RcodeNameError || len(got) != 0 {
		t.Errorf("unknown.test: %v rcode %s err %v, want NXDOMAIN", got, dns.RcodeToString[rcode], err)
	}
	if !n.Asked("inet.test") || !n.Asked("unknown.test.") {
		t.Errorf("queries not recorded: %+v", n.Queries())
	}

	// The servers' sockets live in the namespace, not on the host.
	if body, err := fetchFromHost(netip.MustParseAddr("127.0.0.1")); err == nil && strings.Contains(body, "test internet") {
		t.Errorf("the test internet's server answers on the host loopback: %q", body)
	}

	n.close()
	if out := ipCmd(t, "netns", "list"); strings.Contains(out, n.NS) {
		t.Errorf("namespace %s left behind:\n%s", n.NS, out)
	}
	if err := exec.Command("ip", "link", "show", n.HostLink).Run(); err == nil {
		t.Errorf("link %s left behind", n.HostLink)
	}
	for _, dst := range []string{"10.99.0.0/24", n.Metadata.String()} {
		if out := ipCmd(t, "route", "show", "exact", dst); strings.TrimSpace(out) != "" {
			t.Errorf("route to %s left behind: %s", dst, out)
		}
	}
	if _, err := fetchFromHost(n.Addr); err == nil {
		t.Errorf("the test internet still answers after close")
	}
	if out, _ := exec.Command("ip", "-br", "-4", "addr", "show", "to", "198.18.0.0/24").Output(); len(bytes.TrimSpace(out)) != 0 {
		t.Errorf("addresses left behind: %s", out)
	}
}
