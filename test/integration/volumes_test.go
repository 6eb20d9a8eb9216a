package integration

import (
	"archive/zip"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

type fileResult struct {
	OK      bool   `json:"ok"`
	Content string `json:"content"`
	Error   string `json:"error"`
}

func (s *supervisor) readFile(hash, path string) fileResult {
	s.t.Helper()
	return s.fileCall(hash, "/read-file?path="+url.QueryEscape(path))
}

func (s *supervisor) writeFile(hash, path, content string) fileResult {
	s.t.Helper()
	return s.fileCall(hash, "/write-file?path="+url.QueryEscape(path)+"&content="+url.QueryEscape(content))
}

func (s *supervisor) fileCall(hash, route string) fileResult {
	s.t.Helper()
	r := s.get("/vm/" + hash + route)
	expect(s.t, r, http.StatusOK)
	var res fileResult
	if err := json.Unmarshal(r.Body, &res); err != nil {
		s.t.Fatalf("%s: %v: %s", route, err, r.Body)
	}
	return res
}

func writeTree(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		p := filepath.Join(dir, name)
		must(t, os.MkdirAll(filepath.Dir(p), 0o755))
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// publishFile puts bytes on the fake Aleph API behind a STORE message and
// returns the message's hash, the ref a volume names.
func (s *supervisor) publishFile(t *testing.T, b []byte) string {
	t.Helper()
	sum := sha256.Sum256(b)
	h := hex.EncodeToString(sum[:])
	s.api.mu.Lock()
	s.api.files[h] = b
	s.api.mu.Unlock()
	return s.api.addInline(t, "STORE", hostileOwner, map[string]any{
		"address": hostileOwner, "time": 1700000000.0, "item_type": "storage", "item_hash": h,
	})
}

// TestProgramUploadVolumes uploads the probe with `program upload`'s
// volume flags and checks from inside the program that each volume is at
// its mount with its content and its writability: the immutable volume
// (a directory packed as squashfs) read-only and the data archive (packed
// as zip) writable, under every backend; under gVisor also a persistent volume
// kept across a restart, an ephemeral one bounded by size_mib and gone at
// the next start, a zip immutable volume fetched from the Aleph API, and a
// second program naming the same persistent volume, which gets its own
// image (aleph-vm keys them by program) while the first one runs.
func TestProgramUploadVolumes(t *testing.T) {
	s := startSupervisor(t, "ALEPH_VM_PREWARM=false")
	probe, _ := filepath.Abs("testdata/probe")
	lib := writeTree(t, map[string]string{"greeting.txt": "from the immutable volume"})
	data := writeTree(t, map[string]string{"input/hello.txt": "from the data archive"})
	full := hypervisor == "gvisor" // each VM cold start costs 10–35 s under TCG
	flags := []string{"--immutable-volume", "mount=/opt/lib,path=" + lib, "--data", data}
	if full {
		flags = append(flags,
			"--persistent-volume", "mount=/var/lib/state,name=state,size_mib=8",
			"--ephemeral-volume", "mount=/var/cache/scratch,size_mib=4")
	}
	hash := s.upload(probe, "main:app", flags...)

	readOnly := func(hash, dir string) {
		t.Helper()
		if w := s.writeFile(hash, dir+"/new.txt", "x"); w.OK || !strings.Contains(w.Error, "Read-only file system") {
			t.Errorf("writing into %s: %+v, want a read-only file system", dir, w)
		}
	}
	has := func(hash, path, want string) {
		t.Helper()
		if r := s.readFile(hash, path); !r.OK || r.Content != want {
			t.Errorf("%s: %+v, want %q", path, r, want)
		}
	}
	has(hash, "/opt/lib/greeting.txt", "from the immutable volume")
	readOnly(hash, "/opt/lib")
	has(hash, "/data/input/hello.txt", "from the data archive")
	// Writable, as aleph-vm unzips it (TestVol19DataWritable).
	if w := s.writeFile(hash, "/data/new.txt", "x"); !w.OK {
		t.Errorf("writing into /data: %+v, want it writable", w)
	}
	if !full {
		return
	}

	if w := s.writeFile(hash, "/var/lib/state/kept.txt", "v1"); !w.OK {
		t.Fatalf("writing the persistent volume: %+v", w)
	}
	has(hash, "/var/lib/state/kept.txt", "v1")
	if w := s.writeFile(hash, "/var/cache/scratch/tmp.txt", "scratch"); !w.OK {
		t.Fatalf("writing the ephemeral volume: %+v", w)
	}
	res := s.fill(hash, "/var/cache/scratch/fill", 64)
	if res.Error == nil || *res.Error != "ENOSPC" || res.Written == 0 || res.Written > 4<<20 {
		t.Errorf("filling the 4 MiB ephemeral volume: %+v, want ENOSPC within 4 MiB", res)
	}
	image := filepath.Join(s.execRoot, "volumes", "persistent", hash, "state.ext4")
	var st syscall.Stat_t
	if err := syscall.Stat(image, &st); err != nil || st.Size != 8<<20 || st.Mode&syscall.S_IFMT != syscall.S_IFREG {
		t.Errorf("persistent image %s: %v, size %d, mode %o; want an 8 MiB file", image, err, st.Size, st.Mode)
	}

	// Another program of the same owner naming the same volume: its own
	// image, both running at once.
	var zbuf bytes.Buffer
	zw := zip.NewWriter(&zbuf)
	w, err := zw.Create("pkg/z.txt")
	must(t, err)
	_, err = w.Write([]byte("from a zip volume"))
	must(t, err)
	must(t, zw.Close())
	other := s.programWithVolumes(hash, []map[string]any{
		{"mount": "/var/lib/state", "persistence": "host", "name": "state", "size_mib": 8},
		{"mount": "/opt/zipped", "ref": s.publishFile(t, zbuf.Bytes()), "use_latest": false},
	})
	if r := s.readFile(other, "/var/lib/state/kept.txt"); r.OK {
		t.Errorf("the other program sees the first one's volume: %+v", r)
	}
	if w := s.writeFile(other, "/var/lib/state/kept.txt", "other"); !w.OK {
		t.Errorf("writing the other program's volume: %+v", w)
	}
	has(other, "/opt/zipped/pkg/z.txt", "from a zip volume")
	readOnly(other, "/opt/zipped")
	has(other, "/data/input/hello.txt", "from the data archive")
	has(hash, "/var/lib/state/kept.txt", "v1")
	if _, err := os.Stat(filepath.Join(s.execRoot, "volumes", "persistent", other, "state.ext4")); err != nil {
		t.Errorf("the other program's image: %v", err)
	}

	// A new execution: the persistent volume kept its file, the ephemeral
	// one starts empty.
	s.shutdown()
	s.restart()
	has(hash, "/var/lib/state/kept.txt", "v1")
	if r := s.readFile(hash, "/var/cache/scratch/tmp.txt"); r.OK {
		t.Errorf("the ephemeral volume survived the execution: %+v", r)
	}
	has(hash, "/opt/lib/greeting.txt", "from the immutable volume")
}
