package pool

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend/vmimage"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
)

// Named persistent volumes get the image path every backend uses,
// aleph-vm's layout, and a VM backend's preparer makes the image there
// (the pool used to make a directory at that place, which VMs refused).
func TestSpecForPersistentVolume(t *testing.T) {
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("mkfs.ext4 missing (e2fsprogs)")
		}
		t.Skip("mkfs.ext4 missing")
	}
	dir := t.TempDir()
	runtime := filepath.Join(dir, "rootfs.squashfs")
	if err := os.WriteFile(runtime, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	pv := filepath.Join(dir, "persistent")
	hash := "f00d"
	prog := &sources.Program{
		Hash:    hash,
		Content: &message.ProgramContent{},
		Runtime: sources.File{Path: runtime},
		Volumes: []sources.ResolvedVolume{
			{Kind: message.VolumeEphemeral, Volume: message.Volume{Mount: "/cache", Ephemeral: true, SizeMiB: 4}},
			{Kind: message.VolumePersistent, Volume: message.Volume{Mount: "/var/lib/db", Name: "db", Persistence: "host", SizeMiB: 4}},
		},
	}
	spec := SpecFor(prog, pv)
	want := filepath.Join(pv, hash, "db.ext4")
	if got := spec.Volumes[1].Path; got != want {
		t.Fatalf("persistent volume path %q, want %q", got, want)
	}
	spec.StateDir = filepath.Join(dir, "state")
	prepared, err := vmimage.NewPreparer(vmimage.Options{PersistentDir: pv}).Prepare(context.Background(), spec)
	if err != nil {
		t.Fatalf("VM preparer on the pool's spec: %v", err)
	}
	defer func() {
		if err := prepared.Cleanup(); err != nil {
			t.Error(err)
		}
	}()
	if fi, err := os.Stat(want); err != nil || fi.Size() != 4<<20 {
		t.Errorf("image at %s: %v, %v", want, fi, err)
	}
}
