package volimage

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

func TestPersistentPath(t *testing.T) {
	for _, tc := range []struct {
		n           int
		name, mount string
		want        string
	}{
		{0, "sqlite", "/var/lib/sqlite", "sqlite"},
		{0, "", "/var/lib/sqlite", "var_lib_sqlite"},
		{1, "", "/data/", "data"},
		{2, "", "", "volume-2"},
		{3, "", "/a b/c", "a_b_c"},
		{4, "", "/..", "volume-4"},
		{5, "../escape", "/x", "x"},
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

	if err := EnsurePersistent(ctx, "", img, "/data", 4, true); !errkind.Is(err, errkind.ResourceMissing) {
		t.Errorf("missing read-only volume: %v", err)
	}
	if err := EnsurePersistent(ctx, "", img, "/data", 0, false); !errkind.Is(err, errkind.InvalidInput) {
		t.Errorf("no size: %v", err)
	}
	if err := EnsurePersistent(ctx, "", img, "/data", 4, false); err != nil {
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
	if err := EnsurePersistent(ctx, "", img, "/data", 8, false); err != nil {
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
	err = EnsurePersistent(ctx, "", legacyDir+".ext4", "/old", 4, false)
	if !errkind.Is(err, errkind.Unsupported) || !strings.Contains(err.Error(), "mkfs.ext4 -q -d "+legacyDir) {
		t.Errorf("legacy directory beside the image: %v", err)
	}
	if _, err := os.Stat(legacyDir + ".ext4"); !os.IsNotExist(err) {
		t.Error("an image was made beside a legacy directory")
	}
	if err := EnsurePersistent(ctx, "", legacyDir, "/old", 4, false); !errkind.Is(err, errkind.Unsupported) {
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
