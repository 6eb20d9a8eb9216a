package integration

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey"
)

// Issue 20, round 3, the guest API's findings: a signature for another
// program's content, idle connections without bound, the relay following
// redirects off the API host, one program's listings starving another's
// writes, publications without a rate limit, and files readable by all.

func gapiSHA256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// gapiCall has the program hash call its guest API (testdata/gapi /call).
func gapiCall(t *testing.T, s *supervisor, hash, method, path, body string) (status int, text, retryAfter string) {
	t.Helper()
	q := url.Values{"method": {method}, "path": {path}, "body": {body}}
	r := s.get("/vm/" + hash + "/call?" + q.Encode())
	expect(t, r, http.StatusOK)
	m := r.json(t)
	code, _ := m["status"].(float64)
	text, _ = m["body"].(string)
	retryAfter, _ = m["retry_after"].(string)
	return int(code), text, retryAfter
}

// gapiMessage is a message whose content names address, inline, with
// itemHash ("" for the content's own hash).
func gapiMessage(t *testing.T, address, itemHash string) (msg string, contentHash string) {
	t.Helper()
	content, _ := json.Marshal(map[string]any{"address": address, "time": 1.5, "type": "test", "content": map[string]string{"n": "1"}})
	contentHash = gapiSHA256Hex(content)
	if itemHash == "" {
		itemHash = contentHash
	}
	b, _ := json.Marshal(map[string]any{
		"chain": "ETH", "type": "POST", "channel": "TEST", "time": 1.5, "item_type": "inline",
		"item_content": string(content), "item_hash": itemHash,
	})
	return string(b), contentHash
}

// gapiJSON gets a program's path and decodes its JSON answer.
func gapiJSON(t *testing.T, s *supervisor, hash, pathAndQuery string) map[string]any {
	t.Helper()
	r := s.get("/vm/" + hash + pathAndQuery)
	expect(t, r, http.StatusOK)
	return r.json(t)
}

// A program asks the node to sign a message whose content names the
// program itself but whose item_hash (what the signature covers) is the
// hash of another content, naming another program: refused with 403, and
// so are other item types (400). Its honest message is still signed, by
// the node's key, over the content's true hash.
func TestGapiSignForSomeoneElse(t *testing.T) {
	backendIndependent(t)
	s := startSupervisor(t)
	hash := s.upload("testdata/gapi", "main:app")
	victim := strings.Repeat("7", 64)

	_, victimHash := gapiMessage(t, victim, "")
	forged, _ := gapiMessage(t, hash, victimHash)
	code, body, _ := gapiCall(t, s, hash, "POST", "/sign", forged)
	if code != http.StatusForbidden || strings.Contains(body, "signature") {
		t.Errorf("signing another content's hash: %d %s, want 403", code, body)
	}
	if !strings.Contains(body, "item_hash is not the sha256 of item_content") {
		t.Errorf("refusal does not say why: %s", body)
	}
	storage := strings.Replace(forged, `"item_type":"inline"`, `"item_type":"storage"`, 1)
	if code, body, _ := gapiCall(t, s, hash, "POST", "/sign", storage); code != http.StatusBadRequest || !strings.Contains(body, "only inline messages") {
		t.Errorf("storage message: %d %s, want 400", code, body)
	}
	// aleph-vm's own check still comes first.
	other, _ := gapiMessage(t, victim, "")
	if code, body, _ := gapiCall(t, s, hash, "POST", "/sign", other); code != http.StatusBadRequest || body != "400: Message address does not match VM item_hash" {
		t.Errorf("another program's content: %d %s", code, body)
	}

	honest, contentHash := gapiMessage(t, hash, "")
	code, body, _ = gapiCall(t, s, hash, "POST", "/sign", honest)
	if code != http.StatusOK {
		t.Fatalf("honest message: %d %s", code, body)
	}
	var signed map[string]any
	if err := json.Unmarshal([]byte(body), &signed); err != nil {
		t.Fatal(err)
	}
	_, props, _ := gapiCall(t, s, hash, "GET", "/properties", "")
	var p map[string]string
	_ = json.Unmarshal([]byte(props), &p)
	sig, _ := signed["signature"].(string)
	who, err := nodekey.RecoverPersonal(nodekey.VerificationBuffer("ETH", p["address"], "POST", contentHash), sig)
	if err != nil || who != p["address"] || signed["item_hash"] != contentHash {
		t.Errorf("honest signature recovers to %s (%v), node is %s; item_hash %v", who, err, p["address"], signed["item_hash"])
	}
}

