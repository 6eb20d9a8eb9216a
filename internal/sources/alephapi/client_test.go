package alephapi

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

const owner = "0x9319Ad3B7A8E0eE24f2E639c40D8eD124C5520Ba"

func sum(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// storeMessage builds a STORE message as the API serves it: the envelope
// fields the network adds (_id, confirmations, ...) included.
func storeMessage(t *testing.T, fileHash, ref string, at time.Time) json.RawMessage {
	t.Helper()
	return storeMessageBy(t, owner, fileHash, ref, at)
}

// storeMessageBy is a STORE message for owner sent by sender (owner, or a
// delegate of it).
func storeMessageBy(t *testing.T, sender, fileHash, ref string, at time.Time) json.RawMessage {
	t.Helper()
	content := message.StoreContent{
		Address: owner, Time: float64(at.Unix()), ItemType: "storage", ItemHash: fileHash, Ref: ref,
	}
	m, err := message.InlineMessage(message.TypeStore, content, sender, at)
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]any{
		"_id":           map[string]string{"$oid": "6080402d7f44efefd611dc1e"},
		"chain":         "ETH",
		"item_hash":     m.ItemHash,
		"sender":        sender,
		"type":          "STORE",
		"channel":       "TEST",
		"confirmed":     true,
		"content":       json.RawMessage(m.ItemContent),
		"item_content":  m.ItemContent,
		"item_type":     "inline",
		"signature":     "0x372d",
		"size":          len(m.ItemContent),
		"time":          m.Time,
		"confirmations": []map[string]any{{"chain": "ETH", "height": 12284734, "hash": "0x67f2"}},
	}
	b, err := json.Marshal(env)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func itemHashOf(t *testing.T, raw json.RawMessage) string {
	var m struct {
		ItemHash string `json:"item_hash"`
	}
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	return m.ItemHash
}

func writePage(w http.ResponseWriter, msgs ...json.RawMessage) {
	if msgs == nil {
		msgs = []json.RawMessage{}
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"messages":            msgs,
		"pagination_page":     1,
		"pagination_total":    len(msgs),
		"pagination_per_page": 20,
		"pagination_item":     "messages",
	})
}

func fastClient(url string, opts ...Option) *Client {
	base := []Option{WithRetries(3, time.Millisecond), WithTimeout(2 * time.Second)}
	return New(url, url+"/ipfs", append(base, opts...)...)
}

