package integration

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"strings"
	"testing"
)

// bytesLoopbackServer answers anything on a loopback address of network
// ("tcp4" or "tcp6"), standing for the public hosts /status/check/host
// probes upstream.
func bytesLoopbackServer(t *testing.T, network, addr string) *httptest.Server {
	t.Helper()
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatalf("listening on %s %s: %v", network, addr, err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusNoContent)
	}))
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

// The real supervisor tells the network what it is as upstream's clients
// read it: its own release (internal/version/VERSION, never "0+<commit>")
// in the Server header and /status/config, QEMU support only with QEMU on
// KVM, the payment receiver, and upstream's bytes for certificates,
// unknown pages, update and /status/check/host (its targets on loopback:
// the test never leaves the machine).
func TestBytesNodeAnswersAsUpstream(t *testing.T) {
	backendIndependent(t)
	v4 := bytesLoopbackServer(t, "tcp4", "127.0.0.1:0")
	v6 := bytesLoopbackServer(t, "tcp6", "[::1]:0")
	s := startSupervisor(t,
		"ALEPH_VM_PAYMENT_RECEIVER_ADDRESS=0x5D7A6D4fB1C6E4d0a8A1C3c2bC9dB3a2F0e1D2c3",
		"ALEPH_VM_CONNECTIVITY_IPV4_URL="+v4.URL+"/",
		"ALEPH_VM_CONNECTIVITY_IPV6_URL="+v6.URL+"/",
		"ALEPH_VM_CONNECTIVITY_DNS_HOSTNAME=localhost",
		"ALEPH_VM_CONNECTIVITY_HTTP_URLS="+v4.URL+"/success.txt",
	)

	semver, err := os.ReadFile("../../internal/version/VERSION")
	if err != nil {
		t.Fatal(err)
	}
	r := s.get("/status/config")
	expect(t, r, 200)
	server := r.Header.Get("Server")
	if !regexp.MustCompile(`^aleph-vm/` + regexp.QuoteMeta(strings.TrimSpace(string(semver))) + `(\+g[0-9a-f]{7}(\.dirty)?)?$`).MatchString(server) {
		t.Errorf("Server %q, want aleph-vm/%s with at most a commit label", server, strings.TrimSpace(string(semver)))
	}
	cfg := r.json(t)
	if cfg["version"] != strings.TrimPrefix(server, "aleph-vm/") {
		t.Errorf("/status/config version %v, Server %q", cfg["version"], server)
	}
	if got := cfg["computing"].(map[string]any)["ENABLE_QEMU_SUPPORT"]; got != false {
		t.Errorf("ENABLE_QEMU_SUPPORT = %v on gVisor", got)
	}
	if got := cfg["payment"].(map[string]any)["PAYMENT_RECEIVER_ADDRESS"]; got != "0x5D7A6D4fB1C6E4d0a8A1C3c2bC9dB3a2F0e1D2c3" {
		t.Errorf("PAYMENT_RECEIVER_ADDRESS = %v", got)
	}
	if ct := r.Header.Get("Content-Type"); ct != "application/json; charset=utf-8" {
		t.Errorf("/status/config Content-Type %q", ct)
	}

	for _, c := range []struct {
		method, path string
		status       int
		body         string
	}{
		{"GET", "/about/certificates", 503, `{"error": "Confidential computing setting not enabled on that server"}`},
		{"GET", "/about/non_existing_path", 404, `{"error": "404: Not Found"}`},
		{"GET", "/status/nope", 404, `{"error": "404: Not Found"}`},
		{"POST", "/control/machine/" + strings.Repeat("ab", 32) + "/update", 404, `{"error": "404: VM not found"}`},
		{"GET", "/status/check/version", 400, `{"error": "Query field '?reference=` + "`" + ` must be specified"}`},
	} {
		r := s.do(c.method, c.path, nil)
		if r.Status != c.status || string(r.Body) != c.body {
			t.Errorf("%s %s: %d %q, want %d %q", c.method, c.path, r.Status, r.Body, c.status, c.body)
		}
	}

	// /status/check/host: every probe reaches loopback; DOMAIN_NAME may
	// or may not resolve here, and the status follows upstream's rule.
	r = s.get("/status/check/host")
	m := regexp.MustCompile(`^\{"ipv4": \{"egress": true, "dns": true, "domain": (true|false), "http": true\}, ` +
		`"ipv6": \{"egress": true, "dns": (true|false), "domain": (true|false), "http": false\}\}$`).FindStringSubmatch(string(r.Body))
	if m == nil {
		t.Fatalf("/status/check/host: %d %s", r.Status, r.Body)
	}
	want := 503
	if m[1] == "true" && m[2] == "true" && m[3] == "true" {
		want = 200
	}
	if r.Status != want {
		t.Errorf("/status/check/host: %d for %s, want %d", r.Status, r.Body, want)
	}
	fmt.Fprintf(os.Stderr, "bytes: Server %s; /status/check/host %d %s\n", server, r.Status, r.Body)
}
