package gvisor

import (
	"bufio"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/volimage"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/loopdev"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// imageFile reads a file from an ext4 image with debugfs, without
// mounting it.
func imageFile(t *testing.T, img, path string) string {
	t.Helper()
	out, err := exec.Command("debugfs", "-R", "cat "+path, img).Output()
	if err != nil {
		t.Fatalf("debugfs cat %s: %v", path, err)
	}
	return string(out)
}

// assertImageFree checks that no loop device holds img and that its lock
// is free.
func assertImageFree(t *testing.T, img string) {
	t.Helper()
	if devs, err := loopdev.BackedBy(img); err != nil || len(devs) > 0 {
		t.Errorf("loop devices still on %s: %v %v", img, devs, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	l, err := volimage.Acquire(ctx, img)
	if err != nil {
		t.Errorf("image still locked: %v", err)
		return
	}
	if err := l.Release(); err != nil {
		t.Error(err)
	}
}

// readUntil reads lines from r until one equals marker and returns what
// came before it.
func readUntil(t *testing.T, r io.Reader, marker string, d time.Duration) string {
	t.Helper()
	type res struct {
		out string
		ok  bool
	}
	ch := make(chan res, 1)
	go func() {
		var b strings.Builder
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			if sc.Text() == marker {
				ch <- res{b.String(), true}
				return
			}
			b.WriteString(sc.Text() + "\n")
		}
		ch <- res{b.String(), false}
	}()
	select {
	case got := <-ch:
		if !got.ok {
			t.Fatalf("sandbox ended before %q:\n%s", marker, got.out)
		}
		return got.out
	case <-time.After(2 * time.Minute):
		t.Fatalf("no %q from the sandbox", marker)
		return ""
	}
}

func TestPersistentVolumeImage(t *testing.T) {
	img := filepath.Join(t.TempDir(), "prog", "data.ext4")
	vol := backend.Volume{Mount: "/data", Kind: message.VolumePersistent, Path: img, SizeMiB: 8}
	fill := strings.Join([]string{
		`echo kept > /data/marker`,
		`cp /bin/busybox /data/suid && chmod 4755 /data/suid && echo suid-made`,
		`ln -s /etc/shadow /data/link && echo link-made`,
		`if dd if=/dev/zero of=/data/fill bs=1M count=64 2>/tmp/dd.err; then echo fill-fit; else echo "fill-stopped $(cat /tmp/dd.err | grep -o 'No space left on device' | head -n1)"; fi`,
		`echo "filled=$(wc -c < /data/fill)"`,
		`echo ready`,
		`exec cat`,
	}, "\n")
	env := newEnv(t, "/bin/sh", "-c", fill)
	spec := env.spec(t)
	spec.Volumes = []backend.Volume{vol}
	inst := env.start(t, spec)
	ch, err := inst.Channel(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	out := readUntil(t, ch, "ready", time.Minute)
	t.Logf("sandbox said:\n%s", out)
	for _, want := range []string{"suid-made", "link-made", "fill-stopped No space left on device"} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("missing %q", want)
		}
	}

	// The image has the size asked for and is the only place the writes
	// went: its allocated blocks stay within size_mib.
	var st syscall.Stat_t
	if err := syscall.Stat(img, &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != 8<<20 {
		t.Errorf("image size %d, want %d", st.Size, 8<<20)
	}
	if st.Blocks*512 > 8<<20 {
		t.Errorf("image uses %d bytes on the host, more than its 8 MiB", st.Blocks*512)
	}

	// The host mount is nosuid and nodev: the set-user-id file the program
	// made is there, inert.
	mp := filepath.Join(spec.StateDir, "volumes", "0")
	var sfs unix.Statfs_t
	if err := unix.Statfs(mp, &sfs); err != nil {
		t.Fatal(err)
	}
	if sfs.Flags&unix.ST_NOSUID == 0 || sfs.Flags&unix.ST_NODEV == 0 {
		t.Errorf("host mount of the volume lacks nosuid/nodev: flags %#x", sfs.Flags)
	}
	if fi, err := os.Lstat(filepath.Join(mp, "suid")); err != nil || fi.Mode()&os.ModeSetuid == 0 {
		t.Errorf("the program's set-user-id file: %v, %v (the check above would prove nothing)", fi, err)
	}
	if devs, _ := loopdev.BackedBy(img); len(devs) != 1 {
		t.Errorf("loop devices on the image while running: %v", devs)
	}

	// A second execution cannot have the volume while this one runs.
	other := env.spec(t)
	other.Volumes = []backend.Volume{vol}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	_, err = env.b.Start(ctx, other)
	cancel()
	if !errkind.Is(err, errkind.Conflict) {
		t.Errorf("second execution on a held volume: %v, want a conflict", err)
	}
	if left, _ := os.ReadDir(other.StateDir); len(left) > 0 {
		t.Errorf("the refused execution left files: %v", left)
	}
	if devs, _ := loopdev.BackedBy(img); len(devs) != 1 {
		t.Errorf("loop devices on the image after the refused start: %v", devs)
	}

	stop(t, inst)
	env.assertNothingLeft(t, spec)
	assertImageFree(t, img)

	// The data is there for the next execution.
	env2 := newEnv(t, "/bin/sh", "-c", `echo "marker=$(cat /data/marker)"; echo "link=$(readlink /data/link)"; rm /data/fill && echo x > /data/after && echo writable-again; echo done`)
	spec2 := env2.spec(t)
	spec2.Volumes = []backend.Volume{vol}
	inst2 := env2.start(t, spec2)
	ch2, err := inst2.Channel(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	out = readUntil(t, ch2, "done", time.Minute)
	t.Logf("second execution said:\n%s", out)
	for _, want := range []string{"marker=kept", "link=/etc/shadow", "writable-again"} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("missing %q", want)
		}
	}
	stop(t, inst2)
	env2.assertNothingLeft(t, spec2)
	assertImageFree(t, img)
}

func TestPersistentVolumeRefusesHostDirectory(t *testing.T) {
	env := newEnv(t, "/bin/true")
	spec := env.spec(t)
	dir := t.TempDir()
	spec.Volumes = []backend.Volume{{Mount: "/data", Kind: message.VolumePersistent, Path: dir, SizeMiB: 4}}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := env.b.Start(ctx, spec)
	if !errkind.Is(err, errkind.Unsupported) || !strings.Contains(err.Error(), "mkfs.ext4 -q -d") {
		t.Fatalf("Start on a host directory: %v, want a refusal explaining the migration", err)
	}
	env.assertNothingLeft(t, spec)
}

// TestWritableLayersAreBounded: an ephemeral volume (tmpfs inside the
// Sentry) stops at its size_mib, and /tmp and the root overlay at half the
// program's memory, with ENOSPC, and the sandbox lives on.
func TestWritableLayersAreBounded(t *testing.T) {
	script := strings.Join([]string{
		// dd's complaint is kept in a variable: the full file system could
		// not take it.
		`try() { if out=$(dd if=/dev/zero of=$1 bs=1M count=$2 2>&1); then echo "$3-fit"; else echo "$3-stopped $(echo "$out" | grep -o 'No space left on device' | head -n1)"; fi; echo "$3=$(wc -c < $1)"; }`,
		`try /eph/f 64 eph`,
		`try /tmp/f 400 tmp`,
		`rm -f /tmp/f`,
		`try /rootfill 400 root`,
		`rm -f /rootfill`,
		`echo alive`,
	}, "\n")
	env := newEnv(t, "/bin/sh", "-c", script)
	spec := env.spec(t)
	spec.MemoryMiB = 128
	spec.Volumes = []backend.Volume{{Mount: "/eph", Kind: message.VolumeEphemeral, SizeMiB: 8}}
	inst := env.start(t, spec)
	ch, err := inst.Channel(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	out := readUntil(t, ch, "alive", 2*time.Minute)
	t.Logf("sandbox said:\n%s", out)
	for _, want := range []string{"eph-stopped No space left on device", "tmp-stopped No space left on device", "root-stopped No space left on device"} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("missing %q", want)
		}
	}
	layer := int64(RootOverlayMiB(spec.MemoryMiB)) << 20
	for name, limit := range map[string]int64{"eph": 8 << 20, "tmp": layer, "root": layer} {
		var n int64
		for _, line := range strings.Split(out, "\n") {
			if v, ok := strings.CutPrefix(line, name+"="); ok {
				n = parseInt(t, v)
			}
		}
		if n == 0 || n > limit {
			t.Errorf("%s: %d bytes written, want some and at most %d", name, n, limit)
		}
	}
	stop(t, inst)
	env.assertNothingLeft(t, spec)
}

func parseInt(t *testing.T, s string) int64 {
	t.Helper()
	var n int64
	for _, c := range strings.TrimSpace(s) {
		if c < '0' || c > '9' {
			t.Fatalf("not a number: %q", s)
		}
		n = n*10 + int64(c-'0')
	}
	return n
}
