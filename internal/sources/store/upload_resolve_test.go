package store_test

import (
	"archive/zip"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/pack"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

// TestUploadThenResolve uploads a program with each encoding and resolves
// it offline through the Resolver, as a /vm/<hash> request would.
func TestUploadThenResolve(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "rootfs.squashfs")
	if err := os.WriteFile(img, []byte("runtime image"), 0o644); err != nil {
		t.Fatal(err)
	}
	runtimeRef, err := st.AddRuntime(ctx, img, "test runtime", true)
	if err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	mainPy := "from fastapi import FastAPI\napp = FastAPI()\n"
	if err := os.WriteFile(filepath.Join(dir, "main.py"), []byte(mainPy), 0o644); err != nil {
		t.Fatal(err)
	}
	r := sources.New(st, nil, nil, sources.DefaultLimits())

	tests := []struct {
		encoding message.Encoding
		path     string
		needs    string // binary the encoding needs
	}{
		{message.EncodingZip, dir, ""},
		{message.EncodingSquashfs, dir, pack.MksquashfsPath},
		{message.EncodingPlain, filepath.Join(dir, "main.py"), ""},
	}
	for _, tt := range tests {
		t.Run(string(tt.encoding), func(t *testing.T) {
			if tt.needs != "" {
				if _, err := exec.LookPath(tt.needs); err != nil {
					t.Skipf("%s not installed", tt.needs)
				}
			}
			opts := store.UploadOptions{
				Path: tt.path, Entrypoint: "main:app", Encoding: tt.encoding,
				Internet: true, Persistent: true, Variables: map[string]string{"GREETING": "hi"},
			}
			res, err := st.UploadProgram(ctx, opts)
			if err != nil {
				t.Fatal(err)
			}
			again, err := st.UploadProgram(ctx, opts)
			if err != nil {
				t.Fatal(err)
			}
			if again.ProgramHash != res.ProgramHash {
				t.Errorf("uploading the same program twice gave %s and %s", res.ProgramHash, again.ProgramHash)
			}

			p, err := r.Program(ctx, res.ProgramHash)
			if err != nil {
				t.Fatalf("Program(%s): %v", res.ProgramHash, err)
			}
			c := p.Content
			if c.Type != "vm-function" || c.Address != store.LocalAddress || !c.On.HTTP ||
				c.On.Persistent == nil || !*c.On.Persistent {
				t.Errorf("content %+v", c)
			}
			if rs := c.Resources; rs.VCPUs != 1 || rs.Memory != 128 || rs.Seconds != 30 {
				t.Errorf("resources %+v", c.Resources)
			}
			if c.Environment != (message.Environment{Internet: true, AlephAPI: true}) {
				t.Errorf("environment %+v", c.Environment)
			}
			if c.Variables["GREETING"] != "hi" || c.Code.Entrypoint != "main:app" {
				t.Errorf("variables %v entrypoint %q", c.Variables, c.Code.Entrypoint)
			}
			if p.Code.Ref != res.CodeRef || p.Code.Hash != res.CodeHash || p.Code.Encoding != tt.encoding {
				t.Errorf("code file %+v, upload %+v", p.Code, res)
			}
			if p.Runtime.Ref != runtimeRef || p.Runtime.Encoding != message.EncodingSquashfs {
				t.Errorf("runtime file %+v", p.Runtime)
			}
			if b, _ := os.ReadFile(p.Runtime.Path); string(b) != "runtime image" {
				t.Errorf("runtime content %q", b)
			}
			checkCode(t, p.Code.Path, tt.encoding, mainPy)
		})
	}
}

func checkCode(t *testing.T, path string, enc message.Encoding, mainPy string) {
	t.Helper()
	switch enc {
	case message.EncodingPlain:
		if b, _ := os.ReadFile(path); string(b) != mainPy {
			t.Errorf("plain code %q", b)
		}
	case message.EncodingZip:
		zr, err := zip.OpenReader(path)
		if err != nil {
			t.Fatal(err)
		}
		defer zr.Close()
		if len(zr.File) != 1 || zr.File[0].Name != "main.py" {
			t.Errorf("zip entries %v", zr.File)
		}
	case message.EncodingSquashfs:
		out, err := exec.Command("unsquashfs", "-l", path).CombinedOutput()
		if err != nil {
			t.Fatalf("unsquashfs: %v: %s", err, out)
		}
		if !strings.Contains(string(out), "squashfs-root/main.py") {
			t.Errorf("squashfs listing:\n%s", out)
		}
	}
}
