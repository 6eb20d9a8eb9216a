package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// Per-execution networking, end to end: programs run by the real
// supervisor reach the test internet (testinet_test.go) through NAT, the
// egress firewall keeps them off the host, each other, link-local and
// private ranges, and nothing of the network outlives the supervisor.
// The same tests run under gVisor and under QEMU (ALEPH_TEST_HYPERVISOR):
// under QEMU's emulation every cold start costs 10–30 s, so each test
// warms few programs and reuses them.

// defaultPool is the default IPV4_ADDRESS_POOL.
var defaultPool = netip.MustParsePrefix("172.16.0.0/12")

// startNetworkSupervisor starts a supervisor whose programs with internet
// go out through the test internet's link and resolve names with its DNS
// server.
func startNetworkSupervisor(t *testing.T, inet *testInternet, extraEnv ...string) *supervisor {
	t.Helper()
	env := append([]string{
		"ALEPH_VM_ALLOW_VM_NETWORKING=true",
		"ALEPH_VM_NETWORK_INTERFACE=" + inet.HostLink,
		"ALEPH_VM_DNS_NAMESERVERS=" + inet.Addr.String(),
	}, extraEnv...)
	return startSupervisor(t, env...)
}

// callInto GETs path of the program hash and decodes its JSON answer into
// v; t is the (sub)test asking.
func callInto(t *testing.T, s *supervisor, hash, path string, v any) {
	t.Helper()
	resp, err := client.Get(s.base + "/vm/" + hash + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: reading body: %v", path, err)
	}
	if resp.StatusCode != 200 {
		t.Fatalf("GET /vm/%s…%s: status %d: %s", hash[:8], path, resp.StatusCode, tail(string(b), 40))
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("GET %s: %v: %q", path, err, b)
	}
}

type fetchResult struct {
	OK     bool   `json:"ok"`
	Status int    `json:"status"`
	Body   string `json:"body"`
	Error  string `json:"error"`
}

// fetch has the program GET rawURL (urllib, 3 s timeout).
func fetch(t *testing.T, s *supervisor, hash, rawURL string) fetchResult {
	t.Helper()
	var f fetchResult
	callInto(t, s, hash, "/fetch?url="+url.QueryEscape(rawURL), &f)
	return f
}

type resolveResult struct {
	OK        bool     `json:"ok"`
	Addresses []string `json:"addresses"`
	Error     string   `json:"error"`
}

// ipReport is what the program sees of its own network.
type ipReport struct {
	Address    string   `json:"address"` // source address of a route to the test internet
	Error      string   `json:"error"`
	ResolvConf string   `json:"resolv_conf"`
	Interfaces []string `json:"interfaces"`
	Hostname   string   `json:"hostname"`
}

type connResult struct {
	Connected bool   `json:"connected"`
	Error     string `json:"error"`
	Received  string `json:"received"`
}

// connectAll has the program open TCP connections to every host:port at
// once (2 s timeout each); with read, it reports the first line received.
func connectAll(t *testing.T, s *supervisor, hash string, read bool, targets ...string) map[string]connResult {
	t.Helper()
	q := url.Values{"to": targets}
	if read {
		q.Set("read", "true")
	}
	out := map[string]connResult{}
	callInto(t, s, hash, "/connect-all?"+q.Encode(), &out)
	for _, target := range targets {
		if _, ok := out[target]; !ok {
			t.Fatalf("connect-all did not report %s: %v", target, out)
		}
	}
	return out
}

// executionIPv4 is the ipv4 field the operator page lists for the running
// execution of hash ("" when it has no network).
func executionIPv4(t *testing.T, s *supervisor, hash string) string {
	t.Helper()
	execs := s.executions(t)
	for _, e := range execs {
		if e["vm_hash"] == hash {
			switch v := e["ipv4"].(type) {
			case nil:
				return ""
			case string:
				return v
			default:
				t.Fatalf("ipv4 of %s is a %T: %v", hash, v, v)
			}
		}
	}
	t.Fatalf("no running execution of %s on /about/executions: %v", hash, execs)
	return ""
}

