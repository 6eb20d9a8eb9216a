package codeprep

import (
	"archive/zip"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// must fails the test when a setup step fails.
func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func extractZipFile(t *testing.T, p string, lim Limits) (string, error) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "out")
	return dir, Extract(context.Background(), dir, Source{Path: p, Encoding: message.EncodingZip}, lim)
}

func wantRefused(t *testing.T, err error, kind errkind.Kind) {
	t.Helper()
	if !errors.Is(err, ErrUnsafeArchive) || !errkind.Is(err, kind) {
		t.Fatalf("want an unsafe archive error of kind %s, got %v", kind, err)
	}
}

// countTree counts entries below dir (dir excluded).
func countTree(t *testing.T, dir string) int {
	t.Helper()
	n := 0
	// The callback never fails: entries it cannot see are not counted.
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && p != dir {
			n++
		}
		return nil
	})
	return n
}

// A zip of many deep paths: every implicit directory counts, so the
// extraction stops at the entry limit, not at the archive's own count.
func TestZipDirectoryBomb(t *testing.T) {
	skipIfShort(t)
	var entries []zipEntry
	deep := strings.Repeat("d/", 40)
	for i := range 2000 {
		entries = append(entries, zipEntry{name: fmt.Sprintf("b%d/%sf", i, deep), body: ""})
	}
	p := writeZip(t, entries)
	fi, _ := os.Stat(p)
	lim := Limits{MaxFiles: 10_000}
	dir, err := extractZipFile(t, p, lim)
	wantRefused(t, err, errkind.TooLarge)
	if n := countTree(t, dir); n > lim.MaxFiles {
		t.Errorf("%d entries made on disk (limit %d)", n, lim.MaxFiles)
	}
	t.Logf("zip of %d bytes, %d entries, would make %d directories: refused: %v", fi.Size(), len(entries), len(entries)*41, err)
}

func TestZipNames(t *testing.T) {
	for name, c := range map[string]struct {
		entries []zipEntry
		kind    errkind.Kind
	}{
		"too deep":          {[]zipEntry{{name: strings.Repeat("d/", 100) + "f"}}, errkind.InvalidInput},
		"too long":          {[]zipEntry{{name: strings.Repeat("x", 200) + "/" + strings.Repeat("y", 250) + "/" + strings.Repeat("z", 250) + "/" + strings.Repeat("w", 250) + "/" + strings.Repeat("v", 250)}}, errkind.InvalidInput},
		"newline":           {[]zipEntry{{name: "a\nb"}}, errkind.InvalidInput},
		"escape char":       {[]zipEntry{{name: "a\x1b[2Jb"}}, errkind.InvalidInput},
		"duplicate":         {[]zipEntry{{name: "a", body: "1"}, {name: "a", body: "2"}}, errkind.InvalidInput},
		"file then dir":     {[]zipEntry{{name: "a", body: "1"}, {name: "a/b", body: "2"}}, errkind.InvalidInput},
		"dotdot inside":     {[]zipEntry{{name: "a/../../b"}}, errkind.InvalidInput},
		"link target ctrl":  {[]zipEntry{{name: "l", body: "a\nb", mode: os.ModeSymlink | 0o777}}, errkind.InvalidInput},
		"fifo":              {[]zipEntry{{name: "p", mode: os.ModeNamedPipe | 0o644}}, errkind.InvalidInput},
		"device":            {[]zipEntry{{name: "null", mode: os.ModeDevice | os.ModeCharDevice | 0o666}}, errkind.InvalidInput},
		"many empty files":  {manyEmpty(300), errkind.TooLarge},
		"bytes of metadata": {manyEmpty(200), errkind.TooLarge},
	} {
		t.Run(name, func(t *testing.T) {
			lim := Limits{}
			if strings.HasPrefix(name, "many") {
				lim.MaxFiles = 100
			}
			if strings.HasPrefix(name, "bytes") {
				lim.MaxBytes = 100 * entryCost
			}
			_, err := extractZipFile(t, writeZip(t, c.entries), lim)
			wantRefused(t, err, c.kind)
		})
	}
}

func manyEmpty(n int) []zipEntry {
	var e []zipEntry
	for i := range n {
		e = append(e, zipEntry{name: fmt.Sprintf("f%d", i)})
	}
	return e
}