// Node-signed publications are rate-limited: a program gets its budget
// (here 3 a minute) and then 429 with Retry-After, and a neighbour still
// gets its own signatures.
func TestGapiPublicationsRateLimit(t *testing.T) {
	backendIndependent(t)
	s := startSupervisor(t, "ALEPH_VM_GUEST_API_PUBLICATIONS_PER_MINUTE=3")
	hostile := s.upload("testdata/gapi", "main:app")
	neighbour := s.upload("testdata/gapi", "main:app", "--env", "ROLE=neighbour")

	counts := map[int]int{}
	var retry, refusal string
	for range 10 {
		msg, _ := gapiMessage(t, hostile, "")
		code, body, ra := gapiCall(t, s, hostile, "POST", "/sign", msg)
		counts[code]++
		if code == http.StatusTooManyRequests {
			retry, refusal = ra, body
		}
	}
	if counts[200] != 3 || counts[429] != 7 {
		t.Errorf("10 signatures in a burst: %v, want 3 × 200 then 7 × 429", counts)
	}
	if n, err := strconv.Atoi(retry); err != nil || n < 1 || n > 20 {
		t.Errorf("Retry-After %q, want 1…20 s", retry)
	}
	if !strings.Contains(refusal, "node-signed publications") {
		t.Errorf("refusal: %s", refusal)
	}
	// pubsub publications share the budget.
	pub, _ := json.Marshal(map[string]string{"topic": "ALEPH-TEST", "data": `{"channel": "TEST", "item_content": "{\"type\": \"chat\", \"content\": 1}"}`})
	if code, body, _ := gapiCall(t, s, hostile, "POST", "/api/v0/ipfs/pubsub/pub", string(pub)); code != http.StatusTooManyRequests {
		t.Errorf("pubsub beyond the budget: %d %s", code, body)
	}
	msg, _ := gapiMessage(t, neighbour, "")
	if code, body, _ := gapiCall(t, s, neighbour, "POST", "/sign", msg); code != http.StatusOK {
		t.Errorf("neighbour's signature: %d %s", code, body)
	}
}

// The relay to the Aleph API does not follow a redirect off the API's
// host: a program asking for a path the API redirects to a service that
// listens on the node's loopback only gets the redirect, never that
// service's answer. A redirect within the API's host is still followed.
func TestGapiRelayRedirectOffHost(t *testing.T) {
	backendIndependent(t)
	var secretHits atomic.Int32
	secret := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		secretHits.Add(1)
		_, _ = io.WriteString(w, "loopback-only secret")
	}))
	defer secret.Close()
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/api/v0/away":
			http.Redirect(w, r, secret.URL+"/admin", http.StatusFound)
		case "/api/v0/here":
			http.Redirect(w, r, "/api/v0/there", http.StatusFound)
		case "/api/v0/there":
			_, _ = io.WriteString(w, "api there")
		default:
			http.NotFound(w, r)
		}
	}))
	defer api.Close()
	s := startSupervisor(t, "ALEPH_VM_API_SERVER="+api.URL)
	hash := s.upload("testdata/gapi", "main:app")

	code, body, _ := gapiCall(t, s, hash, "GET", "/api/v0/away", "")
	if code != http.StatusFound || strings.Contains(body, "secret") {
		t.Errorf("off-host redirect: %d %q, want the 302 itself", code, body)
	}
	if n := secretHits.Load(); n != 0 {
		t.Errorf("the loopback-only service was reached %d times through the relay", n)
	}
	if code, body, _ := gapiCall(t, s, hash, "GET", "/api/v0/here", ""); code != http.StatusOK || body != "api there" {
		t.Errorf("same-host redirect: %d %q", code, body)
	}
}

