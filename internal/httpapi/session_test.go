package httpapi

import (
	"bytes"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestStripOperatorCookieKeepsTheProgramsOwn(t *testing.T) {
	cases := []struct {
		in, kept []string
		removed  []string
	}{
		{[]string{"token=abc"}, nil, []string{"abc"}},
		{[]string{"theme=dark; token=abc; sid=\"q=1\""}, []string{"theme=dark; sid=\"q=1\""}, []string{"abc"}},
		{[]string{"a=1", "token=x;b=2"}, []string{"a=1", "b=2"}, []string{"x"}},
		// Names that merely contain ours are someone else's.
		{[]string{"my-token=1; token2=2"}, []string{"my-token=1; token2=2"}, nil},
		{[]string{" token =spaced ; x=y"}, []string{"x=y"}, []string{"spaced"}},
		// "token" is a common name: a program's own token cookie passes.
		{[]string{"token=programs-own; a=1"}, []string{"token=programs-own; a=1"}, nil},
		// Quoted as RFC 6265 allows: the value net/http reads, so ours.
		{[]string{"a=1; token=\"abc\""}, []string{"a=1"}, []string{"abc"}},
	}
	ours := func(v string) bool { return v != "programs-own" }
	for _, c := range cases {
		kept, removed := stripOperatorCookie(c.in, ours)
		if strings.Join(kept, "|") != strings.Join(c.kept, "|") || strings.Join(removed, "|") != strings.Join(c.removed, "|") {
			t.Errorf("%q: kept %q removed %q, want %q %q", c.in, kept, removed, c.kept, c.removed)
		}
	}
}

func TestScrubForProgram(t *testing.T) {
	const token = "0123456789abcdef0123456789abcdef"
	const session = "S3ss10n-1d-of-the-operator-xxxxxxxxxxxxxx"
	h := http.Header{}
	h.Add("Cookie", "token="+session+"; app_session=keep-me")
	h.Add("Authorization", "Bearer "+token)
	h.Add("X-Copied", "prefix "+session)
	h.Add("Referer", "http://node/about/login?token="+token)
	h.Add("X-Program-Header", "kept")
	h.Add("Accept", "a")
	h.Add("Accept", "b")
	scrubForProgram(h, token, func(v string) bool { return v == session })
	want := http.Header{
		"Cookie":           {"app_session=keep-me"},
		"X-Program-Header": {"kept"},
		"Accept":           {"a", "b"},
	}
	if len(h) != len(want) {
		t.Fatalf("headers after scrubbing: %v, want %v", h, want)
	}
	for k, v := range want {
		if strings.Join(h[k], ",") != strings.Join(v, ",") {
			t.Errorf("%s: %q, want %q", k, h[k], v)
		}
	}

	// A program's own Authorization passes.
	h = http.Header{"Authorization": {"Bearer program-api-key"}, "Cookie": {"token=" + session}}
	scrubForProgram(h, token, func(v string) bool { return v == session })
	if h.Get("Authorization") != "Bearer program-api-key" || h.Get("Cookie") != "" {
		t.Errorf("after scrubbing: %v", h)
	}
}

func TestDropOperatorSetCookie(t *testing.T) {
	h := http.Header{"Set-Cookie": {
		"token=forged; Path=/about", "token=x; Path=/", "token=y; HttpOnly; path=/about/config",
		"app=1; Path=/", "token=programs-own", "token=z; Path=/vm/abc",
	}}
	dropOperatorSetCookie(h)
	want := []string{"app=1; Path=/", "token=programs-own", "token=z; Path=/vm/abc"}
	if got := h.Values("Set-Cookie"); strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("Set-Cookie after: %q, want %q", got, want)
	}
}

