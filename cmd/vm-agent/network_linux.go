package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// vmInterface is the first virtio-net device of the guest.
const vmInterface = "eth0"

// setHostname sets the host name and lists it in /etc/hosts, so that a
// program resolving its own name does not wait on DNS.
func setHostname(name string) error {
	if err := unix.Sethostname([]byte(name)); err != nil {
		return err
	}
	hosts := "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t" + name + "\n"
	return os.WriteFile("/etc/hosts", []byte(hosts), 0o644)
}

// configureNetwork gives eth0 the address, default route and resolvers of
// cfg. No address means no network: the VM then only has loopback.
func configureNetwork(cfg guest.Config, log *slog.Logger) error {
	if cfg.IPv4 == "" {
		return nil
	}
	prefix, err := netip.ParsePrefix(cfg.IPv4)
	if err != nil || !prefix.Addr().Is4() {
		return fmt.Errorf("bad IPv4 address %q (want address/prefix)", cfg.IPv4)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)

	ifr, err := unix.NewIfreq(vmInterface)
	if err != nil {
		return err
	}
	if err := ifr.SetInet4Addr(prefix.Addr().AsSlice()); err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFADDR, ifr); err != nil {
		return fmt.Errorf("%s: set address: %w", vmInterface, err)
	}
	if err := ifr.SetInet4Addr(prefixMask(prefix.Bits())); err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFNETMASK, ifr); err != nil {
		return fmt.Errorf("%s: set netmask: %w", vmInterface, err)
	}
	ifr, _ = unix.NewIfreq(vmInterface)
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("%s: get flags: %w", vmInterface, err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("%s: up: %w", vmInterface, err)
	}
	if cfg.Gateway != "" {
		gw, err := netip.ParseAddr(cfg.Gateway)
		if err != nil || !gw.Is4() {
			return fmt.Errorf("bad IPv4 gateway %q", cfg.Gateway)
		}
		if err := addDefaultRoute(fd, gw); err != nil {
			return fmt.Errorf("default route via %s: %w", gw, err)
		}
	}
	if err := writeResolvConf(cfg.DNS); err != nil {
		return err
	}
	log.Info("network configured", "interface", vmInterface, "address", prefix, "gateway", cfg.Gateway)
	return nil
}

// writeResolvConf points the guest's resolver at the Config's nameservers.
// Under gVisor it is all the agent does for the network: runsc's netstack
// took the address and routes from the namespace the host prepared.
func writeResolvConf(servers []string) error {
	if len(servers) == 0 {
		return nil
	}
	var b strings.Builder
	for _, ns := range servers {
		if _, err := netip.ParseAddr(ns); err != nil {
			return fmt.Errorf("bad DNS server %q", ns)
		}
		fmt.Fprintf(&b, "nameserver %s\n", ns)
	}
	// The runtime may ship resolv.conf as a symlink into /run.
	os.Remove("/etc/resolv.conf")
	if err := os.WriteFile("/etc/resolv.conf", []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("writing /etc/resolv.conf: %w", err)
	}
	return nil
}

func prefixMask(bits int) []byte {
	m := uint32(0)
	if bits > 0 {
		m = ^uint32(0) << (32 - bits)
	}
	return []byte{byte(m >> 24), byte(m >> 16), byte(m >> 8), byte(m)}
}

// rtentry is struct rtentry of <linux/route.h> on 64-bit Linux; x/sys/unix
// does not define it, and SIOCADDRT spares the agent a netlink client.
type rtentry struct {
	pad1    uint64
	dst     unix.RawSockaddrInet4
	gateway unix.RawSockaddrInet4
	genmask unix.RawSockaddrInet4
	flags   uint16
	pad2    int16
	pad3    uint64
	pad4    uintptr
	metric  int16
	dev     *byte
	mtu     uint64
	window  uint64
	irtt    uint16
}

func addDefaultRoute(fd int, gw netip.Addr) error {
	if unsafe.Sizeof(uintptr(0)) != 8 {
		return errors.New("routes are only supported on 64-bit guests")
	}
	rt := rtentry{flags: unix.RTF_UP | unix.RTF_GATEWAY}
	rt.dst.Family = unix.AF_INET
	rt.genmask.Family = unix.AF_INET
	rt.gateway.Family = unix.AF_INET
	rt.gateway.Addr = gw.As4()
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCADDRT, uintptr(unsafe.Pointer(&rt)))
	if errno != 0 && errno != unix.EEXIST {
		return errno
	}
	return nil
}
