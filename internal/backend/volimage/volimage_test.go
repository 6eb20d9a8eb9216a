package volimage

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// TestPersistentPath pins aleph-vm's file names (storage.py
// get_volume_path, executable.py download_volumes): the name as it is when
// it holds only letters, digits, "_" and "-", else each other character
// as "_"; unamed_volume_<i> (sic, i counting every volume) without one;
// the mount point plays no part.
func TestPersistentPath(t *testing.T) {
	for _, tc := range []struct {
		n           int
		name, mount string
		want        string
	}{
		{0, "sqlite", "/var/lib/sqlite", "sqlite"},
		{0, "my-db_2", "/x", "my-db_2"},
		{1, "my.db", "/x", "my_db"},
		{0, "", "/var/lib/sqlite", "unamed_volume_0"},
		{3, "", "", "unamed_volume_3"},
		{5, "../escape", "/x", "___escape"},
	} {
		got, err := PersistentPath("/pv", "hash1", tc.n, tc.name, tc.mount)
		if err != nil {
			t.Fatal(err)
		}
		if want := "/pv/hash1/" + tc.want + ".ext4"; got != want {
			t.Errorf("PersistentPath(%d, %q, %q) = %q, want %q", tc.n, tc.name, tc.mount, got, want)
		}
	}
	if _, err := PersistentPath("/pv", "../x", 0, "a", "/a"); !errkind.Is(err, errkind.InvalidInput) {
		t.Errorf("unusable hash: %v", err)
	}
	if _, err := PersistentPath("", "h", 0, "a", "/a"); !errkind.Is(err, errkind.InvalidInput) {
		t.Errorf("no directory: %v", err)
	}
}

// TestLegacyPaths: the names earlier versions gave (the name with its dot,
// a mount-derived name without one); none when they equal upstream's.
func TestLegacyPaths(t *testing.T) {
	for _, tc := range []struct {
		n           int
		name, mount string
		want        []string
	}{
		{0, "sqlite", "/var/lib/sqlite", nil},
		{1, "my.db", "/x", []string{"/pv/h/my.db.ext4"}},
		{0, "", "/var/lib/sqlite", []string{"/pv/h/var_lib_sqlite.ext4"}},
		{2, "", "", []string{"/pv/h/volume-2.ext4"}},
	} {
		got := LegacyPaths("/pv", "h", tc.n, tc.name, tc.mount)
		if strings.Join(got, ",") != strings.Join(tc.want, ",") {
			t.Errorf("LegacyPaths(%d, %q, %q) = %q, want %q", tc.n, tc.name, tc.mount, got, tc.want)
		}
	}
}

