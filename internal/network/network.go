// Package network gives each execution a network of its own: one subnet
// of IPV4_ADDRESS_POOL, a link between the host (the gateway, .1) and the
// program (.2), outbound NAT through NETWORK_INTERFACE and an egress
// firewall, all in a nftables table of ours. gVisor sandboxes get a
// network namespace whose eth0 runsc's netstack takes over; VMs get a tap.
//
// Everything an execution gets is named after its subnet's index and is
// reserved by a lease file first (lease.go), so Release, and Sweep after a
// crash, find every piece.
package network

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"

	"github.com/google/nftables"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// Defaults of Options.
const (
	DefaultLeaseDir   = "/run/aleph-vm/network/leases"
	DefaultTable      = "aleph_vm"
	DefaultLinkPrefix = "avm"
)

// Options configure a Manager.
type Options struct {
	Pool      netip.Prefix // IPV4_ADDRESS_POOL
	PrefixLen int          // IPV4_NETWORK_PREFIX_LENGTH
	// Outbound is NETWORK_INTERFACE (the caller resolves an unset one,
	// e.g. with DefaultRouteInterface, as it needs it for DNS too).
	Outbound    string
	Nameservers []netip.Addr   // what programs use for DNS
	EgressAllow []netip.Prefix // private ranges the operator opens
	// LeaseDir, Table and LinkPrefix default to the Default* constants;
	// tests change them to stay apart from a running supervisor.
	LeaseDir   string
	Table      string
	LinkPrefix string
	Logger     *slog.Logger
}

// Manager hands out networks. It is safe for concurrent use.
type Manager struct {
	opts   Options
	leases leaseDir
	fw     *firewall
	log    *slog.Logger
	self   lease // owner fields of our leases

	mu       sync.Mutex // serialises nftables batches and the cursor
	cursor   int
	size     int
	reserved []netip.Prefix // the host's own networks
}

// Network is one execution's network.
type Network struct {
	backend.Network
	Index int
	Link  string // host side: veth or tap
	Netns string // namespace name (gVisor), empty for taps
}

// New checks the options and returns a Manager; call Setup before use.
func New(opts Options) (*Manager, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.LeaseDir == "" {
		opts.LeaseDir = DefaultLeaseDir
	}
	if opts.Table == "" {
		opts.Table = DefaultTable
	}
	if opts.LinkPrefix == "" {
		opts.LinkPrefix = DefaultLinkPrefix
	}
	if opts.Outbound == "" {
		return nil, errors.New("network: no outbound interface")
	}
	if !opts.Pool.IsValid() || !opts.Pool.Addr().Is4() {
		return nil, fmt.Errorf("network: address pool %v is not an IPv4 range", opts.Pool)
	}
	if opts.PrefixLen <= opts.Pool.Bits() || opts.PrefixLen > 30 {
		return nil, fmt.Errorf("network: prefix length %d must be longer than the pool's (/%d) and at most 30", opts.PrefixLen, opts.Pool.Bits())
	}
	size := 1 << min(opts.PrefixLen-opts.Pool.Bits(), 20)
	start, err := processStart(os.Getpid())
	if err != nil {
		return nil, fmt.Errorf("network: %w", err)
	}
	return &Manager{
		opts:   opts,
		leases: leaseDir(opts.LeaseDir),
		fw:     newFirewall(opts.Table, opts.LinkPrefix),
		log:    opts.Logger.With("component", "network"),
		self:   lease{OwnerPID: os.Getpid(), OwnerStart: start},
		size:   size,
	}, nil
}

// Setup prepares the host: it clears what a crashed run left, enables
// IPv4 forwarding and installs the firewall.
func (m *Manager) Setup(ctx context.Context) error {
	if err := os.MkdirAll(m.opts.LeaseDir, 0o700); err != nil {
		return fmt.Errorf("network: %w", err)
	}
	if err := m.Sweep(ctx); err != nil {
		return err
	}
	reserved, err := hostPrefixes()
	if err != nil {
		return fmt.Errorf("network: %w", err)
	}
	m.reserved = reserved
	if err := m.forwarding().enable(m.self); err != nil {
		return fmt.Errorf("network: %w", err)
	}
	if err := m.withNft(m.fw.install); err != nil {
		return fmt.Errorf("network: %w", err)
	}
	m.log.Info("program networking ready", "pool", m.opts.Pool, "prefix", m.opts.PrefixLen,
		"outbound", m.opts.Outbound, "dns", m.opts.Nameservers, "egress_allow", m.opts.EgressAllow)
	return nil
}