func TestLoginGivesASessionNotTheToken(t *testing.T) {
	s, _ := newTestServer(t)
	rec := serve(s, "GET", "node.example", "/about/login?token=secret-token")
	if rec.Code != http.StatusFound {
		t.Fatalf("login: %d %s", rec.Code, rec.Body)
	}
	if rec.Header().Get("Referrer-Policy") != "no-referrer" {
		t.Errorf("login answer lets the token URL leak through Referer: %v", rec.Header())
	}
	cookies := rec.Result().Cookies()
	if len(cookies) != 1 {
		t.Fatalf("cookies: %v", cookies)
	}
	c := cookies[0]
	if strings.Contains(c.Value, "secret-token") || len(c.Value) < 40 || c.Path != "/about" || !c.HttpOnly ||
		c.SameSite != http.SameSiteStrictMode || c.MaxAge <= 0 {
		t.Errorf("session cookie: %+v", c)
	}
	// Each login is a session of its own.
	other := serve(s, "GET", "node.example", "/about/login?token=secret-token").Result().Cookies()[0]
	if other.Value == c.Value {
		t.Error("two logins gave the same session id")
	}
	if rec := serve(s, "GET", "node.example", "/about/config", c); rec.Code != 200 {
		t.Errorf("config with the session: %d", rec.Code)
	}
	// The token is no credential by itself, nor is a made-up session.
	for _, v := range []string{"secret-token", "", strings.Repeat("A", 43)} {
		if rec := serve(s, "GET", "node.example", "/about/config", &http.Cookie{Name: authCookie, Value: v}); rec.Code != 401 {
			t.Errorf("cookie %q: %d, want 401", v, rec.Code)
		}
	}
	// Logout ends this session only.
	rec = serve(s, "POST", "node.example", "/about/logout", c)
	if rec.Code != 200 || rec.Result().Cookies()[0].MaxAge >= 0 {
		t.Errorf("logout: %d %v", rec.Code, rec.Result().Cookies())
	}
	if rec := serve(s, "GET", "node.example", "/about/config", c); rec.Code != 401 {
		t.Errorf("config after logout: %d, want 401", rec.Code)
	}
	if rec := serve(s, "GET", "node.example", "/about/config", other); rec.Code != 200 {
		t.Errorf("other session after logout of the first: %d", rec.Code)
	}
}

func TestSessionsExpireAndStayBounded(t *testing.T) {
	ss := newSessions()
	now := time.Unix(1_000_000, 0)
	ss.now = func() time.Time { return now }
	first := ss.create()
	if !ss.valid(first) {
		t.Fatal("fresh session not valid")
	}
	now = now.Add(sessionTTL + time.Second)
	if ss.valid(first) {
		t.Error("session valid after its TTL")
	}
	for range maxSessions + 10 {
		now = now.Add(time.Millisecond)
		ss.create()
	}
	if len(ss.expiry) > maxSessions {
		t.Errorf("%d sessions kept, limit %d", len(ss.expiry), maxSessions)
	}
	last := ss.create()
	if !ss.valid(last) {
		t.Error("newest session evicted")
	}
}

// TestNoSecretInLogs runs login attempts, operator pages and program
// requests carrying the session and the token, with debug logging, and
// looks for either in what was logged.
func TestNoSecretInLogs(t *testing.T) {
	s, hash := newTestServer(t)
	var buf bytes.Buffer
	s.log = slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))

	serve(s, "GET", "node.example", "/about/login?token=wrong-"+"secret-token")
	session := serve(s, "GET", "node.example", "/about/login?token=secret-token").Result().Cookies()[0]
	serve(s, "GET", "node.example", "/about/config", session)
	serve(s, "GET", "node.example", "/about/config", &http.Cookie{Name: authCookie, Value: "secret-token"})
	for _, path := range []string{"/vm/" + hash + "/x?token=secret-token", "/vm/not-a-hash/?token=secret-token", "/nope?token=secret-token"} {
		req := httptest.NewRequest("GET", path, nil)
		req.Host = "node.example"
		req.AddCookie(session)
		req.Header.Set("Authorization", "Bearer secret-token")
		s.ServeHTTP(httptest.NewRecorder(), req)
	}
	serve(s, "GET", "node.example", "/about/logout", session)

	logged := buf.String()
	if !strings.Contains(logged, "request failed") {
		t.Fatalf("nothing logged, the test looks at nothing:\n%s", logged)
	}
	for _, secret := range []string{"secret-token", session.Value} {
		if strings.Contains(logged, secret) {
			t.Errorf("log holds %q:\n%s", secret, logged)
		}
	}
}

// A session id in a quoted cookie logs in and is taken out before
// forwarding: the login check and the strip read cookies alike.
func TestQuotedSessionCookieIsStrippedWhereItLogsIn(t *testing.T) {
	s := New(Options{Version: "test", Logger: quiet})
	id := s.sessions.create()
	for _, cookie := range []string{"token=\"" + id + "\"", "token=" + id, "x=1;token= \"" + id + "\" "} {
		r := httptest.NewRequest("GET", "/about/config", nil)
		r.Header.Set("Cookie", cookie)
		if !s.hasSession(r) {
			t.Errorf("%q: no session", cookie)
		}
		h := r.Header.Clone()
		scrubForProgram(h, "", s.sessions.valid)
		if strings.Contains(strings.Join(h.Values("Cookie"), ";"), id) {
			t.Errorf("%q: forwarded as %q", cookie, h.Values("Cookie"))
		}
	}
}