// TestEnsurePersistentMovesLegacy: an image under an earlier version's
// name is moved, with its data, to upstream's name; an image already at
// upstream's name is never replaced by a legacy one.
func TestEnsurePersistentMovesLegacy(t *testing.T) {
	dir := t.TempDir()
	image := filepath.Join(dir, "h", "my_db.ext4")
	old := filepath.Join(dir, "h", "my.db.ext4")
	if err := os.MkdirAll(filepath.Dir(old), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(old, []byte("old volume"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	// mkfs "false": anything but a move would fail.
	if err := EnsurePersistent(ctx, "false", image, "/db", 4, false, Origin{OldPaths: []string{old}}); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(image); err != nil || string(b) != "old volume" {
		t.Fatalf("moved image = %q, %v; want the old volume's bytes", b, err)
	}
	if _, err := os.Lstat(old); !os.IsNotExist(err) {
		t.Fatalf("legacy image still there: %v", err)
	}
	// Both present: the new one wins, the legacy one stays untouched.
	if err := os.WriteFile(old, []byte("stale"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := EnsurePersistent(ctx, "false", image, "/db", 4, false, Origin{OldPaths: []string{old}}); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(image); string(b) != "old volume" {
		t.Fatalf("image replaced: %q", b)
	}
	if b, _ := os.ReadFile(old); string(b) != "stale" {
		t.Fatalf("legacy image changed: %q", b)
	}
}

func requireTools(t *testing.T) {
	t.Helper()
	for _, bin := range []string{"mkfs.ext4", "e2fsck"} {
		if _, err := exec.LookPath(bin); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s missing (e2fsprogs)", bin)
			}
			t.Skipf("%s missing (e2fsprogs)", bin)
		}
	}
}

func TestEnsurePersistent(t *testing.T) {
	requireTools(t)
	ctx := context.Background()
	dir := t.TempDir()
	img := filepath.Join(dir, "prog", "data.ext4")

	if err := EnsurePersistent(ctx, "", img, "/data", 4, true, Origin{}); !errkind.Is(err, errkind.ResourceMissing) {
		t.Errorf("missing read-only volume: %v", err)
	}
	if err := EnsurePersistent(ctx, "", img, "/data", 0, false, Origin{}); !errkind.Is(err, errkind.InvalidInput) {
		t.Errorf("no size: %v", err)
	}
	if err := EnsurePersistent(ctx, "", img, "/data", 4, false, Origin{}); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(img, &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != 4<<20 || st.Blocks*512 >= st.Size || st.Mode&0o077 != 0 {
		t.Errorf("image: size %d, %d bytes allocated, mode %o; want 4 MiB, sparse, 0600", st.Size, st.Blocks*512, st.Mode&0o777)
	}
	if err := Check(ctx, "", img); err != nil {
		t.Errorf("fresh image fails e2fsck: %v", err)
	}
	// Existing images are used as they are, never formatted over.
	f, err := os.OpenFile(img, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.WriteAt([]byte("MARK"), 4<<20-4)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := EnsurePersistent(ctx, "", img, "/data", 8, false, Origin{}); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(img); string(b[len(b)-4:]) != "MARK" {
		t.Error("existing image was recreated")
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "prog", ".*")); len(left) > 0 {
		t.Errorf("temporary files left: %v", left)
	}

	// A directory of an earlier version, at the image's place or beside it.
	legacyDir := filepath.Join(dir, "prog", "old")
	if err := os.MkdirAll(legacyDir, 0o700); err != nil {
		t.Fatal(err)
	}
	err = EnsurePersistent(ctx, "", legacyDir+".ext4", "/old", 4, false, Origin{})
	if !errkind.Is(err, errkind.Unsupported) || !strings.Contains(err.Error(), "mkfs.ext4 -q -d "+legacyDir) {
		t.Errorf("legacy directory beside the image: %v", err)
	}
	if _, err := os.Stat(legacyDir + ".ext4"); !os.IsNotExist(err) {
		t.Error("an image was made beside a legacy directory")
	}
	if err := EnsurePersistent(ctx, "", legacyDir, "/old", 4, false, Origin{}); !errkind.Is(err, errkind.Unsupported) {
		t.Errorf("directory as the image: %v", err)
	}
}

func TestCheckRefusesGarbage(t *testing.T) {
	requireTools(t)
	img := filepath.Join(t.TempDir(), "bad.ext4")
	if err := os.WriteFile(img, []byte(strings.Repeat("not a file system", 1<<12)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := Check(context.Background(), "", img); err == nil {
		t.Error("e2fsck accepted garbage")
	}
}

func TestLockIsExclusive(t *testing.T) {
	img := filepath.Join(t.TempDir(), "v.ext4")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	a, err := Acquire(ctx, img)
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	if _, err := Acquire(short, img); !errkind.Is(err, errkind.Conflict) {
		t.Fatalf("second Acquire while held: %v, want a conflict", err)
	}
	// A waiter gets the lock once the holder lets go.
	got := make(chan error, 1)
	go func() {
		l, err := Acquire(ctx, img)
		if err == nil {
			err = l.Release()
		}
		got <- err
	}()
	time.Sleep(100 * time.Millisecond)
	if err := a.Release(); err != nil {
		t.Fatal(err)
	}
	if err := a.Release(); err != nil {
		t.Fatalf("second Release: %v", err)
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("waiter never got the lock")
	}
}

// TestEnsurePersistentFromParent: a new volume with a parent starts as a
// copy of the parent's file system (its files there), grown by size_mib
// as aleph-vm grows it, sparse, the parent untouched; an existing volume
// is never replaced by the parent; a parent that is not ext4 is refused.
func TestEnsurePersistentFromParent(t *testing.T) {
	requireTools(t)
	for _, bin := range []string{"resize2fs", "debugfs", "dumpe2fs"} {
		if _, err := exec.LookPath(bin); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s missing (e2fsprogs)", bin)
			}
			t.Skipf("%s missing (e2fsprogs)", bin)
		}
	}
	ctx := context.Background()
	dir := t.TempDir()
	tree := filepath.Join(dir, "tree")
	if err := os.MkdirAll(filepath.Join(tree, "db"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tree, "db", "seed.txt"), []byte("from the parent image\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	parent := filepath.Join(dir, "parent.ext4")
	if out, err := exec.Command("mkfs.ext4", "-q", "-d", tree, parent, "8M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs: %v: %s", err, out)
	}
	parentBefore, err := os.ReadFile(parent)
	if err != nil {
		t.Fatal(err)
	}

	image := filepath.Join(dir, "vols", "h", "db.ext4")
	if err := EnsurePersistent(ctx, "false", image, "/db", 16, false, Origin{Parent: parent}); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(image)
	if err != nil {
		t.Fatal(err)
	}
	if want := int64(8+16) << 20; fi.Size() != want {
		t.Errorf("image size %d, want %d (parent 8 MiB + size_mib 16)", fi.Size(), want)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if allocated := st.Blocks * 512; allocated >= fi.Size()/2 {
		t.Errorf("image not sparse: %d bytes allocated of %d", allocated, fi.Size())
	}
	out, err := exec.Command("debugfs", "-R", "cat /db/seed.txt", image).Output()
	if err != nil || string(out) != "from the parent image\n" {
		t.Errorf("file of the parent in the volume: %q, %v", out, err)
	}
	out, err = exec.Command("dumpe2fs", "-h", image).Output()
	if err != nil {
		t.Fatal(err)
	}
	// 1 KiB or 4 KiB blocks: the file system fills the whole file.
	var blocks, blockSize int64
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(line, "Block count:"); ok {
			blocks = atoi(t, v)
		}
		if v, ok := strings.CutPrefix(line, "Block size:"); ok {
			blockSize = atoi(t, v)
		}
	}
	if blocks*blockSize != fi.Size() {
		t.Errorf("file system of %d bytes in an image of %d: not resized", blocks*blockSize, fi.Size())
	}
	if after, _ := os.ReadFile(parent); string(after) != string(parentBefore) {
		t.Error("the parent image changed")
	}

	// Existing: kept as it is.
	if err := os.WriteFile(image, []byte("written by the program"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := EnsurePersistent(ctx, "false", image, "/db", 16, false, Origin{Parent: parent}); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(image); string(b) != "written by the program" {
		t.Errorf("existing volume replaced by its parent: %q", b)
	}

	junk := filepath.Join(dir, "junk")
	if err := os.WriteFile(junk, []byte(strings.Repeat("not ext4 ", 1000)), 0o600); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(dir, "vols", "h", "other.ext4")
	if err := EnsurePersistent(ctx, "false", other, "/o", 4, false, Origin{Parent: junk}); !errkind.Is(err, errkind.InvalidInput) {
		t.Errorf("junk parent: %v, want InvalidInput", err)
	}
	if _, err := os.Lstat(other); !os.IsNotExist(err) {
		t.Errorf("a volume was left from a junk parent: %v", err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "vols", "h", TempPrefix+"*")); len(left) != 0 {
		t.Errorf("temporary images left: %v", left)
	}
}

func atoi(t *testing.T, s string) int64 {
	t.Helper()
	var n int64
	if _, err := fmt.Sscan(strings.TrimSpace(s), &n); err != nil {
		t.Fatalf("%q: %v", s, err)
	}
	return n
}
