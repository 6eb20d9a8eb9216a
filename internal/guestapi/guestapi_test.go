package guestapi

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func do(t *testing.T, h http.Handler, method, path, body string) (int, string) {
	t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(method, path, r))
	return rec.Code, rec.Body.String()
}

func TestCacheIsNamespacedAndExpires(t *testing.T) {
	cache := NewCache(time.Hour)
	clock := time.Now()
	cache.now = func() time.Time { return clock }
	a := New(Options{Program: Program{Hash: "a"}, Cache: cache})
	b := New(Options{Program: Program{Hash: "b"}, Cache: cache})

	if code, _ := do(t, a, "PUT", "/cache/greeting", "hello"); code != 200 {
		t.Fatalf("put: %d", code)
	}
	if code, body := do(t, a, "GET", "/cache/greeting", ""); code != 200 || body != "hello" {
		t.Errorf("get own key: %d %q", code, body)
	}
	if code, _ := do(t, b, "GET", "/cache/greeting", ""); code != 404 {
		t.Errorf("another program read the key: %d", code)
	}
	do(t, a, "PUT", "/cache/other", "x")
	if code, body := do(t, a, "GET", "/cache/?pattern=gr*", ""); code != 200 || strings.TrimSpace(body) != `["greeting"]` {
		t.Errorf("list: %d %s", code, body)
	}
	if code, _ := do(t, a, "PUT", "/cache/bad-key!", "x"); code != 400 {
		t.Errorf("bad key accepted: %d", code)
	}
	clock = clock.Add(2 * time.Hour)
	if code, _ := do(t, a, "GET", "/cache/greeting", ""); code != 404 {
		t.Errorf("expired key still served: %d", code)
	}
	do(t, b, "PUT", "/cache/k", "v")
	do(t, b, "DELETE", "/cache/k", "")
	if code, _ := do(t, b, "GET", "/cache/k", ""); code != 404 {
		t.Errorf("deleted key still served: %d", code)
	}
}

func TestPropertiesSignAndProxy(t *testing.T) {
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "upstream saw "+r.URL.Path+"?"+r.URL.RawQuery)
	}))
	defer api.Close()
	h := New(Options{Program: Program{Hash: "h", Address: "0xabc"}, Cache: NewCache(0), APIServer: api.URL})
	if code, body := do(t, h, "GET", "/properties", ""); code != 200 || !strings.Contains(body, `"address":"0xabc"`) {
		t.Errorf("properties: %d %s", code, body)
	}
	if code, _ := do(t, h, "POST", "/sign", "{}"); code != http.StatusNotImplemented {
		t.Errorf("sign: %d", code)
	}
	if code, body := do(t, h, "GET", "/api/v0/messages.json?hashes=x", ""); code != 200 || body != "upstream saw /api/v0/messages.json?hashes=x" {
		t.Errorf("proxy: %d %q", code, body)
	}
}
