package httpapi

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mr-tron/base58"

	"github.com/aleph-vm-go/vm-supervisor/internal/delegation"
	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey/nodekeytest"
	"github.com/aleph-vm-go/vm-supervisor/internal/ownerauth"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool/pooltest"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/alephapi"
)

// aggregateAPI serves /api/v0/aggregates/{address}.json?keys=security as
// the Aleph API does: the body set for the address, 404 for an address
// without one, or the status set with fail.
type aggregateAPI struct {
	srv   *httptest.Server
	calls atomic.Int32
	mu    sync.Mutex
	body  map[string]string
	fail  int
}

func newAggregateAPI(t *testing.T) *aggregateAPI {
	a := &aggregateAPI{body: map[string]string{}}
	a.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.calls.Add(1)
		addr, ok := strings.CutSuffix(strings.TrimPrefix(r.URL.Path, "/api/v0/aggregates/"), ".json")
		if !ok || r.URL.Query().Get("keys") != "security" {
			t.Errorf("unexpected request %s", r.URL)
		}
		a.mu.Lock()
		body, fail := a.body[addr], a.fail
		a.mu.Unlock()
		switch {
		case fail != 0:
			http.Error(w, "server error", fail)
		case body == "":
			http.Error(w, `{"error":"No aggregate found"}`, http.StatusNotFound)
		default:
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, body)
		}
	}))
	t.Cleanup(a.srv.Close)
	return a
}

func (a *aggregateAPI) set(address, authorizations string, fail int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.fail = 0
	delete(a.body, address)
	if authorizations != "" {
		a.body[address] = fmt.Sprintf(`{"address":%q,"data":{"security":{"authorizations":%s}}}`, address, authorizations)
	}
	a.fail = fail
}

