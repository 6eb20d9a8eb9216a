package integration

import (
	"encoding/json"
	"io/fs"
	"net/http"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/loopdev"
	"github.com/aleph-vm-go/vm-supervisor/internal/mountinfo"
)

// programWithVolumes publishes, through the test Aleph API, the program
// content of an uploaded program with volumes added, and returns its hash.
func (s *supervisor) programWithVolumes(uploaded string, volumes []map[string]any) string {
	return s.republish(uploaded, func(content map[string]any) { content["volumes"] = volumes })
}

type fillResult struct {
	Written int64   `json:"written"`
	Error   *string `json:"error"`
}

func (s *supervisor) fill(hash, path string, mib int) fillResult {
	s.t.Helper()
	r := s.get("/vm/" + hash + "/fill?path=" + url.QueryEscape(path) + "&mib=" + itoa(mib))
	expect(s.t, r, http.StatusOK)
	var res fillResult
	if err := json.Unmarshal(r.Body, &res); err != nil {
		s.t.Fatalf("fill %s: %v: %s", path, err, r.Body)
	}
	return res
}

func itoa(n int) string { return strconv.Itoa(n) }

// allocatedUnder adds up the disk blocks of the files under dir, on dir's
// own file system (mounted volumes are not walked: their images are
// counted where they live).
func allocatedUnder(t *testing.T, dir string) int64 {
	t.Helper()
	var root syscall.Stat_t
	if err := syscall.Stat(dir, &root); err != nil {
		t.Fatal(err)
	}
	var total int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil // raced with a removal
		}
		var st syscall.Stat_t
		if syscall.Lstat(p, &st) != nil {
			return nil
		}
		if st.Dev != root.Dev {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		total += st.Blocks * 512
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return total
}