// Sweep removes every network whose lease has no live owner: what a
// supervisor killed with -9 left behind. When no other supervisor is
// alive it also removes any link, namespace or firewall chain of ours
// that no lease describes.
func (m *Manager) Sweep(ctx context.Context) error {
	all, err := m.leases.list()
	if err != nil {
		return fmt.Errorf("network: %w", err)
	}
	var errs []error
	othersAlive := false
	for idx, l := range all {
		if err := ctx.Err(); err != nil {
			return err
		}
		if l.alive() {
			othersAlive = othersAlive || l.OwnerPID != m.self.OwnerPID
			continue
		}
		m.log.Warn("removing a network left by an earlier run", "index", idx, "execution", l.Execution)
		errs = append(errs, m.teardown(idx))
	}
	if !othersAlive {
		errs = append(errs, m.sweepUnleased(all))
	}
	return errors.Join(errs...)
}

// sweepUnleased removes links, namespaces and the table when nothing of
// ours should exist: no other owner is alive.
func (m *Manager) sweepUnleased(leased map[int]lease) error {
	var errs []error
	links, err := linksWithPrefix(m.opts.LinkPrefix)
	if err != nil {
		return err
	}
	for _, name := range links {
		if idx, ok := m.indexOf(name); ok && leased[idx].alive() {
			continue
		}
		m.log.Warn("removing a stray network link", "link", name)
		errs = append(errs, deleteLink(name))
	}
	entries, _ := os.ReadDir(netnsDir)
	prefix := m.opts.LinkPrefix + "-"
	for _, e := range entries {
		name := e.Name()
		if len(name) <= len(prefix) || name[:len(prefix)] != prefix {
			continue
		}
		if idx, err := strconv.Atoi(name[len(prefix):]); err == nil && leased[idx].alive() {
			continue
		}
		m.log.Warn("removing a stray network namespace", "netns", name)
		errs = append(errs, deleteNamespace(name))
	}
	if len(leased) == 0 || !anyAlive(leased) {
		errs = append(errs, m.withNft(m.fw.remove))
	}
	return errors.Join(errs...)
}

func anyAlive(ls map[int]lease) bool {
	for _, l := range ls {
		if l.alive() {
			return true
		}
	}
	return false
}

func (m *Manager) indexOf(link string) (int, bool) {
	p := m.opts.LinkPrefix
	if len(link) <= len(p) || link[:len(p)] != p {
		return 0, false
	}
	idx, err := strconv.Atoi(link[len(p):])
	return idx, err == nil
}

// Link says how an execution attaches to its network.
type Link struct {
	Kind backend.LinkKind
	// UID and GID own a tap, for a VMM that opens it unprivileged.
	UID, GID int
}

// Allocate reserves a subnet for an execution and builds its link with
// its firewall rules. The caller must Release it.
func (m *Manager) Allocate(ctx context.Context, execution string, link Link) (*Network, error) {
	kind := link.Kind
	if kind != backend.LinkNamespace && kind != backend.LinkTap {
		return nil, errkind.New(errkind.Unsupported, "network: this backend cannot attach a network")
	}
	idx, err := m.reserve(execution, kind)
	if err != nil {
		return nil, err
	}
	n := m.describe(idx, kind)
	if err := m.build(ctx, n, link); err != nil {
		if terr := m.teardown(idx); terr != nil {
			m.log.Error("undoing a failed network", "index", idx, "err", terr)
		}
		return nil, fmt.Errorf("network: %w", err)
	}
	return n, nil
}

