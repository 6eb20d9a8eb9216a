package gvisor

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// Snapshots of warm sandboxes. A sandbox without a program costs about a
// second to start here, most of it Python importing uvicorn and FastAPI;
// restoring a checkpoint of one that already did costs a fifth of that
// (docs/snapshots.md). So for every shape of spare-like sandbox (runtime,
// memory, vCPUs, internet or not; no volumes) the backend checkpoints one warm
// sandbox once, and later starts of that shape restore it instead: the
// pool's spares refill faster and with less CPU, and a cold start that
// finds no spare waits for a restore instead of a fresh start.
//
// What is checkpointed is the moment the agent holds (cmd/vm-agent,
// hold.go): the interpreter warm, no guest session yet, no program, no
// socket bound on the host. Nothing there belongs to a program, so one
// image serves every program of the shape; the launcher draws again, when
// it takes its program, every generator state the interpreter kept
// (random, multiprocessing's authkey, tempfile's names, aiohttp's
// websocket masks, OpenSSL's). What every restore shares is what cannot
// be drawn again: the interpreter's hash seed, the memory layout and
// gVisor's boot id. runsc restore gives each sandbox its own hostname.
//
// Sandboxes with a network restore too: runsc restore reads the network
// of the restoring sandbox's own namespace (address, routes, link) and
// configures the saved netstack with it, so each restored sandbox has its
// execution's address (TestSnapshotWithInternet).

// snapshotFormat is bumped when what a snapshot holds changes in a way
// its key does not see.
const snapshotFormat = "1"

// snapshotRetryAfter is how long a shape whose checkpoint or restore
// failed starts afresh before trying again.
const snapshotRetryAfter = 10 * time.Minute

// holdTimeout bounds the wait for a fresh sandbox to get warm before its
// checkpoint (a second or two here, far longer under load).
const holdTimeout = 2 * time.Minute

// restoreTimeout bounds a restore, which takes a fifth of a second here:
// past it the image is taken for broken and the start goes afresh.
const restoreTimeout = 20 * time.Second

// completeMark is written last into a finished image directory.
const completeMark = "complete"

// DefaultSnapshotMaxBytes bounds the images kept when
// Options.SnapshotMaxBytes is zero; one image of the default shape takes
// about 30 MiB.
const DefaultSnapshotMaxBytes = 1 << 30

// errNoSnapshot says a start should go the ordinary way.
var errNoSnapshot = errors.New("no snapshot for this shape")

// errSnapshotSkipped ends the making of an image without counting as a
// failure: the next spare of the shape tries again.
var errSnapshotSkipped = errors.New("snapshot skipped")

// snapshotStore keeps the images under one directory, one per key, and
// bounds their total size, least recently used first.
type snapshotStore struct {
	dir      string
	maxBytes int64
	log      *slog.Logger

	mu      sync.Mutex
	making  map[string]bool
	inUse   map[string]int
	failed  map[string]time.Time
	lastUse map[string]time.Time
}

func openSnapshotStore(dir string, maxBytes int64, log *slog.Logger) (*snapshotStore, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	s := &snapshotStore{dir: dir, maxBytes: maxBytes, log: log,
		making: map[string]bool{}, inUse: map[string]int{},
		failed: map[string]time.Time{}, lastUse: map[string]time.Time{}}
	// Images of an earlier run stay usable; half-made ones do not.
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		if _, err := os.Stat(filepath.Join(p, completeMark)); err != nil || strings.Contains(e.Name(), ".") {
			_ = os.RemoveAll(p)
			continue
		}
		if fi, err := e.Info(); err == nil {
			s.lastUse[e.Name()] = fi.ModTime()
		}
	}
	return s, nil
}

// take returns the image directory of key and a release to call once
// the sandbox restored from it is gone; errNoSnapshot when there is no
// image.
func (s *snapshotStore) take(key string) (string, func(), error) {
	final := filepath.Join(s.dir, key)
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := os.Stat(filepath.Join(final, completeMark)); err != nil {
		return "", nil, errNoSnapshot
	}
	s.inUse[key]++
	s.lastUse[key] = time.Now()
	var once sync.Once
	return final, func() {
		once.Do(func() {
			s.mu.Lock()
			s.inUse[key]--
			s.mu.Unlock()
		})
	}, nil
}

