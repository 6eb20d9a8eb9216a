package integration

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mr-tron/base58"

	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey/nodekeytest"
	"github.com/aleph-vm-go/vm-supervisor/internal/ownerauth"
)

// ownersFront stands in front of the test API: it answers the security
// aggregates (/api/v0/aggregates/{address}.json?keys=security) itself,
// with the authorizations a test sets, and passes everything else, the
// message websocket included, to the test API.
type ownersFront struct {
	srv    *httptest.Server
	target atomic.Pointer[url.URL]
	mu     sync.Mutex
	auths  map[string]string // address → authorizations (JSON list)
	status map[string]string // item hash → status answered by /api/v0/messages/{hash}
}

func ownersNewFront(t *testing.T) *ownersFront {
	f := &ownersFront{auths: map[string]string{}, status: map[string]string{}}
	proxy := &httputil.ReverseProxy{Rewrite: func(r *httputil.ProxyRequest) {
		if u := f.target.Load(); u != nil {
			r.SetURL(u)
		}
	}}
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if addr, ok := strings.CutPrefix(r.URL.Path, "/api/v0/aggregates/"); ok {
			f.mu.Lock()
			auths, known := f.auths[strings.TrimSuffix(addr, ".json")]
			f.mu.Unlock()
			if !known || r.URL.Query().Get("keys") != "security" {
				http.Error(w, `{"error":"Aggregate not found"}`, http.StatusNotFound)
				return
			}
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprintf(w, `{"address":%q,"data":{"security":{"authorizations":%s}}}`, strings.TrimSuffix(addr, ".json"), auths)
			return
		}
		if hash, ok := strings.CutPrefix(r.URL.Path, "/api/v0/messages/"); ok {
			f.mu.Lock()
			status, set := f.status[hash]
			f.mu.Unlock()
			if set {
				w.Header().Set("Content-Type", "application/json")
				fmt.Fprintf(w, `{"status":%q,"item_hash":%q,"reason":"test","forgotten_by":[]}`, status, hash)
				return
			}
		}
		if f.target.Load() == nil {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *ownersFront) setAuthorizations(address, auths string) {
	f.mu.Lock()
	f.auths[address] = auths
	f.mu.Unlock()
}

// ownersStart starts a supervisor whose API is the front over its test API.
func ownersStart(t *testing.T, env ...string) (*supervisor, *ownersFront) {
	t.Helper()
	f := ownersNewFront(t)
	s := startSupervisor(t, append([]string{"ALEPH_VM_DOMAIN_NAME=" + controlDomain, "ALEPH_VM_API_SERVER=" + f.srv.URL}, env...)...)
	u, err := url.Parse(s.api.srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	f.target.Store(u)
	return s, f
}

func ownersSolanaCredentials(t *testing.T, seed string) (*ownerauth.Credentials, string) {
	t.Helper()
	sum := sha256.Sum256([]byte(seed))
	wallet := ed25519.NewKeyFromSeed(sum[:])
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	c, err := ownerauth.AuthorizeSolana(wallet, key, controlDomain, time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	return c, base58.Encode(wallet.Public().(ed25519.PublicKey))
}

// TestOwnersDelegatedControl: upstream's operator views answer a wallet
// the program's owner delegated to in its security aggregate (types
// empty or naming INSTANCE) as they answer the owner; a wallet the
// aggregate does not list, or lists for other types, gets 403
// "Unauthorized sender"; a Solana wallet is a wallet like another.
func TestOwnersDelegatedControl(t *testing.T) {
	backendIndependent(t)
	s, front := ownersStart(t)
	owner := nodekeytest.Fixed(t, 0x31)
	delegate, postsOnly, stranger := nodekeytest.Fixed(t, 0x32), nodekeytest.Fixed(t, 0x33), nodekeytest.Fixed(t, 0x34)
	sol, solAddress := ownersSolanaCredentials(t, "owners solana delegate")
	// The delegate's address upper-cased (but its 0x): the case is ignored.
	front.setAuthorizations(owner.Address(), fmt.Sprintf(`[{"address":%q,"types":["INSTANCE"]},{"address":%q,"types":["POST"]},{"address":%q,"chain":"SOL"}]`,
		"0x"+strings.ToUpper(delegate.Address()[2:]), postsOnly.Address(), solAddress))

	hash := s.republish(s.upload("testdata/probe", "main:app"), func(c map[string]any) {
		c["address"] = owner.Address()
	})
	expect(t, s.get("/vm/"+hash+"/print?text=delegated"), http.StatusOK)
	base := "/control/machine/" + hash
	exp := time.Now().Add(time.Hour)

	expectBody(t, s.signed(credentials(t, stranger, exp), "POST", base+"/stop"), 403, "Unauthorized sender")
	expectBody(t, s.signed(credentials(t, postsOnly, exp), "POST", base+"/stop"), 403, "Unauthorized sender")
	if n := s.runningExecutions(); n != 1 {
		t.Fatalf("%d executions after refused stops, want 1", n)
	}
	mine := credentials(t, delegate, exp)
	// The program's output reaches its log after its answer: wait for it.
	r := s.signed(mine, "GET", base+"/logs")
	for deadline := time.Now().Add(10 * time.Second); r.Status == http.StatusOK && !strings.Contains(string(r.Body), "delegated 0") && time.Now().Before(deadline); {
		time.Sleep(200 * time.Millisecond)
		r = s.signed(credentials(t, delegate, exp), "GET", base+"/logs")
	}
	if r.Status != http.StatusOK || !strings.Contains(string(r.Body), "delegated 0") {
		t.Fatalf("delegate's logs: %d %s", r.Status, r.Body)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, status := s.logStream(ctx, sol, hash)
	if status["status"] != "connected" {
		t.Fatalf("Solana delegate's stream: %v", status)
	}
	_ = conn.CloseNow()
	expectBody(t, s.signed(mine, "POST", base+"/stop"), 200, "Stopped VM with ref "+hash)
	if n := s.runningExecutions(); n != 0 {
		t.Fatalf("%d executions after the delegate's stop, want 0", n)
	}
	// The Solana delegate stops it too once it runs again.
	expect(t, s.get("/vm/"+hash+"/print?text=again"), http.StatusOK)
	expectBody(t, s.signed(sol, "POST", base+"/stop"), 200, "Stopped VM with ref "+hash)
}

// TestOwnersDelegatedAmend: a use_latest code ref amended by a delegate
// of its owner (allowed STOREs) stops the program and its restart runs
// the amend; an amend by a stranger, even one naming the owner, changes
// nothing.
func TestOwnersDelegatedAmend(t *testing.T) {
	backendIndependent(t)
	s, front := ownersStart(t)
	delegate := nodekeytest.Fixed(t, 0x35).Address()
	stranger := nodekeytest.Fixed(t, 0x36).Address()
	front.setAuthorizations(watchOwner, fmt.Sprintf(`[{"address":%q,"types":["STORE"]}]`, delegate))
	program, codeRef := ownersWatchedProgram(t, s)
	amend := func(sender, version string) {
		data := watchCode(t, version)
		sum := sha256.Sum256(data)
		fileHash := hex.EncodeToString(sum[:])
		s.api.mu.Lock()
		s.api.files[fileHash] = data
		s.api.mu.Unlock()
		s.api.publish(t, "STORE", sender, "TEST", map[string]any{
			"address": watchOwner, "time": float64(time.Now().UnixNano()) / 1e9,
			"item_type": "storage", "item_hash": fileHash, "size": len(data), "ref": codeRef,
		})
	}
	amend(stranger, "stranger")
	time.Sleep(3 * time.Second)
	if r := s.get("/vm/" + program + "/version"); r.Status != http.StatusOK || string(r.Body) != "v1" {
		t.Fatalf("after a stranger's amend: %d %s, want v1", r.Status, r.Body)
	}
	amend(delegate, "v2")
	s.until(t, "the delegate's amend answers", "/vm/"+program+"/version", 120*time.Second, func(r response) bool {
		return r.Status == http.StatusOK && string(r.Body) == "v2"
	})
	if !strings.Contains(s.logs.String(), "ref of a running program was amended") {
		t.Error("the supervisor did not say it stopped the program for the amend")
	}
}

// ownersStore records a STORE message on the test API without sending it
// on the stream: a message the websocket missed.
func ownersStore(t *testing.T, a *alephAPI, sender, owner, ref string, data []byte) {
	t.Helper()
	sum := sha256.Sum256(data)
	fileHash := hex.EncodeToString(sum[:])
	raw, err := json.Marshal(map[string]any{
		"address": owner, "time": float64(time.Now().UnixNano()) / 1e9,
		"item_type": "storage", "item_hash": fileHash, "size": len(data), "ref": ref,
	})
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(raw)
	a.mu.Lock()
	defer a.mu.Unlock()
	a.files[fileHash] = data
	a.messages[hex.EncodeToString(h[:])] = map[string]any{
		"item_hash": hex.EncodeToString(h[:]), "type": "STORE", "chain": "ETH", "sender": sender,
		"channel": "TEST", "item_type": "inline", "item_content": string(raw),
		"time": float64(time.Now().UnixNano()) / 1e9, "signature": "0x00", "confirmed": true,
	}
}

// TestOwnersStatusPoll: what the stream never delivered is noticed by
// the status poll (PAYMENT_MONITOR_INTERVAL, 1 s here): an amend of the
// code published without a stream message runs at the next start, and a
// program the API calls forgotten is stopped and unknown, both without a
// message on the websocket.
func TestOwnersStatusPoll(t *testing.T) {
	backendIndependent(t)
	s, front := ownersStart(t, "ALEPH_VM_PAYMENT_MONITOR_INTERVAL=1")
	program, codeRef := ownersWatchedProgram(t, s)

	ownersStore(t, s.api, watchOwner, watchOwner, codeRef, watchCode(t, "v2"))
	s.until(t, "the missed amend answers", "/vm/"+program+"/version", 60*time.Second, func(r response) bool {
		return r.Status == http.StatusOK && string(r.Body) == "v2"
	})
	if !strings.Contains(s.logs.String(), "amended (seen by polling)") {
		t.Error("the supervisor did not say the poll found the amend")
	}

	front.mu.Lock()
	front.status[program] = "forgotten"
	front.mu.Unlock()
	start := time.Now()
	deadline := time.Now().Add(60 * time.Second)
	for s.runningExecutions() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the program the API calls forgotten still runs")
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("stopped %s after the API first called it forgotten (3 polls of 1 s needed)", time.Since(start).Round(100*time.Millisecond))
	if time.Since(start) < 2*time.Second {
		t.Errorf("stopped after %s: fewer than 3 polls", time.Since(start))
	}
	expect(t, s.get("/vm/"+program+"/version"), http.StatusNotFound)
}

// ownersWatchedProgram publishes a use_latest program once the supervisor
// follows the message stream, and waits for its first version.
func ownersWatchedProgram(t *testing.T, s *supervisor) (program, codeRef string) {
	t.Helper()
	msgsWaitStream(t, s)
	program, codeRef = publishWatchedProgram(t, s)
	s.until(t, "v1 answers", "/vm/"+program+"/version", 120*time.Second, func(r response) bool {
		return r.Status == http.StatusOK && string(r.Body) == "v1"
	})
	return program, codeRef
}