// Each link looks local on its own; resolved for real, the chain leaves
// the tree. Lexical checks let these through.
func TestZipLinkChains(t *testing.T) {
	for name, entries := range map[string][]zipEntry{
		"through a link to the root": {
			{name: "s", body: ".", mode: os.ModeSymlink | 0o777},
			{name: "esc", body: "s/../etc/passwd", mode: os.ModeSymlink | 0o777},
		},
		"through a link to the parent": {
			{name: "d/f", body: "x"},
			{name: "d/up", body: "..", mode: os.ModeSymlink | 0o777},
			{name: "esc", body: "d/up/../etc", mode: os.ModeSymlink | 0o777},
		},
		"two hops": {
			{name: "a/b/f", body: "x"},
			{name: "a/b/top", body: "../..", mode: os.ModeSymlink | 0o777},
			{name: "a/hop", body: "b/top", mode: os.ModeSymlink | 0o777},
			{name: "esc", body: "a/hop/../x", mode: os.ModeSymlink | 0o777},
		},
	} {
		t.Run(name, func(t *testing.T) {
			for _, e := range entries {
				if e.mode&os.ModeSymlink != 0 {
					if err := checkLink(e.name, e.body); err != nil {
						t.Fatalf("the lexical check alone already refuses %s -> %s: not the case under test", e.name, e.body)
					}
				}
			}
			_, err := extractZipFile(t, writeZip(t, entries), Limits{})
			wantRefused(t, err, errkind.InvalidInput)
			if !strings.Contains(err.Error(), "does not resolve inside") {
				t.Errorf("refused for another reason: %v", err)
			}
		})
	}
	// A chain that stays inside is kept.
	dir, err := extractZipFile(t, writeZip(t, []zipEntry{
		{name: "d/f", body: "ok"},
		{name: "d/self", body: ".", mode: os.ModeSymlink | 0o777},
		{name: "g", body: "d/self/self/f", mode: os.ModeSymlink | 0o777},
		{name: "dangling", body: "nowhere", mode: os.ModeSymlink | 0o777},
	}), Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "g")); err != nil || string(b) != "ok" {
		t.Errorf("inner chain: %q, %v", b, err)
	}
}

// assertNormalised checks modes and owners of every entry below dir.
func assertNormalised(t *testing.T, dir string) {
	t.Helper()
	// The callback reports each error itself and goes on.
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			t.Error(err)
			return nil
		}
		fi, err := os.Lstat(p)
		if err != nil {
			t.Error(err)
			return nil
		}
		st := fi.Sys().(*syscall.Stat_t)
		if os.Geteuid() == 0 && (st.Uid != 0 || st.Gid != 0) {
			t.Errorf("%s owned by %d:%d", p, st.Uid, st.Gid)
		}
		m := fi.Mode()
		switch {
		case m.IsDir():
			if m&(fs.ModePerm|fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky) != 0o755 {
				t.Errorf("directory %s has mode %v", p, m)
			}
		case m.IsRegular():
			if perm := m & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky); perm != 0o644 && perm != 0o755 {
				t.Errorf("file %s has mode %v", p, m)
			}
		case m&fs.ModeSymlink != 0:
		default:
			t.Errorf("%s is a %v", p, m.Type())
		}
		return nil
	})
}

func TestZipModesNormalised(t *testing.T) {
	dir, err := extractZipFile(t, writeZip(t, []zipEntry{
		{name: "open/", mode: os.ModeDir | 0o777},
		{name: "open/world", body: "w", mode: 0o666},
		{name: "suid", body: "s", mode: os.ModeSetuid | 0o4777},
		{name: "sticky/", mode: os.ModeDir | os.ModeSticky | 0o1777},
		{name: "private", body: "p", mode: 0o600},
	}), Limits{})
	if err != nil {
		t.Fatal(err)
	}
	assertNormalised(t, dir)
	for name, want := range map[string]fs.FileMode{"open/world": 0o644, "suid": 0o755, "private": 0o644} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.Mode() != want {
			t.Errorf("%s: mode %v (%v), want %v", name, fi.Mode(), err, want)
		}
	}
}

func TestZipHonoursContext(t *testing.T) {
	// 64 entries of 4 MiB of zeros: some seconds of inflating and writing.
	p := filepath.Join(t.TempDir(), "big.zip")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	zw := zip.NewWriter(f)
	zero := make([]byte, 4<<20)
	for i := range 64 {
		w, _ := zw.Create(fmt.Sprintf("z%d", i))
		if _, err := w.Write(zero); err != nil {
			t.Fatal(err)
		}
	}
	zw.Close()
	f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	err = Extract(ctx, filepath.Join(t.TempDir(), "out"), Source{Path: p, Encoding: message.EncodingZip}, Limits{})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("want the deadline, got %v", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("extraction went on for %s after a 50ms deadline", d)
	}
}