func TestGetMessage(t *testing.T) {
	known := storeMessage(t, sum([]byte("code")), "", time.Unix(1700000000, 0))
	knownHash := itemHashOf(t, known)
	tampered := json.RawMessage(strings.Replace(string(known), `\"size\"`, `\"sizes\"`, 1))
	tampered = json.RawMessage(strings.Replace(string(tampered), "storage", "ipfs", 2))
	unknown := sum([]byte("nobody"))

	tests := []struct {
		name      string
		hash      string
		handler   func(calls int32, w http.ResponseWriter, r *http.Request)
		wantKind  errkind.Kind
		wantCalls int32
	}{
		{name: "found", hash: knownHash, wantCalls: 1, handler: func(_ int32, w http.ResponseWriter, r *http.Request) {
			writePage(w, known)
		}},
		{name: "empty list is not found", hash: unknown, wantKind: errkind.NotFound, wantCalls: 1,
			handler: func(_ int32, w http.ResponseWriter, r *http.Request) { writePage(w) }},
		{name: "5xx retried then ok", hash: knownHash, wantCalls: 3, handler: func(calls int32, w http.ResponseWriter, r *http.Request) {
			if calls < 3 {
				http.Error(w, "busy", http.StatusServiceUnavailable)
				return
			}
			writePage(w, known)
		}},
		{name: "5xx every time is unavailable", hash: knownHash, wantKind: errkind.Unavailable, wantCalls: 3,
			handler: func(_ int32, w http.ResponseWriter, r *http.Request) { http.Error(w, "down", http.StatusBadGateway) }},
		{name: "404 not retried", hash: knownHash, wantKind: errkind.NotFound, wantCalls: 1,
			handler: func(_ int32, w http.ResponseWriter, r *http.Request) { http.NotFound(w, r) }},
		{name: "4xx is upstream error", hash: knownHash, wantKind: errkind.Upstream, wantCalls: 1,
			handler: func(_ int32, w http.ResponseWriter, r *http.Request) {
				http.Error(w, "no", http.StatusUnprocessableEntity)
			}},
		{name: "garbage body", hash: knownHash, wantKind: errkind.Upstream, wantCalls: 1,
			handler: func(_ int32, w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "<html>") }},
		{name: "inline content not matching item_hash", hash: knownHash, wantKind: errkind.InvalidInput, wantCalls: 1,
			handler: func(_ int32, w http.ResponseWriter, r *http.Request) { writePage(w, tampered) }},
		{name: "malformed hash refused locally", hash: "not-a-hash", wantKind: errkind.InvalidInput, wantCalls: 0,
			handler: func(_ int32, w http.ResponseWriter, r *http.Request) { writePage(w, known) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var calls atomic.Int32
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				n := calls.Add(1)
				if r.URL.Path != "/api/v0/messages.json" || r.URL.Query().Get("hashes") != tt.hash {
					t.Errorf("unexpected request %s", r.URL)
				}
				tt.handler(n, w, r)
			}))
			defer srv.Close()
			m, err := fastClient(srv.URL).GetMessage(context.Background(), tt.hash)
			if got := calls.Load(); got != tt.wantCalls {
				t.Errorf("%d calls, want %d", got, tt.wantCalls)
			}
			if tt.wantKind != errkind.Unknown {
				if !errkind.Is(err, tt.wantKind) {
					t.Fatalf("err %v (kind %v), want kind %v", err, errkind.Of(err), tt.wantKind)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if m.ItemHash != tt.hash || m.Type != message.TypeStore {
				t.Fatalf("got %s %s", m.Type, m.ItemHash)
			}
			sc, err := m.Store()
			if err != nil || sc.ItemHash != sum([]byte("code")) {
				t.Fatalf("store content %+v, %v", sc, err)
			}
		})
	}
}

func TestUnreachable(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close() // nothing listens there any more
	_, err := fastClient(url).GetMessage(context.Background(), sum([]byte("x")))
	if !errkind.Is(err, errkind.Unavailable) || !errors.Is(err, ErrUnreachable) {
		t.Fatalf("err %v, want Unavailable wrapping ErrUnreachable", err)
	}
	if errkind.Is(err, errkind.NotFound) {
		t.Fatal("unreachable must not look like not found")
	}
}

func TestRequestTimeout(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(release)
	c := New(srv.URL, "", WithTimeout(50*time.Millisecond), WithRetries(2, time.Millisecond))
	start := time.Now()
	_, err := c.GetMessage(context.Background(), sum([]byte("x")))
	if !errkind.Is(err, errkind.Unavailable) || !errors.Is(err, ErrUnreachable) {
		t.Fatalf("err %v, want Unavailable", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("took %s: timeout not applied", d)
	}
}

func TestCallerCancellation(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "down", http.StatusServiceUnavailable)
	}))
	defer srv.Close()
	c := New(srv.URL, "", WithRetries(10, time.Second))
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := c.GetMessage(ctx, sum([]byte("x"))); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err %v, want the caller's deadline", err)
	}
}

