package integration

import (
	"net/http"
	"strings"
	"testing"
	"time"
)

// A backend that cannot run here (Firecracker without usable KVM or its
// binary, gVisor without runsc): the supervisor must still start and
// answer with a clear 503 naming what is missing, at once rather than
// after a hang.
func TestUnavailableBackendIsAClearError(t *testing.T) {
	for _, c := range []struct {
		name, names string
		env         []string
	}{
		{"firecracker", "firecracker", []string{"ALEPH_VM_HYPERVISOR=firecracker", "ALEPH_VM_FIRECRACKER_PATH=/nonexistent/firecracker"}},
		{"gvisor without runsc", "runsc", []string{"ALEPH_VM_HYPERVISOR=gvisor", "ALEPH_VM_RUNSC_PATH=/nonexistent/runsc"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := startSupervisor(t, c.env...)
			hash := s.upload("testdata/probe", "main:app")
			start := time.Now()
			r := s.get("/vm/" + hash + "/")
			expect(t, r, http.StatusServiceUnavailable)
			if !strings.Contains(string(r.Body), c.names) {
				t.Errorf("error does not name %s: %s", c.names, r.Body)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("took %v", d)
			}
		})
	}
}
