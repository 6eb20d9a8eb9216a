package gvisor

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// These tests drive the snapshot store with a build function that writes
// files instead of checkpointing a sandbox; TestSnapshotRestoredSandboxes
// (test/integration) runs the whole path with runsc.

func writeImage(size int) func(context.Context, string) error {
	return func(_ context.Context, dir string) error {
		return os.WriteFile(filepath.Join(dir, "pages.img"), make([]byte, size), 0o600)
	}
}

func openTestStore(t *testing.T, dir string, maxBytes int64) *snapshotStore {
	t.Helper()
	s, err := openSnapshotStore(dir, maxBytes, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// makeTestImage claims and makes key's image.
func makeTestImage(t *testing.T, s *snapshotStore, key string, size int) {
	t.Helper()
	if !s.claim(key) {
		t.Fatalf("claim %s refused", key[:4])
	}
	if err := s.make(context.Background(), key, writeImage(size)); err != nil {
		t.Fatal(err)
	}
}

const keyA = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
const keyB = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
const keyC = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"

// One start of a shape makes its image; the others, meanwhile and after,
// neither make another nor wait for it.
func TestSnapshotMadeOnce(t *testing.T) {
	s := openTestStore(t, t.TempDir(), 1<<30)
	if _, _, err := s.take(keyA); !errors.Is(err, errNoSnapshot) {
		t.Fatalf("take before any image: %v, want errNoSnapshot", err)
	}
	if !s.claim(keyA) {
		t.Fatal("first claim refused")
	}
	if s.claim(keyA) {
		t.Error("a second claim was granted while the image is being made")
	}
	if _, _, err := s.take(keyA); !errors.Is(err, errNoSnapshot) {
		t.Errorf("take while the image is being made: %v, want errNoSnapshot", err)
	}
	if err := s.make(context.Background(), keyA, writeImage(1000)); err != nil {
		t.Fatal(err)
	}
	if s.claim(keyA) {
		t.Error("claim granted for an image that exists")
	}
	dir, release, err := s.take(keyA)
	if err != nil || dir != filepath.Join(s.dir, keyA) {
		t.Fatalf("take: %q, %v", dir, err)
	}
	release()
	if _, err := os.Stat(filepath.Join(dir, completeMark)); err != nil {
		t.Errorf("finished image has no completion mark: %v", err)
	}
}

// A failed checkpoint leaves nothing half-made, and the shape starts
// afresh for a while instead of failing again at every start.
func TestSnapshotFailureIsRemembered(t *testing.T) {
	s := openTestStore(t, t.TempDir(), 1<<30)
	if !s.claim(keyA) {
		t.Fatal("claim refused")
	}
	err := s.make(context.Background(), keyA, func(ctx context.Context, dir string) error {
		_ = writeImage(10)(ctx, dir)
		return errors.New("runsc checkpoint: refused")
	})
	if err == nil {
		t.Fatal("a failed build made an image")
	}
	if s.claim(keyA) {
		t.Error("claim granted right after a failure")
	}
	if entries, _ := os.ReadDir(s.dir); len(entries) != 0 {
		t.Errorf("a failed checkpoint left %v", entries)
	}
	// After the retry delay it is tried again.
	s.mu.Lock()
	s.failed[keyA] = time.Now().Add(-snapshotRetryAfter - time.Second)
	s.mu.Unlock()
	if !s.claim(keyA) {
		t.Error("claim refused after the retry delay")
	}
}

// An image that would not restore is removed and the shape is left to
// fresh starts for a while.
func TestSnapshotDropped(t *testing.T) {
	s := openTestStore(t, t.TempDir(), 1<<30)
	makeTestImage(t, s, keyA, 10)
	s.drop(keyA, errors.New("restore failed"))
	if _, err := os.Stat(filepath.Join(s.dir, keyA)); !os.IsNotExist(err) {
		t.Errorf("dropped image still there: %v", err)
	}
	if _, _, err := s.take(keyA); !errors.Is(err, errNoSnapshot) {
		t.Errorf("take after a drop: %v, want errNoSnapshot", err)
	}
	if s.claim(keyA) {
		t.Error("claim granted right after a drop")
	}
}

// Past the size bound the least recently used images go, never one a
// live sandbox was restored from.
func TestSnapshotEviction(t *testing.T) {
	s := openTestStore(t, t.TempDir(), 2500)
	makeTestImage(t, s, keyA, 1000)
	_, releaseA, err := s.take(keyA)
	if err != nil {
		t.Fatal(err)
	}
	makeTestImage(t, s, keyB, 1000)
	// A, in use and the oldest, stays; B, the least recently used of the
	// others, goes.
	makeTestImage(t, s, keyC, 1000)
	present := func(key string) bool {
		_, err := os.Stat(filepath.Join(s.dir, key, completeMark))
		return err == nil
	}
	if !present(keyA) || present(keyB) || !present(keyC) {
		t.Errorf("after eviction: A %v (in use), B %v (least recent), C %v (newest); want true false true",
			present(keyA), present(keyB), present(keyC))
	}
	releaseA()
}

// Images survive a restart of the supervisor; what a crash left half-made
// does not.
func TestSnapshotStoreReopen(t *testing.T) {
	dir := t.TempDir()
	s := openTestStore(t, dir, 1<<30)
	makeTestImage(t, s, keyA, 10)
	halfMade := filepath.Join(dir, keyB+".making-123")
	unmarked := filepath.Join(dir, keyC)
	for _, d := range []string{halfMade, unmarked} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	s = openTestStore(t, dir, 1<<30)
	if _, release, err := s.take(keyA); err != nil {
		t.Errorf("image of the earlier run: %v", err)
	} else {
		release()
	}
	for _, d := range []string{halfMade, unmarked} {
		if _, err := os.Stat(d); !os.IsNotExist(err) {
			t.Errorf("%s survived the reopen", filepath.Base(d))
		}
	}
}

// A held agent's channel keeps what the host writes (its session may
// send the Config while the agent still warms) and sends it after the
// release line, in order; reads wait for the release.
func TestHeldChannelKeepsWritesUntilRelease(t *testing.T) {
	stdinR, stdinW, err := os.Pipe() // the agent's stdin
	if err != nil {
		t.Fatal(err)
	}
	stdoutR, stdoutW, err := os.Pipe() // the agent's stdout
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []*os.File{stdinR, stdinW, stdoutR, stdoutW} {
		defer f.Close()
	}
	h := newHeldChannel()
	c := &stdioChannel{w: stdinW, r: stdoutR, held: h}
	read := make(chan string, 1)
	go func() {
		b := make([]byte, 1)
		n, _ := c.Read(b)
		read <- string(b[:n])
	}()
	// The agent has something to say, but the host must not see it yet.
	if _, err := stdoutW.Write([]byte("f")); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"config ", "window"} {
		if n, err := c.Write([]byte(p)); err != nil || n != len(p) {
			t.Fatalf("write while held: %d, %v", n, err)
		}
	}
	select {
	case got := <-read:
		t.Fatalf("a read returned %q while the agent was held", got)
	case <-time.After(100 * time.Millisecond):
	}
	if err := h.release(stdinW, []byte("\n")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte(" after")); err != nil {
		t.Fatal(err)
	}
	want := "\nconfig window after"
	got := make([]byte, len(want))
	if _, err := io.ReadFull(stdinR, got); err != nil {
		t.Fatal(err)
	}
	if string(got) != want {
		t.Errorf("the agent's stdin got %q, want %q", got, want)
	}
	select {
	case got := <-read:
		if got != "f" {
			t.Errorf("read %q after the release, want the agent's byte", got)
		}
	case <-time.After(5 * time.Second):
		t.Error("the read did not go on after the release")
	}
}