func TestLatestAmend(t *testing.T) {
	orig := storeMessage(t, sum([]byte("v1")), "", time.Unix(1700000000, 0))
	origHash := itemHashOf(t, orig)
	older := storeMessage(t, sum([]byte("v2")), origHash, time.Unix(1700000100, 0))
	newer := storeMessage(t, sum([]byte("v3")), origHash, time.Unix(1700000200, 0))
	tests := []struct {
		name     string
		msgs     []json.RawMessage
		want     string // file hash of the winning amend
		wantKind errkind.Kind
	}{
		{name: "newest wins", msgs: []json.RawMessage{newer, older}, want: sum([]byte("v3"))},
		{name: "order of the answer does not matter", msgs: []json.RawMessage{older, newer}, want: sum([]byte("v3"))},
		{name: "no amend", msgs: nil, wantKind: errkind.NotFound},
		{name: "a message that does not amend ref is ignored", msgs: []json.RawMessage{orig}, wantKind: errkind.NotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				q := r.URL.Query()
				if q.Get("msgType") != "STORE" || q.Get("refs") != origHash || q.Get("owners") != owner || q.Get("sort_order") != "-1" {
					t.Errorf("unexpected query %s", r.URL.RawQuery)
				}
				writePage(w, tt.msgs...)
			}))
			defer srv.Close()
			m, err := fastClient(srv.URL).LatestAmend(context.Background(), origHash, owner, nil)
			if tt.wantKind != errkind.Unknown {
				if !errkind.Is(err, tt.wantKind) {
					t.Fatalf("err %v, want %v", err, tt.wantKind)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			sc, err := m.Store()
			if err != nil || sc.ItemHash != tt.want {
				t.Fatalf("amend points at %v (%v), want %s", sc, err, tt.want)
			}
		})
	}
}

// TestLatestAmendByDelegate: amends are asked for by owner
// (content.address), as aleph-vm's get_latest_amend does, so a delegate's
// amend is seen; the caller's accept (the owner's delegations) decides
// whether it wins, as the reactor decides whether it stops the program.
func TestLatestAmendByDelegate(t *testing.T) {
	const delegate = "0x1111111111111111111111111111111111111111"
	orig := storeMessage(t, sum([]byte("v1")), "", time.Unix(1700000000, 0))
	origHash := itemHashOf(t, orig)
	byOwner := storeMessage(t, sum([]byte("v2")), origHash, time.Unix(1700000100, 0))
	byDelegate := storeMessageBy(t, delegate, sum([]byte("v3")), origHash, time.Unix(1700000200, 0))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if q := r.URL.Query(); q.Get("owners") != owner || q.Get("addresses") != "" {
			t.Errorf("unexpected query %s", r.URL.RawQuery)
		}
		writePage(w, byDelegate, byOwner)
	}))
	defer srv.Close()
	delegates := func(m *message.Message) (bool, error) { return m.Sender == delegate, nil }
	nobody := func(*message.Message) (bool, error) { return false, nil }
	broken := func(*message.Message) (bool, error) {
		return false, errkind.New(errkind.Upstream, "aggregate unreadable")
	}
	cases := []struct {
		name   string
		accept func(*message.Message) (bool, error)
		want   string
		fails  bool
	}{
		{name: "the delegate's newer amend wins", accept: delegates, want: sum([]byte("v3"))},
		{name: "a delegate not allowed: the owner's amend", accept: nobody, want: sum([]byte("v2"))},
		{name: "no accept: the owner's only", accept: nil, want: sum([]byte("v2"))},
		{name: "delegations unreadable: the lookup fails", accept: broken, fails: true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m, err := fastClient(srv.URL).LatestAmend(context.Background(), origHash, owner, c.accept)
			if c.fails {
				if err == nil || !errkind.Is(err, errkind.Upstream) {
					t.Fatalf("got %v, %v; want the delegations' error", m, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if sc, _ := m.Store(); sc == nil || sc.ItemHash != c.want {
				t.Fatalf("amend points at %v, want %s", sc, c.want)
			}
		})
	}
}

func TestDownload(t *testing.T) {
	data := []byte("the code archive")
	h := sum(data)
	cid := "QmWVxvresoeadRbCeG4BmvsoSsqHV7VwUNuGK6nUCKKFGQ"
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		switch r.URL.Path {
		case "/api/v0/storage/raw/" + h, "/ipfs/" + cid:
			_, _ = w.Write(data) // the client compares what it got
		case "/api/v0/storage/raw/" + sum([]byte("flaky")):
			if calls.Load() == 1 {
				http.Error(w, "oops", http.StatusInternalServerError)
				return
			}
			_, _ = w.Write(data) // the client compares what it got
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	tests := []struct {
		name     string
		store    message.StoreContent
		wantKind errkind.Kind
	}{
		{name: "storage", store: message.StoreContent{ItemType: "storage", ItemHash: h}},
		{name: "ipfs through gateway", store: message.StoreContent{ItemType: "ipfs", ItemHash: cid}},
		{name: "5xx retried", store: message.StoreContent{ItemType: "storage", ItemHash: sum([]byte("flaky"))}},
		{name: "missing file", store: message.StoreContent{ItemType: "storage", ItemHash: sum([]byte("gone"))}, wantKind: errkind.NotFound},
		{name: "unknown item type", store: message.StoreContent{ItemType: "inline", ItemHash: h}, wantKind: errkind.InvalidInput},
	}
	c := fastClient(srv.URL)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			calls.Store(0)
			body, err := c.Download(context.Background(), &tt.store)
			if tt.wantKind != errkind.Unknown {
				if !errkind.Is(err, tt.wantKind) {
					t.Fatalf("err %v, want %v", err, tt.wantKind)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer body.Close()
			got, err := io.ReadAll(body)
			if err != nil || string(got) != string(data) {
				t.Fatalf("got %q, %v", got, err)
			}
		})
	}
}

func TestDownloadStallHitsIdleTimeout(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte("first bytes"))
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	c := fastClient(srv.URL, WithIdleTimeout(100*time.Millisecond))
	body, err := c.Download(context.Background(), &message.StoreContent{ItemType: "storage", ItemHash: sum([]byte("x"))})
	if err != nil {
		t.Fatal(err)
	}
	defer body.Close()
	_, err = io.ReadAll(body)
	if !errkind.Is(err, errkind.Unavailable) {
		t.Fatalf("stalled download: err %v, want Unavailable", err)
	}
}

