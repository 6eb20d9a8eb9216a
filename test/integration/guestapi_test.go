package integration

import (
	"net/http"
	"net/url"
	"strings"
	"testing"
)

// A program reaches the host's guest API through ALEPH_API_UNIX_SOCKET,
// across the guest channel: its properties, a cache that outlives the
// sandbox, and the Aleph API through the host.
func TestGuestAPIFromInsideTheSandbox(t *testing.T) {
	s := startSupervisor(t)
	hash := s.upload("testdata/probe", "main:app")
	call := func(method, path, body string) map[string]any {
		t.Helper()
		q := url.Values{"method": {method}, "path": {path}, "body": {body}}
		r := s.get("/vm/" + hash + "/guest-api?" + q.Encode())
		expect(t, r, http.StatusOK)
		return r.json(t)
	}
	props := call("GET", "/properties", "")
	if props["status"] != float64(200) || !strings.Contains(props["body"].(string), `"chain":"ETH"`) {
		t.Errorf("properties: %v", props)
	}
	if put := call("PUT", "/cache/visits", "41"); put["status"] != float64(200) {
		t.Fatalf("cache put: %v", put)
	}
	if get := call("GET", "/cache/visits", ""); get["status"] != float64(200) || get["body"] != "41" {
		t.Errorf("cache get: %v", get)
	}
	// The in-test Aleph API answers message queries through the host.
	msgs := call("GET", "/api/v0/messages.json?hashes="+hash, "")
	if msgs["status"] != float64(200) || !strings.Contains(msgs["body"].(string), `"pagination_item":"messages"`) {
		t.Errorf("API proxy: %v", msgs)
	}
}
