package integration

import (
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// vol19Ext4 makes an ext4 image of sizeMiB holding files, with e2fsprogs
// (mkfs.ext4 -d), as a node operator or a program's author makes one.
func vol19Ext4(t *testing.T, sizeMiB int, files map[string]string) []byte {
	t.Helper()
	img := filepath.Join(t.TempDir(), "image.ext4")
	out, err := exec.Command("mkfs.ext4", "-q", "-d", writeTree(t, files), img, itoa(sizeMiB)+"M").CombinedOutput()
	if err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	b, err := os.ReadFile(img)
	must(t, err)
	return b
}

// vol19Image is where a program's persistent volume image lives on the
// host: aleph-vm's PERSISTENT_VOLUMES_DIR/<program hash>/<file>.
func (s *supervisor) vol19Image(hash, file string) string {
	return filepath.Join(s.execRoot, "volumes", "persistent", hash, file)
}

// TestVol19DataWritable: aleph-vm's guest unzips the data archive into
// /data in its own root, so a program may change and add files there
// (init1.py setup_input_data). Ours too, under every backend; and what one
// program writes never reaches the shared extraction another program with
// the same data reads.
func TestVol19DataWritable(t *testing.T) {
	s := startSupervisor(t, "ALEPH_VM_PREWARM=false")
	probe, _ := filepath.Abs("testdata/probe")
	data := writeTree(t, map[string]string{"input/hello.txt": "from the data archive"})
	hash := s.upload(probe, "main:app", "--data", data)

	if r := s.readFile(hash, "/data/input/hello.txt"); !r.OK || r.Content != "from the data archive" {
		t.Fatalf("/data/input/hello.txt: %+v", r)
	}
	if w := s.writeFile(hash, "/data/input/hello.txt", "changed by the program"); !w.OK {
		t.Errorf("changing a file of the data archive: %+v, want it writable as upstream", w)
	}
	if w := s.writeFile(hash, "/data/new.txt", "added"); !w.OK {
		t.Errorf("adding a file to /data: %+v, want it writable as upstream", w)
	}
	if r := s.readFile(hash, "/data/input/hello.txt"); !r.OK || r.Content != "changed by the program" {
		t.Errorf("after the write: %+v", r)
	}
	if r := s.readFile(hash, "/data/new.txt"); !r.OK || r.Content != "added" {
		t.Errorf("the added file: %+v", r)
	}

	// Another program with the same data (one extraction in the cache):
	// the archive as published, nothing of the first program's writes.
	other := s.republish(hash, func(c map[string]any) { c["variables"] = map[string]any{"VOL19": "other"} })
	if r := s.readFile(other, "/data/input/hello.txt"); !r.OK || r.Content != "from the data archive" {
		t.Errorf("the other program's /data/input/hello.txt: %+v, want the archive's bytes", r)
	}
	if r := s.readFile(other, "/data/new.txt"); r.OK {
		t.Errorf("the other program sees the first one's new file: %+v", r)
	}
}

// TestVol19UpstreamVolumeNames: persistent volume images have aleph-vm's
// file names (storage.py get_volume_path, executable.py download_volumes):
// <program hash>/<name>.ext4 with each character other than a letter, a
// digit, "_" or "-" as "_", and unamed_volume_<i> (sic; i counts every
// volume of the message) for an unnamed one, mounted at
// /mnt/unamed_volume_<i> when it has no mount either. An image an earlier
// version kept under the old name (the name with its dot) is moved, with
// its data, not recreated empty.
func TestVol19UpstreamVolumeNames(t *testing.T) {
	backendIndependent(t)
	s := startSupervisor(t, "ALEPH_VM_PREWARM=false")
	probe, _ := filepath.Abs("testdata/probe")
	uploaded := s.upload(probe, "main:app")
	lib := zipBytes(t, map[string]string{"x": "y"}, nil) // an immutable volume at index 0
	hash := s.programWithVolumes(uploaded, []map[string]any{
		{"mount": "/opt/lib", "ref": s.publishFile(t, lib), "use_latest": false},
		{"mount": "/var/lib/unnamed", "persistence": "host", "size_mib": 8},
		{"mount": "/var/lib/db", "persistence": "host", "name": "my.db", "size_mib": 8},
		{"persistence": "host", "size_mib": 8},
	})
	// What an earlier version of this supervisor made for volumes[2].
	legacy := s.vol19Image(hash, "my.db.ext4")
	must(t, os.MkdirAll(filepath.Dir(legacy), 0o700))
	must(t, os.WriteFile(legacy, vol19Ext4(t, 8, map[string]string{"kept.txt": "written before the move"}), 0o600))

	if r := s.readFile(hash, "/var/lib/db/kept.txt"); !r.OK || r.Content != "written before the move" {
		t.Errorf("the volume under its earlier name: %+v, want its data", r)
	}
	for _, w := range []struct{ path, content string }{
		{"/var/lib/unnamed/a.txt", "unnamed 1"},
		{"/mnt/unamed_volume_3/b.txt", "unnamed 3"},
	} {
		if res := s.writeFile(hash, w.path, w.content); !res.OK {
			t.Errorf("writing %s: %+v", w.path, res)
		}
	}
	for _, f := range []string{"unamed_volume_1.ext4", "my_db.ext4", "unamed_volume_3.ext4"} {
		var st syscall.Stat_t
		if err := syscall.Stat(s.vol19Image(hash, f), &st); err != nil || st.Mode&syscall.S_IFMT != syscall.S_IFREG {
			t.Errorf("image %s: %v, want a regular file", f, err)
		}
	}
	if _, err := os.Lstat(legacy); !os.IsNotExist(err) {
		t.Errorf("the image under its earlier name is still there: %v", err)
	}
	entries, err := os.ReadDir(filepath.Dir(legacy))
	must(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if got := strings.Join(names, " "); got != "my_db.ext4 unamed_volume_1.ext4 unamed_volume_3.ext4" {
		t.Errorf("the program's volume directory holds %q", got)
	}

	// The next execution finds the same data under the same names.
	s.shutdown()
	s.restart()
	for path, want := range map[string]string{
		"/var/lib/db/kept.txt":       "written before the move",
		"/var/lib/unnamed/a.txt":     "unnamed 1",
		"/mnt/unamed_volume_3/b.txt": "unnamed 3",
	} {
		if r := s.readFile(hash, path); !r.OK || r.Content != want {
			t.Errorf("%s after a restart: %+v, want %q", path, r, want)
		}
	}
}

// TestVol19ParentVolume: a persistent volume with a parent starts as a copy
// of the parent's ext4 image (its files there), grown by size_mib as
// aleph-vm grows it, kept across executions (never copied again over the
// program's writes); the parent is a STORE file hash-checked like any
// other: bytes that do not match its hash start nothing and leave no
// volume.
func TestVol19ParentVolume(t *testing.T) {
	backendIndependent(t)
	s := startSupervisor(t, "ALEPH_VM_PREWARM=false")
	probe, _ := filepath.Abs("testdata/probe")
	uploaded := s.upload(probe, "main:app")
	parent := vol19Ext4(t, 8, map[string]string{"seed/schema.sql": "CREATE TABLE t (x);"})
	hash := s.programWithVolumes(uploaded, []map[string]any{
		{"mount": "/var/lib/db", "persistence": "host", "name": "db", "size_mib": 16,
			"parent": map[string]any{"ref": s.publishFile(t, parent), "use_latest": false}},
	})
	if r := s.readFile(hash, "/var/lib/db/seed/schema.sql"); !r.OK || r.Content != "CREATE TABLE t (x);" {
		t.Fatalf("the parent's file in the volume: %+v", r)
	}
	if w := s.writeFile(hash, "/var/lib/db/seed/schema.sql", "changed"); !w.OK {
		t.Errorf("writing the volume: %+v", w)
	}
	res := s.fill(hash, "/var/lib/db/fill", 32)
	if res.Error == nil || *res.Error != "ENOSPC" || res.Written < 12<<20 || res.Written > 24<<20 {
		t.Errorf("filling the volume (8 MiB parent + 16 MiB): %+v, want ENOSPC after 12-24 MiB", res)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(s.vol19Image(hash, "db.ext4"), &st); err != nil || st.Size != 24<<20 {
		t.Errorf("image: %v, size %d, want the parent's 8 MiB + size_mib 16", err, st.Size)
	}

	s.shutdown()
	s.restart()
	if r := s.readFile(hash, "/var/lib/db/seed/schema.sql"); !r.OK || r.Content != "changed" {
		t.Errorf("after a restart: %+v, want the program's write kept", r)
	}

	// A parent whose bytes are not those its hash names.
	good := vol19Ext4(t, 8, map[string]string{"seed": "x"})
	sum := sha256.Sum256(good)
	ref := s.publishFile(t, good)
	s.api.mu.Lock()
	s.api.files[hex.EncodeToString(sum[:])] = vol19Ext4(t, 8, map[string]string{"seed": "tampered"})
	s.api.mu.Unlock()
	bad := s.programWithVolumes(uploaded, []map[string]any{
		{"mount": "/var/lib/db", "persistence": "host", "name": "db", "size_mib": 16,
			"parent": map[string]any{"ref": ref, "use_latest": false}},
	})
	if r := s.get("/vm/" + bad + "/"); r.Status == http.StatusOK {
		t.Errorf("a program with a tampered parent answered 200: %s", r.Body)
	}
	if _, err := os.Lstat(s.vol19Image(bad, "db.ext4")); !os.IsNotExist(err) {
		t.Errorf("a volume was made from a tampered parent: %v", err)
	}
}