func p256(t *testing.T) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// signedDo sends a request signed with c for the node's domain.
func (l *live) signedDo(t *testing.T, c *ownerauth.Credentials, method, path string) answer {
	t.Helper()
	h, err := c.Headers(ownerauth.NewOperation(method, path, "node.example"))
	if err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequest(method, l.url+path, nil)
	req.Host = "node.example"
	req.Header = h
	resp, err := (&http.Client{Timeout: 15 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return answer{resp.StatusCode, string(b), resp.Header}
}

// TestControlDelegates pins upstream's operator tests
// (tests/supervisor/views/test_operator.py, test_*delegation*): a wallet
// the program's owner lists in its security aggregate may stop the
// program when the delegation names no types or names INSTANCE; the
// address is compared ignoring case; any other wallet, an empty list,
// other types, a missing aggregate or an API error give 403
// "Unauthorized sender". A Solana wallet delegated the same way is
// accepted too.
func TestControlDelegates(t *testing.T) {
	api := newAggregateAPI(t)
	// A TTL of 1ns: every request reads the aggregate the case set.
	checker := delegation.New(alephapi.New(api.srv.URL, "", alephapi.WithRetries(1, time.Millisecond)), time.Nanosecond)
	l := startLiveOn(t, pooltest.NewStore(t), map[string]program{"prog": {agent: pooltest.Agent{Handler: pooltest.OK}}}, nil,
		func(o *Options) { o.Control = o.Pool.(*pool.Pool); o.Delegations = checker })
	hash := l.hashes["prog"]
	run := func() string {
		t.Helper()
		if a := l.do(t, "GET", "/vm/"+hash+"/", nil); a.code != 200 {
			t.Fatalf("starting the program: %d %s", a.code, a.body)
		}
		return l.pool.Running(hash).Owner()
	}
	owner := run()

	delegate := nodekeytest.Fixed(t, 41)
	stranger := nodekeytest.Fixed(t, 42)
	solSeed := sha256.Sum256([]byte("solana delegate"))
	solWallet := ed25519.NewKeyFromSeed(solSeed[:])
	solAddress := base58.Encode(solWallet.Public().(ed25519.PublicKey))
	exp := time.Now().Add(time.Hour)
	delegateCreds, err := ownerauth.Authorize(delegate, p256(t), "node.example", exp)
	if err != nil {
		t.Fatal(err)
	}
	strangerCreds, _ := ownerauth.Authorize(stranger, p256(t), "node.example", exp)
	solCreds, err := ownerauth.AuthorizeSolana(solWallet, p256(t), "node.example", exp)
	if err != nil {
		t.Fatal(err)
	}
	d := strings.ToLower(delegate.Address())

	cases := []struct {
		name  string
		auths string // the aggregate's authorizations; "" none (404)
		fail  int    // the API's status instead
		creds *ownerauth.Credentials
		ok    bool
	}{
		{name: "delegated INSTANCE", auths: `[{"address":"` + d + `","types":["INSTANCE"]}]`, creds: delegateCreds, ok: true},
		{name: "another address delegated", auths: `[{"address":"` + d + `","types":["INSTANCE"]}]`, creds: strangerCreds},
		{name: "empty authorizations", auths: `[]`, creds: delegateCreds},
		{name: "wrong message types", auths: `[{"address":"` + d + `","types":["POST","AGGREGATE"]}]`, creds: delegateCreds},
		{name: "address case ignored", auths: `[{"address":"` + strings.ToUpper(d) + `","types":["INSTANCE"]}]`, creds: delegateCreds, ok: true},
		{name: "API error", fail: http.StatusInternalServerError, creds: delegateCreds},
		{name: "no security aggregate", creds: delegateCreds},
		{name: "empty types allow all", auths: `[{"address":"` + d + `","types":[]}]`, creds: delegateCreds, ok: true},
		{name: "no types allow all", auths: `[{"address":"` + d + `"}]`, creds: delegateCreds, ok: true},
		{name: "Solana delegate", auths: `[{"address":"` + solAddress + `","chain":"SOL"}]`, creds: solCreds, ok: true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if l.pool.Running(hash) == nil {
				run()
			}
			api.set(owner, c.auths, c.fail)
			a := l.signedDo(t, c.creds, "POST", "/control/machine/"+hash+"/stop")
			if !c.ok {
				if a.code != 403 || a.body != "Unauthorized sender" {
					t.Fatalf("got %d %q, want 403 \"Unauthorized sender\"", a.code, a.body)
				}
				if l.pool.Running(hash) == nil {
					t.Fatal("the program was stopped by a wallet not delegated")
				}
				return
			}
			if a.code != 200 || a.body != "Stopped VM with ref "+hash {
				t.Fatalf("got %d %q, want 200 \"Stopped VM with ref %s\"", a.code, a.body, hash)
			}
			if l.pool.Running(hash) != nil {
				t.Fatal("the program still runs")
			}
		})
	}

	// The logs follow the same rule (operate_logs_json).
	t.Run("delegate reads the logs", func(t *testing.T) {
		if l.pool.Running(hash) == nil {
			run()
		}
		api.set(owner, `[{"address":"`+d+`"}]`, 0)
		if a := l.signedDo(t, delegateCreds, "GET", "/control/machine/"+hash+"/logs"); a.code != 200 || !strings.HasPrefix(a.body, "[") {
			t.Fatalf("delegate's logs: %d %q", a.code, a.body)
		}
		if a := l.signedDo(t, strangerCreds, "GET", "/control/machine/"+hash+"/logs"); a.code != 403 || a.body != "Unauthorized sender" {
			t.Fatalf("stranger's logs: %d %q", a.code, a.body)
		}
	})
}

// TestControlDelegationsCached: the owner's aggregate is read once per
// CACHE_TTL_SECURITY_AGGREGATE however many operations name it.
func TestControlDelegationsCached(t *testing.T) {
	api := newAggregateAPI(t)
	checker := delegation.New(alephapi.New(api.srv.URL, "", alephapi.WithRetries(1, time.Millisecond)), time.Minute)
	l := startLiveOn(t, pooltest.NewStore(t), map[string]program{"prog": {agent: pooltest.Agent{Handler: pooltest.OK}}}, nil,
		func(o *Options) { o.Control = o.Pool.(*pool.Pool); o.Delegations = checker })
	hash := l.hashes["prog"]
	if a := l.do(t, "GET", "/vm/"+hash+"/", nil); a.code != 200 {
		t.Fatalf("starting the program: %d %s", a.code, a.body)
	}
	api.set(l.pool.Running(hash).Owner(), `[]`, 0)
	stranger, _ := ownerauth.Authorize(nodekeytest.Fixed(t, 43), p256(t), "node.example", time.Now().Add(time.Hour))
	for range 20 {
		if a := l.signedDo(t, stranger, "GET", "/control/machine/"+hash+"/logs"); a.code != 403 {
			t.Fatalf("got %d %q", a.code, a.body)
		}
	}
	if n := api.calls.Load(); n != 1 {
		t.Fatalf("the aggregate was read %d times for 20 operations, want 1", n)
	}
}