// TestAuthorizations reads the "security" aggregate as pyaleph serves it,
// skipping entries that are not delegations (upstream skips what is not
// a dict), and an address without one (404) as no delegation.
func TestAuthorizations(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("keys") != "security" {
			t.Errorf("query %s: want keys=security", r.URL.RawQuery)
		}
		switch r.URL.Path {
		case "/api/v0/aggregates/0xowner.json":
			_, _ = w.Write([]byte(`{"address":"0xowner","data":{"security":{"authorizations":[
				{"address":"0xdele","chain":"ETH","types":["FORGET","STORE"],"channels":["C"]},
				"not an object", {"address":"0xbad","types":"STORE"}, {"types":["STORE"]},
				{"address":"0xany"}]}}}`))
		default:
			http.Error(w, `{"error":"Aggregate not found"}`, http.StatusNotFound)
		}
	}))
	defer srv.Close()
	c := New(srv.URL, "", WithRetries(1, 0))
	got, err := c.Authorizations(context.Background(), "0xowner")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Address != "0xdele" || got[0].Chain != "ETH" || len(got[0].Types) != 2 || got[0].Channels[0] != "C" || got[1].Address != "0xany" {
		t.Fatalf("authorizations %+v", got)
	}
	none, err := c.Authorizations(context.Background(), "0xnobody")
	if err != nil || none != nil {
		t.Fatalf("no aggregate: %v, %v; want none, nil", none, err)
	}
	if _, err := c.Authorizations(context.Background(), "../x"); !errkind.Is(err, errkind.InvalidInput) {
		t.Fatalf("a path in the address: %v", err)
	}
}