// programAddress is the program's IPv4 address and prefix. The address the
// program sees for itself must be the one the operator page lists.
func programAddress(t *testing.T, s *supervisor, hash string) netip.Prefix {
	t.Helper()
	var ip ipReport
	callInto(t, s, hash, "/ip", &ip)
	addr, err := netip.ParseAddr(ip.Address)
	if err != nil {
		t.Fatalf("program %s… has no IPv4 address of its own: %+v", hash[:8], ip)
	}
	listed := executionIPv4(t, s, hash)
	p, err := netip.ParsePrefix(listed)
	if err != nil {
		t.Fatalf("/about/executions lists ipv4 %q for %s…, want address/prefix: %v", listed, hash[:8], err)
	}
	if p.Addr() != addr {
		t.Fatalf("program %s… sees itself as %s, /about/executions says %s", hash[:8], addr, p)
	}
	return p
}

// gatewayOf is the host side of an execution's subnet: its first address.
func gatewayOf(p netip.Prefix) netip.Addr { return p.Masked().Addr().Next() }

// hostLinkOf names the host link that holds addr ("" if none does).
func hostLinkOf(t *testing.T, addr netip.Addr) string {
	t.Helper()
	out := ipCmd(t, "-br", "-4", "addr", "show", "to", addr.String()+"/32")
	f := strings.Fields(out)
	if len(f) == 0 {
		return ""
	}
	name, _, _ := strings.Cut(f[0], "@")
	return name
}

// hostAddresses are the IPv4 addresses of the host's links, loopback
// excepted: gateways of executions, the test internet's host side, the
// host's own.
func hostAddresses(t *testing.T) []netip.Addr {
	t.Helper()
	ifaces, err := net.Interfaces()
	if err != nil {
		t.Fatal(err)
	}
	var out []netip.Addr
	for _, iface := range ifaces {
		addrs, err := iface.Addrs()
		if err != nil {
			continue
		}
		for _, a := range addrs {
			ipnet, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			addr, ok := netip.AddrFromSlice(ipnet.IP)
			if !ok {
				continue
			}
			addr = addr.Unmap()
			if addr.Is4() && !addr.IsLoopback() {
				out = append(out, addr)
			}
		}
	}
	return out
}

// hostListener is a TCP listener of the test on every host address; it
// counts the connections it accepts.
type hostListener struct {
	ln   net.Listener
	Port int
	mu   sync.Mutex
	from []string
}

func newHostListener(t *testing.T) *hostListener {
	t.Helper()
	ln, err := net.Listen("tcp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	h := &hostListener{ln: ln, Port: ln.Addr().(*net.TCPAddr).Port}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			h.mu.Lock()
			h.from = append(h.from, c.RemoteAddr().String())
			h.mu.Unlock()
			_, _ = c.Write([]byte("host\n"))
			c.Close()
		}
	}()
	return h
}

// Accepted returns the remote addresses of the connections accepted so far.
func (h *hostListener) Accepted() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.from...)
}

// waitAccepted waits until the listener has recorded n connections.
func (h *hostListener) waitAccepted(t *testing.T, n int, d time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(d); len(h.Accepted()) < n; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the host listener recorded %v, want %d control connections", h.Accepted(), n)
		}
	}
}

// dialFromHost checks that the test itself reaches addr:port.
func dialFromHost(t *testing.T, addr netip.Addr, port int) {
	t.Helper()
	c, err := net.DialTimeout("tcp", netip.AddrPortFrom(addr, uint16(port)).String(), 2*time.Second)
	if err != nil {
		t.Fatalf("control: the test cannot reach %s:%d from the host, so a program failing to cannot prove a firewall: %v", addr, port, err)
	}
	c.Close()
}

// wantTestInternetPage fails unless f is the test internet's page served on
// addr to a client masqueraded as the host side of its link.
func wantTestInternetPage(t *testing.T, inet *testInternet, what string, f fetchResult, addr netip.Addr) {
	t.Helper()
	want := fmt.Sprintf("hello from the test internet %s\nclient %s:", addr, inet.HostAddr)
	if !f.OK || f.Status != 200 || !strings.HasPrefix(f.Body, want) {
		t.Errorf("program fetched %s: %+v\nwant a 200 starting with %q (the client line is who the server saw: %s if masqueraded)", what, f, want, inet.HostAddr)
	}
}

