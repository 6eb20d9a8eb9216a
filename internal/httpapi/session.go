package httpapi

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Operator sessions. Logging in with the token from EXECUTION_ROOT/login_token
// gives the browser a random session id, never the token itself: a session
// id that leaks (to a program, a proxy, a screenshot) expires, can be
// logged out, and does not let its holder mint new sessions.

const (
	// authCookie is aleph-vm's cookie name (views/__init__.py about_login),
	// so that operator tools find it; its value is a session id, not the
	// token aleph-vm puts there.
	authCookie = "token"
	// operatorPath scopes the cookie to the operator pages, so browsers do
	// not even send it with /vm/... requests (forward also strips it, for
	// clients that send it anyway).
	operatorPath = "/about"
	sessionTTL   = 12 * time.Hour
	// maxSessions bounds the table; only holders of the token can add to
	// it, so the oldest session giving way is enough.
	maxSessions = 1024
)

type sessions struct {
	mu sync.Mutex
	// Keyed by the id's digest, so that a lookup's timing says nothing
	// useful about the ids it is compared with.
	expiry map[[sha256.Size]byte]time.Time
	now    func() time.Time
}

func newSessions() *sessions {
	return &sessions{expiry: map[[sha256.Size]byte]time.Time{}, now: time.Now}
}

// create returns a fresh session id, valid for sessionTTL.
func (s *sessions) create() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // never fails (crypto/rand documents it)
	id := base64.RawURLEncoding.EncodeToString(b)
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	var oldest [sha256.Size]byte
	var oldestExp time.Time
	for k, exp := range s.expiry {
		if !exp.After(now) {
			delete(s.expiry, k)
		} else if oldestExp.IsZero() || exp.Before(oldestExp) {
			oldest, oldestExp = k, exp
		}
	}
	if len(s.expiry) >= maxSessions {
		delete(s.expiry, oldest)
	}
	s.expiry[sha256.Sum256([]byte(id))] = now.Add(sessionTTL)
	return id
}

// valid reports whether id names a live session.
func (s *sessions) valid(id string) bool {
	if id == "" {
		return false
	}
	k := sha256.Sum256([]byte(id))
	s.mu.Lock()
	defer s.mu.Unlock()
	exp, ok := s.expiry[k]
	if ok && !exp.After(s.now()) {
		delete(s.expiry, k)
		return false
	}
	return ok
}

func (s *sessions) remove(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.expiry, sha256.Sum256([]byte(id)))
}

// sessionCookie is the operator cookie carrying id; an empty id with
// MaxAge -1 clears it.
func sessionCookie(r *http.Request, id string) *http.Cookie {
	c := &http.Cookie{
		Name: authCookie, Value: id, Path: operatorPath,
		HttpOnly: true, SameSite: http.SameSiteStrictMode, Secure: r.TLS != nil,
		MaxAge: int(sessionTTL / time.Second),
	}
	if id == "" {
		c.MaxAge = -1
	}
	return c
}

// cookiePair is one name=value of a Cookie header, as the client sent it
// (raw) and as its value is read (quotes removed, as net/http and
// browsers read it).
type cookiePair struct {
	name, value, raw string
}

// parseCookies is the one reader of Cookie headers, used both to find
// the operator's session (hasSession, logout) and to take it out before
// forwarding (stripOperatorCookie): two parsers would disagree on some
// spelling (token="<id>" logged in with one and was forwarded by the
// other).
func parseCookies(values []string) []cookiePair {
	var out []cookiePair
	for _, v := range values {
		for _, part := range strings.Split(v, ";") {
			raw := strings.TrimSpace(part)
			if raw == "" {
				continue
			}
			name, value, _ := strings.Cut(raw, "=")
			value = strings.TrimSpace(value)
			if len(value) >= 2 && value[0] == '"' && value[len(value)-1] == '"' {
				value = value[1 : len(value)-1]
			}
			out = append(out, cookiePair{name: strings.TrimSpace(name), value: value, raw: raw})
		}
	}
	return out
}

