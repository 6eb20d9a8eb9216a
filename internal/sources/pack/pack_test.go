package pack

import (
	"archive/zip"
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// makeTree writes files (name → content; a trailing "*" in the name makes
// it executable) under a new temporary directory.
func makeTree(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		mode := os.FileMode(0o644)
		if n := len(name); name[n-1] == '*' {
			name, mode = name[:n-1], 0o755
		}
		p := filepath.Join(dir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func touchAll(t *testing.T, dir string, at time.Time) {
	t.Helper()
	err := filepath.WalkDir(dir, func(p string, _ os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Chtimes(p, at, at)
	})
	if err != nil {
		t.Fatal(err)
	}
}

var program = map[string]string{
	"main.py":                 "from fastapi import FastAPI\napp = FastAPI()\n",
	"lib/helpers.py":          "X = 1\n",
	"run.sh*":                 "#!/bin/sh\nexec python3 -m main\n",
	"__pycache__/main.pyc":    "bytecode",
	"lib/__pycache__/h.pyc":   "bytecode",
	"static/index.html":       "<html></html>",
	"static/empty/.gitignore": "",
}

func TestZipDeterministic(t *testing.T) {
	dir := makeTree(t, program)
	var a, b bytes.Buffer
	touchAll(t, dir, time.Date(2020, 5, 1, 0, 0, 0, 0, time.UTC))
	if err := Zip(context.Background(), dir, &a); err != nil {
		t.Fatal(err)
	}
	touchAll(t, dir, time.Now())
	if err := Zip(context.Background(), dir, &b); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Fatal("zip of the same tree differs when only mtimes changed")
	}

	zr, err := zip.NewReader(bytes.NewReader(a.Bytes()), int64(a.Len()))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range zr.File {
		names = append(names, f.Name)
		if !f.Modified.Equal(FixedTime) {
			t.Errorf("%s: mtime %s", f.Name, f.Modified)
		}
	}
	want := []string{"lib/", "lib/helpers.py", "main.py", "run.sh", "static/", "static/empty/", "static/empty/.gitignore", "static/index.html"}
	if !slices.Equal(names, want) {
		t.Fatalf("entries %v, want %v", names, want)
	}
	for _, f := range zr.File {
		switch f.Name {
		case "run.sh":
			if f.Mode().Perm() != 0o755 {
				t.Errorf("run.sh mode %v, want executable", f.Mode())
			}
		case "main.py":
			if f.Mode().Perm() != 0o644 {
				t.Errorf("main.py mode %v", f.Mode())
			}
			rc, _ := f.Open()
			got, _ := io.ReadAll(rc)
			rc.Close()
			if string(got) != program["main.py"] {
				t.Errorf("main.py content %q", got)
			}
		}
	}
}

func TestZipSingleFileAndErrors(t *testing.T) {
	dir := makeTree(t, map[string]string{"app.py": "app = 1\n"})
	var buf bytes.Buffer
	if err := Zip(context.Background(), filepath.Join(dir, "app.py"), &buf); err != nil {
		t.Fatal(err)
	}
	zr, err := zip.NewReader(bytes.NewReader(buf.Bytes()), int64(buf.Len()))
	if err != nil || len(zr.File) != 1 || zr.File[0].Name != "app.py" {
		t.Fatalf("single-file zip: %v %v", zr, err)
	}

	tests := []struct {
		name string
		run  func() error
	}{
		{"zip of a missing path", func() error { return Zip(context.Background(), filepath.Join(dir, "nope"), io.Discard) }},
		{"plain of a directory", func() error { return Plain(context.Background(), dir, io.Discard) }},
		{"plain of a missing file", func() error { return Plain(context.Background(), filepath.Join(dir, "nope.py"), io.Discard) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.run(); !errkind.Is(err, errkind.InvalidInput) {
				t.Fatalf("err %v, want InvalidInput", err)
			}
		})
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := Zip(ctx, makeTree(t, program), io.Discard); err == nil {
		t.Fatal("zip with a cancelled context succeeded")
	}
}

func TestPlain(t *testing.T) {
	dir := makeTree(t, map[string]string{"app.py": "app = 1\n"})
	var buf bytes.Buffer
	if err := Plain(context.Background(), filepath.Join(dir, "app.py"), &buf); err != nil {
		t.Fatal(err)
	}
	if buf.String() != "app = 1\n" {
		t.Fatalf("plain content %q", buf.String())
	}
}

func TestSquashfsDeterministic(t *testing.T) {
	if _, err := exec.LookPath(MksquashfsPath); err != nil {
		t.Skip("mksquashfs not installed")
	}
	dir := makeTree(t, program)
	out := t.TempDir()
	a, b := filepath.Join(out, "a.sqfs"), filepath.Join(out, "b.sqfs")
	if err := Squashfs(context.Background(), dir, a); err != nil {
		t.Fatal(err)
	}
	touchAll(t, dir, time.Now().Add(time.Hour))
	if err := Squashfs(context.Background(), dir, b); err != nil {
		t.Fatal(err)
	}
	da, _ := os.ReadFile(a)
	db, _ := os.ReadFile(b)
	if len(da) == 0 || !bytes.Equal(da, db) {
		t.Fatal("squashfs of the same tree differs when only mtimes changed")
	}
	if unsq, err := exec.LookPath("unsquashfs"); err == nil {
		list, err := exec.Command(unsq, "-l", a).Output()
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(list, []byte("__pycache__")) || !bytes.Contains(list, []byte("lib/helpers.py")) {
			t.Fatalf("unexpected listing:\n%s", list)
		}
	}
}
