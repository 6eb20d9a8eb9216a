package store

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

func openStore(t *testing.T) *Store {
	t.Helper()
	s, err := Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func writeFile(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
}

func TestFilesAndMessages(t *testing.T) {
	s := openStore(t)
	ctx := context.Background()
	h, err := s.AddFile(ctx, strings.NewReader("hello"))
	if err != nil {
		t.Fatal(err)
	}
	if h != "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824" {
		t.Fatalf("hash %s", h)
	}
	p, err := s.FilePath(h)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); string(b) != "hello" {
		t.Fatalf("content %q", b)
	}
	if _, err := s.FilePath(strings.Repeat("0", 64)); !errkind.Is(err, errkind.NotFound) {
		t.Fatalf("absent file: %v", err)
	}

	m, err := s.AddStoreMessage(h, nil)
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.GetMessage(m.ItemHash)
	if err != nil {
		t.Fatal(err)
	}
	sc, err := got.Store()
	if err != nil || sc.ItemHash != h || sc.Size != 5 || sc.ItemType != "storage" {
		t.Fatalf("store content %+v, %v", sc, err)
	}
	if _, err := s.GetMessage(strings.Repeat("1", 64)); !errkind.Is(err, errkind.NotFound) {
		t.Fatalf("absent message: %v", err)
	}
	if _, err := s.GetMessage("../../etc/passwd"); !errkind.Is(err, errkind.InvalidInput) {
		t.Fatalf("malformed hash: %v", err)
	}
	list, err := s.Messages()
	if err != nil || len(list) != 1 || list[0] != m.ItemHash {
		t.Fatalf("Messages() = %v, %v", list, err)
	}

	// A tampered message on disk is refused when read back.
	path := s.messagePath(m.ItemHash)
	data, _ := os.ReadFile(path)
	writeFile(t, path, strings.Replace(string(data), `\"size\":5`, `\"size\":6`, 1), 0o644)
	if _, err := s.GetMessage(m.ItemHash); !errkind.Is(err, errkind.InvalidInput) {
		t.Fatalf("tampered message: %v", err)
	}
}

func TestOpenRemovesTempFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "store")
	if _, err := Open(dir); err != nil {
		t.Fatal(err)
	}
	leftover := filepath.Join(dir, "files", tmpPrefix+"add-123")
	writeFile(t, leftover, "partial", 0o644)
	if _, err := Open(dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(leftover); !os.IsNotExist(err) {
		t.Fatalf("leftover still there: %v", err)
	}
}

