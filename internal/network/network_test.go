package network

import (
	"context"
	"encoding/json"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
)

// These tests change the host's network (namespaces, links, nftables), so
// they need root; with CI=true they must run.
func requireRoot(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("changes the host's network as root: skipped with -short")
	}
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("network tests need root in CI")
	}
	t.Skip("network tests need root")
}

// testManager uses names of its own so it never meets a running
// supervisor's links or table.
func testManager(t *testing.T, leases string) *Manager {
	t.Helper()
	m, err := New(Options{
		Pool:        netip.MustParsePrefix("10.213.0.0/16"),
		PrefixLen:   24,
		Outbound:    "lo",
		Nameservers: []netip.Addr{netip.MustParseAddr("192.0.2.53")},
		LeaseDir:    leases,
		Table:       "aleph_vm_test",
		LinkPrefix:  "tvm",
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestAllocateReleaseAndFirewall(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	m := testManager(t, t.TempDir())
	if err := m.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })

	a, err := m.Allocate(ctx, "exec-a", Link{Kind: backend.LinkNamespace})
	if err != nil {
		t.Fatal(err)
	}
	b, err := m.Allocate(ctx, "exec-b", Link{Kind: backend.LinkTap, UID: 4242, GID: 4343})
	if err != nil {
		t.Fatal(err)
	}
	if a.Address.String() != "10.213.0.2/24" || a.Gateway.String() != "10.213.0.1" {
		t.Errorf("first network: %v via %v", a.Address, a.Gateway)
	}
	if b.Address.String() != "10.213.1.2/24" || b.TapName != "tvm1" {
		t.Errorf("second network: %v tap %q", b.Address, b.TapName)
	}
	if a.NetnsPath == "" || a.TapName != "" {
		t.Errorf("namespace network: %+v", a)
	}
	// The tap belongs to the user its VMM runs as.
	owner, _ := os.ReadFile("/sys/class/net/tvm1/owner")
	group, _ := os.ReadFile("/sys/class/net/tvm1/group")
	if strings.TrimSpace(string(owner)) != "4242" || strings.TrimSpace(string(group)) != "4343" {
		t.Errorf("tap owner %q group %q, want 4242 4343", owner, group)
	}

	// Inside the namespace: eth0 with the program's address and a default
	// route through the gateway.
	ns, err := netns.GetFromPath(a.NetnsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	eth0, err := h.LinkByName(GuestInterface)
	if err != nil {
		t.Fatal(err)
	}
	addrs, _ := h.AddrList(eth0, netlink.FAMILY_V4)
	if len(addrs) != 1 || addrs[0].IPNet.String() != "10.213.0.2/24" {
		t.Errorf("eth0 addresses: %v", addrs)
	}
	routes, _ := h.RouteList(eth0, netlink.FAMILY_V4)
	foundDefault := false
	for _, r := range routes {
		if r.Dst == nil || isZeroMask(r.Dst.Mask) {
			foundDefault = r.Gw.String() == "10.213.0.1"
		}
	}
	if !foundDefault {
		t.Errorf("no default route via the gateway: %v", routes)
	}

	// The host listens on the gateway address: from the namespace, the
	// connection must be dropped by the input chain.
	ln, err := net.Listen("tcp", a.Gateway.String()+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	if err := dialFrom(t, ns, ln.Addr().String()); err == nil {
		t.Errorf("a program reached a host listener on its gateway %s", ln.Addr())
	}
	// With our table gone the same connection succeeds: the block above
	// was the firewall, not routing.
	if err := m.withNft(m.fw.remove); err != nil {
		t.Fatal(err)
	}
	if err := dialFrom(t, ns, ln.Addr().String()); err != nil {
		t.Errorf("without the firewall the host listener is unreachable too (%v): the test proves nothing", err)
	}
	if err := m.withNft(m.fw.install); err != nil {
		t.Fatal(err)
	}

	for _, n := range []*Network{a, b} {
		if err := m.Release(n); err != nil {
			t.Fatal(err)
		}
		if err := m.Release(n); err != nil {
			t.Fatalf("second release: %v", err)
		}
	}
	assertNothingLeft(t, m)
}

func dialFrom(t *testing.T, ns netns.NsHandle, addr string) error {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // the thread is discarded: never unlocked
		if err := netns.Set(ns); err != nil {
			errc <- err
			return
		}
		c, err := net.DialTimeout("tcp", addr, 700*time.Millisecond)
		if err == nil {
			c.Close()
		}
		errc <- err
	}()
	return <-errc
}

func TestSweepRemovesWhatADeadOwnerLeft(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	dir := t.TempDir()
	first := testManager(t, dir)
	if err := first.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	n, err := first.Allocate(ctx, "crashed", Link{Kind: backend.LinkNamespace})
	if err != nil {
		t.Fatal(err)
	}
	// The owner dies without releasing anything (kill -9): its lease names
	// a process that no longer exists.
	l := lease{Index: n.Index, Execution: "crashed", Kind: "netns", OwnerPID: 1 << 30, OwnerStart: 1}
	b, _ := json.Marshal(l)
	if err := os.WriteFile(filepath.Join(dir, "0"), b, 0o600); err != nil {
		t.Fatal(err)
	}

	second := testManager(t, dir)
	if err := second.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := netlink.LinkByName(n.Link); err == nil {
		t.Errorf("link %s survived the sweep", n.Link)
	}
	if _, err := os.Stat(n.NetnsPath); err == nil {
		t.Errorf("namespace %s survived the sweep", n.NetnsPath)
	}
	if err := second.Close(); err != nil {
		t.Fatal(err)
	}
	assertNothingLeft(t, second)
}

func assertNothingLeft(t *testing.T, m *Manager) {
	t.Helper()
	if links, _ := linksWithPrefix(m.opts.LinkPrefix); len(links) > 0 {
		t.Errorf("links left: %v", links)
	}
	entries, _ := os.ReadDir(netnsDir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), m.opts.LinkPrefix+"-") {
			t.Errorf("namespace left: %s", e.Name())
		}
	}
	if ls, _ := m.leases.list(); len(ls) > 0 {
		t.Errorf("leases left: %v", ls)
	}
	c, _ := nftables.New()
	if chains, _ := m.fw.ourChains(c); len(chains) > 0 {
		t.Errorf("chains left: %v", chains)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if ok, _ := m.fw.exists(c); ok {
		t.Errorf("table %s left", m.fw.table.Name)
	}
}

func TestParseResolvConf(t *testing.T) {
	got := parseResolvConf(strings.NewReader("# comment\nnameserver 192.0.2.1\nsearch x\nnameserver 2001:db8::1\nnameserver bogus\n"))
	if len(got) != 2 || got[0].String() != "192.0.2.1" || got[1].String() != "2001:db8::1" {
		t.Errorf("got %v", got)
	}
}
