package guestapi

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

type reply struct {
	code        int
	body        string
	contentType string
}

func do(t *testing.T, h http.Handler, method, path string, body io.Reader) reply {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(method, path, body))
	return reply{rec.Code, rec.Body.String(), rec.Header().Get("Content-Type")}
}

func (r reply) is(t *testing.T, what string, code int, contentType, body string) {
	t.Helper()
	if r.code != code || r.contentType != contentType || r.body != body {
		t.Errorf("%s: %d %q %q, want %d %q %q", what, r.code, r.contentType, r.body, code, contentType, body)
	}
}

const (
	textType = "text/plain; charset=utf-8"
	jsonType = "application/json; charset=utf-8"
)

// The cache routes answer byte for byte as aleph-vm's guest API does.
func TestCacheShapesAreAlephVMs(t *testing.T) {
	store, _ := openTestDisk(t, "", Limits{MaxKeys: 4, MaxBytes: 3 << 20})
	cache := NewCache(store, 0, nil)
	a := New(Options{Program: Program{Hash: "a"}, Cache: cache})
	b := New(Options{Program: Program{Hash: "b"}, Cache: cache})
	s := strings.NewReader

	do(t, a, "PUT", "/cache/greeting", s("hello")).is(t, "put", 200, jsonType, "true")
	do(t, a, "GET", "/cache/greeting", nil).is(t, "get", 200, "application/octet-stream", "hello")
	do(t, b, "GET", "/cache/greeting", nil).is(t, "other program", 404, textType, "No such key in cache")
	do(t, a, "PUT", "/cache/café", s("x")).is(t, "unicode key", 200, jsonType, "true")
	do(t, a, "GET", "/cache/", nil).is(t, "list", 200, jsonType, `["caf\u00e9", "greeting"]`)
	do(t, a, "GET", "/cache/?pattern=gr*", nil).is(t, "list gr*", 200, jsonType, `["greeting"]`)
	do(t, a, "GET", "/cache/?pattern=zz*", nil).is(t, "list none", 200, jsonType, `[]`)
	do(t, a, "GET", "/cache/?pattern=[a]*", nil).is(t, "bad pattern", 400, textType, "Invalid key")
	do(t, a, "GET", "/cache/?pattern=", nil).is(t, "empty pattern", 400, textType, "Invalid key")
	do(t, a, "DELETE", "/cache/greeting", nil).is(t, "delete", 200, jsonType, "1")
	do(t, a, "DELETE", "/cache/greeting", nil).is(t, "delete again", 200, jsonType, "0")
	do(t, a, "GET", "/cache/greeting", nil).is(t, "deleted", 404, textType, "No such key in cache")
	for _, bad := range []string{"/cache/bad-key", "/cache/a%20b", "/cache/a/b", "/cache/a:b"} {
		for _, m := range []string{"GET", "PUT", "DELETE"} {
			do(t, a, m, bad, s("x")).is(t, m+" "+bad, 400, textType, "Invalid key")
		}
	}
	do(t, a, "PUT", "/cache/", s("x")).is(t, "empty key", 400, textType, "Invalid key")
	do(t, a, "POST", "/cache/k", s("x")).is(t, "POST", 405, textType, "405: Method Not Allowed")
	// aleph-vm answers `if body:`: an empty value reads as absent.
	do(t, a, "PUT", "/cache/empty", s("")).is(t, "put empty", 200, jsonType, "true")
	do(t, a, "GET", "/cache/empty", nil).is(t, "get empty", 404, textType, "No such key in cache")

	// Values: aiohttp's client_max_size (1 MiB) refuses 1 MiB itself.
	big := bytes.Repeat([]byte("v"), DefaultMaxValueSize)
	do(t, a, "PUT", "/cache/big", bytes.NewReader(big)).is(t, "largest value", 200, jsonType, "true")
	if r := do(t, a, "GET", "/cache/big", nil); r.code != 200 || len(r.body) != len(big) {
		t.Errorf("largest value read back: %d, %d bytes", r.code, len(r.body))
	}
	do(t, a, "PUT", "/cache/big2", bytes.NewReader(append(big, 'v'))).is(t, "1 MiB", 413, textType,
		"Maximum request body size 1048576 exceeded, actual body size 1048576")
	// Without Content-Length (chunked), the reader stops at the limit.
	r := do(t, a, "PUT", "/cache/big2", io.MultiReader(bytes.NewReader(big), strings.NewReader("vvvv")))
	r.is(t, "chunked over 1 MiB", 413, textType, "Maximum request body size 1048576 exceeded, actual body size 1048576")

	// Program caps: 4 keys (big, café, empty, k4), then refusals.
	do(t, a, "PUT", "/cache/k4", s("1")).is(t, "fourth key", 200, jsonType, "true")
	r = do(t, a, "PUT", "/cache/k5", s("1"))
	if r.code != 413 || r.contentType != textType || !strings.Contains(r.body, "cache quota exceeded") {
		t.Errorf("fifth key: %+v", r)
	}
	do(t, b, "PUT", "/cache/k5", s("1")).is(t, "a neighbour still writes", 200, jsonType, "true")
}

func TestCacheStoreDown(t *testing.T) {
	url := startRedis(t)
	store, err := OpenRedis(t.Context(), url, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	h := New(Options{Program: Program{Hash: "a"}, Cache: NewCache(store, 0, nil)})
	do(t, h, "PUT", "/cache/k", strings.NewReader("v")).is(t, "put", 200, jsonType, "true")
	store.Close()
	if r := do(t, h, "GET", "/cache/k", nil); r.code != 503 || r.contentType != textType {
		t.Errorf("with Redis gone: %+v, want 503", r)
	}
}
