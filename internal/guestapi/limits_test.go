package guestapi

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// The relay never hands a program what another service answers: a
// redirect off the Aleph API's host (here to a loopback-only service) is
// relayed as the redirect, not followed; one within the host is followed.
func TestProxyRedirectOffHost(t *testing.T) {
	var secretHits atomic.Int32
	secret := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		secretHits.Add(1)
		_, _ = io.WriteString(w, "loopback secret")
	}))
	defer secret.Close()
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/api/v0/away":
			http.Redirect(w, r, secret.URL+"/admin", http.StatusFound)
		case "/api/v0/here":
			http.Redirect(w, r, "/api/v0/there", http.StatusMovedPermanently)
		default:
			_, _ = io.WriteString(w, "api "+r.URL.Path)
		}
	}))
	defer api.Close()
	for name, client := range map[string]*http.Client{"default client": nil, "given client": {}} {
		h := New(Options{Program: Program{Hash: "a"}, APIServer: api.URL, Client: client})
		r := do(t, h, "GET", "/api/v0/away", nil)
		if r.code != http.StatusFound || strings.Contains(r.body, "loopback secret") {
			t.Errorf("%s: off-host redirect answered %d %q", name, r.code, r.body)
		}
		do(t, h, "GET", "/api/v0/here", nil).is(t, name+": same-host redirect", 200, "text/plain", "api /api/v0/there")
	}
	if n := secretHits.Load(); n != 0 {
		t.Errorf("the loopback service was reached %d times", n)
	}
}

// Node-signed publications are rate-limited per program and per node:
// a burst within the budget is signed (200), the next one refused with
// 429 and Retry-After, and another program keeps its own budget until
// the node's is spent.
func TestPublicationsRateLimit(t *testing.T) {
	pubs := NewPublications(3, 5)
	key := testKey(t)
	other := strings.Repeat("b", 64)
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
	}))
	defer api.Close()
	mine := New(Options{Program: Program{Hash: testVMHash}, Signer: key, APIServer: api.URL, Publications: pubs})
	theirs := New(Options{Program: Program{Hash: other}, Signer: key, APIServer: api.URL, Publications: pubs})

	msg, _ := json.Marshal(map[string]any{"channel": "TEST", "item_content": `{"type": "chat", "content": 1}`})
	pub, _ := json.Marshal(map[string]string{"topic": "ALEPH-TEST", "data": string(msg)})
	publish := func(h http.Handler) reply {
		return do(t, h, "POST", "/api/v0/ipfs/pubsub/pub", strings.NewReader(string(pub)))
	}
	sign := func(h http.Handler, hash string) reply {
		return do(t, h, "POST", "/sign", strings.NewReader(signRequest(hash, "")))
	}

	// /sign and pubsub share the program's budget of 3.
	for i, r := range []reply{sign(mine, testVMHash), publish(mine), sign(mine, testVMHash)} {
		if r.code != 200 {
			t.Fatalf("publication %d within the budget: %+v", i, r)
		}
	}
	for _, r := range []reply{sign(mine, testVMHash), publish(mine)} {
		if r.code != http.StatusTooManyRequests || !strings.Contains(r.body, "this program made its 3 node-signed publications") {
			t.Errorf("beyond the program's budget: %+v", r)
		}
	}
	rec := httptest.NewRecorder()
	mine.ServeHTTP(rec, httptest.NewRequest("POST", "/sign", strings.NewReader(signRequest(testVMHash, ""))))
	if s, err := strconv.Atoi(rec.Header().Get("Retry-After")); rec.Code != 429 || err != nil || s < 1 || s > 20 {
		t.Errorf("Retry-After %q with %d, want 1…20 s (a publication every 20 s)", rec.Header().Get("Retry-After"), rec.Code)
	}
	// Refusals spent nothing of the node's budget (5): the other program
	// gets the 2 left, then the node's limit.
	for i := range 2 {
		if r := sign(theirs, other); r.code != 200 {
			t.Fatalf("other program's publication %d: %+v", i, r)
		}
	}
	if r := publish(theirs); r.code != 429 || !strings.Contains(r.body, "this node made its 5 node-signed publications") {
		t.Errorf("beyond the node's budget: %+v", r)
	}
	// Refused requests are not limited: a malformed one still says why.
	forged := strings.Replace(signRequest(testVMHash, ""), `"item_type": "inline"`, `"item_type": "storage"`, 1)
	if r := do(t, mine, "POST", "/sign", strings.NewReader(forged)); r.code != 400 {
		t.Errorf("malformed while limited: %+v", r)
	}
}

// The connection limits reach the guest channel's server, defaults filled in.
func TestConnectionLimits(t *testing.T) {
	type limited interface {
		ConnectionLimits() (int, time.Duration, time.Duration)
	}
	h, ok := New(Options{Connections: ConnLimits{Max: 7, IdleTimeout: time.Second}}).(limited)
	if !ok {
		t.Fatal("the handler does not say its connection limits")
	}
	n, header, idle := h.ConnectionLimits()
	if n != 7 || header != DefaultConnLimits.ReadHeaderTimeout || idle != time.Second {
		t.Errorf("limits %d %v %v", n, header, idle)
	}
}
