package httpapi

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// Upstream references are aleph-vm at commit 6da21a3a.

// /status/check/version: views/__init__.py:417-438; its HTTP exceptions
// (raised or returned) become JSON {"error": text} in error_middleware
// (supervisor.py), so only the 200 is text.
func TestVersionAgainstReference(t *testing.T) {
	s, _ := newTestServer(t)
	s.opts.Version = "1.7.2.post3+g0123abc"
	const text, js = "text/plain; charset=utf-8", "application/json; charset=utf-8"
	cases := []struct {
		query       string
		status      int
		contentType string
		body        string
	}{
		{"", 400, js, `{"error": "Query field '?reference=` + "`" + ` must be specified"}`},
		{"?reference=", 400, js, `{"error": "Query field '?reference=` + "`" + ` must be specified"}`},
		{"?reference=not-a-version", 400, js, `{"error": "Invalid version: 'not-a-version'"}`},
		{"?reference=1.7.2", 200, text, "Up-to-date: version 1.7.2.post3+g0123abc >= 1.7.2"},
		{"?reference=v1.7", 200, text, "Up-to-date: version 1.7.2.post3+g0123abc >= 1.7"},
		{"?reference=1.8.0rc1", 403, js, `{"error": "Outdated: version 1.7.2.post3+g0123abc < 1.8.0rc1"}`},
	}
	for _, c := range cases {
		rec := serve(s, "GET", "node.example", "/status/check/version"+c.query)
		if rec.Code != c.status || rec.Body.String() != c.body {
			t.Errorf("%s: %d %q, want %d %q", c.query, rec.Code, rec.Body, c.status, c.body)
		}
		if ct := rec.Header().Get("Content-Type"); ct != c.contentType {
			t.Errorf("%s: Content-Type %q, want %q", c.query, ct, c.contentType)
		}
	}
}

// The Server header carries the PEP 440 form of `git describe`
// (supervisor.py:150-152 sets aleph-vm/<__version__>).
func TestServerHeaderIsPEP440(t *testing.T) {
	s := New(Options{Version: "v1.2.3-4-gabc1234-dirty", Pool: nil, Logger: quiet})
	rec := serve(s, "GET", "node.example", "/status/check/version?reference=1.2.3")
	if got := rec.Header().Get("Server"); got != "aleph-vm/1.2.3.post4+gabc1234.dirty" {
		t.Errorf("Server %q", got)
	}
	if rec.Code != 200 {
		t.Errorf("1.2.3.post4 >= 1.2.3: %d %s", rec.Code, rec.Body)
	}
}

// What internal/version gives (VERSION plus the commit as a local label) is
// kept as it is, and compares as the release it labels.
func TestServerHeaderOwnVersion(t *testing.T) {
	s := New(Options{Version: "1.0.0+g7eb5434.dirty", Logger: quiet})
	rec := serve(s, "GET", "node.example", "/status/check/version?reference=1.0.0")
	if got := rec.Header().Get("Server"); got != "aleph-vm/1.0.0+g7eb5434.dirty" {
		t.Errorf("Server %q", got)
	}
	if rec.Code != 200 {
		t.Errorf("1.0.0+g7eb5434.dirty >= 1.0.0: %d %s", rec.Code, rec.Body)
	}
	rec = serve(s, "GET", "node.example", "/status/check/version?reference=1.5.1")
	if rec.Code != 403 {
		t.Errorf("1.0.0+g7eb5434.dirty < 1.5.1: %d %s", rec.Code, rec.Body)
	}
}

// /about/login: views/__init__.py:151-160: 302 to /about/config with a
// "token" cookie, or 401 {"success": false}.
func TestLoginRedirectsWithTokenCookie(t *testing.T) {
	s, _ := newTestServer(t)
	rec := serve(s, "GET", "node.example", "/about/login?token=secret-token")
	if rec.Code != http.StatusFound || rec.Header().Get("Location") != "/about/config" {
		t.Fatalf("login: %d Location %q", rec.Code, rec.Header().Get("Location"))
	}
	cookies := rec.Result().Cookies()
	if len(cookies) != 1 || cookies[0].Name != "token" || cookies[0].Value == "secret-token" {
		t.Fatalf("cookies %+v: want one \"token\" cookie holding a session id", cookies)
	}
	if rec := serve(s, "GET", "node.example", "/about/config", cookies[0]); rec.Code != 200 {
		t.Errorf("following the redirect with the cookie: %d", rec.Code)
	}
	for _, q := range []string{"", "?token=", "?token=wrong"} {
		rec := serve(s, "GET", "node.example", "/about/login"+q)
		if rec.Code != 401 || rec.Body.String() != `{"success": false}` || len(rec.Result().Cookies()) != 0 {
			t.Errorf("login%s: %d %q %v", q, rec.Code, rec.Body, rec.Result().Cookies())
		}
	}
}

