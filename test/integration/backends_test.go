package integration

import (
	"net/http"
	"strings"
	"testing"
	"time"
)

// Firecracker cannot run on hosts without usable KVM or without its
// binary: the supervisor must still start and answer with a clear 503
// naming what is missing, at once rather than after a hang.
func TestUnavailableBackendIsAClearError(t *testing.T) {
	s := startSupervisor(t, "ALEPH_VM_HYPERVISOR=firecracker", "ALEPH_VM_FIRECRACKER_PATH=/nonexistent/firecracker")
	hash := s.upload("testdata/probe", "main:app")
	start := time.Now()
	r := s.get("/vm/" + hash + "/")
	expect(t, r, http.StatusServiceUnavailable)
	if !strings.Contains(string(r.Body), "firecracker") {
		t.Errorf("error does not name the backend: %s", r.Body)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("took %v", d)
	}
}

// Without runsc, gVisor cannot run: the same clear and prompt 503.
func TestMissingRunscIsAClearError(t *testing.T) {
	s := startSupervisor(t, "ALEPH_VM_HYPERVISOR=gvisor", "ALEPH_VM_RUNSC_PATH=/nonexistent/runsc")
	hash := s.upload("testdata/probe", "main:app")
	start := time.Now()
	r := s.get("/vm/" + hash + "/")
	expect(t, r, http.StatusServiceUnavailable)
	if !strings.Contains(string(r.Body), "runsc") {
		t.Errorf("error does not name runsc: %s", r.Body)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("took %v", d)
	}
}
