package store_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/pack"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

func writeFiles(t *testing.T, dir string, files map[string]string) string {
	t.Helper()
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func storeFiles(t *testing.T, st *store.Store) int {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(st.Dir(), "files"))
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// TestUploadVolumes uploads a program with every kind of volume and a data
// directory, then resolves it offline as a request would: the message
// has aleph-message's shapes, the packed directories are in the store
// with the encodings the backends expect.
func TestUploadVolumes(t *testing.T) {
	if _, err := exec.LookPath(pack.MksquashfsPath); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("mksquashfs missing")
		}
		t.Skip("mksquashfs missing")
	}
	ctx := context.Background()
	st, err := store.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "rootfs.squashfs")
	if err := os.WriteFile(img, []byte("runtime image"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := st.AddRuntime(ctx, img, "test runtime", true); err != nil {
		t.Fatal(err)
	}
	code := writeFiles(t, t.TempDir(), map[string]string{"main.py": "app = None\n"})
	volDir := writeFiles(t, t.TempDir(), map[string]string{"lib/v.txt": "in the volume"})
	dataDir := writeFiles(t, t.TempDir(), map[string]string{"in.txt": "in the data"})

	// A volume by ref: an earlier upload's STORE message.
	first, err := st.UploadProgram(ctx, store.UploadOptions{
		Path: code, Entrypoint: "main:app",
		Volumes: []store.UploadVolume{{Kind: message.VolumeImmutable, Mount: "/opt/first", Path: volDir}},
	})
	if err != nil {
		t.Fatal(err)
	}
	fc, _ := first.Message.Program()
	byRef := fc.Volumes[0].Ref

	res, err := st.UploadProgram(ctx, store.UploadOptions{
		Path: code, Entrypoint: "main:app",
		Volumes: []store.UploadVolume{
			{Kind: message.VolumeImmutable, Mount: "/opt/lib", Path: volDir},
			{Kind: message.VolumeImmutable, Mount: "/opt/again", Ref: byRef},
			{Kind: message.VolumePersistent, Mount: "/var/lib/state", Name: "state", SizeMiB: 16},
			{Kind: message.VolumeEphemeral, Mount: "/var/cache/x", SizeMiB: 8},
		},
		Data: &store.UploadData{Path: dataDir},
	})
	if err != nil {
		t.Fatal(err)
	}
	c, err := res.Message.Program()
	if err != nil {
		t.Fatal(err)
	}
	want := []message.Volume{
		{Mount: "/opt/lib", Ref: byRef}, // same directory, same content: same STORE message
		{Mount: "/opt/again", Ref: byRef},
		{Mount: "/var/lib/state", Persistence: "host", Name: "state", SizeMiB: 16},
		{Mount: "/var/cache/x", Ephemeral: true, SizeMiB: 8},
	}
	if len(c.Volumes) != len(want) {
		t.Fatalf("volumes %+v", c.Volumes)
	}
	for i := range want {
		if c.Volumes[i] != want[i] {
			t.Errorf("volume %d = %+v, want %+v", i, c.Volumes[i], want[i])
		}
	}
	if c.Data == nil || c.Data.Mount != store.DefaultDataMount || c.Data.Encoding != message.EncodingZip || c.Data.UseLatest {
		t.Fatalf("data = %+v", c.Data)
	}

	p, err := sources.New(st, nil, nil, sources.DefaultLimits()).Program(ctx, res.ProgramHash)
	if err != nil {
		t.Fatal(err)
	}
	if f := p.Volumes[0].File; f == nil || f.Encoding != message.EncodingSquashfs {
		t.Errorf("packed volume resolved as %+v", f)
	}
	if p.Data == nil || p.Data.Encoding != message.EncodingZip {
		t.Errorf("data resolved as %+v", p.Data)
	}
}

// Bad volume options are InvalidInput errors that say what is wrong, and
// write nothing to the store.
func TestUploadVolumesRefused(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "rootfs.squashfs")
	if err := os.WriteFile(img, []byte("runtime image"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := st.AddRuntime(ctx, img, "test runtime", true); err != nil {
		t.Fatal(err)
	}
	code := writeFiles(t, t.TempDir(), map[string]string{"main.py": "app = None\n"})
	aFile := filepath.Join(code, "main.py")
	unknown := strings.Repeat("ab", 32)
	for _, tc := range []struct {
		name string
		vols []store.UploadVolume
		data *store.UploadData
		want string
	}{
		{"relative mount", []store.UploadVolume{{Kind: message.VolumeEphemeral, Mount: "cache", SizeMiB: 1}}, nil, "must be an absolute path"},
		{"root mount", []store.UploadVolume{{Kind: message.VolumeEphemeral, Mount: "/", SizeMiB: 1}}, nil, "root directory"},
		{"climbing mount", []store.UploadVolume{{Kind: message.VolumeEphemeral, Mount: "/a/../etc", SizeMiB: 1}}, nil, `".."`},
		{"no mount", []store.UploadVolume{{Kind: message.VolumeEphemeral, SizeMiB: 1}}, nil, "missing mount"},
		{"unknown ref", []store.UploadVolume{{Kind: message.VolumeImmutable, Mount: "/v", Ref: unknown}}, nil, "no such STORE message"},
		{"malformed ref", []store.UploadVolume{{Kind: message.VolumeImmutable, Mount: "/v", Ref: "nope"}}, nil, "ref"},
		{"ref and path", []store.UploadVolume{{Kind: message.VolumeImmutable, Mount: "/v", Ref: unknown, Path: code}}, nil, "one of them"},
		{"path is a file", []store.UploadVolume{{Kind: message.VolumeImmutable, Mount: "/v", Path: aFile}}, nil, "not a directory"},
		{"ephemeral too big", []store.UploadVolume{{Kind: message.VolumeEphemeral, Mount: "/e", SizeMiB: message.MaxEphemeralVolumeMiB + 1}}, nil, "size_mib must be between"},
		{"persistent without name", []store.UploadVolume{{Kind: message.VolumePersistent, Mount: "/p", SizeMiB: 1}}, nil, "needs a name"},
		{"persistent bad name", []store.UploadVolume{{Kind: message.VolumePersistent, Mount: "/p", Name: "../x", SizeMiB: 1}}, nil, `name "../x"`},
		{"persistent twice", []store.UploadVolume{
			{Kind: message.VolumePersistent, Mount: "/p", Name: "x", SizeMiB: 1},
			{Kind: message.VolumePersistent, Mount: "/q", Name: "x", SizeMiB: 1},
		}, nil, "named twice"},
		{"data missing", nil, &store.UploadData{Path: filepath.Join(code, "nope")}, "data: path"},
		{"data relative mount", nil, &store.UploadData{Path: code, Mount: "data"}, "data: mount"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := storeFiles(t, st)
			_, err := st.UploadProgram(ctx, store.UploadOptions{Path: code, Entrypoint: "main:app", Volumes: tc.vols, Data: tc.data})
			if !errkind.Is(err, errkind.InvalidInput) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want InvalidInput containing %q", err, tc.want)
			}
			if n := storeFiles(t, st); n != before {
				t.Errorf("refused upload wrote %d files", n-before)
			}
		})
	}
}
