package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// netnsDir is where `ip netns` keeps named namespaces; ours are visible
// to `ip netns list` for operators.
const netnsDir = "/run/netns"

// GuestInterface is the name of the program's link inside its namespace.
const GuestInterface = "eth0"

func netnsPath(name string) string { return filepath.Join(netnsDir, name) }

// createNamespace makes a named network namespace without moving the
// calling goroutine into it for longer than the creation.
func createNamespace(name string) (netns.NsHandle, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return 0, err
	}
	defer orig.Close()
	if err := os.MkdirAll(netnsDir, 0o755); err != nil {
		return 0, err
	}
	ns, err := netns.NewNamed(name)
	if restoreErr := netns.Set(orig); restoreErr != nil {
		// This thread is stuck in the new namespace: keep it locked so the
		// runtime throws it away instead of reusing it.
		runtime.LockOSThread()
		return 0, fmt.Errorf("returning to the host namespace: %w", restoreErr)
	}
	if err != nil {
		return 0, fmt.Errorf("creating network namespace %s: %w", name, err)
	}
	return ns, nil
}

func deleteNamespace(name string) error {
	err := netns.DeleteNamed(name)
	if err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("deleting network namespace %s: %w", name, err)
	}
	return nil
}

// setupVeth creates hostLink on the host with the gateway address and its
// peer inside ns as eth0 with the program's address and default route, as
// gVisor's netstack expects to find them.
func setupVeth(ns netns.NsHandle, hostLink, peerTemp string, n *Network) error {
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: hostLink},
		PeerName:      peerTemp,
		PeerNamespace: netlink.NsFd(int(ns)),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		return fmt.Errorf("creating veth %s: %w", hostLink, err)
	}
	if err := upWithAddress(netlink.Handle{}, hostLink, netip.PrefixFrom(n.Gateway, n.Address.Bits())); err != nil {
		return err
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in namespace: %w", err)
	}
	defer h.Close()
	peer, err := h.LinkByName(peerTemp)
	if err != nil {
		return fmt.Errorf("veth peer: %w", err)
	}
	if err := h.LinkSetName(peer, GuestInterface); err != nil {
		return fmt.Errorf("renaming veth peer: %w", err)
	}
	if mac, err := net.ParseMAC(n.GuestMAC); err == nil {
		if err := h.LinkSetHardwareAddr(peer, mac); err != nil {
			return fmt.Errorf("guest MAC: %w", err)
		}
	}
	if lo, err := h.LinkByName("lo"); err == nil {
		_ = h.LinkSetUp(lo)
	}
	if err := upWithAddress(*h, GuestInterface, n.Address); err != nil {
		return err
	}
	guestLink, err := h.LinkByName(GuestInterface)
	if err != nil {
		return err
	}
	route := &netlink.Route{LinkIndex: guestLink.Attrs().Index, Gw: n.Gateway.AsSlice()}
	if err := h.RouteAdd(route); err != nil {
		return fmt.Errorf("default route in namespace: %w", err)
	}
	return nil
}

// setupTap creates a persistent tap for a VM, with the gateway address on
// the host side. QEMU and Firecracker open it by name.
func setupTap(name string, n *Network, uid, gid int) error {
	// netlink always sets the owner: zero would make the tap root's only.
	tap := &netlink.Tuntap{
		LinkAttrs: netlink.LinkAttrs{Name: name},
		Mode:      netlink.TUNTAP_MODE_TAP,
		Flags:     netlink.TUNTAP_NO_PI,
		Owner:     uint32(uid),
		Group:     uint32(gid),
	}
	if err := netlink.LinkAdd(tap); err != nil {
		return fmt.Errorf("creating tap %s: %w", name, err)
	}
	// LinkAdd keeps the tap's file descriptors open; the device is
	// persistent, so closing them leaves it for the VMM to open.
	for _, f := range tap.Fds {
		f.Close()
	}
	return upWithAddress(netlink.Handle{}, name, netip.PrefixFrom(n.Gateway, n.Address.Bits()))
}

func upWithAddress(h netlink.Handle, name string, addr netip.Prefix) error {
	link, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("link %s: %w", name, err)
	}
	ipnet := &net.IPNet{IP: addr.Addr().AsSlice(), Mask: net.CIDRMask(addr.Bits(), 32)}
	if err := h.AddrAdd(link, &netlink.Addr{IPNet: ipnet}); err != nil {
		return fmt.Errorf("address %s on %s: %w", addr, name, err)
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("link %s up: %w", name, err)
	}
	return nil
}

func deleteLink(name string) error {
	link, err := netlink.LinkByName(name)
	if err != nil {
		var notFound netlink.LinkNotFoundError
		if errors.As(err, &notFound) {
			return nil
		}
		return fmt.Errorf("link %s: %w", name, err)
	}
	if err := netlink.LinkDel(link); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("deleting link %s: %w", name, err)
	}
	return nil
}

// linksWithPrefix lists host links whose name starts with prefix.
func linksWithPrefix(prefix string) ([]string, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("listing links: %w", err)
	}
	var out []string
	for _, l := range links {
		if name := l.Attrs().Name; len(name) > len(prefix) && name[:len(prefix)] == prefix {
			out = append(out, name)
		}
	}
	return out, nil
}

// hostPrefixes are the networks of the host's own addresses, which the
// pool must not hand out.
func hostPrefixes() ([]netip.Prefix, error) {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("listing host addresses: %w", err)
	}
	var out []netip.Prefix
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP.To4())
		if !ok {
			continue
		}
		bits, _ := a.Mask.Size()
		out = append(out, netip.PrefixFrom(ip, bits).Masked())
	}
	return out, nil
}

// DefaultRouteInterface is the interface of the host's IPv4 default route.
func DefaultRouteInterface() (string, error) {
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		return "", fmt.Errorf("listing routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst == nil || r.Dst.IP.IsUnspecified() && isZeroMask(r.Dst.Mask) {
			link, err := netlink.LinkByIndex(r.LinkIndex)
			if err != nil {
				return "", fmt.Errorf("default route's link: %w", err)
			}
			return link.Attrs().Name, nil
		}
	}
	return "", errors.New("the host has no IPv4 default route")
}

func isZeroMask(m net.IPMask) bool {
	ones, _ := m.Size()
	return ones == 0
}