func TestNetworkInternet(t *testing.T) {
	requirePrerequisites(t)
	inet := newTestInternet(t)
	// On every address, the supervisor's port is something the firewall
	// must hold back, not something routing alone refuses.
	s := startNetworkSupervisor(t, inet, "ALEPH_VM_SUPERVISOR_HOST=0.0.0.0")
	online := s.upload("testdata/probe", "main:app", "--internet")
	peer := s.upload("testdata/probe", "main:app", "--internet", "--env", "ROLE=peer")
	offline := s.upload("testdata/probe", "main:app", "--env", "ROLE=offline")

	// A program with internet fetches a page of the test internet by
	// address and by name; the server sees the host side of its link (NAT).
	t.Run("fetch by address and by name", func(t *testing.T) {
		before := len(inet.HitsOn(inet.Addr))
		wantTestInternetPage(t, inet, "http://198.18.0.2/", fetch(t, s, online, "http://"+inet.Addr.String()+"/"), inet.Addr)
		hits := inet.HitsOn(inet.Addr)
		if len(hits) != before+1 {
			t.Fatalf("the test internet served %d requests on %s, want %d", len(hits), inet.Addr, before+1)
		}
		if from := hits[len(hits)-1].Remote.Addr(); from != inet.HostAddr {
			t.Errorf("the test internet saw the program's connection come from %s, want %s (masquerade)", from, inet.HostAddr)
		}

		wantTestInternetPage(t, inet, "http://inet.test/", fetch(t, s, online, "http://inet.test/"), inet.Addr)
		if !inet.Asked(inetName) {
			t.Errorf("the test internet's DNS server was never asked for %s: %+v", inetName, inet.Queries())
		}
		var r resolveResult
		callInto(t, s, online, "/resolve?name=private.test", &r)
		if !r.OK || len(r.Addresses) != 1 || r.Addresses[0] != inet.Private.String() {
			t.Errorf("program resolved private.test to %+v, want [%s]", r, inet.Private)
		}
	})

	// Its own address is in the pool, .2 of its own /24 whose .1 is on a
	// host link of ours, and is what /about/executions lists; two programs
	// never share a range.
	t.Run("own address in the pool", func(t *testing.T) {
		p := programAddress(t, s, online)
		if !defaultPool.Contains(p.Addr()) || p.Bits() != 24 {
			t.Errorf("program address %s, want a /24 inside %s", p, defaultPool)
		}
		gw := gatewayOf(p)
		if p.Addr() != gw.Next() {
			t.Errorf("program address %s, want %s (.2 of its subnet)", p.Addr(), gw.Next())
		}
		if link := hostLinkOf(t, gw); !strings.HasPrefix(link, ourLinkPrefix) {
			t.Errorf("gateway %s is on host link %q, want one named %s*", gw, link, ourLinkPrefix)
		}
		var ip ipReport
		callInto(t, s, online, "/ip", &ip)
		if !strings.Contains(ip.ResolvConf, "nameserver "+inet.Addr.String()) {
			t.Errorf("program's /etc/resolv.conf does not name DNS_NAMESERVERS=%s:\n%s", inet.Addr, ip.ResolvConf)
		}
		other := programAddress(t, s, peer)
		if other.Overlaps(p) {
			t.Errorf("two running programs share a range: %s and %s", p, other)
		}
		if !defaultPool.Contains(other.Addr()) {
			t.Errorf("peer address %s outside the pool %s", other, defaultPool)
		}
	})

	// The same program without internet keeps loopback only.
	t.Run("no internet", func(t *testing.T) {
		before := len(inet.Hits())
		if f := fetch(t, s, offline, "http://"+inet.Addr.String()+"/"); f.OK {
			t.Errorf("a program without internet fetched the test internet: %+v", f)
		}
		var ip ipReport
		callInto(t, s, offline, "/ip", &ip)
		if ip.Address != "" {
			t.Errorf("a program without internet has a route to the test internet from %s", ip.Address)
		}
		for _, name := range ip.Interfaces {
			if strings.HasPrefix(name, "eth") || strings.HasPrefix(name, "en") {
				t.Errorf("a program without internet has a network card %s (interfaces %v)", name, ip.Interfaces)
			}
		}
		if v := executionIPv4(t, s, offline); v != "" {
			t.Errorf("/about/executions lists ipv4 %q for a program without internet", v)
		}
		if n := len(inet.Hits()); n != before {
			t.Errorf("the test internet served %d requests during the offline program's attempt", n-before)
		}
	})

	t.Run("firewall", func(t *testing.T) { networkFirewall(t, s, inet, online, peer) })

	// SIGTERM with live networks: they exist now, and shutdown checks that
	// nothing of them is left.
	st := ourNetworkState(t)
	if len(st.Links) < 2 || len(st.Leases) < 2 || (hypervisor == "gvisor" && len(st.Netns) < 2) {
		t.Errorf("with two programs with internet running, the host shows %+v: the leak checks look in the wrong places", st)
	}
	s.shutdown()
}

