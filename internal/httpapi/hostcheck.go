package httpapi

import (
	"context"
	"net"
	"net/http"
	"sync"
	"time"
)

// HostCheck are the targets of /status/check/host (aleph-vm's
// CONNECTIVITY_* settings, views/host_status.py).
type HostCheck struct {
	IPv4URL, IPv6URL string
	DNSHostname      string
	HTTPURLs         []string
	// LookupIPAddr resolves names; nil: net.DefaultResolver.
	LookupIPAddr func(ctx context.Context, host string) ([]net.IPAddr, error)
	// Timeout bounds each HTTP probe (aleph-vm: 5 s); 0: 5 s.
	Timeout time.Duration
}

// familyResult is one address family's line of /status/check/host, in
// aleph-vm's key order.
type familyResult struct {
	Egress bool `json:"egress"`
	DNS    bool `json:"dns"`
	Domain bool `json:"domain"`
	HTTP   bool `json:"http"`
}

type hostCheckResult struct {
	IPv4 familyResult `json:"ipv4"`
	IPv6 familyResult `json:"ipv6"`
}

// handleCheckHost is aleph-vm's status_check_host: per family, egress to
// a raw IP, resolution of CONNECTIVITY_DNS_HOSTNAME and of DOMAIN_NAME,
// and HTTP to a named host (advisory); 200 when every egress, dns and
// domain check passes, else 503, with the same JSON either way.
func (s *Server) handleCheckHost(w http.ResponseWriter, r *http.Request) {
	hc := s.opts.HostCheck
	if hc == nil {
		hc = &HostCheck{}
	}
	ctx := r.Context()
	lookup := hc.LookupIPAddr
	if lookup == nil {
		lookup = net.DefaultResolver.LookupIPAddr
	}
	resolves := func(host string) (v4, v6 bool) {
		if host == "" {
			return false, false
		}
		addrs, err := lookup(ctx, host)
		if err != nil {
			return false, false
		}
		for _, a := range addrs {
			if a.IP.To4() != nil {
				v4 = true
			} else {
				v6 = true
			}
		}
		return v4, v6
	}
	var out hostCheckResult
	// The probes run side by side: each may wait for its timeout.
	var wg sync.WaitGroup
	wg.Go(func() { out.IPv4.DNS, out.IPv6.DNS = resolves(hc.DNSHostname) })
	wg.Go(func() { out.IPv4.Domain, out.IPv6.Domain = resolves(s.opts.DomainName) })
	wg.Go(func() { out.IPv4.Egress = hc.reaches(ctx, "tcp4", hc.IPv4URL) })
	wg.Go(func() { out.IPv6.Egress = hc.reaches(ctx, "tcp6", hc.IPv6URL) })
	wg.Go(func() { out.IPv4.HTTP = hc.reachesAny(ctx, "tcp4", hc.HTTPURLs) })
	wg.Go(func() { out.IPv6.HTTP = hc.reachesAny(ctx, "tcp6", hc.HTTPURLs) })
	wg.Wait()
	ok := func(f familyResult) bool { return f.Egress && f.DNS && f.Domain }
	code := http.StatusOK
	if !ok(out.IPv4) || !ok(out.IPv6) {
		code = http.StatusServiceUnavailable
	}
	writeJSON(w, code, out)
}

// client dials only over network ("tcp4" or "tcp6"); any HTTP answer
// counts, so redirects are not followed.
func (hc *HostCheck) client(network string) *http.Client {
	timeout := hc.Timeout
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	d := &net.Dialer{Timeout: timeout}
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
				return d.DialContext(ctx, network, addr)
			},
			TLSHandshakeTimeout: timeout,
			DisableKeepAlives:   true,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// reaches tells whether url answers anything over network: any status
// confirms connectivity.
func (hc *HostCheck) reaches(ctx context.Context, network, url string) bool {
	if url == "" {
		return false
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return false
	}
	resp, err := hc.client(network).Do(req)
	if err != nil {
		return false
	}
	_ = resp.Body.Close()
	return true
}

func (hc *HostCheck) reachesAny(ctx context.Context, network string, urls []string) bool {
	for _, u := range urls {
		if hc.reaches(ctx, network, u) {
			return true
		}
	}
	return false
}
