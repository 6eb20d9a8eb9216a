package httpapi

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/allocations"
	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey"
	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey/nodekeytest"
	"github.com/aleph-vm-go/vm-supervisor/internal/ownerauth"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool/pooltest"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/alephapi"
)

// The legacy token of aleph-vm's tests ("test") and upstream's answers.
const (
	allocsignToken      = "test"
	allocsignRefused    = `{"error": "Authentication token received is invalid"}`
	allocsignEmptyOK    = `{"success": true, "successful": [], "failing": [], "errors": {}, "stopped": []}`
	allocsignEmptyBody  = `{"persistent_vms": []}`
	allocsignAllocation = "/control/allocations"
)

func allocsignHash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// allocsignLive is a live server whose allocations run on pooltest's
// sandboxes, with the real allocations.Manager; tune sets the auth.
func allocsignLive(t *testing.T, tune func(*Options)) *live {
	t.Helper()
	var m *allocations.Manager
	l := startLiveOn(t, pooltest.NewStore(t), nil, nil, func(o *Options) {
		m = allocations.New(allocations.Options{Pool: o.Pool.(*pool.Pool), Logger: quiet})
		o.Allocations = m
		o.AllocationTokenHash = allocsignHash(allocsignToken)
		tune(o)
	})
	t.Cleanup(m.Close)
	return l
}

type allocsignAnswer struct {
	code        int
	contentType string
	body        []byte
}