// networkFirewall: a program with internet reaches no address of the host,
// not the other program, nor link-local and private ranges; controls first
// show that each target answers when no firewall is in the way.
func networkFirewall(t *testing.T, s *supervisor, inet *testInternet, online, peer string) {
	self := programAddress(t, s, online)
	gw := gatewayOf(self)
	other := programAddress(t, s, peer).Addr()
	const peerPort = 9090

	// Controls: every target below answers when no firewall is in the
	// way, so a failure to reach it is the firewall's doing.
	host := newHostListener(t)
	for _, a := range []netip.Addr{gw, inet.HostAddr} {
		dialFromHost(t, a, host.Port)
		dialFromHost(t, a, s.port)
	}
	// The listener records a connection when its accept loop runs, which
	// on a loaded machine may trail the dial: the two control dials must
	// be counted before the programs' attempts are.
	host.waitAccepted(t, 2, 10*time.Second)
	controls := len(host.Accepted())
	var l map[string]any
	callInto(t, s, peer, fmt.Sprintf("/listen?port=%d", peerPort), &l)
	peerTarget := netip.AddrPortFrom(other, peerPort).String()
	if r := connectAll(t, s, peer, true, peerTarget)[peerTarget]; !r.Connected || r.Received != "pong\n" {
		t.Fatalf("control: the peer program does not answer on its own address %s: %+v", peerTarget, r)
	}
	for _, a := range []netip.Addr{inet.Private, inet.Metadata} {
		if _, err := fetchFromHost(a); err != nil {
			t.Fatalf("control: the host cannot reach the test internet's %s: %v", a, err)
		}
	}
	wantTestInternetPage(t, inet, "http://198.18.0.2/ (control: the program has internet)", fetch(t, s, online, "http://"+inet.Addr.String()+"/"), inet.Addr)

	// The host (every address of it: the program's gateway, other
	// executions' gateways, the test internet's side, the host's own)
	// and the other program.
	what := map[string]string{peerTarget: "the other program's listener"}
	var targets []string
	for _, a := range hostAddresses(t) {
		for port, name := range map[int]string{s.port: "the supervisor's port", host.Port: "a listener of the host"} {
			target := netip.AddrPortFrom(a, uint16(port)).String()
			targets = append(targets, target)
			what[target] = fmt.Sprintf("%s on host address %s", name, a)
			if a == gw {
				what[target] += " (its own gateway)"
			}
		}
	}
	targets = append(targets, peerTarget)
	for target, r := range connectAll(t, s, online, false, targets...) {
		if r.Connected {
			t.Errorf("a program with internet reached %s: %s", what[target], target)
		}
	}
	if got := host.Accepted(); len(got) != controls {
		t.Errorf("the host listener accepted connections from programs: %v", got[controls:])
	}

	// Link-local (cloud metadata) and private ranges, served by the
	// test internet and routed from the host.
	hitsPrivate, hitsMetadata := len(inet.HitsOn(inet.Private)), len(inet.HitsOn(inet.Metadata))
	for _, u := range []string{"http://" + inet.Metadata.String() + "/", "http://" + inet.Private.String() + "/", "http://private.test/"} {
		if f := fetch(t, s, online, u); f.OK {
			t.Errorf("a program with internet fetched %s: %+v", u, f)
		}
	}
	if n := len(inet.HitsOn(inet.Private)); n != hitsPrivate {
		t.Errorf("the test internet served %d requests on %s to programs", n-hitsPrivate, inet.Private)
	}
	if n := len(inet.HitsOn(inet.Metadata)); n != hitsMetadata {
		t.Errorf("the test internet served %d requests on %s to programs", n-hitsMetadata, inet.Metadata)
	}
}

