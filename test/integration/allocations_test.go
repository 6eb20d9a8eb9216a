package integration

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// allocationToken is the scheduler's token in these tests; the node is
// given its sha256, as ALLOCATION_TOKEN_HASH is set in production.
const allocationToken = "test"

func tokenHash(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// allocate posts an allocation body with the given token ("" = no
// header).
func (s *supervisor) allocate(token, body string) response {
	s.t.Helper()
	req, err := http.NewRequest(http.MethodPost, s.base+"/control/allocations", strings.NewReader(body))
	if err != nil {
		s.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if token != "" {
		req.Header.Set("X-Auth-Signature", token)
	}
	resp, err := client.Do(req)
	if err != nil {
		s.t.Fatal(err)
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	if _, err := b.ReadFrom(resp.Body); err != nil {
		s.t.Fatal(err)
	}
	return response{Status: resp.StatusCode, Header: resp.Header, Body: b.Bytes()}
}

// listed returns /about/executions/list (public, aleph-vm's shape).
func (s *supervisor) listed(t *testing.T) map[string]map[string]any {
	t.Helper()
	r := s.get("/about/executions/list")
	expect(t, r, http.StatusOK)
	var m map[string]map[string]any
	if err := json.Unmarshal(r.Body, &m); err != nil {
		t.Fatalf("list: %v: %s", err, r.Body)
	}
	return m
}

// executionOf returns the uuid of the program's running execution, or "".
func (s *supervisor) executionOf(t *testing.T, hash string) string {
	t.Helper()
	for _, e := range s.executions(t) {
		if e["vm_hash"] == hash {
			id, _ := e["uuid"].(string)
			return id
		}
	}
	return ""
}

// sandboxPID is the host pid of the runsc sandbox of an execution.
func (s *supervisor) sandboxPID(t *testing.T, id string) int {
	t.Helper()
	out, err := exec.Command("runsc", "--root", filepath.Join(s.execRoot, "runsc"), "state", id).Output()
	if err != nil {
		t.Fatalf("runsc state %s: %v", id, err)
	}
	var st struct {
		Pid int `json:"pid"`
	}
	if err := json.Unmarshal(out, &st); err != nil || st.Pid <= 0 {
		t.Fatalf("runsc state %s: %v: %s", id, err, out)
	}
	return st.Pid
}

func waitFor(t *testing.T, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", within, what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func jsonEqual(t *testing.T, got []byte, want string) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatalf("body is not JSON: %v: %s", err, got)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatal(err)
	}
	gb, _ := json.Marshal(g)
	wb, _ := json.Marshal(w)
	if !bytes.Equal(gb, wb) {
		t.Errorf("body\n got %s\nwant %s", gb, wb)
	}
}

// The scheduler's API: 401 without the token, 400 with upstream's
// validation errors, 200 with upstream's result body.
func TestAllocationBodies(t *testing.T) {
	backendIndependent(t)
	s := startSupervisor(t, "ALEPH_VM_ALLOCATION_TOKEN_HASH="+tokenHash(allocationToken))

	for _, token := range []string{"", "notTest"} {
		r := s.allocate(token, `{"persistent_vms": []}`)
		expect(t, r, http.StatusUnauthorized)
		jsonEqual(t, r.Body, `{"error": "Authentication token received is invalid"}`)
	}
	r := s.allocate(allocationToken, `{"persistent_vms": ["not-an-ItemHash"]}`)
	expect(t, r, http.StatusBadRequest)
	jsonEqual(t, r.Body, `[{"loc": ["persistent_vms", 0], "msg": "Value error, Could not determine hash type: 'not-an-ItemHash'",
		"type": "value_error", "ctx": {"error": "Could not determine hash type: 'not-an-ItemHash'"}, "input": "not-an-ItemHash"}]`)
	r = s.allocate(allocationToken, `{"persistent_vms": []}`)
	expect(t, r, http.StatusOK)
	jsonEqual(t, r.Body, `{"success": true, "successful": [], "failing": [], "errors": {}, "stopped": []}`)

	// An unknown program alone: every start failed, 503.
	unknown := strings.Repeat("cd", 32)
	r = s.allocate(allocationToken, `{"persistent_vms": ["`+unknown+`"]}`)
	expect(t, r, http.StatusServiceUnavailable)
	var res struct {
		Success bool              `json:"success"`
		Failing []string          `json:"failing"`
		Errors  map[string]string `json:"errors"`
	}
	if err := json.Unmarshal(r.Body, &res); err != nil || res.Success || len(res.Failing) != 1 || res.Errors[unknown] == "" {
		t.Errorf("unknown program: %v %s", err, r.Body)
	}
	expect(t, s.allocate(allocationToken, `{}`), http.StatusOK)
}

// A persistent program in an allocation runs without a request, comes
// back after its sandbox is killed and after a supervisor restart, serves
// requests in the running execution, and stops when it is deallocated.
func TestAllocatedPersistentProgram(t *testing.T) {
	if hypervisor != "gvisor" {
		t.Skip("kills the runsc sandbox; the keeping itself is backend-independent")
	}
	s := startSupervisor(t, "ALEPH_VM_ALLOCATION_TOKEN_HASH="+tokenHash(allocationToken))
	hash := s.upload("testdata/probe", "main:app", "--persistent")

	r := s.allocate(allocationToken, `{"persistent_vms": ["`+hash+`"], "instances": []}`)
	expect(t, r, http.StatusOK)
	jsonEqual(t, r.Body, `{"success": true, "successful": ["`+hash+`"], "failing": [], "errors": {}, "stopped": []}`)
	if e, ok := s.listed(t)[hash]; !ok || e["vm_type"] != "persistent_program" {
		t.Fatalf("allocated program not listed as a persistent program: %v", s.listed(t))
	}
	first := s.executionOf(t, hash)

	// Killed: restarted by itself, in a new sandbox.
	if err := syscall.Kill(s.sandboxPID(t, first), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var second string
	waitFor(t, "the program running again after its sandbox was killed", 90*time.Second, func() bool {
		second = s.executionOf(t, hash)
		return second != "" && second != first
	})
	if !strings.Contains(s.logs.String(), "allocated program ended; restarting it") {
		t.Error("the restart is not in the log")
	}
	// Requests reach the running execution; none is started for them.
	expect(t, s.get("/vm/"+hash+"/"), http.StatusOK)
	if id := s.executionOf(t, hash); id != second {
		t.Errorf("the request ran in %s, not the kept execution %s", id, second)
	}

	// A supervisor restart runs it again without a new allocation.
	s.shutdown()
	s.restart()
	waitFor(t, "the program running after a supervisor restart", 90*time.Second, func() bool {
		_, ok := s.listed(t)[hash]
		return ok
	})

	r = s.allocate(allocationToken, `{"persistent_vms": []}`)
	expect(t, r, http.StatusOK)
	jsonEqual(t, r.Body, `{"success": true, "successful": [], "failing": [], "errors": {}, "stopped": ["`+hash+`"]}`)
	if l := s.listed(t); len(l) != 0 {
		t.Errorf("executions after the program was deallocated: %v", l)
	}
}
