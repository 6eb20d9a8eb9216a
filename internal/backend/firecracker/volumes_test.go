package firecracker

import (
	"archive/zip"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend/vmimage"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
)

// TestNamedVolumesReachTheConfig follows a program with a named
// persistent volume, an ephemeral one, a zip immutable volume and a data
// archive from the pool's spec through the real image preparer to
// Firecracker's configuration, jailed and not: the persistent drive is
// the ext4 file at aleph-vm's path (never a directory), read-write and
// flushed to the host; the configuration validates against v1.0.0's API.
func TestNamedVolumesReachTheConfig(t *testing.T) {
	for _, tool := range []string{"mkfs.ext4", "mksquashfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s missing", tool)
			}
			t.Skipf("%s missing", tool)
		}
	}
	defs := loadDefinitions(t)
	dir := t.TempDir()
	runtime := filepath.Join(dir, "rootfs.squashfs")
	writeFile(t, runtime, "hsqs", 0o644)
	zipPath := filepath.Join(dir, "vol.zip")
	writeZip(t, zipPath, "lib/x.txt", "zipped")
	persistentDir := filepath.Join(dir, "persistent")
	const hash = "c0ffee"
	prog := &sources.Program{
		Hash:    hash,
		Content: &message.ProgramContent{Resources: message.Resources{VCPUs: 1, Memory: 128}},
		Runtime: sources.File{Path: runtime, Hash: "rt"},
		Data:    &sources.File{Path: zipPath, Hash: "datahash", Encoding: message.EncodingZip},
		Volumes: []sources.ResolvedVolume{
			{Kind: message.VolumePersistent, Volume: message.Volume{Mount: "/var/lib/db", Name: "db", Persistence: "host", SizeMiB: 8}},
			{Kind: message.VolumeEphemeral, Volume: message.Volume{Mount: "/cache", Ephemeral: true, SizeMiB: 4}},
			{Kind: message.VolumeImmutable, Volume: message.Volume{Mount: "/opt/lib", Ref: "ref"},
				File: &sources.File{Path: zipPath, Hash: "volhash", Encoding: message.EncodingZip}},
		},
	}
	prog.Content.Data = &message.DataContent{Encoding: message.EncodingZip, Mount: "/data"}

	spec := pool.SpecFor(prog, persistentDir)
	spec.ExecutionID = "6f1c2e8a-0d7b-4c55-a1e3-9b8f7d6c5a4b"
	spec.StateDir = filepath.Join(dir, "x")
	image := filepath.Join(persistentDir, hash, "db.ext4")
	if spec.Volumes[0].Path != image {
		t.Fatalf("pool gives %q for the named volume, want %q", spec.Volumes[0].Path, image)
	}
	opts := Options{KernelPath: "/opt/vm/vmlinux", CacheRoot: filepath.Join(dir, "cache"), PersistentDir: persistentDir,
		JailerUID: 990, JailerGID: 990, CgroupVersion: 1}.withDefaults()
	prep, err := opts.preparer().Prepare(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := prep.Cleanup(); err != nil {
			t.Error(err)
		}
	}()
	if fi, err := os.Stat(image); err != nil || !fi.Mode().IsRegular() || fi.Size() != 8<<20 {
		t.Fatalf("persistent image %s: %v, %v; want an 8 MiB file", image, fi, err)
	}

	for _, jailed := range []bool{false, true} {
		opts.UseJailer = jailed
		plan, _ := validPlan(t, defs, opts, spec, vmimage.GuestDrives(prep, nil))
		drives := plan.Config.Drives
		if len(drives) != 5 { // runtime, persistent, ephemeral, zip volume, data
			t.Fatalf("jailed=%v: drives %+v", jailed, drives)
		}
		db := drives[1]
		if db.DriveID != "vol0" || db.IsReadOnly || db.IsRootDevice || db.CacheType != "Writeback" {
			t.Errorf("jailed=%v: persistent drive %+v, want vol0 read-write with writeback", jailed, db)
		}
		host := db.PathOnHost
		if jailed {
			host = ""
			for _, f := range plan.Files {
				if f.Dest == db.PathOnHost {
					host = f.Source
					if !f.Writable {
						t.Errorf("persistent image put in the jail read-only: %+v", f)
					}
				}
			}
		}
		if host != image {
			t.Errorf("jailed=%v: persistent drive comes from %q, want %q", jailed, host, image)
		}
		for _, d := range drives[3:] {
			if !d.IsReadOnly {
				t.Errorf("jailed=%v: %s is writable", jailed, d.DriveID)
			}
		}
		var mounts []string
		for _, v := range plan.Guest.Volumes {
			mounts = append(mounts, v.Mount+":"+v.FSType)
		}
		if got, want := strings.Join(mounts, " "), "/var/lib/db:ext4 /cache:ext4 /opt/lib:squashfs"; got != want {
			t.Errorf("jailed=%v: guest mounts %q, want %q", jailed, got, want)
		}
		// The data drive is copied writable to /data by the agent.
		if d := plan.Guest.Data; d == nil || d.Mount != "/data" || d.Device != "/dev/vde" {
			t.Errorf("jailed=%v: guest data %+v, want /dev/vde copied to /data", jailed, d)
		}
	}
}

// writeZip writes a zip archive holding one file.
func writeZip(t *testing.T, path, name, content string) {
	t.Helper()
	var zipped bytes.Buffer
	zw := zip.NewWriter(&zipped)
	w, err := zw.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte(content)); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	writeFile(t, path, zipped.String(), 0o644)
}
