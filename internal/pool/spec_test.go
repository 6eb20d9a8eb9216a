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

// TestSpecForUpstreamVolumes: the spec carries aleph-vm's names and
// mounts (unamed_volume_<i> at /mnt/unamed_volume_<i>, "my.db" as
// my_db.ext4), where earlier versions kept the images, the resolved
// parent of a volume, and /data for a data archive without a mount.
func TestSpecForUpstreamVolumes(t *testing.T) {
	pv := "/pv"
	prog := &sources.Program{
		Hash:    "f00d",
		Content: &message.ProgramContent{Data: &message.DataContent{Encoding: message.EncodingZip}},
		Data:    &sources.File{Path: "/cache/data.zip", Hash: "d", Encoding: message.EncodingZip},
		Volumes: []sources.ResolvedVolume{
			{Kind: message.VolumeEphemeral, Volume: message.Volume{Mount: "/cache", Ephemeral: true, SizeMiB: 4}},
			{Kind: message.VolumePersistent, Volume: message.Volume{Persistence: "host", SizeMiB: 4}},
			{Kind: message.VolumePersistent, Volume: message.Volume{Mount: "/db", Name: "my.db", Persistence: "host", SizeMiB: 4,
				Parent: &message.ParentVolume{Ref: "p"}}, File: &sources.File{Path: "/cache/parent", Hash: "p"}},
		},
	}
	spec := SpecFor(prog, pv)
	if v := spec.Volumes[1]; v.Mount != "/mnt/unamed_volume_1" || v.Path != "/pv/f00d/unamed_volume_1.ext4" ||
		len(v.LegacyPaths) != 1 || v.LegacyPaths[0] != "/pv/f00d/volume-1.ext4" || v.ParentPath != "" {
		t.Errorf("unnamed volume: %+v", v)
	}
	if v := spec.Volumes[2]; v.Mount != "/db" || v.Path != "/pv/f00d/my_db.ext4" ||
		len(v.LegacyPaths) != 1 || v.LegacyPaths[0] != "/pv/f00d/my.db.ext4" || v.ParentPath != "/cache/parent" {
		t.Errorf("named volume with a parent: %+v", v)
	}
	if spec.DataMount != "/data" {
		t.Errorf("data mount %q, want /data", spec.DataMount)
	}
}
