package integration

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey"
	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey/nodekeytest"
	"github.com/aleph-vm-go/vm-supervisor/internal/ownerauth"
)

const allocsignRefused = `{"error": "Authentication token received is invalid"}`

// allocsignPost posts an allocation body with the given headers.
func allocsignPost(t *testing.T, s *supervisor, headers map[string]string, body string) response {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, s.base+"/control/allocations", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	if _, err := b.ReadFrom(resp.Body); err != nil {
		t.Fatal(err)
	}
	return response{Status: resp.StatusCode, Header: resp.Header, Body: b.Bytes()}
}

func allocsignSigned(k *nodekey.Key, body string, iat int64) map[string]string {
	return map[string]string{"Authorization": ownerauth.SignAllocation(k, http.MethodPost, "/control/allocations", []byte(body), iat)}
}

// The scheduler signing as upstream's does (Aleph-EIP191-V1) is obeyed by
// the real supervisor; unsigned, replayed, expired and foreign-signed
// requests get upstream's 401 and body; the deprecated token still works
// and its deprecation is logged once at start, not per request.
func TestAllocsignSignedAllocations(t *testing.T) {
	backendIndependent(t)
	scheduler, rogue := nodekeytest.Fixed(t, 1), nodekeytest.Fixed(t, 2)
	s := startSupervisor(t,
		"ALEPH_VM_ALLOCATION_TOKEN_HASH="+tokenHash(allocationToken),
		"ALEPH_VM_AUTHORIZED_ALLOCATION_SIGNERS="+scheduler.Address())
	const body = `{"persistent_vms": []}`
	const ok = `{"success": true, "successful": [], "failing": [], "errors": {}, "stopped": []}`
	now := time.Now().Unix()

	signed := allocsignSigned(scheduler, body, now)
	r := allocsignPost(t, s, signed, body)
	expect(t, r, http.StatusOK)
	jsonEqual(t, r.Body, ok)

	for name, h := range map[string]map[string]string{
		"replayed":       signed,
		"unsigned":       nil,
		"expired":        allocsignSigned(scheduler, body, now-301),
		"foreign signer": allocsignSigned(rogue, body, now),
		"malformed, with a valid token": {
			"Authorization": "Aleph-EIP191-V1 sig=0xdead,payload=0xbeef", "X-Auth-Signature": allocationToken},
	} {
		r := allocsignPost(t, s, h, body)
		if r.Status != http.StatusUnauthorized {
			t.Errorf("%s: status %d, want 401", name, r.Status)
		}
		jsonEqual(t, r.Body, allocsignRefused)
	}

	r = s.allocate(allocationToken, body)
	expect(t, r, http.StatusOK)
	jsonEqual(t, r.Body, ok)
	if n := strings.Count(s.logs.String(), "legacy X-Auth-Signature token is still accepted"); n != 1 {
		t.Errorf("the legacy token's deprecation logged %d times, want once at start", n)
	}
}

// Without a local signer list the supervisor asks API_SERVER for the
// settings aggregate (once for several requests) and obeys its signer,
// not the built-in default; an empty ALLOCATION_TOKEN_HASH turns the
// legacy token off.
func TestAllocsignAggregateSigner(t *testing.T) {
	backendIndependent(t)
	scheduler := nodekeytest.Fixed(t, 3)
	const owner = "0xFba561a84A537fCaa567bb7A2257e7142701ae2A"
	var fetches atomic.Int32
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/api/v0/aggregates/"+owner+".json" || r.URL.Query().Get("keys") != "settings" {
			http.NotFound(w, r)
			return
		}
		fetches.Add(1)
		_, _ = io.WriteString(w, `{"address":"`+owner+`","data":{"settings":{"compatible_gpus":[],"authorized_allocation_signers":["`+scheduler.Address()+`"]}}}`)
	}))
	defer api.Close()
	s := startSupervisor(t, "ALEPH_VM_API_SERVER="+api.URL, "ALEPH_VM_ALLOCATION_TOKEN_HASH=")
	const body = `{"persistent_vms": []}`
	now := time.Now().Unix()
	for i := range int64(3) {
		expect(t, allocsignPost(t, s, allocsignSigned(scheduler, body, now+i), body), http.StatusOK)
	}
	if n := fetches.Load(); n != 1 {
		t.Errorf("%d aggregate fetches for 3 requests, want 1", n)
	}
	r := s.allocate(allocationToken, body)
	if r.Status != http.StatusUnauthorized {
		t.Errorf("legacy token with ALLOCATION_TOKEN_HASH empty: status %d, want 401", r.Status)
	}
	jsonEqual(t, r.Body, allocsignRefused)
	if strings.Contains(s.logs.String(), "legacy X-Auth-Signature") {
		t.Error("legacy token warned about while it is off")
	}
}