// gapiFDs counts a process's open file descriptors.
func gapiFDs(t *testing.T, pid int) int {
	t.Helper()
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// A program opens thousands of idle connections to its guest API socket
// and keeps them: the supervisor holds at most GUEST_API_MAX_CONNECTIONS
// of them (the idlest are closed at once), its memory and descriptors stay
// bounded, and the program's own later guest API call and a neighbour's
// still answer. Below the cap, silent connections time out.
func TestGapiIdleConnectionsBounded(t *testing.T) {
	backendIndependent(t)
	const keep = 32 // the default is 64
	s := startSupervisor(t, fmt.Sprintf("ALEPH_VM_GUEST_API_MAX_CONNECTIONS=%d", keep), "ALEPH_VM_GUEST_API_READ_HEADER_TIMEOUT=3")
	// Memory for the guest's side of ten thousand connections.
	hostile := s.upload("testdata/gapi", "main:app", "--memory", "1024")
	neighbour := s.upload("testdata/gapi", "main:app", "--env", "ROLE=neighbour")
	for _, h := range []string{hostile, neighbour} {
		expect(t, s.get("/vm/"+h+"/"), http.StatusOK)
		if code, body, _ := gapiCall(t, s, h, "GET", "/properties", ""); code != 200 {
			t.Fatalf("properties: %d %s", code, body)
		}
	}
	// Under the cap, connections that never send a request are closed
	// after GUEST_API_READ_HEADER_TIMEOUT (3 s here).
	gapiJSON(t, s, hostile, "/hoard?n=5")
	time.Sleep(6 * time.Second)
	if state := gapiJSON(t, s, hostile, "/hoard-state"); state["closed_by_host"] != float64(5) {
		t.Errorf("silent connections after the read header timeout: %v, want all 5 closed", state)
	}
	gapiJSON(t, s, hostile, "/release")

	pid := s.cmd.Process.Pid
	rssBefore, fdsBefore := vmRSS(t, pid), gapiFDs(t, pid)

	stop := peakRSS(pid)
	const n = 10000
	start := time.Now()
	h := gapiJSON(t, s, hostile, fmt.Sprintf("/hoard?n=%d", n))
	opened, _ := h["opened"].(float64)
	// The last ones reach the host, which closes all but keep.
	var state map[string]any
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(time.Second) {
		state = gapiJSON(t, s, hostile, "/hoard-state")
		if closed, _ := state["closed_by_host"].(float64); closed >= opened-keep || time.Now().After(deadline) {
			break
		}
	}
	peak := stop()
	rssAfter, fdsAfter := vmRSS(t, pid), gapiFDs(t, pid)
	t.Logf("%v idle connections opened in %v (%v); supervisor RSS %d MiB before, peak %d MiB, after %d MiB; fds %d before, %d after; %v",
		opened, time.Since(start), h, rssBefore>>20, peak>>20, rssAfter>>20, fdsBefore, fdsAfter, state)
	if opened < n/2 {
		t.Fatalf("the program opened only %v connections: not an attack (%v)", opened, h)
	}
	// keep connections of a few KiB each, plus the churn of closed streams
	// (each freed at most 10 s after it was closed).
	const rssBound = 40 << 20
	if peak-rssBefore > rssBound {
		t.Errorf("supervisor RSS grew by %d MiB (bound %d MiB)", (peak-rssBefore)>>20, rssBound>>20)
	}
	if fdsAfter-fdsBefore > 20 {
		t.Errorf("supervisor fds grew from %d to %d", fdsBefore, fdsAfter)
	}
	if closed, _ := state["closed_by_host"].(float64); closed != opened-keep {
		t.Errorf("the host closed %v of %v idle connections, want all but %d", closed, opened, keep)
	}
	// Still holding them all, the program's own call is answered.
	if code, body, _ := gapiCall(t, s, hostile, "GET", "/properties", ""); code != 200 {
		t.Errorf("the program's own later call: %d %s", code, body)
	}
	if code, body, _ := gapiCall(t, s, neighbour, "PUT", "/cache/still", "here"); code != 200 || body != "true" {
		t.Errorf("neighbour's call: %d %s", code, body)
	}
	expect(t, s.get("/vm/"+neighbour+"/"), http.StatusOK)
	gapiJSON(t, s, hostile, "/release")
}

// One program lists its thousand longest keys in a loop from many threads,
// with a pattern that makes SQLite read them all and match none (so that
// the answers are small and the listings many);
// a neighbour's cache writes and reads keep their pace (p50 under 100 ms,
// against 1.2 s with one connection for all). After use the cache's and
// the records' files are 0600.
func TestGapiListingDoesNotStarveNeighbour(t *testing.T) {
	backendIndependent(t)
	s := startSupervisor(t)
	lister := s.upload("testdata/gapi", "main:app", "--timeout-seconds", "300")
	neighbour := s.upload("testdata/gapi", "main:app", "--timeout-seconds", "300", "--env", "ROLE=neighbour")
	if f := gapiJSON(t, s, lister, "/fill-keys?n=1000&length=1000"); f["failed"] != float64(0) {
		t.Fatalf("fill: %v", f)
	}
	quiet := gapiJSON(t, s, neighbour, "/put-latency?n=20")
	gapiJSON(t, s, lister, "/list-start?threads=48&pattern=*z")
	time.Sleep(time.Second)
	busy := gapiJSON(t, s, neighbour, "/put-latency?n=30")
	listed := gapiJSON(t, s, lister, "/list-stop")
	p50 := func(m map[string]any, k string) float64 {
		v, _ := m[k].([]any)
		if len(v) == 0 {
			t.Fatalf("no %s timings: %v", k, m)
		}
		f := make([]float64, len(v))
		for i := range v {
			f[i], _ = v[i].(float64)
		}
		sort.Float64s(f)
		return f[len(f)/2]
	}
	t.Logf("neighbour's PUT p50 %.1f ms, GET p50 %.1f ms alone; %.1f ms and %.1f ms while the other lists (%v)",
		p50(quiet, "puts"), p50(quiet, "gets"), p50(busy, "puts"), p50(busy, "gets"), listed)
	if listed["listings"] == float64(0) {
		t.Errorf("no listing ran: %v", listed)
	}
	if busy["failed"] != float64(0) {
		t.Errorf("neighbour's calls failed: %v", busy)
	}
	if put, get := p50(busy, "puts"), p50(busy, "gets"); put > 100 || get > 100 {
		t.Errorf("neighbour's p50 while the other lists: PUT %.1f ms, GET %.1f ms (bound 100 ms)", put, get)
	}

	for _, name := range []string{"guest-cache.sqlite3", "executions.sqlite3"} {
		for _, suffix := range []string{"", "-wal", "-shm"} {
			p := filepath.Join(s.execRoot, name+suffix)
			fi, err := os.Stat(p)
			if err != nil {
				if suffix == "" || !os.IsNotExist(err) {
					t.Errorf("%s: %v", p, err)
				}
				continue
			}
			if fi.Mode().Perm() != 0o600 {
				t.Errorf("%s is %o, want 600", p, fi.Mode().Perm())
			}
		}
	}
}
