package ownerauth

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey"
	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey/nodekeytest"
)

// The cases of aleph-vm's tests/supervisor/views/test_allocation_auth.py,
// with its fixed clock (1_700_000_000) and its default 300 s window.
const allocNow = 1_700_000_000

func allocVerifier(signers ...*nodekey.Key) AllocationVerifier {
	return AllocationVerifier{
		Signers: func(context.Context) []string {
			var out []string
			for _, k := range signers {
				out = append(out, k.Address())
			}
			return out
		},
		Now:     func() time.Time { return time.Unix(allocNow, 0) },
		Replays: NewReplays(0),
	}
}

func allocRequest(method, target, auth string, body []byte) *http.Request {
	r := httptest.NewRequest(method, target, strings.NewReader(string(body)))
	r.Header.Set("Authorization", auth)
	r.Header.Set("Content-Length", strconv.Itoa(len(body)))
	return r
}

func TestParseAllocationAuth(t *testing.T) {
	for _, h := range []string{
		"Aleph-EIP191-V1 sig=0xdead,payload=0xbeef",
		"Aleph-EIP191-V1   sig=0xdead, payload=0xbeef",
		"aleph-eip191-v1 sig=0xdead,payload=0xbeef",
		"ALEPH-EIP191-V1 sig=0xdead,payload=0xbeef",
	} {
		p, err := ParseAllocationAuth(h)
		if err != nil || len(p) != 2 || p["sig"] != "0xdead" || p["payload"] != "0xbeef" {
			t.Errorf("%q: %v %v", h, p, err)
		}
	}
	for _, h := range []string{
		"Aleph-EIP191-V1",
		"Aleph-EIP191-V1 sig=0xdead",
		"Aleph-EIP191-V1 payload=0xbeef",
		"Aleph-EIP191-V1 sigonly",
		"Aleph-EIP191-V1 sig=,payload=0xbeef",
		"Bearer abc",
		"Aleph-EIP191-V1 sig=0xdead,payload=0xbeef,extra=0xc0ffee",
	} {
		if _, err := ParseAllocationAuth(h); err == nil {
			t.Errorf("%q parsed", h)
		}
	}
}

