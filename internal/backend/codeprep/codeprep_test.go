package codeprep

import (
	"archive/zip"
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

type zipEntry struct {
	name string
	body string
	mode os.FileMode
}

func writeZip(t *testing.T, entries []zipEntry) string {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, e := range entries {
		h := &zip.FileHeader{Name: e.name, Method: zip.Deflate}
		mode := e.mode
		if mode == 0 {
			mode = 0o644
		}
		h.SetMode(mode)
		w, err := zw.CreateHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write([]byte(e.body)); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "code.zip")
	if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPlainFileName(t *testing.T) {
	for _, c := range []struct {
		entrypoint, want string
		bad              bool
	}{
		{"main:app", "main.py", false},
		{"pkg.mod:app", "pkg/mod.py", false},
		{"run.sh", "run.sh", false},
		{"../x:app", "", true},
		{"a/b", "", true},
		{"..", "", true},
		{"", "", true},
	} {
		got, err := PlainFileName(c.entrypoint)
		if (err != nil) != c.bad || got != c.want {
			t.Errorf("PlainFileName(%q) = %q, %v", c.entrypoint, got, err)
		}
	}
}

func TestPreparePlainAndCache(t *testing.T) {
	src := filepath.Join(t.TempDir(), "code")
	if err := os.WriteFile(src, []byte("app = 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cacheDir := t.TempDir()
	cache, err := OpenCache(cacheDir, CacheOptions{})
	if err != nil {
		t.Fatal(err)
	}
	s := Source{Path: src, Hash: "h1", Encoding: message.EncodingPlain, Entrypoint: "pkg.main:app"}

	// Concurrent cold starts share one extraction.
	var wg sync.WaitGroup
	dirs := make([]string, 8)
	for i := range dirs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l, err := cache.Acquire(context.Background(), s)
			if err != nil {
				t.Error(err)
				return
			}
			dirs[i] = l.Path
		}()
	}
	wg.Wait()
	for _, d := range dirs[1:] {
		if d != dirs[0] {
			t.Fatalf("different dirs for the same code: %v", dirs)
		}
	}
	b, err := os.ReadFile(filepath.Join(dirs[0], "pkg", "main.py"))
	if err != nil || string(b) != "app = 1\n" {
		t.Fatalf("plain code: %q, %v", b, err)
	}
	entries, _ := os.ReadDir(cacheDir)
	if len(entries) != 1 {
		t.Errorf("cache holds %d entries, want 1 (no temp dirs left)", len(entries))
	}
}

func TestZip(t *testing.T) {
	good := writeZip(t, []zipEntry{
		{name: "pkg/"},
		{name: "pkg/__init__.py", body: ""},
		{name: "pkg/main.py", body: "app = 1\n"},
		{name: "bin/run", body: "#!/bin/sh\n", mode: 0o755},
		{name: "pkg/alias.py", body: "main.py", mode: os.ModeSymlink | 0o777},
	})
	dir := filepath.Join(t.TempDir(), "out")
	if err := Extract(context.Background(), dir, Source{Path: good, Encoding: message.EncodingZip}, Limits{}); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "pkg", "alias.py")); err != nil || string(b) != "app = 1\n" {
		t.Errorf("link inside the tree: %q, %v", b, err)
	}
	if fi, err := os.Stat(filepath.Join(dir, "bin", "run")); err != nil || fi.Mode()&0o111 == 0 {
		t.Errorf("executable bit lost: %v, %v", fi, err)
	}

	for name, entries := range map[string][]zipEntry{
		"dotdot":        {{name: "../evil.py", body: "x"}},
		"absolute":      {{name: "/tmp/evil.py", body: "x"}},
		"link outside":  {{name: "l", body: "../../etc/passwd", mode: os.ModeSymlink | 0o777}},
		"absolute link": {{name: "l", body: "/etc/passwd", mode: os.ModeSymlink | 0o777}},
	} {
		t.Run(name, func(t *testing.T) {
			p := writeZip(t, entries)
			dir := filepath.Join(t.TempDir(), "out")
			err := Extract(context.Background(), dir, Source{Path: p, Encoding: message.EncodingZip}, Limits{})
			if !errors.Is(err, ErrUnsafeArchive) {
				t.Fatalf("want ErrUnsafeArchive, got %v", err)
			}
		})
	}
}

func TestZipBomb(t *testing.T) {
	// 8 MiB of zeros compresses to a few KiB.
	p := writeZip(t, []zipEntry{{name: "zeros", body: string(make([]byte, 8<<20))}})
	if fi, _ := os.Stat(p); fi.Size() > 1<<20 {
		t.Fatalf("test archive unexpectedly large: %d", fi.Size())
	}
	dir := filepath.Join(t.TempDir(), "out")
	err := Extract(context.Background(), dir, Source{Path: p, Encoding: message.EncodingZip}, Limits{MaxBytes: 1 << 20})
	if !errors.Is(err, ErrUnsafeArchive) || !errkind.Is(err, errkind.TooLarge) {
		t.Fatalf("want a too-large unsafe archive error, got %v", err)
	}
	if fi, err := os.Stat(filepath.Join(dir, "zeros")); err == nil && fi.Size() > 1<<20+1 {
		t.Errorf("wrote %d bytes past the limit", fi.Size())
	}
}

func TestSquashfs(t *testing.T) {
	if _, err := exec.LookPath("mksquashfs"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("mksquashfs missing in CI")
		}
		t.Skip("mksquashfs not installed")
	}
	src := t.TempDir()
	if err := os.MkdirAll(filepath.Join(src, "pkg"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "pkg", "main.py"), []byte("app = 1\n"), 0o4755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(src, "pkg", "main.py"), 0o4755); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "code.squashfs")
	if out, err := exec.Command("mksquashfs", src, img, "-noappend", "-quiet", "-no-progress").CombinedOutput(); err != nil {
		t.Fatalf("mksquashfs: %v: %s", err, out)
	}
	dir := filepath.Join(t.TempDir(), "out")
	if err := Extract(context.Background(), dir, Source{Path: img, Hash: "sq1", Encoding: message.EncodingSquashfs}, Limits{}); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, "pkg", "main.py"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeSetuid != 0 {
		t.Error("set-uid bit kept")
	}

	// Too big for the limit: refused before extraction.
	err = Extract(context.Background(), filepath.Join(t.TempDir(), "out"), Source{Path: img, Hash: "sq2", Encoding: message.EncodingSquashfs}, Limits{MaxBytes: 4})
	if !errkind.Is(err, errkind.TooLarge) {
		t.Errorf("want TooLarge, got %v", err)
	}

	// Special files are refused.
	if err := syscall.Mkfifo(filepath.Join(src, "fifo"), 0o644); err != nil {
		t.Fatal(err)
	}
	img2 := filepath.Join(t.TempDir(), "fifo.squashfs")
	if out, err := exec.Command("mksquashfs", src, img2, "-noappend", "-quiet", "-no-progress").CombinedOutput(); err != nil {
		t.Fatalf("mksquashfs: %v: %s", err, out)
	}
	err = Extract(context.Background(), filepath.Join(t.TempDir(), "out"), Source{Path: img2, Hash: "sq3", Encoding: message.EncodingSquashfs}, Limits{})
	if !errors.Is(err, ErrUnsafeArchive) {
		t.Errorf("want ErrUnsafeArchive for a fifo, got %v", err)
	}
}