// claim reserves the making of key's image for the caller, who then calls
// make; false when the image exists, is being made, or failed recently.
func (s *snapshotStore) claim(key string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if t, ok := s.failed[key]; ok && time.Since(t) < snapshotRetryAfter {
		return false
	}
	if s.making[key] {
		return false
	}
	if _, err := os.Stat(filepath.Join(s.dir, key, completeMark)); err == nil {
		return false
	}
	s.making[key] = true
	return true
}

// make makes key's image, claimed by the caller, with build (which writes
// it into a directory of its own), then keeps the images within bounds.
func (s *snapshotStore) make(ctx context.Context, key string, build func(ctx context.Context, dir string) error) error {
	err := s.makeImage(ctx, key, build)
	s.mu.Lock()
	delete(s.making, key)
	if errors.Is(err, errSnapshotSkipped) {
		s.mu.Unlock()
		return err
	}
	if err != nil {
		s.failed[key] = time.Now()
	} else {
		s.lastUse[key] = time.Now() // counted by the eviction below
	}
	s.mu.Unlock()
	if err != nil {
		return fmt.Errorf("snapshot of a warm sandbox: %w", err)
	}
	s.evict()
	return nil
}

func (s *snapshotStore) makeImage(ctx context.Context, key string, build func(ctx context.Context, dir string) error) error {
	tmp, err := os.MkdirTemp(s.dir, key+".making-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	t0 := time.Now()
	if err := build(ctx, tmp); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, completeMark), nil, 0o600); err != nil {
		return err
	}
	final := filepath.Join(s.dir, key)
	_ = os.RemoveAll(final)
	if err := os.Rename(tmp, final); err != nil {
		return err
	}
	s.log.Info("made a snapshot of a warm sandbox", "key", key[:12], "took", time.Since(t0).Round(time.Millisecond),
		"mib", dirBytes(final)>>20)
	return nil
}

// drop removes key's image after a restore from it failed, and keeps the
// shape on fresh starts for a while.
func (s *snapshotStore) drop(key string, why error) {
	s.mu.Lock()
	s.failed[key] = time.Now()
	s.mu.Unlock()
	s.log.Warn("dropping a snapshot that did not restore; this shape starts afresh for a while",
		"key", key[:12], "err", why, "retry_after", snapshotRetryAfter)
	s.remove(key)
}

// remove deletes an image; a restore already reading it keeps its open
// files.
func (s *snapshotStore) remove(key string) {
	final := filepath.Join(s.dir, key)
	trash, err := os.MkdirTemp(s.dir, key+".removing-")
	if err == nil {
		_ = os.Remove(trash)
		if os.Rename(final, trash) == nil {
			final = trash
		}
	}
	_ = os.RemoveAll(final)
	s.mu.Lock()
	delete(s.lastUse, key)
	s.mu.Unlock()
}

// evict removes the least recently used images not in use until the rest
// fit in maxBytes.
func (s *snapshotStore) evict() {
	s.mu.Lock()
	keys := make([]string, 0, len(s.lastUse))
	for k := range s.lastUse {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(a, b int) bool { return s.lastUse[keys[a]].Before(s.lastUse[keys[b]]) })
	s.mu.Unlock()
	sizes := make(map[string]int64, len(keys))
	var total int64
	for _, k := range keys {
		sizes[k] = dirBytes(filepath.Join(s.dir, k))
		total += sizes[k]
	}
	for _, k := range keys {
		if total <= s.maxBytes {
			return
		}
		s.mu.Lock()
		busy := s.inUse[k] > 0
		s.mu.Unlock()
		if busy {
			continue
		}
		s.log.Info("removing a snapshot beyond SNAPSHOT_CACHE_MAX_MIB", "key", k[:12], "mib", sizes[k]>>20)
		s.remove(k)
		total -= sizes[k]
	}
}

