package firecracker

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
)

// TestFailedStartErrors starts VMs that fail at different steps (with the
// fake VMM's binary as Firecracker): the error names the backend exactly
// once and the failed step, and whatever the earlier steps made is gone.
func TestFailedStartErrors(t *testing.T) {
	for _, tc := range []struct {
		name     string
		edit     func(b *Backend, spec *backend.Spec)
		wantStep string
	}{
		{"spec check", func(_ *Backend, spec *backend.Spec) { spec.ExecutionID = "no/slash" }, "execution id"},
		{"plan", func(_ *Backend, spec *backend.Spec) { spec.ExecutionID = "not_a_jail_id" }, "plan: execution id"},
		{"start", func(b *Backend, _ *backend.Spec) { b.opts.FirecrackerPath += "-gone" }, "start VMM: "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, spec := fakeSetup(t)
			// A name that is not the backend's, for exec errors.
			b.opts.FirecrackerPath = filepath.Join(filepath.Dir(spec.StateDir), "vmm")
			writeFile(t, b.opts.FirecrackerPath, "#!/bin/sh\nexit 1\n", 0o755)
			tc.edit(b, &spec)
			inst, err := b.Start(context.Background(), spec)
			if err == nil {
				_ = inst.Stop(context.Background())
				t.Fatal("Start succeeded")
			}
			msg := err.Error()
			if n := strings.Count(msg, "firecracker"); n != 1 || !strings.HasPrefix(msg, "firecracker: ") {
				t.Errorf("error names the backend %d times, want once at the start: %s", n, msg)
			}
			if !strings.Contains(msg, tc.wantStep) {
				t.Errorf("error %q does not contain %q", msg, tc.wantStep)
			}
			if entries, _ := os.ReadDir(spec.StateDir); len(entries) != 0 {
				t.Errorf("state dir not clean after a failed start: %v", entries)
			}
		})
	}
}