// A program's own "token" cookie with a wider path does not hide the
// operator's session.
func TestSessionFoundAmongSeveralTokenCookies(t *testing.T) {
	s, _ := newTestServer(t)
	session := serve(s, "GET", "node.example", "/about/login?token=secret-token").Result().Cookies()[0]
	rec := serve(s, "GET", "node.example", "/about/config", &http.Cookie{Name: "token", Value: "programs-own"}, session)
	if rec.Code != 200 {
		t.Errorf("config: %d", rec.Code)
	}
}

// /about/executions/records answers a bare array (views/__init__.py:306-308)
// whose items have every column of metrics.py:54-83.
func TestRecordsIsAnArray(t *testing.T) {
	s, _ := newTestServer(t)
	rec := serve(s, "GET", "node.example", "/about/executions/records")
	if rec.Code != 200 || strings.TrimSpace(rec.Body.String()) != "[]" {
		t.Errorf("records: %d %q, want 200 []", rec.Code, rec.Body)
	}
}

// /about/executions/list (views/__init__.py:237-256) and /status/config
// (views/__init__.py:442-...) exist without login.
func TestExecutionListAndPublicConfig(t *testing.T) {
	s, _ := newTestServer(t)
	rec := serve(s, "GET", "node.example", "/about/executions/list")
	if rec.Code != 200 || strings.TrimSpace(rec.Body.String()) != "{}" {
		t.Errorf("list: %d %q", rec.Code, rec.Body)
	}
	s.opts.PublicConfig = func() any { return map[string]any{"DOMAIN_NAME": "node.example"} }
	rec = serve(s, "GET", "node.example", "/status/config")
	var body map[string]any
	if rec.Code != 200 || json.Unmarshal(rec.Body.Bytes(), &body) != nil || body["DOMAIN_NAME"] != "node.example" {
		t.Errorf("status/config: %d %q", rec.Code, rec.Body)
	}
	if got := networkOf("172.16.4.2/30"); got != "172.16.4.0/30" {
		t.Errorf("networkOf: %v", got)
	}
}

// CORS as aiohttp_cors does it with aleph-vm's options
// (supervisor.py:169-178, aiohttp_cors cors_config.py and
// preflight_handler.py).
func TestCORS(t *testing.T) {
	s, _ := newTestServer(t)
	do := func(method, path string, hdr map[string]string) *httptest.ResponseRecorder {
		req := httptest.NewRequest(method, path, nil)
		req.Host = "node.example"
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		rec := httptest.NewRecorder()
		s.ServeHTTP(rec, req)
		return rec
	}
	for _, path := range []string{"/about/executions/records", "/status/check/version?reference=0", "/about/usage/system", "/about/executions/list"} {
		rec := do("GET", path, map[string]string{"Origin": "https://scheduler.example"})
		h := rec.Header()
		if h.Get("Access-Control-Allow-Origin") != "https://scheduler.example" || h.Get("Access-Control-Allow-Credentials") != "true" {
			t.Errorf("GET %s: CORS headers %v", path, h)
		}
		if exp := h.Get("Access-Control-Expose-Headers"); !strings.Contains(exp, "Server") || strings.Contains(exp, "Content-Type") {
			t.Errorf("GET %s: Expose-Headers %q: want every header but the simple ones", path, exp)
		}
		// Without Origin, no CORS headers at all.
		if rec := do("GET", path, nil); rec.Header().Get("Access-Control-Allow-Origin") != "" {
			t.Errorf("GET %s without Origin: %v", path, rec.Header())
		}
	}
	// A 401 of an operator page carries them too.
	if rec := do("GET", "/about/config", map[string]string{"Origin": "https://o.example"}); rec.Code != 401 ||
		rec.Header().Get("Access-Control-Allow-Origin") != "https://o.example" {
		t.Errorf("config: %d %v", rec.Code, rec.Header())
	}

	rec := do("OPTIONS", "/about/executions/list", map[string]string{
		"Origin": "https://o.example", "Access-Control-Request-Method": "GET",
		"Access-Control-Request-Headers": "x-custom, Content-Type",
	})
	h := rec.Header()
	if rec.Code != 200 || h.Get("Access-Control-Allow-Origin") != "https://o.example" ||
		h.Get("Access-Control-Allow-Credentials") != "true" || h.Get("Access-Control-Allow-Methods") != "GET" ||
		h.Get("Access-Control-Allow-Headers") != "X-CUSTOM,CONTENT-TYPE" {
		t.Errorf("preflight: %d %v", rec.Code, h)
	}
	for _, c := range []struct {
		hdr  map[string]string
		body string
	}{
		{map[string]string{"Access-Control-Request-Method": "GET"}, "CORS preflight request failed: origin header is not specified in the request"},
		{map[string]string{"Origin": "https://o.example"}, "CORS preflight request failed: 'Access-Control-Request-Method' header is not specified"},
		{map[string]string{"Origin": "https://o.example", "Access-Control-Request-Method": "POST"},
			"CORS preflight request failed: request method 'POST' is not allowed for 'https://o.example' origin"},
	} {
		rec := do("OPTIONS", "/status/config", c.hdr)
		if rec.Code != 403 || rec.Body.String() != c.body {
			t.Errorf("preflight %v: %d %q, want 403 %q", c.hdr, rec.Code, rec.Body, c.body)
		}
	}
	// Program routes are the program's business: no CORS from us.
	if rec := do("GET", "/vm/not-a-hash/", map[string]string{"Origin": "https://o.example"}); rec.Header().Get("Access-Control-Allow-Origin") != "" {
		t.Errorf("program route got CORS headers: %v", rec.Header())
	}
}

