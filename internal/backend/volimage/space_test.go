package volimage

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func freeMiB(t *testing.T, dir string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Bavail) * int64(st.Bsize) >> 20
}

// Formatting writes little: a 1 GiB volume cost 33 MiB of the host's
// disk before lazy initialisation, a 2 TB one 1.05 GB.
func TestMakeExt4AllocatesLittle(t *testing.T) {
	requireTools(t)
	img := filepath.Join(t.TempDir(), "p", "v.ext4")
	if err := MakeExt4(context.Background(), "", img, 1024, true); err != nil {
		t.Fatal(err)
	}
	got := allocated(t, img)
	t.Logf("1 GiB volume: %d KiB allocated", got>>10)
	if got > 4<<20 {
		t.Errorf("formatting a 1 GiB volume allocated %d KiB, want at most 4 MiB", got>>10)
	}
	if err := Check(context.Background(), "", img); err != nil {
		t.Errorf("lazily formatted image: %v", err)
	}
	left, _ := filepath.Glob(filepath.Join(filepath.Dir(img), ".*"))
	if len(left) > 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

func TestVolumesWeighedAgainstFreeDisk(t *testing.T) {
	requireTools(t)
	t.Cleanup(func() { SetLimits(Limits{}) })
	ctx := context.Background()
	dir := t.TempDir()
	globs := PromiseGlobs(dir, "")

	SetLimits(Limits{MaxSizeMiB: 4096, Globs: globs})
	err := MakeExt4(ctx, "", filepath.Join(dir, "p", "huge.ext4"), 2<<20, true)
	if errkind.HTTPStatus(err) != http.StatusBadRequest || !strings.Contains(err.Error(), "MAX_VOLUME_SIZE_MIB") {
		t.Errorf("2 TiB volume: %v (status %d), want 400 naming MAX_VOLUME_SIZE_MIB", err, errkind.HTTPStatus(err))
	}

	// 1000 MiB of the disk left above the reserve: one 600 MiB volume
	// fits, a second does not, since the first may still grow to 600.
	SetLimits(Limits{ReserveMiB: freeMiB(t, dir) - 1000, Globs: globs})
	first := filepath.Join(dir, "p", "first.ext4")
	if err := MakeExt4(ctx, "", first, 600, true); err != nil {
		t.Fatalf("first volume: %v", err)
	}
	err = MakeExt4(ctx, "", filepath.Join(dir, "p", "second.ext4"), 600, true)
	if errkind.HTTPStatus(err) != http.StatusInsufficientStorage || !strings.Contains(err.Error(), "insufficient storage") {
		t.Errorf("second volume: %v (status %d), want 507", err, errkind.HTTPStatus(err))
	}
	if _, err := os.Stat(filepath.Join(dir, "p", "second.ext4")); err == nil {
		t.Error("the refused volume was made")
	}
	// Deleting the first gives its room back.
	if err := os.Remove(first); err != nil {
		t.Fatal(err)
	}
	if err := MakeExt4(ctx, "", filepath.Join(dir, "p", "second.ext4"), 600, true); err != nil {
		t.Errorf("second volume once the first is gone: %v", err)
	}

	SetLimits(Limits{ReserveMiB: freeMiB(t, dir) + 1, Globs: globs})
	err = EnsurePersistent(ctx, "", filepath.Join(dir, "p", "third.ext4"), "/data", 1, false, Origin{})
	if errkind.HTTPStatus(err) != http.StatusInsufficientStorage {
		t.Errorf("volume beyond the reserve: %v (status %d), want 507", err, errkind.HTTPStatus(err))
	}
}

func TestSweepTemporary(t *testing.T) {
	dir := t.TempDir()
	prog := filepath.Join(dir, "prog")
	if err := os.MkdirAll(prog, 0o700); err != nil {
		t.Fatal(err)
	}
	write := func(name string) string {
		p := filepath.Join(prog, name)
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	crashed := write(TempPrefix + "data.ext4-123")
	older := write(".data.ext4-456")
	volume := write("data.ext4")
	making := write(TempPrefix + "other.ext4-789")
	f, err := os.Open(making)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	if err := SweepTemporary(context.Background(), dir, slog.New(slog.NewTextHandler(io.Discard, nil))); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{crashed, older} {
		if _, err := os.Lstat(p); err == nil {
			t.Errorf("half-made image left: %s", p)
		}
	}
	for _, p := range []string{volume, making} {
		if _, err := os.Lstat(p); err != nil {
			t.Errorf("%s removed: %v", p, err)
		}
	}
}
