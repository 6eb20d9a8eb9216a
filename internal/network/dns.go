package network

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"strings"
)

// DNS resolution modes, as aleph-vm names them: where the host's
// nameservers are read when DNS_NAMESERVERS is not given.
const (
	DNSDetect     = "detect"      // resolvectl when it answers, else resolv.conf
	DNSResolvConf = "resolv.conf" // /etc/resolv.conf
	DNSResolvectl = "resolvectl"  // systemd-resolved's servers of the outbound link
)

// HostNameservers finds the nameservers programs should use. Loopback
// servers (a local stub resolver such as systemd-resolved's 127.0.0.53)
// are left out: programs cannot reach the host's loopback.
func HostNameservers(ctx context.Context, mode, iface string) (servers, skipped []netip.Addr, err error) {
	var all []netip.Addr
	switch mode {
	case DNSResolvConf:
		all, err = resolvConfServers("/etc/resolv.conf")
	case DNSResolvectl:
		all, err = resolvectlServers(ctx, iface)
	case DNSDetect, "":
		all, err = resolvectlServers(ctx, iface)
		if err != nil || len(all) == 0 {
			all, err = resolvConfServers("/etc/resolv.conf")
		}
	default:
		return nil, nil, fmt.Errorf("unknown DNS resolution mode %q", mode)
	}
	if err != nil {
		return nil, nil, err
	}
	for _, a := range all {
		if a.IsLoopback() || !a.Is4() {
			skipped = append(skipped, a)
			continue
		}
		servers = append(servers, a)
	}
	return servers, skipped, nil
}

func resolvConfServers(path string) ([]netip.Addr, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading nameservers: %w", err)
	}
	defer f.Close()
	return parseResolvConf(f), nil
}

func parseResolvConf(r io.Reader) []netip.Addr {
	var out []netip.Addr
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "nameserver" {
			if a, err := netip.ParseAddr(fields[1]); err == nil {
				out = append(out, a.Unmap())
			}
		}
	}
	return out
}

// resolvectlServers parses `resolvectl dns -i IFACE`, whose output looks
// like "Link 2 (eth0): 192.0.2.53 2001:db8::53".
func resolvectlServers(ctx context.Context, iface string) ([]netip.Addr, error) {
	out, err := exec.CommandContext(ctx, "resolvectl", "dns", "-i", iface).Output()
	if err != nil {
		return nil, fmt.Errorf("resolvectl dns -i %s: %w", iface, err)
	}
	_, servers, ok := strings.Cut(string(out), ":")
	if !ok {
		return nil, fmt.Errorf("resolvectl dns -i %s: unexpected output %q", iface, out)
	}
	var addrs []netip.Addr
	for _, f := range strings.Fields(servers) {
		if a, err := netip.ParseAddr(f); err == nil {
			addrs = append(addrs, a)
		}
	}
	return addrs, nil
}