// The flat check answers every check (views/__init__.py:336-364) with a
// 503 when the required ones fail; here the program cannot start.
func TestCheckFastAPIFlatShape(t *testing.T) {
	s, hash := newTestServer(t)
	s.opts.SelfTestProgram = func(context.Context) (string, error) { return hash, nil }
	rec := serve(s, "GET", "node.example", "/status/check/fastapi")
	var flat map[string]bool
	if err := json.Unmarshal(rec.Body.Bytes(), &flat); err != nil || rec.Code != 503 {
		t.Fatalf("%d %q: %v", rec.Code, rec.Body, err)
	}
	want := []string{"index", "environ", "messages", "dns", "ipv4", "internet", "cache",
		"persistent_storage", "error_handling", "get_a_message", "lifespan"}
	if len(flat) != len(want) {
		t.Errorf("checks %v, want %v", flat, want)
	}
	for _, k := range want {
		if v, ok := flat[k]; !ok || v {
			t.Errorf("%s: %v %v", k, v, ok)
		}
	}
	// Retro-compatibility leaves out the Debian 12 checks (views/__init__.py:330-357).
	rec = serve(s, "GET", "node.example", "/status/check/fastapi?retro-compatibility=true")
	flat = nil
	_ = json.Unmarshal(rec.Body.Bytes(), &flat)
	if _, has := flat["lifespan"]; has || len(flat) != len(want)-2 {
		t.Errorf("retro: %v", flat)
	}
	rec = serve(s, "GET", "node.example", "/status/check/fastapi/detail")
	var detail struct {
		Program string                 `json:"program"`
		Checks  map[string]checkResult `json:"checks"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &detail); err != nil || rec.Code != 503 || detail.Program != hash ||
		!strings.Contains(detail.Checks["index"].Detail, "503") || len(detail.Checks) != len(want)+1 {
		t.Errorf("detail: %d %s", rec.Code, rec.Body)
	}
}

// Unknown /about, /control and /status paths: aleph-vm's http_not_found
// routes through error_middleware (tests/supervisor/views/test_view_errors.py
// test_json_404_about), on the node's host and on a program's alike.
func TestUnknownNodePagesAre404JSON(t *testing.T) {
	s, _ := newTestServer(t)
	for _, host := range []string{"node.example", "app.example"} {
		for _, path := range []string{"/about/non_existing_path", "/control/nonexistent", "/status/check/nope", "/control/machine/abc/update"} {
			rec := serve(s, "GET", host, path)
			if rec.Code != 404 || rec.Body.String() != `{"error": "404: Not Found"}` ||
				rec.Header().Get("Content-Type") != "application/json; charset=utf-8" {
				t.Errorf("GET %s%s: %d %q %q", host, path, rec.Code, rec.Header().Get("Content-Type"), rec.Body)
			}
		}
	}
}