// allocsignPost posts body with the given headers; chunked sends it
// without a Content-Length.
func allocsignPost(t *testing.T, l *live, target string, headers map[string]string, body string, chunked bool) allocsignAnswer {
	t.Helper()
	var rd io.Reader = strings.NewReader(body)
	if chunked {
		rd = io.MultiReader(rd) // unknown length: Transfer-Encoding: chunked
	}
	req, err := http.NewRequest(http.MethodPost, l.url+target, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = "node.example"
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := (&http.Client{Timeout: 15 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return allocsignAnswer{resp.StatusCode, resp.Header.Get("Content-Type"), b}
}

func allocsignExpect(t *testing.T, name string, a allocsignAnswer, code int, body string) {
	t.Helper()
	var got, want any
	if err := json.Unmarshal(a.body, &got); err != nil {
		t.Errorf("%s: body not JSON: %s", name, a.body)
		return
	}
	_ = json.Unmarshal([]byte(body), &want)
	gb, _ := json.Marshal(got)
	wb, _ := json.Marshal(want)
	if a.code != code || !bytes.Equal(gb, wb) || !strings.HasPrefix(a.contentType, "application/json") {
		t.Errorf("%s: %d %q %s, want %d %s", name, a.code, a.contentType, a.body, code, body)
	}
}

func allocsignSigned(k *nodekey.Key, body string, iat int64) map[string]string {
	return map[string]string{"Authorization": ownerauth.SignAllocation(k, "POST", allocsignAllocation, []byte(body), iat)}
}

// A request signed by an authorized signer allocates (upstream's
// test_allocation_aleph_eip191_v1_valid); unsigned, replayed, expired,
// foreign-signed, malformed and unbound ones get upstream's one 401, and
// a present Authorization header never falls back to the token
// (test_allocation_aleph_eip191_v1_invalid_no_fallback and the
// dispatcher cases of test_allocation_auth.py).
func TestAllocationsSigned(t *testing.T) {
	scheduler, rogue := nodekeytest.Fixed(t, 1), nodekeytest.Fixed(t, 2)
	l := allocsignLive(t, func(o *Options) {
		o.AllocationSigners = func(context.Context) []string { return []string{scheduler.Address()} }
	})
	now := time.Now().Unix()
	signed := allocsignSigned(scheduler, allocsignEmptyBody, now)
	allocsignExpect(t, "signed", allocsignPost(t, l, allocsignAllocation, signed, allocsignEmptyBody, false), http.StatusOK, allocsignEmptyOK)
	allocsignExpect(t, "replayed", allocsignPost(t, l, allocsignAllocation, signed, allocsignEmptyBody, false), http.StatusUnauthorized, allocsignRefused)
	// The same second, another body: not a replay.
	other := `{"persistent_vms": [], "instances": []}`
	allocsignExpect(t, "same second, other body", allocsignPost(t, l, allocsignAllocation, allocsignSigned(scheduler, other, now), other, false), http.StatusOK, allocsignEmptyOK)
	lower := map[string]string{"Authorization": strings.Replace(allocsignSigned(scheduler, allocsignEmptyBody, now+1)["Authorization"], ownerauth.AllocationScheme, "aleph-eip191-v1", 1)}
	allocsignExpect(t, "lower-case scheme", allocsignPost(t, l, allocsignAllocation, lower, allocsignEmptyBody, false), http.StatusOK, allocsignEmptyOK)
	allocsignExpect(t, "legacy token", allocsignPost(t, l, allocsignAllocation, map[string]string{"X-Auth-Signature": allocsignToken}, allocsignEmptyBody, false), http.StatusOK, allocsignEmptyOK)

	withToken := func(auth string) map[string]string {
		return map[string]string{"Authorization": auth, "X-Auth-Signature": allocsignToken}
	}
	refused := []struct {
		name    string
		target  string
		headers map[string]string
		body    string
		chunked bool
	}{
		{"unsigned", allocsignAllocation, nil, allocsignEmptyBody, false},
		{"wrong token", allocsignAllocation, map[string]string{"X-Auth-Signature": "notTest"}, allocsignEmptyBody, false},
		{"empty token", allocsignAllocation, map[string]string{"X-Auth-Signature": ""}, allocsignEmptyBody, false},
		{"expired", allocsignAllocation, allocsignSigned(scheduler, allocsignEmptyBody, now-301), allocsignEmptyBody, false},
		{"from the future", allocsignAllocation, allocsignSigned(scheduler, allocsignEmptyBody, now+301), allocsignEmptyBody, false},
		{"foreign signer", allocsignAllocation, allocsignSigned(rogue, allocsignEmptyBody, now), allocsignEmptyBody, false},
		{"body not the signed one", allocsignAllocation, allocsignSigned(scheduler, allocsignEmptyBody, now+2), `{"persistent_vms": ["` + strings.Repeat("cd", 32) + `"]}`, false},
		{"query string", allocsignAllocation + "?foo=bar", allocsignSigned(scheduler, allocsignEmptyBody, now+3), allocsignEmptyBody, false},
		{"chunked", allocsignAllocation, allocsignSigned(scheduler, allocsignEmptyBody, now+4), allocsignEmptyBody, true},
		{"malformed, with a valid token", allocsignAllocation, withToken("Aleph-EIP191-V1 sig=0xdead,payload=0xbeef"), allocsignEmptyBody, false},
		{"other scheme, with a valid token", allocsignAllocation, withToken("Bearer abc"), allocsignEmptyBody, false},
		{"scheme alone, with a valid token", allocsignAllocation, withToken("Aleph-EIP191-V1"), allocsignEmptyBody, false},
	}
	for _, c := range refused {
		allocsignExpect(t, c.name, allocsignPost(t, l, c.target, c.headers, c.body, c.chunked), http.StatusUnauthorized, allocsignRefused)
	}
	// None of the refused requests used up its payload: the one whose
	// body was wrong goes through with its own body.
	allocsignExpect(t, "retried with the signed body", allocsignPost(t, l, allocsignAllocation, allocsignSigned(scheduler, allocsignEmptyBody, now+2), allocsignEmptyBody, false), http.StatusOK, allocsignEmptyOK)
}

// Without a local override the signer comes from the settings aggregate
// on the API server, fetched once for many requests; with
// ALLOCATION_TOKEN_HASH empty the legacy token is refused.
func TestAllocationsSignerFromAggregate(t *testing.T) {
	scheduler := nodekeytest.Fixed(t, 3)
	const owner = "0xFba561a84A537fCaa567bb7A2257e7142701ae2A"
	fetches := 0
	fake := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/v0/aggregates/"+owner+".json" || r.URL.RawQuery != "keys=settings" {
			http.NotFound(w, r)
			return
		}
		fetches++
		_, _ = io.WriteString(w, `{"address":"`+owner+`","data":{"settings":{"authorized_allocation_signers":["`+scheduler.Address()+`"]}}}`)
	}))
	defer fake.Close()
	api := alephapi.New(fake.URL, "", alephapi.WithRetries(1, 0))
	signers := &allocations.Signers{
		Default: []string{"0x2937f62e5F81A88e921f883f8fE56ceCf4A4A44A"},
		Aggregate: func(ctx context.Context) (map[string]json.RawMessage, error) {
			return api.SettingsAggregate(ctx, owner)
		},
		Log: quiet,
	}
	l := allocsignLive(t, func(o *Options) {
		o.AllocationSigners = signers.Authorized
		o.AllocationTokenHash = ""
	})
	now := time.Now().Unix()
	for i := range int64(3) {
		allocsignExpect(t, "aggregate signer", allocsignPost(t, l, allocsignAllocation, allocsignSigned(scheduler, allocsignEmptyBody, now+i), allocsignEmptyBody, false), http.StatusOK, allocsignEmptyOK)
	}
	if fetches != 1 {
		t.Errorf("%d aggregate fetches for 3 requests, want 1", fetches)
	}
	allocsignExpect(t, "default signer not used", allocsignPost(t, l, allocsignAllocation, allocsignSigned(nodekeytest.Fixed(t, 1), allocsignEmptyBody, now), allocsignEmptyBody, false), http.StatusUnauthorized, allocsignRefused)
	allocsignExpect(t, "legacy token off", allocsignPost(t, l, allocsignAllocation, map[string]string{"X-Auth-Signature": allocsignToken}, allocsignEmptyBody, false), http.StatusUnauthorized, allocsignRefused)
}

// A body of 1 MiB is refused as aiohttp refuses it (client_max_size):
// 413 with the token, 401 when signed (upstream's verifier turns the
// refusal into its one answer, before reading the body).
func TestAllocationsBodyBound(t *testing.T) {
	scheduler := nodekeytest.Fixed(t, 1)
	l := allocsignLive(t, func(o *Options) {
		o.AllocationSigners = func(context.Context) []string { return []string{scheduler.Address()} }
	})
	big := `{"persistent_vms": []}` + strings.Repeat(" ", 1<<20-len(allocsignEmptyBody))
	if a := allocsignPost(t, l, allocsignAllocation, map[string]string{"X-Auth-Signature": allocsignToken}, big, false); a.code != http.StatusRequestEntityTooLarge {
		t.Errorf("token, 1 MiB: %d %s", a.code, a.body)
	}
	allocsignExpect(t, "signed, 1 MiB", allocsignPost(t, l, allocsignAllocation, allocsignSigned(scheduler, big, time.Now().Unix()), big, false), http.StatusUnauthorized, allocsignRefused)
	fits := big[:len(big)-1]
	allocsignExpect(t, "signed, 1 MiB less a byte", allocsignPost(t, l, allocsignAllocation, allocsignSigned(scheduler, fits, time.Now().Unix()), fits, false), http.StatusOK, allocsignEmptyOK)
}