func TestAllocationSignatureAccepted(t *testing.T) {
	k := nodekeytest.Fixed(t, 1)
	v := allocVerifier(k)
	body := []byte(`{"persistent_vms": []}`)
	// The exact bytes the scheduler signs, as json.dumps(sort_keys=True,
	// separators=(",", ":")) writes them.
	want := `{"body_sha256":"` + sha256Hex(body) + `","iat":1700000000,"method":"POST","path":"/control/allocations"}`
	if got := string(AllocationPayload("POST", "/control/allocations", body, allocNow)); got != want {
		t.Fatalf("payload\n got %s\nwant %s", got, want)
	}
	for i, iat := range []int64{allocNow, allocNow - 300, allocNow + 300} { // the window's edges are in it
		b := append(body, strings.Repeat(" ", i)...)
		signer, got, err := v.Allocation(context.Background(), allocRequest("POST", "/control/allocations", SignAllocation(k, "POST", "/control/allocations", b, iat), b))
		if err != nil || signer != strings.ToLower(k.Address()) || string(got) != string(b) {
			t.Errorf("iat %d: %q %q %v", iat, signer, got, err)
		}
	}
	// 0x on sig and payload, lower-case scheme, v as 0/1: all accepted.
	p := AllocationPayload("POST", "/control/allocations", body, allocNow+1)
	sig, _ := hex.DecodeString(strings.TrimPrefix(k.SignPersonal(p), "0x"))
	sig[64] -= 27
	auth := "aleph-eip191-v1 sig=0x" + hex.EncodeToString(sig) + ",payload=0x" + hex.EncodeToString(p)
	if _, _, err := v.Allocation(context.Background(), allocRequest("POST", "/control/allocations", auth, body)); err != nil {
		t.Errorf("0x and v=0/1: %v", err)
	}
	// v as EIP-155 writes it for chain 1 (37/38), which eth_account
	// also recovers.
	p = AllocationPayload("POST", "/control/allocations", body, allocNow+2)
	sig, _ = hex.DecodeString(strings.TrimPrefix(k.SignPersonal(p), "0x"))
	sig[64] += 37 - 27
	auth = AllocationScheme + " sig=" + hex.EncodeToString(sig) + ",payload=" + hex.EncodeToString(p)
	if _, _, err := v.Allocation(context.Background(), allocRequest("POST", "/control/allocations", auth, body)); err != nil {
		t.Errorf("v=37/38: %v", err)
	}
	sig[64] = 29 // neither 0/1, 27/28 nor 35 and more
	auth = AllocationScheme + " sig=" + hex.EncodeToString(sig) + ",payload=" + hex.EncodeToString(p)
	if _, _, err := v.Allocation(context.Background(), allocRequest("POST", "/control/allocations", auth, body)); !errors.Is(err, ErrMalformedAllocationAuth) {
		t.Errorf("v=29: %v", err)
	}
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func TestAllocationSignatureRefused(t *testing.T) {
	k := nodekeytest.Fixed(t, 1)
	rogue := nodekeytest.Fixed(t, 2)
	body := []byte("{}")
	good := SignAllocation(k, "POST", "/control/allocations", body, allocNow)
	tampered := strings.Replace(good, hex.EncodeToString([]byte(`"iat":1700000000`)), hex.EncodeToString([]byte(`"iat":1700000001`)), 1)
	cases := []struct {
		name, method, target, auth string
		body                       []byte
		malformed                  bool
	}{
		{"stale", "POST", "/control/allocations", SignAllocation(k, "POST", "/control/allocations", body, allocNow-301), body, false},
		{"far future", "POST", "/control/allocations", SignAllocation(k, "POST", "/control/allocations", body, allocNow+301), body, false},
		{"method", "GET", "/control/allocations", good, body, false},
		{"path", "POST", "/control/migrate", good, body, false},
		{"trailing slash", "POST", "/control/allocations/", good, body, false},
		{"query", "POST", "/control/allocations?foo=bar", good, body, false},
		{"foreign signer", "POST", "/control/allocations", SignAllocation(rogue, "POST", "/control/allocations", body, allocNow), body, false},
		{"tampered payload", "POST", "/control/allocations", tampered, body, false},
		{"body", "POST", "/control/allocations", SignAllocation(k, "POST", "/control/allocations", []byte("original"), allocNow), []byte("tampered"), false},
		{"string iat", "POST", "/control/allocations", SignAllocationPayload(k, []byte(`{"body_sha256":"`+sha256Hex(body)+`","iat":"1700000000","method":"POST","path":"/control/allocations"}`)), body, true},
		{"boolean iat", "POST", "/control/allocations", SignAllocationPayload(k, []byte(`{"body_sha256":"`+sha256Hex(body)+`","iat":true,"method":"POST","path":"/control/allocations"}`)), body, true},
		{"float iat", "POST", "/control/allocations", SignAllocationPayload(k, []byte(`{"body_sha256":"`+sha256Hex(body)+`","iat":1700000000.0,"method":"POST","path":"/control/allocations"}`)), body, true},
		{"missing field", "POST", "/control/allocations", SignAllocationPayload(k, []byte(`{"body_sha256":"`+sha256Hex(body)+`","method":"POST","path":"/control/allocations"}`)), body, true},
		{"sig not hex", "POST", "/control/allocations", "Aleph-EIP191-V1 sig=notHex,payload=0xbeef", body, true},
		{"payload not hex", "POST", "/control/allocations", "Aleph-EIP191-V1 sig=0xdead,payload=notHex", body, true},
		{"payload not JSON", "POST", "/control/allocations", "Aleph-EIP191-V1 sig=0xdead,payload=0xbeef", body, true},
		{"unknown param", "POST", "/control/allocations", good + ",extra=poison", body, true},
	}
	for _, c := range cases {
		v := allocVerifier(k)
		_, _, err := v.Allocation(context.Background(), allocRequest(c.method, c.target, c.auth, c.body))
		if !errkind.Is(err, errkind.Unauthorized) || errors.Is(err, ErrMalformedAllocationAuth) != c.malformed {
			t.Errorf("%s: %v", c.name, err)
		}
	}
}

func TestAllocationSignatureBodyBound(t *testing.T) {
	k := nodekeytest.Fixed(t, 1)
	v := allocVerifier(k)
	body := []byte("{}")
	auth := SignAllocation(k, "POST", "/control/allocations", body, allocNow)
	over := allocRequest("POST", "/control/allocations", auth, body)
	over.Header.Set("Content-Length", strconv.Itoa(MaxSignedAllocationBody))
	over.ContentLength = MaxSignedAllocationBody
	chunked := allocRequest("POST", "/control/allocations", auth, body)
	chunked.Header.Del("Content-Length")
	chunked.ContentLength = -1
	for name, r := range map[string]*http.Request{"1 MiB": over, "chunked": chunked} {
		if _, _, err := v.Allocation(context.Background(), r); !errkind.Is(err, errkind.Unauthorized) {
			t.Errorf("%s: %v", name, err)
		}
		if n, _ := r.Body.Read(make([]byte, 8)); n == 0 {
			t.Errorf("%s: the body was read before the length was checked", name)
		}
	}
}

// Only a byte-identical payload of the same signer is a replay: two
// requests of the same second with different bodies or paths pass, and
// another signer's identical payload is its own.
func TestAllocationSignatureReplays(t *testing.T) {
	k, k2 := nodekeytest.Fixed(t, 1), nodekeytest.Fixed(t, 2)
	v := allocVerifier(k, k2)
	ctx := context.Background()
	body := []byte("{}")
	auth := SignAllocation(k, "POST", "/control/allocations", body, allocNow)
	if _, _, err := v.Allocation(ctx, allocRequest("POST", "/control/allocations", auth, body)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := v.Allocation(ctx, allocRequest("POST", "/control/allocations", auth, body)); !errkind.Is(err, errkind.Unauthorized) {
		t.Errorf("replay: %v", err)
	}
	for _, b := range []string{`{"persistent_vms": ["a"]}`, `{"persistent_vms": ["b"]}`} {
		a := SignAllocation(k, "POST", "/control/allocations", []byte(b), allocNow)
		if _, _, err := v.Allocation(ctx, allocRequest("POST", "/control/allocations", a, []byte(b))); err != nil {
			t.Errorf("same second, body %s: %v", b, err)
		}
	}
	if _, _, err := v.Allocation(ctx, allocRequest("POST", "/control/allocations", SignAllocation(k2, "POST", "/control/allocations", body, allocNow), body)); err != nil {
		t.Errorf("second signer, same payload: %v", err)
	}
	// A failed request is not remembered: its retry with the right body
	// passes.
	a := SignAllocation(k, "POST", "/control/allocations", []byte("x"), allocNow+1)
	if _, _, err := v.Allocation(ctx, allocRequest("POST", "/control/allocations", a, []byte("y"))); err == nil {
		t.Fatal("wrong body accepted")
	}
	if _, _, err := v.Allocation(ctx, allocRequest("POST", "/control/allocations", a, []byte("x"))); err != nil {
		t.Errorf("retry after a failure: %v", err)
	}
	// Once out of the window a payload is forgotten (and stale anyway);
	// the one of iat allocNow+1 is still in it, as upstream keeps it.
	later := v
	later.Now = func() time.Time { return time.Unix(allocNow+301, 0) }
	if _, _, err := later.Allocation(ctx, allocRequest("POST", "/control/allocations", SignAllocation(k, "POST", "/control/allocations", body, allocNow+301), body)); err != nil {
		t.Fatal(err)
	}
	if n := v.Replays.Len(); n != 2 {
		t.Errorf("%d payloads remembered after the window, want 2", n)
	}
}