func needSquashfsTools(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"mksquashfs", "unsquashfs"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s missing in CI", tool)
			}
			t.Skipf("%s not installed", tool)
		}
	}
}

// skipIfShort skips the attacks that take many seconds (gigabytes of
// sparse data, tens of thousands of entries) in -short mode.
func skipIfShort(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("slow attack: skipped with -short")
	}
}

func needRoot(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs root: skipped with -short")
	}
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("this test needs root in CI (mknod, chown)")
		}
		t.Skip("needs root")
	}
}

// mksquashfs packs src into an image and returns its path.
func mksquashfs(t *testing.T, src string, args ...string) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "code.squashfs")
	cmd := exec.Command("mksquashfs", append([]string{src, img, "-noappend", "-quiet", "-no-progress"}, args...)...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("mksquashfs: %v: %s", err, out)
	}
	return img
}

func extractSquashfsImage(t *testing.T, img string, lim Limits) (string, error) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "out")
	return dir, Extract(context.Background(), dir, Source{Path: img, Encoding: message.EncodingSquashfs}, lim)
}

// A name holding a newline and the look of a listing line with a negative
// size used to cancel out a 3 GiB sparse file.
func TestSquashfsForgedListing(t *testing.T) {
	needSquashfsTools(t)
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "x\n-rw-r--r-- 0 -3221225472 2024-01-01 00:00 squashfs-root"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	img := mksquashfs(t, src)
	dir, err := extractSquashfsImage(t, img, Limits{})
	wantRefused(t, err, errkind.InvalidInput)
	if _, serr := os.Stat(dir); serr == nil {
		t.Error("refused from the listing, yet something was extracted")
	}
	t.Logf("refused: %v", err)
}