func dirBytes(dir string) int64 {
	var n int64
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

// restorable tells whether spec may start from a snapshot: the ones the
// pool marks (Spec.Snapshot), shaped like a spare, started by our agent
// with its interpreter preloaded on the stdio channel.
func (b *Backend) restorable(spec backend.Spec) bool {
	return b.snaps != nil && spec.Snapshot && len(spec.Volumes) == 0 &&
		spec.DataPath == "" && len(b.opts.Command) == 0 &&
		slices.Contains(b.opts.AgentArgs, "--preload") && !slices.Contains(b.opts.AgentArgs, "--hold")
}

// snapshotKey names the image a sandbox of spec restores: everything a
// restore must match (runsc checks the mounts, resources and process
// against the checkpoint's) or that the image holds.
func (b *Backend) snapshotKey(spec backend.Spec) (string, error) {
	rt, err := runtimeKey(spec)
	if err != nil {
		return "", err
	}
	b.binOnce.Do(func() { b.binIDs, b.binErr = fileIdentities(b.runsc, b.opts.AgentPath) })
	if b.binErr != nil {
		return "", b.binErr
	}
	h := sha256.New()
	fmt.Fprintf(h, "format %s\nruntime %s\nmemory %d\nvcpus %d\nnetwork %t\nplatform %s\nargs %q\noverhead %d\npids %d\nprofile %t\ndebug %t\nbinaries %s\n",
		snapshotFormat, rt, spec.MemoryMiB, spec.VCPUs, spec.Network != nil, b.opts.Platform, b.opts.AgentArgs,
		b.opts.MemoryOverheadMiB, b.opts.PidsLimit, b.opts.AgentProfileDir != "", b.opts.Debug, b.binIDs)
	return hex.EncodeToString(h.Sum(nil)), nil
}

// fileIdentities names the runsc and agent binaries by path, size,
// modification time and inode: a snapshot holds the agent's memory and
// the Sentry's state format, so a rebuilt binary of either makes every
// image stale. (Hashing their 70 MB would delay the first spare.)
func fileIdentities(paths ...string) (string, error) {
	var b strings.Builder
	for _, p := range paths {
		fi, err := os.Stat(p)
		if err != nil {
			return "", err
		}
		var ino uint64
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			ino = st.Ino
		}
		abs, _ := filepath.Abs(p)
		fmt.Fprintf(&b, "%s:%d:%d:%d;", abs, fi.Size(), fi.ModTime().UnixNano(), ino)
	}
	return b.String(), nil
}

// startFromSnapshot starts spec by restoring its shape's image. Without
// one, a spare's start makes it: its sandbox starts afresh with the agent
// holding, is checkpointed in place once warm (runsc checkpoint
// --leave-running) and then goes on as an ordinary spare; its channel is
// handed out at once and carries nothing until the hold is over.
// fallback is true when the ordinary start should be tried instead.
func (b *Backend) startFromSnapshot(ctx context.Context, spec backend.Spec, log *slog.Logger) (inst backend.Instance, fallback bool, err error) {
	key, err := b.snapshotKey(spec)
	if err != nil {
		return nil, true, err
	}
	image, release, err := b.snaps.take(key)
	if errors.Is(err, errNoSnapshot) && spec.DeferCode && b.snaps.claim(key) {
		return b.startAndCheckpoint(ctx, spec, key, log)
	}
	if err != nil {
		return nil, true, err
	}
	warm := spec
	warm.DeferCode = true
	i := newInstance(b, warm, log)
	i.hold, i.restoreFrom, i.releaseImage = true, image, release
	t0 := time.Now()
	started, err := backend.Start(ctx, "gvisor", warm, log, i)
	if err != nil {
		release()
		return nil, ctx.Err() == nil, err
	}
	if err := i.awaitRestore(ctx, restoreTimeout); err != nil {
		_ = started.Stop(context.WithoutCancel(ctx))
		if ctx.Err() == nil {
			b.snaps.drop(key, err)
		}
		return nil, ctx.Err() == nil, err
	}
	log.Debug("restored a warm sandbox", "took", time.Since(t0).Round(time.Millisecond))
	if !spec.DeferCode {
		// A program's own start: it takes its code now, as a spare would.
		if err := i.LoadCode(ctx, spec); err != nil {
			_ = started.Stop(context.WithoutCancel(ctx))
			return nil, false, err
		}
	}
	return started, false, nil
}