// operatorCookies are the values of every cookie of our name in the
// request.
func operatorCookies(h http.Header) []string {
	var ids []string
	for _, c := range parseCookies(h.Values("Cookie")) {
		if c.name == authCookie {
			ids = append(ids, c.value)
		}
	}
	return ids
}

// stripOperatorCookie removes our cookie from the Cookie header values
// and returns the rest, leaving every other cookie byte for byte as the
// client sent it: programs use cookies of their own (sessions, consent,
// CSRF tokens), and aleph-vm forwards the client's headers unchanged, so
// only what belongs to the supervisor is taken out. "token" is a common
// name, so a cookie of that name is ours only if ours(value) says so (a
// live session id). Cookies are split rather than re-serialised, because
// re-serialising drops or quotes values that programs may rely on.
func stripOperatorCookie(values []string, ours func(value string) bool) (kept []string, removed []string) {
	for _, v := range values {
		var parts []string
		for _, c := range parseCookies([]string{v}) {
			if c.name == authCookie && ours(c.value) {
				removed = append(removed, c.value)
				continue
			}
			parts = append(parts, c.raw)
		}
		if len(parts) > 0 {
			kept = append(kept, strings.Join(parts, "; "))
		}
	}
	return kept, removed
}

// scrubForProgram removes from h, the headers about to be sent to a
// program, everything that carries the operator's credentials: our cookie,
// and any header whose value contains the login token or the session id
// the client presented (an Authorization: Bearer <token>, a Referer with
// ?token=, ...). Programs' own Authorization headers pass: the supervisor
// never reads that header, and programs use it for their own APIs.
func scrubForProgram(h http.Header, loginToken string, isSession func(string) bool) {
	secrets := []string{}
	if loginToken != "" {
		secrets = append(secrets, loginToken)
	}
	if vals := h.Values("Cookie"); len(vals) > 0 {
		kept, removed := stripOperatorCookie(vals, isSession)
		h.Del("Cookie")
		for _, v := range kept {
			h.Add("Cookie", v)
		}
		for _, id := range removed {
			if len(id) >= 16 { // a real session id, not an empty or junk value
				secrets = append(secrets, id)
			}
		}
	}
	if len(secrets) == 0 {
		return
	}
	for name, vals := range h {
		kept := vals[:0:0]
		for _, v := range vals {
			if !containsAny(v, secrets) {
				kept = append(kept, v)
			}
		}
		if len(kept) == 0 {
			delete(h, name)
		} else {
			h[name] = kept
		}
	}
}

func containsAny(v string, subs []string) bool {
	for _, s := range subs {
		if strings.Contains(v, s) {
			return true
		}
	}
	return false
}

// dropOperatorSetCookie removes Set-Cookie lines of a program's response
// that would overwrite or clear the operator's session cookie: a "token"
// cookie whose path reaches the operator pages. A program's own "token"
// cookie scoped to its paths passes.
func dropOperatorSetCookie(h http.Header) {
	vals := h.Values("Set-Cookie")
	if len(vals) == 0 {
		return
	}
	h.Del("Set-Cookie")
	for _, v := range vals {
		name, _, _ := strings.Cut(v, "=")
		if strings.TrimSpace(name) != authCookie || !reachesOperatorPages(v) {
			h.Add("Set-Cookie", v)
		}
	}
}

// reachesOperatorPages reports whether a Set-Cookie line would be stored
// for /about: an explicit Path of /, /about or below. Without a Path the
// browser uses the request's directory, /vm/<hash>/..., which does not.
func reachesOperatorPages(setCookie string) bool {
	parts := strings.Split(setCookie, ";")
	for _, attr := range parts[1:] {
		k, v, _ := strings.Cut(strings.TrimSpace(attr), "=")
		if strings.EqualFold(strings.TrimSpace(k), "path") {
			p := strings.TrimSpace(v)
			return p == "" || p == "/" || p == operatorPath || strings.HasPrefix(p, operatorPath+"/") ||
				strings.HasPrefix(operatorPath, p)
		}
	}
	return false
}
