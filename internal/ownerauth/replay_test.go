package ownerauth_test

import (
	"crypto/elliptic"
	"encoding/hex"
	"encoding/json"
	"math/big"
	"net/http"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey/nodekeytest"
	"github.com/aleph-vm-go/vm-supervisor/internal/ownerauth"
)

// TestReplayRefused: a signed operation is honoured once; the same
// headers again within the window are a 401, also with the signature's
// other valid ECDSA form (s → n-s); another operation of the same key
// still passes; after the window the operation is refused as stale, and
// the set forgets it.
func TestReplayRefused(t *testing.T) {
	now := time.Now()
	clock := func() time.Time { return now }
	c, _ := ownerauth.Authorize(nodekeytest.Fixed(t, 7), ephemeralKey(t), domain, now.Add(time.Hour))
	replays := ownerauth.NewReplays(0)
	v := ownerauth.Verifier{Domain: domain, Now: clock, Replays: replays}
	path := "/control/machine/abc/stop"
	op := ownerauth.NewOperation(http.MethodPost, path, domain)
	h, err := c.Headers(op)
	if err != nil {
		t.Fatal(err)
	}
	req := func(h http.Header) *http.Request {
		r, _ := http.NewRequest(http.MethodPost, "http://"+domain+path, nil)
		r.Header = h.Clone()
		return r
	}
	if _, err := v.Request(req(h)); err != nil {
		t.Fatalf("first use: %v", err)
	}
	_, err = v.Request(req(h))
	if errkind.HTTPStatus(err) != http.StatusUnauthorized || err.Error() != "Operation already used" {
		t.Fatalf("replay: got %v, want 401 Operation already used", err)
	}

	// The malleated signature verifies too, and is the same operation.
	var signed ownerauth.Signed
	if err := json.Unmarshal([]byte(h.Get(ownerauth.HeaderOperation)), &signed); err != nil {
		t.Fatal(err)
	}
	sig, _ := hex.DecodeString(signed.Signature)
	s := new(big.Int).SetBytes(sig[32:])
	s.Sub(elliptic.P256().Params().N, s)
	malleated := append(append([]byte{}, sig[:32]...), s.FillBytes(make([]byte, 32))...)
	signed.Signature = hex.EncodeToString(malleated)
	raw, _ := json.Marshal(signed)
	h2 := h.Clone()
	h2.Set(ownerauth.HeaderOperation, string(raw))
	if _, err := v.Request(req(h2)); errkind.HTTPStatus(err) != http.StatusUnauthorized {
		t.Fatalf("replay with the signature's other form: got %v, want 401", err)
	}
	fresh := ownerauth.Verifier{Domain: domain, Now: clock}
	if _, err := fresh.Request(req(h2)); err != nil {
		t.Fatalf("the other form must verify (else this case tests nothing): %v", err)
	}

	// Another operation of the same key passes.
	op2 := op
	op2.Time = now.Add(time.Millisecond).UTC().Format(time.RFC3339Nano)
	h3, _ := c.Headers(op2)
	if _, err := v.Request(req(h3)); err != nil {
		t.Fatalf("a new operation: %v", err)
	}
	// The websocket's auth packet shares the set.
	msg, _ := c.AuthMessage(op2)
	var first struct {
		Auth json.RawMessage `json:"auth"`
	}
	_ = json.Unmarshal(msg, &first)
	if _, err := v.Message(first.Auth); errkind.HTTPStatus(err) != http.StatusUnauthorized {
		t.Fatalf("the operation replayed as a websocket auth packet: got %v, want 401", err)
	}

	// Past its window, it is stale (400) and no longer remembered.
	now = now.Add(ownerauth.OperationWindow + 2*time.Second)
	if _, err := v.Request(req(h)); errkind.HTTPStatus(err) != http.StatusBadRequest {
		t.Fatalf("after the window: got %v, want 400 stale", err)
	}
	op3 := ownerauth.NewOperation(http.MethodPost, path, domain)
	op3.Time = now.UTC().Format(time.RFC3339Nano)
	h4, _ := c.Headers(op3)
	if _, err := v.Request(req(h4)); err != nil {
		t.Fatalf("a new operation after the window: %v", err)
	}
	if n := replays.Len(); n != 1 {
		t.Fatalf("%d operations remembered after the window, want 1 (the expired ones purged)", n)
	}
}

// TestReplaysBounded: a full set refuses new operations (503) rather
// than forgetting one still in its window, and takes new ones again once
// the old ones expire.
func TestReplaysBounded(t *testing.T) {
	now := time.Now()
	c, _ := ownerauth.Authorize(nodekeytest.Fixed(t, 7), ephemeralKey(t), domain, now.Add(time.Hour))
	v := ownerauth.Verifier{Domain: domain, Now: func() time.Time { return now }, Replays: ownerauth.NewReplays(3)}
	path := "/control/machine/abc/logs"
	use := func(i int) error {
		op := ownerauth.NewOperation(http.MethodGet, path, domain)
		op.Time = now.Add(time.Duration(i) * time.Millisecond).UTC().Format(time.RFC3339Nano)
		h, _ := c.Headers(op)
		r, _ := http.NewRequest(http.MethodGet, "http://"+domain+path, nil)
		r.Header = h
		_, err := v.Request(r)
		return err
	}
	for i := range 3 {
		if err := use(i); err != nil {
			t.Fatalf("operation %d: %v", i, err)
		}
	}
	if err := use(3); errkind.HTTPStatus(err) != http.StatusServiceUnavailable {
		t.Fatalf("a fourth operation in a set of 3: got %v, want 503", err)
	}
	if err := use(0); errkind.HTTPStatus(err) != http.StatusUnauthorized {
		t.Fatalf("a replay in a full set: got %v, want 401", err)
	}
	now = now.Add(ownerauth.OperationWindow + time.Second)
	if err := use(1000); err != nil { // at now - window + 1 s - ...: still in its window
		t.Fatalf("after the others expired: %v", err)
	}
}