// reserve takes the first free subnet after the cursor, so that a subnet
// just released is not handed out again at once (its conntrack entries
// may linger).
func (m *Manager) reserve(execution string, kind backend.LinkKind) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	l := m.self
	l.Execution = execution
	l.Kind = "tap"
	if kind == backend.LinkNamespace {
		l.Kind = "netns"
	}
	for i := range m.size {
		idx := (m.cursor + i) % m.size
		if m.overlapsHost(idx) {
			continue
		}
		l.Index = idx
		ok, err := m.leases.take(l)
		if err != nil {
			_ = m.leases.drop(idx)
			return 0, err
		}
		if ok {
			m.cursor = idx + 1
			return idx, nil
		}
	}
	return 0, errkind.New(errkind.NoCapacity, "network: every subnet of %s is in use", m.opts.Pool)
}

func (m *Manager) subnet(idx int) netip.Prefix {
	base := m.opts.Pool.Masked().Addr().As4()
	v := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	v += uint32(idx) << (32 - m.opts.PrefixLen)
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), m.opts.PrefixLen)
}

func (m *Manager) overlapsHost(idx int) bool {
	s := m.subnet(idx)
	return slices.ContainsFunc(m.reserved, s.Overlaps)
}

func (m *Manager) describe(idx int, kind backend.LinkKind) *Network {
	s := m.subnet(idx)
	gw := s.Addr().Next()
	guest := gw.Next()
	a := guest.As4()
	n := &Network{
		Index: idx,
		Link:  m.opts.LinkPrefix + strconv.Itoa(idx),
		Network: backend.Network{
			Address:  netip.PrefixFrom(guest, s.Bits()),
			Gateway:  gw,
			DNS:      slices.Clone(m.opts.Nameservers),
			GuestMAC: fmt.Sprintf("02:a1:%02x:%02x:%02x:%02x", a[0], a[1], a[2], a[3]),
		},
	}
	if kind == backend.LinkNamespace {
		n.Netns = m.opts.LinkPrefix + "-" + strconv.Itoa(idx)
		n.NetnsPath = netnsPath(n.Netns)
	} else {
		n.TapName = n.Link
	}
	return n
}

func (m *Manager) build(ctx context.Context, n *Network, link Link) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if n.Netns != "" {
		ns, err := createNamespace(n.Netns)
		if err != nil {
			return err
		}
		defer ns.Close()
		if err := setupVeth(ns, n.Link, m.opts.LinkPrefix+"p"+strconv.Itoa(n.Index), n); err != nil {
			return err
		}
	} else if err := setupTap(n.Link, n, link.UID, link.GID); err != nil {
		return err
	}
	return m.withNft(func(c *nftables.Conn) error {
		return m.fw.addExecution(c, egressPolicy{
			link:     n.Link,
			source:   n.Address.Addr(),
			pool:     m.opts.Pool,
			allow:    m.opts.EgressAllow,
			outbound: m.opts.Outbound,
		})
	})
}

// Release removes everything of the network and frees its subnet. It is
// safe to call more than once.
func (m *Manager) Release(n *Network) error {
	if n == nil {
		return nil
	}
	return m.teardown(n.Index)
}

// teardown removes every piece named after idx, then the lease. The lease
// goes last, so a failure leaves it for the next Sweep.
func (m *Manager) teardown(idx int) error {
	link := m.opts.LinkPrefix + strconv.Itoa(idx)
	errs := []error{
		m.withNft(func(c *nftables.Conn) error { return m.fw.removeExecution(c, link) }),
		deleteLink(link),
		deleteNamespace(m.opts.LinkPrefix + "-" + strconv.Itoa(idx)),
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("network %d: %w", idx, err)
	}
	return m.leases.drop(idx)
}

// Close removes the firewall table when no other supervisor uses it, and
// restores IPv4 forwarding when no other supervisor needs it. Call
// it after every network was released.
func (m *Manager) Close() error {
	// IPv4 forwarding goes back to what it was before the first of our
	// supervisors turned it on, once the last of them stops.
	restored, ferr := m.forwarding().release(m.self)
	if restored {
		m.log.Info("IPv4 forwarding restored to its value before the supervisor")
	}
	all, err := m.leases.list()
	if err != nil {
		return errors.Join(ferr, err)
	}
	if anyAlive(all) {
		return ferr
	}
	return errors.Join(ferr, m.withNft(m.fw.remove))
}

// withNft runs f with a fresh nftables connection, one batch at a time.
func (m *Manager) withNft(f func(*nftables.Conn) error) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	return f(c)
}