func TestRuntime(t *testing.T) {
	s := openStore(t)
	ctx := context.Background()
	if _, err := s.DefaultRuntime(); !errkind.Is(err, errkind.ResourceMissing) || !strings.Contains(err.Error(), "make runtime") {
		t.Fatalf("no default runtime: %v", err)
	}
	img := filepath.Join(t.TempDir(), "rootfs.squashfs")
	writeFile(t, img, "not really squashfs", 0o644)

	ref, err := s.AddRuntime(ctx, img, "Debian 12 with Python", false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.DefaultRuntime(); err == nil {
		t.Fatal("runtime became default without makeDefault")
	}
	ref2, err := s.AddRuntime(ctx, img, "Debian 12 with Python", true)
	if err != nil {
		t.Fatal(err)
	}
	if ref2 != ref {
		t.Fatalf("same runtime gave refs %s and %s", ref, ref2)
	}
	def, err := s.DefaultRuntime()
	if err != nil || def != ref {
		t.Fatalf("default runtime %s, %v; want %s", def, err, ref)
	}
	m, err := s.GetMessage(ref)
	if err != nil {
		t.Fatal(err)
	}
	sc, err := m.Store()
	if err != nil {
		t.Fatal(err)
	}
	if sc.Metadata["comment"] != "Debian 12 with Python" {
		t.Fatalf("metadata %v", sc.Metadata)
	}
	p, err := s.FilePath(sc.ItemHash)
	if err != nil {
		t.Fatal(err)
	}
	// Same filesystem (both under the test's temp dir): hard-linked.
	a, _ := os.Stat(img)
	b, _ := os.Stat(p)
	if sa, ok := a.Sys().(*syscall.Stat_t); ok {
		if sb := b.Sys().(*syscall.Stat_t); sa.Ino != sb.Ino {
			t.Errorf("runtime was copied, expected a hard link on the same filesystem")
		}
	}
	if _, err := s.AddRuntime(ctx, filepath.Join(t.TempDir(), "missing"), "", true); !errkind.Is(err, errkind.InvalidInput) {
		t.Fatalf("missing image: %v", err)
	}
}

func TestUploadValidation(t *testing.T) {
	s := openStore(t)
	ctx := context.Background()
	img := filepath.Join(t.TempDir(), "rootfs.squashfs")
	writeFile(t, img, "rootfs", 0o644)

	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "main.py"), "app = None\n", 0o644)
	writeFile(t, filepath.Join(dir, "pkg", "__init__.py"), "", 0o644)
	writeFile(t, filepath.Join(dir, "pkg", "web.py"), "app = None\n", 0o644)
	writeFile(t, filepath.Join(dir, "server"), "#!/bin/sh\n", 0o755)
	writeFile(t, filepath.Join(dir, "notexec"), "#!/bin/sh\n", 0o644)
	single := filepath.Join(dir, "main.py")

	// Before any runtime exists: the error says what to do.
	_, err := s.UploadProgram(ctx, UploadOptions{Path: dir, Entrypoint: "main:app"})
	if !errkind.Is(err, errkind.ResourceMissing) || !strings.Contains(err.Error(), "make runtime") {
		t.Fatalf("upload without runtime: %v", err)
	}
	if _, err := s.AddRuntime(ctx, img, "test runtime", true); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name    string
		opts    UploadOptions
		wantErr string // "" = success
	}{
		{"asgi module", UploadOptions{Path: dir, Entrypoint: "main:app"}, ""},
		{"dotted module", UploadOptions{Path: dir, Entrypoint: "pkg.web:app"}, ""},
		{"package", UploadOptions{Path: dir, Entrypoint: "pkg:app"}, ""},
		{"executable", UploadOptions{Path: dir, Entrypoint: "server"}, ""},
		{"single file plain", UploadOptions{Path: single, Entrypoint: "main:app"}, ""},
		{"single file zip", UploadOptions{Path: single, Entrypoint: "main:app", Encoding: message.EncodingZip}, ""},
		{"variables", UploadOptions{Path: dir, Entrypoint: "main:app", Variables: map[string]string{"A_B": "1"}}, ""},
		{"missing path", UploadOptions{Entrypoint: "main:app"}, "missing program path"},
		{"nonexistent path", UploadOptions{Path: filepath.Join(dir, "nope"), Entrypoint: "main:app"}, "no such file"},
		{"missing entrypoint", UploadOptions{Path: dir}, "missing entrypoint"},
		{"malformed entrypoint", UploadOptions{Path: dir, Entrypoint: "main:"}, "invalid entrypoint"},
		{"unknown module", UploadOptions{Path: dir, Entrypoint: "other:app"}, "no module other"},
		{"missing executable", UploadOptions{Path: dir, Entrypoint: "nope"}, "no such file"},
		{"not executable", UploadOptions{Path: dir, Entrypoint: "notexec"}, "not executable"},
		{"escaping executable", UploadOptions{Path: dir, Entrypoint: "../server"}, "invalid entrypoint"},
		{"single file wrong module", UploadOptions{Path: single, Entrypoint: "app:app", Encoding: message.EncodingZip}, "module must be"},
		{"plain directory", UploadOptions{Path: dir, Entrypoint: "main:app", Encoding: message.EncodingPlain}, "single file"},
		{"unknown encoding", UploadOptions{Path: dir, Entrypoint: "main:app", Encoding: "tar"}, "unknown encoding"},
		{"bad variable", UploadOptions{Path: dir, Entrypoint: "main:app", Variables: map[string]string{"1X": "y"}}, "invalid variable name"},
		{"bad runtime ref", UploadOptions{Path: dir, Entrypoint: "main:app", RuntimeRef: "xyz"}, "invalid item hash"},
		{"memory out of range", UploadOptions{Path: dir, Entrypoint: "main:app", MemoryMiB: 1 << 30}, "memory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res, err := s.UploadProgram(ctx, tt.opts)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatal(err)
				}
				if !message.IsItemHash(res.ProgramHash) {
					t.Fatalf("program hash %q", res.ProgramHash)
				}
				return
			}
			if err == nil {
				t.Fatalf("upload succeeded, want error containing %q", tt.wantErr)
			}
			if !errkind.Is(err, errkind.InvalidInput) {
				t.Errorf("error %q is %v, want InvalidInput", err, errkind.Of(err))
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q does not contain %q", err, tt.wantErr)
			}
		})
	}
}