// EGRESS_ALLOW opens a private range the firewall otherwise closes: the
// address served from the test internet's namespace, unreachable in
// TestNetworkInternet, answers. The rest stays closed.
func TestNetworkEgressAllow(t *testing.T) {
	requirePrerequisites(t)
	inet := newTestInternet(t)
	s := startNetworkSupervisor(t, inet, "ALEPH_VM_EGRESS_ALLOW=10.99.0.0/24")
	hash := s.upload("testdata/probe", "main:app", "--internet")

	wantTestInternetPage(t, inet, "http://10.99.0.2/", fetch(t, s, hash, "http://"+inet.Private.String()+"/"), inet.Private)
	wantTestInternetPage(t, inet, "http://private.test/", fetch(t, s, hash, "http://private.test/"), inet.Private)
	if hits := inet.HitsOn(inet.Private); len(hits) != 2 {
		t.Errorf("the test internet served %d requests on %s, want 2", len(hits), inet.Private)
	}

	if f := fetch(t, s, hash, "http://"+inet.Metadata.String()+"/"); f.OK {
		t.Errorf("EGRESS_ALLOW=10.99.0.0/24 opened %s too: %+v", inet.Metadata, f)
	}
	if n := len(inet.HitsOn(inet.Metadata)); n != 0 {
		t.Errorf("the test internet served %d requests on %s to programs", n, inet.Metadata)
	}
	host := newHostListener(t)
	gw := gatewayOf(programAddress(t, s, hash))
	dialFromHost(t, gw, host.Port)
	host.waitAccepted(t, 1, 10*time.Second)
	target := netip.AddrPortFrom(gw, uint16(host.Port)).String()
	if r := connectAll(t, s, hash, false, target)[target]; r.Connected {
		t.Errorf("EGRESS_ALLOW=10.99.0.0/24 opened the host: the program reached a host listener on its gateway %s", target)
	}
	if got := host.Accepted(); len(got) != 1 {
		t.Errorf("the host listener accepted %v, want the control connection alone", got)
	}
}

// After kill -9 the restarted supervisor sweeps what the killed one left
// (links, namespaces, leases; sandboxes) before serving, serves the
// program again with a fresh network, and its SIGTERM leaves nothing.
func TestNetworkNothingLeaksAfterKill9(t *testing.T) {
	requirePrerequisites(t)
	inet := newTestInternet(t)
	s := startNetworkSupervisor(t, inet)
	first := s.upload("testdata/probe", "main:app", "--internet")
	second := s.upload("testdata/probe", "main:app", "--internet", "--env", "ROLE=second")
	for _, h := range []string{first, second} {
		wantTestInternetPage(t, inet, "http://198.18.0.2/", fetch(t, s, h, "http://"+inet.Addr.String()+"/"), inet.Addr)
	}
	before := ourNetworkState(t)
	if len(before.Links) < 2 || len(before.Leases) < 2 || (hypervisor == "gvisor" && len(before.Netns) < 2) {
		t.Fatalf("with two programs with internet running, the host shows %+v: the leak checks look in the wrong places", before)
	}
	if _, err := exec.LookPath("nft"); err == nil && len(foreignSupervisors()) == 0 && len(before.Tables) != 1 {
		t.Errorf("with programs with internet running there is no nftables table %q", ourTable)
	}

	s.kill9()
	t.Logf("left by kill -9: %+v", ourNetworkState(t))
	s.restart("ALEPH_VM_PREWARM=false")

	// Before any request: nothing of the killed supervisor, and (no
	// spare, no execution) nothing of the new one but its table.
	after := ourNetworkState(t)
	for _, c := range []struct {
		what      string
		old, left []string
	}{
		{"link", before.Links, after.Links},
		{"network namespace", before.Netns, after.Netns},
		{"lease", before.Leases, after.Leases},
	} {
		for _, name := range c.left {
			if slices.Contains(c.old, name) {
				t.Errorf("%s %s of the killed supervisor still there after the restart", c.what, name)
			} else {
				t.Errorf("%s %s exists before any request with PREWARM=false", c.what, name)
			}
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		procs, _ := exec.Command("pgrep", "-f", s.execRoot).Output()
		if strings.TrimSpace(string(procs)) == "" {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("sandboxes of the killed supervisor still running 10 s after the restart: %s", procs)
			break
		}
		time.Sleep(200 * time.Millisecond)
	}

	expect(t, s.get("/vm/"+first+"/"), 200)
	wantTestInternetPage(t, inet, "http://198.18.0.2/ after the restart", fetch(t, s, first, "http://"+inet.Addr.String()+"/"), inet.Addr)
	if p := programAddress(t, s, first); !defaultPool.Contains(p.Addr()) {
		t.Errorf("after the restart the program's address %s is outside the pool", p)
	}
	s.shutdown()
}
