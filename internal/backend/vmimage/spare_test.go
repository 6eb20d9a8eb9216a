package vmimage

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// A spare's code drive is an empty file of its own, the second drive,
// gone with the execution; its Config names it only once filled.
func TestSpareGetsAnEmptyCodeDrive(t *testing.T) {
	dir := t.TempDir()
	rt := filepath.Join(dir, "runtime.squashfs")
	if err := os.WriteFile(rt, []byte("runtime"), 0o644); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(dir, "state")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	spec := backend.Spec{RuntimePath: rt, DeferCode: true, StateDir: state}
	p, err := NewPreparer(Options{CacheDir: filepath.Join(dir, "cache")}).Prepare(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	drives := GuestDrives(p, nil)
	if len(drives) != 2 || drives[1].Role != RoleCode || drives[1].Device != "/dev/vdb" || !drives[1].Temporary ||
		drives[1].HostPath != filepath.Join(state, PlaceholderName) {
		t.Fatalf("drives %+v, want the runtime then the code placeholder on /dev/vdb", drives)
	}
	if fi, err := os.Stat(drives[1].HostPath); err != nil || fi.Size() != 0 {
		t.Fatalf("placeholder: %v, %v", fi, err)
	}
	var cfg guest.Config
	FillGuest(WithoutCode(drives), &cfg)
	if cfg.CodeDevice != "" {
		t.Errorf("without its code the Config names code device %q", cfg.CodeDevice)
	}
	FillGuest(drives, &cfg)
	if cfg.CodeDevice != "/dev/vdb" {
		t.Errorf("code device %q, want /dev/vdb", cfg.CodeDevice)
	}
	if err := p.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(drives[1].HostPath); !os.IsNotExist(err) {
		t.Errorf("placeholder left after Cleanup: %v", err)
	}
	if _, err := os.Stat(rt); err != nil {
		t.Errorf("Cleanup touched the runtime: %v", err)
	}
}
