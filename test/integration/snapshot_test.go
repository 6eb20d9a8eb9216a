package integration

import (
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// snapshotImages lists the complete snapshot images of a supervisor's
// gVisor backend.
func (s *supervisor) snapshotImages() []string {
	dirs, _ := filepath.Glob(filepath.Join(s.cache, "snapshots", "*", "complete"))
	return dirs
}

// With spares on, the gVisor backend checkpoints the first warm spare of
// the default shape in place, and restores that image for every later
// spare; after a restart without spares, a cold start restores the same
// image instead of starting afresh. Programs restored from one image
// still draw their own random numbers (the launcher re-seeds Python's
// random module).
func TestSnapshotRestoredSandboxes(t *testing.T) {
	snapshotsUnderTest(t)
	s := startSupervisor(t)
	first := s.upload("testdata/probe", "main:app")
	waitDefaultImages(t, s)
	// The checkpointed spare goes on serving: the program takes it.
	r := s.get("/vm/" + first + "/random")
	expect(t, r, http.StatusOK)
	firstRandom := r.json(t)["random"]
	if !strings.Contains(s.logs.String(), "using a pre-warmed sandbox") {
		t.Error("the program did not run in the checkpointed spare")
	}
	// Its replacement is a restore.
	waitLog(t, s, "restored a warm sandbox", 60*time.Second)

	s.shutdown()
	if len(s.snapshotImages()) != defaultShapes {
		t.Fatalf("want the images kept across restarts, have %v", s.snapshotImages())
	}
	s.restart("ALEPH_VM_PREWARM=false")
	mark := len(s.logs.String())

	// A program the supervisor never ran, with no spare to take.
	code := anotherProbe(t)
	second := s.upload(code, "main:app")
	r = s.get("/vm/" + second + "/random")
	expect(t, r, http.StatusOK)
	after := s.logs.String()[mark:]
	if !strings.Contains(after, "restored a warm sandbox") {
		t.Errorf("the cold start without a spare did not restore the snapshot:\n%s", tail(after, 60))
	}
	if strings.Contains(after, "made a snapshot") {
		t.Errorf("a program's start made a snapshot: only spares should")
	}
	if got := r.json(t)["random"]; got == firstRandom {
		t.Errorf("two programs restored from one snapshot drew the same random number %v", got)
	}
	// It serves like any other: the rest of its API works.
	expect(t, s.get("/vm/"+second+"/"), http.StatusOK)
}

// snapshotsUnderTest skips the VM passes: snapshots are a gVisor feature.
func snapshotsUnderTest(t *testing.T) {
	t.Helper()
	if hypervisor != "gvisor" {
		t.Skip("snapshots are a gVisor feature")
	}
}

// defaultShapes is how many shapes always have a spare, hence an image:
// the default runtime and resources, with and without the internet
// (networking is on by default).
const defaultShapes = 2

// waitDefaultImages waits until the spares of the default shapes have
// made their images.
func waitDefaultImages(t *testing.T, s *supervisor) { waitSnapshotImages(t, s, defaultShapes) }

// waitSnapshotImages waits until the spares have made n snapshot images.
func waitSnapshotImages(t *testing.T, s *supervisor, n int) {
	t.Helper()
	for deadline := time.Now().Add(90 * time.Second); len(s.snapshotImages()) < n; time.Sleep(200 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d snapshot images after 90 s of spares, want %d", len(s.snapshotImages()), n)
		}
	}
}

// anotherProbe is a copy of the probe program with another hash.
func anotherProbe(t *testing.T) string {
	t.Helper()
	code := t.TempDir()
	src, err := os.ReadFile("testdata/probe/main.py")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(code, "main.py"), append(src, "\n# another program\n"...), 0o644); err != nil {
		t.Fatal(err)
	}
	return code
}

// waitLog waits until the supervisor's log holds want.
func waitLog(t *testing.T, s *supervisor, want string, d time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(d); !strings.Contains(s.logs.String(), want); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("log has no %q after %s", want, d)
		}
	}
}

// An image that does not restore (here, its files truncated) costs one
// failed attempt: the cold start goes afresh and answers, the image is
// removed, and the next start does not try it again.
func TestBrokenSnapshotFallsBackToAFreshStart(t *testing.T) {
	snapshotsUnderTest(t)
	s := startSupervisor(t)
	hash := s.upload("testdata/probe", "main:app")
	waitDefaultImages(t, s)
	s.shutdown()
	files, _ := filepath.Glob(filepath.Join(s.cache, "snapshots", "*", "*.img"))
	if len(files) == 0 {
		t.Fatal("no image files")
	}
	for _, f := range files {
		if err := os.Truncate(f, 100); err != nil {
			t.Fatal(err)
		}
	}
	s.restart("ALEPH_VM_PREWARM=false")
	mark := len(s.logs.String())
	expect(t, s.get("/vm/"+hash+"/"), http.StatusOK)
	after := s.logs.String()[mark:]
	if !strings.Contains(after, "dropping a snapshot that did not restore") {
		t.Errorf("the broken image was not dropped:\n%s", tail(after, 60))
	}
	// The program's shape's image is gone; the internet shape's, unused,
	// stays.
	if left := s.snapshotImages(); len(left) != defaultShapes-1 {
		t.Errorf("after one failed restore, images left: %v", left)
	}
	// Ended, then started again: a fresh start, without a second try.
	s.get("/vm/" + hash + "/crash")
	for deadline := time.Now().Add(30 * time.Second); s.runningExecutions() != 0; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the crashed program's execution did not end")
		}
	}
	mark = len(s.logs.String())
	expect(t, s.get("/vm/"+hash+"/"), http.StatusOK)
	if after := s.logs.String()[mark:]; strings.Contains(after, "restor") {
		t.Errorf("the second start tried a snapshot again:\n%s", tail(after, 60))
	}
}

// Programs with the internet restore their shape's snapshot too: runsc
// re-reads the network from each restored sandbox's own namespace, so two
// programs restored from one image side by side each have the address of
// their own execution, and reach the (test) internet from it.
func TestSnapshotWithInternet(t *testing.T) {
	snapshotsUnderTest(t)
	inet := newTestInternet(t)
	s := startNetworkSupervisor(t, inet)
	waitDefaultImages(t, s)
	s.shutdown()
	s.restart("ALEPH_VM_PREWARM=false")
	mark := len(s.logs.String())

	code := anotherProbe(t)
	programs := []string{s.upload("testdata/probe", "main:app", "--internet"), s.upload(code, "main:app", "--internet")}
	var addresses []netip.Prefix
	for _, h := range programs {
		wantTestInternetPage(t, inet, "the test internet from a restored sandbox",
			fetch(t, s, h, "http://"+inet.Addr.String()+"/"), inet.Addr)
		wantTestInternetPage(t, inet, "http://inet.test/ from a restored sandbox",
			fetch(t, s, h, "http://inet.test/"), inet.Addr)
		addresses = append(addresses, programAddress(t, s, h)) // its own, as the operator page lists it
	}
	if addresses[0] == addresses[1] {
		t.Errorf("two restored programs share the address %s", addresses[0])
	}
	if n := strings.Count(s.logs.String()[mark:], "restored a warm sandbox"); n != 2 {
		t.Errorf("%d restores for 2 cold starts without spares, want 2", n)
	}
}