// A 3 GiB sparse file fits in a 4 KiB image; its apparent size counts.
func TestSquashfsSparseFile(t *testing.T) {
	skipIfShort(t)
	needSquashfsTools(t)
	src := t.TempDir()
	if err := os.Truncate(filepath.Join(src, "sparse"), 0); err == nil {
		t.Fatal("unexpected")
	}
	f, err := os.Create(filepath.Join(src, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	must(t, f.Truncate(3<<30))
	f.Close()
	img := mksquashfs(t, src)
	fi, _ := os.Stat(img)
	start := time.Now()
	dir, err := extractSquashfsImage(t, img, Limits{})
	wantRefused(t, err, errkind.TooLarge)
	if _, serr := os.Stat(dir); serr == nil {
		t.Error("refused from the listing, yet something was extracted")
	}
	t.Logf("image of %d bytes with a 3 GiB sparse file: refused in %s: %v", fi.Size(), time.Since(start).Round(time.Millisecond), err)
}

// heapPeak returns how far above its level before f the live heap stayed
// while f ran: the highest level that three collections in a row found
// live. One collection counts as live everything allocated while it marks,
// so under load a single reading can be tens of MiB of garbage (a CI run
// saw +37 MiB where +4 MiB was held); memory really held stays across
// collections.
func heapPeak(f func()) uint64 {
	runtime.GC()
	sample := []metrics.Sample{{Name: "/gc/heap/live:bytes"}, {Name: "/gc/cycles/total:gc-cycles"}}
	metrics.Read(sample)
	base, lastCycle := sample[0].Value.Uint64(), sample[1].Value.Uint64()
	var levels []uint64
	done := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		t := time.NewTicker(200 * time.Microsecond)
		defer t.Stop()
		for {
			metrics.Read(sample)
			if c := sample[1].Value.Uint64(); c != lastCycle {
				lastCycle = c
				levels = append(levels, sample[0].Value.Uint64())
			}
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	f()
	close(done)
	<-sampled
	var peak uint64
	for i := range levels {
		held := levels[i]
		for _, l := range levels[i:min(i+3, len(levels))] {
			held = min(held, l)
		}
		peak = max(peak, held)
	}
	if peak > base {
		return peak - base
	}
	return 0
}

// 60,000 hard links under a long path: a listing of tens of MiB, read as
// a stream.
func TestSquashfsListingBomb(t *testing.T) {
	skipIfShort(t)
	needSquashfsTools(t)
	src := t.TempDir()
	long := filepath.Join(src, strings.Repeat(strings.Repeat("p", 30)+"/", 25))
	if err := os.MkdirAll(long, 0o755); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(long, "f")
	if err := os.WriteFile(target, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	for i := range 60_000 {
		if err := os.Link(target, filepath.Join(long, fmt.Sprintf("link-%05d-%s", i, strings.Repeat("n", 150)))); err != nil {
			t.Fatal(err)
		}
	}
	img := mksquashfs(t, src)
	fi, _ := os.Stat(img)
	unsquashfs, _ := exec.LookPath("unsquashfs")

	// Room for all 60,000 entries, so that the whole listing is read.
	roomy := Limits{MaxFiles: 100_000}.withDefaults()

	// The listing as the supervisor reads it: memory stays flat.
	var listErr error
	peak := heapPeak(func() {
		listErr = checkSquashfs(context.Background(), unsquashfs, img, roomy)
	})
	if listErr != nil {
		t.Fatalf("a listing within the limits was refused: %v", listErr)
	}
	const bound = 16 << 20
	if peak > bound {
		t.Errorf("reading the listing raised the heap by %d MiB (bound %d MiB)", peak>>20, bound>>20)
	}
	t.Logf("image of %d KiB, 60,000 hard links of %d-byte paths: listing read with a heap peak of +%d KiB", fi.Size()>>10, len(long)-len(src)+160, peak>>10)

	// Within the limits the whole extraction (listing, unsquashfs, the
	// checking walk) stays bounded too.
	var extractErr error
	start := time.Now()
	peak = heapPeak(func() {
		_, extractErr = extractSquashfsImage(t, img, roomy)
	})
	if extractErr != nil {
		t.Fatal(extractErr)
	}
	if peak > bound {
		t.Errorf("extracting raised the heap by %d MiB (bound %d MiB)", peak>>20, bound>>20)
	}
	t.Logf("extracted in %s with a heap peak of +%d KiB", time.Since(start).Round(time.Millisecond), peak>>10)

	// Above the entry limit: refused, the lister killed early.
	start = time.Now()
	_, err := extractSquashfsImage(t, img, Limits{MaxFiles: 1000})
	wantRefused(t, err, errkind.TooLarge)
	t.Logf("with 1000 entries allowed: refused in %s", time.Since(start).Round(time.Millisecond))

	// A deadline stops the listing and the extraction.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	start = time.Now()
	err = Extract(ctx, filepath.Join(t.TempDir(), "out"), Source{Path: img, Encoding: message.EncodingSquashfs}, roomy)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("want the deadline, got %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("went on for %s after a 20ms deadline", d)
	}
}

func TestSquashfsHostile(t *testing.T) {
	needSquashfsTools(t)
	needRoot(t)
	for name, c := range map[string]struct {
		build func(t *testing.T, src string)
		kind  errkind.Kind
	}{
		"device node": {func(t *testing.T, src string) {
			if err := syscall.Mknod(filepath.Join(src, "mem"), syscall.S_IFCHR|0o666, 1<<8|1); err != nil {
				t.Fatal(err)
			}
		}, errkind.InvalidInput},
		"block device": {func(t *testing.T, src string) {
			if err := syscall.Mknod(filepath.Join(src, "sda"), syscall.S_IFBLK|0o666, 8<<8); err != nil {
				t.Fatal(err)
			}
		}, errkind.InvalidInput},
		"absolute link": {func(t *testing.T, src string) {
			must(t, os.Symlink("/etc/shadow", filepath.Join(src, "l")))
		}, errkind.InvalidInput},
		"link out": {func(t *testing.T, src string) {
			must(t, os.Symlink("../../../etc/shadow", filepath.Join(src, "l")))
		}, errkind.InvalidInput},
		"link chain out": {func(t *testing.T, src string) {
			must(t, os.Mkdir(filepath.Join(src, "d"), 0o755))
			must(t, os.Symlink("..", filepath.Join(src, "d", "up")))
			must(t, os.Symlink("d/up/../etc", filepath.Join(src, "esc")))
		}, errkind.InvalidInput},
		"deep directories": {func(t *testing.T, src string) {
			must(t, os.MkdirAll(filepath.Join(src, strings.Repeat("d/", 100)), 0o755))
		}, errkind.InvalidInput},
		"directory bomb": {func(t *testing.T, src string) {
			for i := range 3000 {
				must(t, os.Mkdir(filepath.Join(src, fmt.Sprint(i)), 0o755))
			}
		}, errkind.TooLarge},
		"control character": {func(t *testing.T, src string) {
			must(t, os.WriteFile(filepath.Join(src, "bell\a"), nil, 0o644))
		}, errkind.InvalidInput},
	} {
		t.Run(name, func(t *testing.T) {
			src := t.TempDir()
			must(t, os.WriteFile(filepath.Join(src, "main.py"), []byte("app = 1\n"), 0o644))
			c.build(t, src)
			dir, err := extractSquashfsImage(t, mksquashfs(t, src), Limits{MaxFiles: 2000})
			wantRefused(t, err, c.kind)
			if _, serr := os.Stat(dir); serr == nil && name != "link chain out" {
				t.Error("refused from the listing, yet something was extracted")
			}
		})
	}
}

// Set-id bits, foreign owners and world-writable modes do not reach the
// host cache.
func TestSquashfsNormalised(t *testing.T) {
	needSquashfsTools(t)
	needRoot(t)
	src := t.TempDir()
	must(t, os.Chmod(src, 0o777))
	for name, mode := range map[string]fs.FileMode{"suid": 0o4755, "sgid": 0o2711, "world": 0o666, "none": 0} {
		p := filepath.Join(src, name)
		must(t, os.WriteFile(p, []byte(name), 0o600))
		must(t, os.Chown(p, 1234, 5678))
		must(t, os.Chmod(p, mode|fs.FileMode(0))) // os.Chmod takes the set-id bits from fs modes
		must(t, syscall.Chmod(p, uint32(mode)))
	}
	must(t, os.Mkdir(filepath.Join(src, "tmp"), 0o777))
	must(t, syscall.Chmod(filepath.Join(src, "tmp"), 0o1777))
	must(t, os.Chown(filepath.Join(src, "tmp"), 99, 99))
	must(t, os.Symlink("suid", filepath.Join(src, "link")))
	must(t, os.Lchown(filepath.Join(src, "link"), 42, 42))
	img := mksquashfs(t, src)
	dir, err := extractSquashfsImage(t, img, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	assertNormalised(t, dir)
	for name, want := range map[string]fs.FileMode{"suid": 0o755, "sgid": 0o755, "world": 0o644, "none": 0o644} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.Mode() != want {
			t.Errorf("%s: mode %v (%v), want %v", name, fi.Mode(), err, want)
		}
	}
}

// A refused code is remembered: the second request gets the same error
// without a new extraction (here: the file was replaced by a good one
// with the same hash, and is still refused), until the TTL passes.
func TestCacheRemembersRefusals(t *testing.T) {
	c, err := OpenCache(t.TempDir(), CacheOptions{FailureTTL: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	bad := writeZip(t, []zipEntry{{name: "a\nb"}})
	src := Source{Path: bad, Hash: "h-bad", Encoding: message.EncodingZip}
	_, err1 := c.Acquire(context.Background(), src)
	wantRefused(t, err1, errkind.InvalidInput)

	good := writeZip(t, []zipEntry{{name: "main.py", body: "app = 1\n"}})
	b, _ := os.ReadFile(good)
	must(t, os.WriteFile(bad, b, 0o644))
	_, err2 := c.Acquire(context.Background(), src)
	if err2 == nil || err2.Error() != err1.Error() {
		t.Fatalf("second request: %v, want the remembered %v", err2, err1)
	}
	time.Sleep(350 * time.Millisecond)
	l, err := c.Acquire(context.Background(), src)
	if err != nil {
		t.Fatalf("after the TTL: %v", err)
	}
	l.Release()

	// Passing errors (the file missing) are not remembered.
	gone := Source{Path: filepath.Join(t.TempDir(), "nope"), Hash: "h-gone", Encoding: message.EncodingZip}
	if _, err := c.Acquire(context.Background(), gone); !errkind.Is(err, errkind.ResourceMissing) {
		t.Fatal(err)
	}
	must(t, os.WriteFile(gone.Path, b, 0o644))
	if l, err := c.Acquire(context.Background(), gone); err != nil {
		t.Fatalf("a missing file was remembered: %v", err)
	} else {
		l.Release()
	}
}

// The cache stays under its size by removing least recently used trees,
// never one in use.
func TestCacheEviction(t *testing.T) {
	dir := t.TempDir()
	// Each tree: 40 KiB of data plus the directory.
	mk := func(i int) Source {
		return Source{Path: writeZip(t, []zipEntry{{name: "data", body: strings.Repeat(fmt.Sprint(i), 40<<10)}}), Hash: fmt.Sprintf("h%d", i), Encoding: message.EncodingZip}
	}
	c, err := OpenCache(dir, CacheOptions{MaxBytes: 100 << 10})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	inUse, err := c.Acquire(ctx, mk(0))
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 4; i++ {
		l, err := c.Acquire(ctx, mk(i))
		if err != nil {
			t.Fatal(err)
		}
		l.Release()
		time.Sleep(10 * time.Millisecond)
	}
	if _, err := os.Stat(filepath.Join(inUse.Path, "data")); err != nil {
		t.Fatalf("a tree in use was evicted: %v", err)
	}
	if c.Size() > 100<<10 {
		t.Errorf("cache holds %d bytes, above its 100 KiB", c.Size())
	}
	present := func(i int) bool {
		_, err := os.Stat(filepath.Join(dir, fmt.Sprintf("h%d.zip", i)))
		return err == nil
	}
	if !present(4) || present(1) {
		t.Errorf("want the newest kept and the oldest unused evicted: h1 %v, h4 %v", present(1), present(4))
	}
	inUse.Release()

	// A new process finds the trees, drops leftovers and keeps the cap.
	must(t, os.Mkdir(filepath.Join(dir, ".tmp-crashed"), 0o700))
	c2, err := OpenCache(dir, CacheOptions{MaxBytes: 50 << 10})
	if err != nil {
		t.Fatal(err)
	}
	if c2.Size() > 50<<10 {
		t.Errorf("reopened cache holds %d bytes, above 50 KiB", c2.Size())
	}
	time.Sleep(100 * time.Millisecond) // background removal
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") {
			t.Errorf("leftover %s", e.Name())
		}
	}
}

// Spares get the cached tree by hard links; across file systems a copy
// keeps holes.
func TestLinkTreeAndSparseCopy(t *testing.T) {
	src := t.TempDir()
	must(t, os.MkdirAll(filepath.Join(src, "pkg"), 0o755))
	must(t, os.WriteFile(filepath.Join(src, "pkg", "main.py"), []byte("app = 1\n"), 0o644))
	must(t, os.Symlink("pkg/main.py", filepath.Join(src, "alias.py")))
	f, _ := os.Create(filepath.Join(src, "sparse"))
	if _, err := f.WriteAt([]byte("head"), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("tail"), 1<<30); err != nil {
		t.Fatal(err)
	}
	f.Close()

	dst := t.TempDir()
	if err := LinkTree(context.Background(), src, dst); err != nil {
		t.Fatal(err)
	}
	a, _ := os.Stat(filepath.Join(src, "pkg", "main.py"))
	b, err := os.Stat(filepath.Join(dst, "pkg", "main.py"))
	if err != nil || !os.SameFile(a, b) {
		t.Errorf("not hard-linked: %v", err)
	}
	if target, err := os.Readlink(filepath.Join(dst, "alias.py")); err != nil || target != "pkg/main.py" {
		t.Errorf("link: %q, %v", target, err)
	}

	sroot, _ := os.OpenRoot(src)
	defer sroot.Close()
	dst2 := t.TempDir()
	droot, _ := os.OpenRoot(dst2)
	defer droot.Close()
	if err := copySparse(context.Background(), sroot, droot, "sparse"); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dst2, "sparse"))
	if err != nil || fi.Size() != 1<<30+4 {
		t.Fatalf("copy: %v, %v", fi, err)
	}
	if blocks := fi.Sys().(*syscall.Stat_t).Blocks * 512; blocks > 1<<20 {
		t.Errorf("1 GiB sparse file copied to %d bytes on disk", blocks)
	}
	cf, err := os.Open(filepath.Join(dst2, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	defer cf.Close()
	head, tail := make([]byte, 4), make([]byte, 4)
	if _, err := cf.ReadAt(head, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := cf.ReadAt(tail, 1<<30); err != nil {
		t.Fatal(err)
	}
	if string(head) != "head" || string(tail) != "tail" {
		t.Errorf("sparse copy lost data: %q %q", head, tail)
	}
}