// startAndCheckpoint starts spec (a spare) afresh with the agent holding,
// and makes key's image from it in the background (the caller claimed
// it); the agent is released once the checkpoint is written.
func (b *Backend) startAndCheckpoint(ctx context.Context, spec backend.Spec, key string, log *slog.Logger) (backend.Instance, bool, error) {
	i := newInstance(b, spec, log)
	i.hold = true
	i.held = newHeldChannel()
	started, err := backend.Start(ctx, "gvisor", spec, log, i)
	if err != nil {
		_ = b.snaps.make(ctx, key, func(context.Context, string) error { return err })
		return nil, false, err
	}
	go func() {
		// The spare's start has returned, so its deadline no longer bounds
		// this; the hold's does, and Stop (closing the pipes) ends it.
		hctx, cancel := context.WithTimeout(context.Background(), holdTimeout)
		defer cancel()
		err := b.snaps.make(hctx, key, func(ctx context.Context, dir string) error {
			if err := i.awaitHeld(ctx); err != nil {
				return err
			}
			if i.adopted.Load() {
				// A program took the spare while it warmed: it is not kept
				// waiting for a checkpoint; the next spare makes one.
				return errSnapshotSkipped
			}
			out, err := b.runscCmd(ctx, "checkpoint", "--leave-running", "--image-path", dir, i.id).CombinedOutput()
			if err != nil {
				return fmt.Errorf("runsc checkpoint: %w: %s", err, bytes.TrimSpace(out))
			}
			return nil
		})
		if err != nil && !i.Exited() && !errors.Is(err, errSnapshotSkipped) {
			log.Warn("could not checkpoint a warm sandbox; this shape starts afresh for a while", "err", err,
				"retry_after", snapshotRetryAfter)
		}
		if !i.heldSeen {
			// The agent never said it was warm: whatever it writes later
			// would reach the session as garbage, so the sandbox goes.
			if i.Halt(fmt.Errorf("the agent did not get warm: %w", err)) {
				_ = started.Stop(context.Background())
			}
			i.held.abandon()
			return
		}
		if err := i.held.release(i.stdin, []byte("\n")); err != nil {
			log.Debug("releasing the agent after the checkpoint", "err", err)
		}
	}()
	return started, false, nil
}

// awaitHeld reads the agent's hold line from a sandbox started to be
// checkpointed.
func (i *instance) awaitHeld(ctx context.Context) error {
	got, err := i.readEarly(ctx, len(guest.HoldReadyLine))
	if err != nil {
		return fmt.Errorf("waiting for the warm agent: %w%s", err, i.lastWords())
	}
	if string(got) != guest.HoldReadyLine {
		return fmt.Errorf("waiting for the warm agent: it said %q", got)
	}
	i.heldSeen = true
	return nil
}

// awaitRestore releases a restored agent from its hold and waits for its
// first bytes (its session's first frame), proof that the restore worked.
// They are kept for the channel's reader.
func (i *instance) awaitRestore(ctx context.Context, limit time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	if _, err := i.stdin.Write([]byte("\n")); err != nil {
		return fmt.Errorf("releasing the restored agent: %w", err)
	}
	got, err := i.readEarly(ctx, 1)
	if err != nil {
		return fmt.Errorf("waiting for the restored agent: %w%s", err, i.lastWords())
	}
	i.early = got
	return nil
}

// readEarly reads exactly n bytes from the agent's stdout before the
// channel is handed out, bounded by ctx and by the sandbox's exit.
func (i *instance) readEarly(ctx context.Context, n int) ([]byte, error) {
	stop := context.AfterFunc(ctx, func() { _ = i.stdout.SetReadDeadline(time.Now()) })
	defer stop()
	go func() {
		select {
		case <-i.Done():
			_ = i.stdout.SetReadDeadline(time.Now())
		case <-ctx.Done():
		}
	}()
	buf := make([]byte, n)
	_, err := io.ReadFull(i.stdout, buf)
	_ = i.stdout.SetReadDeadline(time.Time{})
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		select {
		case <-i.Done():
			return nil, fmt.Errorf("the sandbox exited: %w", errors.Join(i.Err(), err))
		default:
		}
		return nil, err
	}
	return buf, nil
}
