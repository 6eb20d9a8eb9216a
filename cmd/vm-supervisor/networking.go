package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/config"
	"github.com/aleph-vm-go/vm-supervisor/internal/network"
)

// newNetworks prepares program networking on this host. It returns nil
// and no error when the operator turned networking off, and an error
// (programs asking for the internet are then refused with it) when
// networking is on but cannot work here.
func newNetworks(ctx context.Context, s *config.Settings, be backend.Backend, log *slog.Logger) (*network.Manager, error) {
	if !s.AllowVMNetworking {
		log.Info("program networking is off (ALLOW_VM_NETWORKING=false): programs get loopback only")
		return nil, nil
	}
	if be == nil {
		return nil, errors.New("no isolation backend")
	}
	if nw, ok := be.(backend.Networker); !ok || nw.NetworkLink() == backend.LinkNone {
		return nil, fmt.Errorf("backend %s cannot attach a network", be.Name())
	}
	outbound := s.NetworkInterface
	if outbound == "" {
		name, err := network.DefaultRouteInterface()
		if err != nil {
			return nil, fmt.Errorf("NETWORK_INTERFACE is not set and %w", err)
		}
		outbound = name
	}
	servers, err := nameservers(ctx, s, outbound, log)
	if err != nil {
		return nil, err
	}
	m, err := network.New(network.Options{
		Pool:        s.IPv4AddressPool,
		PrefixLen:   s.IPv4NetworkPrefixLength,
		Outbound:    outbound,
		Nameservers: servers,
		EgressAllow: s.EgressAllow,
		Logger:      log,
	})
	if err != nil {
		return nil, err
	}
	if err := m.Setup(ctx); err != nil {
		return nil, err
	}
	return m, nil
}

// nameservers are DNS_NAMESERVERS, or the host's as DNS_RESOLUTION says.
func nameservers(ctx context.Context, s *config.Settings, outbound string, log *slog.Logger) ([]netip.Addr, error) {
	if len(s.DNSNameservers) > 0 {
		out := make([]netip.Addr, 0, len(s.DNSNameservers))
		for _, v := range s.DNSNameservers {
			a, err := netip.ParseAddr(v)
			if err != nil {
				return nil, fmt.Errorf("DNS_NAMESERVERS: %w", err)
			}
			out = append(out, a)
		}
		return out, nil
	}
	servers, skipped, err := network.HostNameservers(ctx, s.DNSResolution, outbound)
	if err != nil {
		log.Warn("programs get no DNS servers: set ALEPH_VM_DNS_NAMESERVERS", "err", err)
		return nil, nil
	}
	if len(skipped) > 0 {
		log.Warn("host nameservers programs cannot reach are left out (loopback or IPv6)", "skipped", skipped)
	}
	if len(servers) == 0 {
		log.Warn("programs get no DNS servers: set ALEPH_VM_DNS_NAMESERVERS")
	}
	return servers, nil
}
