package gvisor

import (
	"archive/zip"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

func writeTestZip(t *testing.T, path string, files map[string]string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	zw := zip.NewWriter(f)
	for name, content := range files {
		w, err := zw.Create(name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write([]byte(content)); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func writeTestSquashfs(t *testing.T, path string, files map[string]string) {
	t.Helper()
	dir := t.TempDir()
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("mksquashfs", dir, path, "-noappend", "-quiet", "-all-root").CombinedOutput(); err != nil {
		t.Fatalf("mksquashfs: %v: %s", err, out)
	}
}

// leasedTrees counts the cached trees some execution still holds.
func leasedTrees(e *testEnv) int { return e.b.code.InUse() }

// TestDataAndZipVolumes: the data archive (zip, then squashfs) appears
// read-only at guest.DataSourceDir, where the agent copies it from to its
// mount (the shared tree itself is never writable), and a zip immutable
// volume at its own mount, read-only; both extracted through the code
// cache; after the stop no tree stays leased.
func TestDataAndZipVolumes(t *testing.T) {
	script := strings.Join([]string{
		`echo "data=$(cat ` + guest.DataSourceDir + `/in/hello.txt)"`,
		`echo "vol=$(cat /opt/lib/pkg/v.txt)"`,
		`if echo x > ` + guest.DataSourceDir + `/new 2>/dev/null; then echo data-writable; else echo data-ro; fi`,
		`if echo x > /opt/lib/new 2>/dev/null; then echo vol-writable; else echo vol-ro; fi`,
		`echo done`,
	}, "\n")
	dir := t.TempDir()
	dataZip := filepath.Join(dir, "data.zip")
	writeTestZip(t, dataZip, map[string]string{"in/hello.txt": "from the zip"})
	dataSquashfs := filepath.Join(dir, "data.squashfs")
	writeTestSquashfs(t, dataSquashfs, map[string]string{"in/hello.txt": "from the squashfs"})
	volZip := filepath.Join(dir, "vol.zip")
	writeTestZip(t, volZip, map[string]string{"pkg/v.txt": "zipped volume"})

	for _, tc := range []struct {
		name, path string
		enc        message.Encoding
		want       string
	}{
		{"zip", dataZip, message.EncodingZip, "from the zip"},
		{"squashfs", dataSquashfs, message.EncodingSquashfs, "from the squashfs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := newEnv(t, "/bin/sh", "-c", script)
			spec := env.spec(t)
			spec.DataPath, spec.DataEncoding, spec.DataMount = tc.path, tc.enc, "/srv/data"
			spec.Volumes = []backend.Volume{{Mount: "/opt/lib", Kind: message.VolumeImmutable, Path: volZip, Encoding: message.EncodingZip, ReadOnly: true}}
			inst := env.start(t, spec)
			ch, err := inst.Channel(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			out := readUntil(t, ch, "done", time.Minute)
			t.Logf("sandbox said:\n%s", out)
			for _, want := range []string{"data=" + tc.want, "vol=zipped volume", "data-ro", "vol-ro"} {
				if !strings.Contains(out, want+"\n") {
					t.Errorf("missing %q", want)
				}
			}
			if n := leasedTrees(env); n != 3 { // code, data, volume
				t.Errorf("%d trees leased while running, want 3", n)
			}
			stop(t, inst)
			env.assertNothingLeft(t, spec)
			if n := leasedTrees(env); n != 0 {
				t.Errorf("%d trees still leased after the stop", n)
			}
		})
	}
}

// An unsafe data archive is refused like unsafe code, before the sandbox
// starts, and leaves nothing behind.
func TestDataArchiveRefused(t *testing.T) {
	env := newEnv(t, "/bin/true")
	spec := env.spec(t)
	evil := filepath.Join(t.TempDir(), "evil.zip")
	writeTestZip(t, evil, map[string]string{"../escape.txt": "out"})
	spec.DataPath, spec.DataEncoding, spec.DataMount = evil, message.EncodingZip, "/data"
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := env.b.Start(ctx, spec)
	if !errkind.Is(err, errkind.InvalidInput) || !strings.Contains(err.Error(), "data: ") {
		t.Fatalf("Start with an escaping data archive: %v, want InvalidInput naming the data", err)
	}
	env.assertNothingLeft(t, spec)
	if n := leasedTrees(env); n != 0 {
		t.Errorf("%d trees leased after the refused start", n)
	}
}