// TestHostileVolumes: a program fills every writable place it has and
// gets ENOSPC at the bound each one states, the host's disk grows by no
// more than the persistent volume's size, what it leaves in its volume is
// inert on the host, its neighbour keeps answering, and after a kill -9
// and at shutdown no mount or loop device remains.
func TestHostileVolumes(t *testing.T) {
	const persistMiB, ephMiB, memoryMiB = 8, 8, 128
	s := startSupervisor(t, "ALEPH_VM_PREWARM=false")
	probe, _ := filepath.Abs("testdata/probe")
	neighbour := s.upload(probe, "main:app", "--memory", itoa(memoryMiB))
	hostile := s.programWithVolumes(neighbour, []map[string]any{
		{"mount": "/data/persist", "persistence": "host", "name": "data", "size_mib": persistMiB},
		{"mount": "/data/eph", "ephemeral": true, "size_mib": ephMiB},
	})
	expect(t, s.get("/vm/"+neighbour+"/"), http.StatusOK)
	expect(t, s.get("/vm/"+hostile+"/"), http.StatusOK)

	image := filepath.Join(s.execRoot, "volumes", "persistent", hostile, "data.ext4")
	var st syscall.Stat_t
	if err := syscall.Stat(image, &st); err != nil {
		t.Fatalf("persistent volume image: %v", err)
	}
	if st.Size != persistMiB<<20 {
		t.Errorf("image size %d, want %d", st.Size, persistMiB<<20)
	}
	before := allocatedUnder(t, s.execRoot)

	// Every writable place, filled far past its bound.
	layer := int64(memoryMiB / 2 << 20) // /tmp and the root overlay (gVisor)
	type fillCase struct {
		what, path string
		bound      int64
	}
	cases := []fillCase{
		{"persistent volume", "/data/persist/fill", persistMiB << 20},
		{"ephemeral volume", "/data/eph/fill", ephMiB << 20},
	}
	// The host's disk may grow by the persistent image; under a VM the
	// ephemeral volume is an image file on the host too.
	diskBound := int64(persistMiB << 20)
	if hypervisor == "gvisor" {
		// In a VM, /tmp and the root's upper layer are the guest kernel's
		// tmpfs in the VM's own memory; the bounds below are gVisor's.
		cases = append(cases,
			fillCase{"/tmp", "/tmp/fill", layer},
			fillCase{"root file system", "/var/fill", layer})
	} else {
		diskBound += ephMiB << 20
	}
	for _, c := range cases {
		res := s.fill(hostile, c.path, 512)
		errno := "<nil>"
		if res.Error != nil {
			errno = *res.Error
		}
		t.Logf("%s: %d bytes written, then %s (bound %d)", c.what, res.Written, errno, c.bound)
		if errno != "ENOSPC" {
			t.Errorf("%s: stopped by %s, want ENOSPC", c.what, errno)
		}
		if res.Written > c.bound || res.Written == 0 {
			t.Errorf("%s: %d bytes written, want some and at most %d", c.what, res.Written, c.bound)
		}
		// Room again for what follows (a full guest ext4 leaves none,
		// where the host's one under gVisor leaves a few blocks).
		expect(t, s.get("/vm/"+hostile+"/remove?path="+url.QueryEscape(c.path)), http.StatusOK)
	}
	r := s.get("/vm/" + hostile + "/plant?dir=/data/persist")
	expect(t, r, http.StatusOK)
	t.Logf("planted: %s", r.Body)

	// The host's disk: the image and nothing else grew, within its size.
	grown := allocatedUnder(t, s.execRoot) - before
	if err := syscall.Stat(image, &st); err != nil {
		t.Fatal(err)
	}
	t.Logf("execution root grew by %d bytes; image allocates %d of %d", grown, st.Blocks*512, st.Size)
	if st.Blocks*512 > persistMiB<<20 {
		t.Errorf("image allocates %d bytes, more than its %d MiB", st.Blocks*512, persistMiB)
	}
	if slack := int64(2 << 20); grown > diskBound+slack {
		t.Errorf("execution root grew by %d bytes, more than the volumes' %d bytes (+%d slack)", grown, diskBound, slack)
	}

	// What the program left is inert on the host: the image's mount is
	// nosuid and nodev.
	if hypervisor == "gvisor" {
		checkVolumeMountsInert(t, s)
	}

	// Neighbour and the program itself still answer.
	expect(t, s.get("/vm/"+neighbour+"/"), http.StatusOK)
	expect(t, s.get("/vm/"+hostile+"/"), http.StatusOK)

	// A crash: kill -9 leaves the sandboxes and their mounts; the restart
	// sweeps them, and autoclear frees the loop devices.
	s.kill9()
	s.restart()
	deadline := time.Now().Add(5 * time.Second)
	for {
		devs, _ := loopdev.BackedUnder(s.execRoot)
		mps, _ := mountinfo.Under(s.execRoot)
		if len(devs) == 0 && len(mps) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after kill -9 and restart: loop devices %v, mounts %v", devs, mps)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// The data outlived the crash.
	r = s.get("/vm/" + hostile + "/read-file?path=/data/persist/marker")
	expect(t, r, http.StatusOK)
	if !strings.Contains(string(r.Body), `"content":"kept"`) {
		t.Errorf("persistent data after kill -9: %s", r.Body)
	}
	expect(t, s.get("/vm/"+neighbour+"/"), http.StatusOK)
	s.shutdown() // asserts no mount, loop device or execution directory is left
}

// checkVolumeMountsInert: every ext4 volume mounted on the host under the
// execution root is nosuid and nodev, and there is one at least.
func checkVolumeMountsInert(t *testing.T, s *supervisor) {
	t.Helper()
	mps, err := mountinfo.Under(filepath.Join(s.execRoot, "executions"))
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, mp := range mps {
		var sfs unix.Statfs_t
		if unix.Statfs(mp, &sfs) != nil || sfs.Type != unix.EXT4_SUPER_MAGIC {
			continue
		}
		found = true
		if sfs.Flags&unix.ST_NOSUID == 0 || sfs.Flags&unix.ST_NODEV == 0 {
			t.Errorf("volume mounted on the host without nosuid/nodev: %s flags %#x", mp, sfs.Flags)
		}
	}
	if !found {
		t.Errorf("no ext4 mount of the persistent volume under the execution root: %v", mps)
	}
}
