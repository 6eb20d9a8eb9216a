package gvisor

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
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

const keyA = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
const keyB = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
const keyC = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"

// Sandboxes of one shape started together wait for one image, made once.
func TestSnapshotMadeOnceForConcurrentStarts(t *testing.T) {
	s := openTestStore(t, t.TempDir(), 1<<30)
	var builds atomic.Int32
	build := func(ctx context.Context, dir string) error {
		builds.Add(1)
		time.Sleep(50 * time.Millisecond)
		return writeImage(1000)(ctx, dir)
	}
	var wg sync.WaitGroup
	dirs := make([]string, 6)
	for n := range dirs {
		wg.Go(func() {
			dir, release, err := s.acquire(context.Background(), keyA, build)
			if err != nil {
				t.Error(err)
				return
			}
			defer release()
			dirs[n] = dir
		})
	}
	wg.Wait()
	if builds.Load() != 1 {
		t.Errorf("image built %d times, want 1", builds.Load())
	}
	for _, d := range dirs {
		if d != filepath.Join(s.dir, keyA) {
			t.Errorf("acquired %q, want the key's directory", d)
		}
	}
	if _, err := os.Stat(filepath.Join(s.dir, keyA, completeMark)); err != nil {
		t.Errorf("finished image has no completion mark: %v", err)
	}
	// A program's own start (no build) takes the image that is there.
	dir, release, err := s.acquire(context.Background(), keyA, nil)
	if err != nil || dir == "" {
		t.Fatalf("acquire without build: %q, %v", dir, err)
	}
	release()
}

// A program's start never makes an image, nor waits for one being made.
func TestSnapshotNotMadeOnTheRequestPath(t *testing.T) {
	s := openTestStore(t, t.TempDir(), 1<<30)
	if _, _, err := s.acquire(context.Background(), keyA, nil); !errors.Is(err, errNoSnapshot) {
		t.Fatalf("acquire without image nor build: %v, want errNoSnapshot", err)
	}
	started, finish := make(chan struct{}), make(chan struct{})
	go func() {
		_, release, err := s.acquire(context.Background(), keyA, func(ctx context.Context, dir string) error {
			close(started)
			<-finish
			return writeImage(10)(ctx, dir)
		})
		if err == nil {
			release()
		}
	}()
	<-started
	t0 := time.Now()
	if _, _, err := s.acquire(context.Background(), keyA, nil); !errors.Is(err, errNoSnapshot) {
		t.Errorf("acquire while the image is being made: %v, want errNoSnapshot", err)
	}
	if time.Since(t0) > time.Second {
		t.Errorf("a program's start waited %v for an image being made", time.Since(t0))
	}
	close(finish)
}

// A failed checkpoint leaves nothing half-made, and the shape starts
// afresh for a while instead of failing again at every start.
func TestSnapshotFailureIsRemembered(t *testing.T) {
	s := openTestStore(t, t.TempDir(), 1<<30)
	var builds atomic.Int32
	failing := func(ctx context.Context, dir string) error {
		builds.Add(1)
		_ = writeImage(10)(ctx, dir)
		return errors.New("runsc checkpoint: refused")
	}
	if _, _, err := s.acquire(context.Background(), keyA, failing); err == nil || errors.Is(err, errNoSnapshot) {
		t.Fatalf("first failure: %v, want the checkpoint's error", err)
	}
	if _, _, err := s.acquire(context.Background(), keyA, failing); !errors.Is(err, errNoSnapshot) {
		t.Fatalf("right after a failure: %v, want errNoSnapshot", err)
	}
	if builds.Load() != 1 {
		t.Errorf("built %d times, want 1", builds.Load())
	}
	entries, _ := os.ReadDir(s.dir)
	if len(entries) != 0 {
		t.Errorf("a failed checkpoint left %v", entries)
	}
	// After the retry delay it is tried again.
	s.mu.Lock()
	s.failed[keyA] = time.Now().Add(-snapshotRetryAfter - time.Second)
	s.mu.Unlock()
	if _, release, err := s.acquire(context.Background(), keyA, writeImage(10)); err != nil {
		t.Fatalf("after the retry delay: %v", err)
	} else {
		release()
	}
}

// An image that would not restore is removed and the shape is left to
// fresh starts for a while.
func TestSnapshotDropped(t *testing.T) {
	s := openTestStore(t, t.TempDir(), 1<<30)
	_, release, err := s.acquire(context.Background(), keyA, writeImage(10))
	if err != nil {
		t.Fatal(err)
	}
	release()
	s.drop(keyA, errors.New("restore failed"))
	if _, err := os.Stat(filepath.Join(s.dir, keyA)); !os.IsNotExist(err) {
		t.Errorf("dropped image still there: %v", err)
	}
	if _, _, err := s.acquire(context.Background(), keyA, writeImage(10)); !errors.Is(err, errNoSnapshot) {
		t.Errorf("right after a drop: %v, want errNoSnapshot", err)
	}
}

// Past the size bound the least recently used images go, never one a
// live sandbox was restored from.
func TestSnapshotEviction(t *testing.T) {
	s := openTestStore(t, t.TempDir(), 2500)
	_, releaseA, err := s.acquire(context.Background(), keyA, writeImage(1000))
	if err != nil {
		t.Fatal(err)
	}
	_, releaseB, err := s.acquire(context.Background(), keyB, writeImage(1000))
	if err != nil {
		t.Fatal(err)
	}
	releaseB()
	// A, in use and the oldest, stays; B, the least recently used of the
	// others, goes.
	_, releaseC, err := s.acquire(context.Background(), keyC, writeImage(1000))
	if err != nil {
		t.Fatal(err)
	}
	defer releaseC()
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
	_, release, err := s.acquire(context.Background(), keyA, writeImage(10))
	if err != nil {
		t.Fatal(err)
	}
	release()
	halfMade := filepath.Join(dir, keyB+".making-123")
	unmarked := filepath.Join(dir, keyC)
	for _, d := range []string{halfMade, unmarked} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	s = openTestStore(t, dir, 1<<30)
	if _, release, err := s.acquire(context.Background(), keyA, nil); err != nil {
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
