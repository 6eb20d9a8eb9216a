package main

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// TestUnpackDataWritable: the data tree is copied to its mount, writable
// (files, directories, modes and links as in the archive), and what the
// program then writes there never reaches the shared source tree.
func TestUnpackDataWritable(t *testing.T) {
	src, root := t.TempDir(), t.TempDir()
	must(t, os.MkdirAll(filepath.Join(src, "sub", "deep"), 0o755))
	must(t, os.WriteFile(filepath.Join(src, "a.txt"), []byte("alpha"), 0o644))
	must(t, os.WriteFile(filepath.Join(src, "sub", "deep", "run.sh"), []byte("#!/bin/sh\n"), 0o755))
	must(t, os.Symlink("a.txt", filepath.Join(src, "link")))
	// What the sandbox sees: a read-only tree.
	must(t, os.Chmod(filepath.Join(src, "a.txt"), 0o444))

	mount := filepath.Join(root, "data")
	// The runtime may already have the directory, with a file of its own.
	must(t, os.MkdirAll(mount, 0o755))
	must(t, os.WriteFile(filepath.Join(mount, "runtime-file"), []byte("kept"), 0o644))
	if err := unpackData(context.Background(), src, &guest.DataCopy{Mount: mount}); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(mount, "a.txt")); err != nil || string(b) != "alpha" {
		t.Fatalf("a.txt = %q, %v", b, err)
	}
	if fi, err := os.Stat(filepath.Join(mount, "sub", "deep", "run.sh")); err != nil || fi.Mode().Perm() != 0o755 {
		t.Fatalf("run.sh: %v %v, want mode 0755", fi, err)
	}
	if target, err := os.Readlink(filepath.Join(mount, "link")); err != nil || target != "a.txt" {
		t.Fatalf("link -> %q, %v", target, err)
	}
	if b, _ := os.ReadFile(filepath.Join(mount, "runtime-file")); string(b) != "kept" {
		t.Fatalf("runtime's file: %q", b)
	}
	// The program writes: new files, and over the archive's.
	must(t, os.WriteFile(filepath.Join(mount, "new.txt"), []byte("mine"), 0o644))
	must(t, os.WriteFile(filepath.Join(mount, "sub", "deep", "run.sh"), []byte("changed"), 0o755))
	if b, _ := os.ReadFile(filepath.Join(src, "sub", "deep", "run.sh")); string(b) != "#!/bin/sh\n" {
		t.Fatalf("the shared source changed: %q", b)
	}
	if _, err := os.Stat(filepath.Join(src, "new.txt")); !os.IsNotExist(err) {
		t.Fatalf("new file reached the source: %v", err)
	}

	for _, bad := range []string{"", "/", "relative"} {
		if err := unpackData(context.Background(), src, &guest.DataCopy{Mount: bad}); err == nil {
			t.Errorf("mount %q accepted", bad)
		}
	}
	if err := unpackData(context.Background(), src, nil); err != nil {
		t.Errorf("no data: %v", err)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
