package vmimage

import (
	"archive/zip"
	"context"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// requireTools skips (or, in CI, fails) when the image tools are missing.
func requireTools(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("prerequisite missing in CI: %s not in PATH", tool)
			}
			t.Skipf("prerequisite missing: %s not in PATH", tool)
		}
	}
}

func TestDeviceName(t *testing.T) {
	for _, tc := range []struct {
		n    int
		want string
	}{
		{0, "/dev/vda"}, {1, "/dev/vdb"}, {25, "/dev/vdz"}, {26, "/dev/vdaa"}, {27, "/dev/vdab"}, {51, "/dev/vdaz"}, {52, "/dev/vdba"}, {701, "/dev/vdzz"}, {702, "/dev/vdaaa"},
	} {
		if got := DeviceName(tc.n); got != tc.want {
			t.Errorf("DeviceName(%d) = %s, want %s", tc.n, got, tc.want)
		}
	}
}

func TestGuestDrives(t *testing.T) {
	rt := Image{Path: "/cache/runtime.squashfs", FSType: FSSquashfs, ReadOnly: true}
	code := &Image{Path: "/cache/code.squashfs", FSType: FSSquashfs, ReadOnly: true}
	imm := VolumeImage{Image: Image{Path: "/v/venv.squashfs", FSType: FSSquashfs, ReadOnly: true}, Mount: "/opt/venv"}
	eph := VolumeImage{Image: Image{Path: "/state/eph.ext4", FSType: FSExt4, Temporary: true}, Mount: "/var/cache"}
	unmounted := VolumeImage{Image: Image{Path: "/p/x.ext4", FSType: FSExt4}}
	data := &VolumeImage{Image: Image{Path: "/cache/data.squashfs", FSType: FSSquashfs, ReadOnly: true}, Mount: "/data"}

	for _, tc := range []struct {
		name        string
		in          Prepared
		wantDevices []string
		wantCode    string
		wantVolumes []guest.VolumeMount
		wantData    *guest.DataCopy
	}{
		{
			name:        "runtime only",
			in:          Prepared{Runtime: rt},
			wantDevices: []string{"/dev/vda"},
		},
		{
			name:        "runtime and code",
			in:          Prepared{Runtime: rt, Code: code},
			wantDevices: []string{"/dev/vda", "/dev/vdb"},
			wantCode:    "/dev/vdb",
		},
		{
			name:        "volumes follow code, data last, unmounted volume attached only",
			in:          Prepared{Runtime: rt, Code: code, Volumes: []VolumeImage{imm, eph, unmounted}, Data: data},
			wantDevices: []string{"/dev/vda", "/dev/vdb", "/dev/vdc", "/dev/vdd", "/dev/vde", "/dev/vdf"},
			wantCode:    "/dev/vdb",
			wantVolumes: []guest.VolumeMount{
				{Device: "/dev/vdc", Mount: "/opt/venv", FSType: "squashfs", ReadOnly: true},
				{Device: "/dev/vdd", Mount: "/var/cache", FSType: "ext4", ReadOnly: false},
			},
			// Not mounted at /data: the agent copies it there, writable.
			wantData: &guest.DataCopy{Device: "/dev/vdf", Mount: "/data"},
		},
		{
			name:        "no code: volumes start at vdb",
			in:          Prepared{Runtime: rt, Volumes: []VolumeImage{imm}},
			wantDevices: []string{"/dev/vda", "/dev/vdb"},
			wantVolumes: []guest.VolumeMount{{Device: "/dev/vdb", Mount: "/opt/venv", FSType: "squashfs", ReadOnly: true}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := &guest.Config{CodeDevice: "stale", Volumes: []guest.VolumeMount{{Device: "stale"}}, Data: &guest.DataCopy{Device: "stale"}}
			drives := GuestDrives(&tc.in, cfg)
			var devs []string
			for _, d := range drives {
				devs = append(devs, d.Device)
			}
			if !reflect.DeepEqual(devs, tc.wantDevices) {
				t.Errorf("devices = %v, want %v", devs, tc.wantDevices)
			}
			if !drives[0].Root || !drives[0].ReadOnly || drives[0].Role != RoleRuntime || drives[0].ID != "rootfs" {
				t.Errorf("first drive must be the read-only root runtime: %+v", drives[0])
			}
			for _, d := range drives[1:] {
				if d.Root {
					t.Errorf("only the runtime is root: %+v", d)
				}
			}
			if cfg.CodeDevice != tc.wantCode {
				t.Errorf("CodeDevice = %q, want %q", cfg.CodeDevice, tc.wantCode)
			}
			if !reflect.DeepEqual(cfg.Volumes, tc.wantVolumes) {
				t.Errorf("Volumes = %+v, want %+v", cfg.Volumes, tc.wantVolumes)
			}
			if !reflect.DeepEqual(cfg.Data, tc.wantData) {
				t.Errorf("Data = %+v, want %+v", cfg.Data, tc.wantData)
			}
		})
	}
}

func writeZip(t *testing.T, path string, files map[string]string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	zw := zip.NewWriter(f)
	for name, body := range files {
		w, err := zw.Create(name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write([]byte(body)); err != nil {
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

func squashfsCat(t *testing.T, img, file string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "x")
	if out, err := exec.Command("unsquashfs", "-d", dir, img).CombinedOutput(); err != nil {
		t.Fatalf("unsquashfs: %v: %s", err, out)
	}
	b, err := os.ReadFile(filepath.Join(dir, file))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// isExt4 checks the ext2/3/4 superblock magic (0xEF53 at byte 1080).
func isExt4(t *testing.T, path string) bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var magic [2]byte
	if _, err := f.ReadAt(magic[:], 1024+56); err != nil {
		t.Fatal(err)
	}
	return binary.LittleEndian.Uint16(magic[:]) == 0xEF53
}

// checkSparseExt4 checks that path is an ext4 image of size bytes that
// takes less room than its size on the disk.
func checkSparseExt4(t *testing.T, path string, size int64) {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != size {
		t.Errorf("%s: size %d, want %d", path, st.Size, size)
	}
	if st.Blocks*512 >= st.Size {
		t.Errorf("%s is not sparse: %d bytes allocated of %d", path, st.Blocks*512, st.Size)
	}
	if !isExt4(t, path) {
		t.Errorf("%s is not ext4", path)
	}
}

// writeFile writes a test fixture; a failure is the test's setup failing.
func writeFile(t *testing.T, path, data string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), mode); err != nil {
		t.Fatal(err)
	}
}

// writeAt writes data into the existing file path at offset off.
func writeAt(t *testing.T, path string, off int64, data string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte(data), off); err != nil {
		t.Fatal(err)
	}
}

// readAt reads n bytes of path at offset off.
func readAt(t *testing.T, path string, off int64, n int) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, n)
	if _, err := f.ReadAt(buf, off); err != nil {
		t.Fatal(err)
	}
	return string(buf)
}

func TestPrepareCode(t *testing.T) {
	requireTools(t, "mksquashfs", "unsquashfs")
	ctx := context.Background()
	dir := t.TempDir()
	runtime := filepath.Join(dir, "runtime.squashfs")
	writeFile(t, runtime, "not really squashfs; attached as is", 0o644)

	plain := filepath.Join(dir, "main.py")
	writeFile(t, plain, "app = 1\n", 0o644)
	zipped := filepath.Join(dir, "code.zip")
	writeZip(t, zipped, map[string]string{"main.py": "app = 2\n", "pkg/util.py": "x = 1\n"})
	sq := filepath.Join(dir, "code.squashfs")
	writeFile(t, sq, "squashfs code attached as is", 0o644)

	for _, tc := range []struct {
		name       string
		path, hash string
		enc        message.Encoding
		entrypoint string
		wantFile   string // file inside the image
		wantBody   string
		asIs       bool
	}{
		{name: "plain", path: plain, hash: "plainhash", enc: message.EncodingPlain, entrypoint: "main:app", wantFile: "main.py", wantBody: "app = 1\n"},
		{name: "plain dotted module", path: plain, hash: "plainhash", enc: message.EncodingPlain, entrypoint: "pkg.main:app", wantFile: "pkg/main.py", wantBody: "app = 1\n"},
		{name: "zip", path: zipped, hash: "ziphash", enc: message.EncodingZip, entrypoint: "main:app", wantFile: "pkg/util.py", wantBody: "x = 1\n"},
		{name: "zip without hash", path: zipped, enc: message.EncodingZip, entrypoint: "main:app", wantFile: "main.py", wantBody: "app = 2\n"},
		{name: "squashfs as is", path: sq, hash: "sqhash", enc: message.EncodingSquashfs, entrypoint: "main:app", asIs: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cache := filepath.Join(dir, "cache-"+strings.ReplaceAll(tc.name, " ", "-"))
			p := NewPreparer(Options{CacheDir: cache})
			spec := backend.Spec{RuntimePath: runtime, CodePath: tc.path, CodeHash: tc.hash, CodeEncoding: tc.enc, Entrypoint: tc.entrypoint}
			planned, err := p.Plan(ctx, spec)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(planned.Code.Path); err == nil && !tc.asIs {
				t.Fatalf("Plan created %s", planned.Code.Path)
			}
			got, err := p.Prepare(ctx, spec)
			if err != nil {
				t.Fatal(err)
			}
			if got.Code.Path != planned.Code.Path {
				t.Errorf("Prepare used %s, Plan said %s", got.Code.Path, planned.Code.Path)
			}
			if got.Runtime.Path != runtime || !got.Runtime.ReadOnly {
				t.Errorf("runtime = %+v", got.Runtime)
			}
			if !got.Code.ReadOnly || got.Code.FSType != FSSquashfs || got.Code.Temporary {
				t.Errorf("code image = %+v", got.Code)
			}
			if tc.asIs {
				if got.Code.Path != tc.path {
					t.Errorf("squashfs code should be attached as is, got %s", got.Code.Path)
				}
				return
			}
			if filepath.Dir(got.Code.Path) != cache {
				t.Errorf("converted image %s not in cache %s", got.Code.Path, cache)
			}
			if body := squashfsCat(t, got.Code.Path, tc.wantFile); body != tc.wantBody {
				t.Errorf("%s in image = %q, want %q", tc.wantFile, body, tc.wantBody)
			}
			// A second preparation reuses the cached image.
			fi1, _ := os.Stat(got.Code.Path)
			again, err := p.Prepare(ctx, spec)
			if err != nil {
				t.Fatal(err)
			}
			fi2, _ := os.Stat(again.Code.Path)
			if !os.SameFile(fi1, fi2) {
				t.Error("second Prepare rebuilt the image")
			}
			left, _ := filepath.Glob(filepath.Join(cache, ".tmp-*"))
			if len(left) > 0 {
				t.Errorf("temporary files left in cache: %v", left)
			}
		})
	}
}

func TestPrepareConcurrentConvertsOnce(t *testing.T) {
	requireTools(t, "mksquashfs")
	dir := t.TempDir()
	runtime := filepath.Join(dir, "rt")
	writeFile(t, runtime, "", 0o644)
	zipped := filepath.Join(dir, "c.zip")
	writeZip(t, zipped, map[string]string{"a.py": "a"})
	p := NewPreparer(Options{CacheDir: filepath.Join(dir, "cache")})
	spec := backend.Spec{RuntimePath: runtime, CodePath: zipped, CodeHash: "h1", CodeEncoding: message.EncodingZip, Entrypoint: "a:app"}
	var wg sync.WaitGroup
	inodes := make([]uint64, 4)
	for i := range inodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got, err := p.Prepare(context.Background(), spec)
			if err != nil {
				t.Error(err)
				return
			}
			fi, _ := os.Stat(got.Code.Path)
			inodes[i] = fi.Sys().(*syscall.Stat_t).Ino
		}()
	}
	wg.Wait()
	for _, ino := range inodes[1:] {
		if ino != inodes[0] {
			t.Fatalf("concurrent preparations produced different images: %v", inodes)
		}
	}
}

func TestPrepareUnsafeZipRefused(t *testing.T) {
	requireTools(t, "mksquashfs")
	dir := t.TempDir()
	runtime := filepath.Join(dir, "rt")
	writeFile(t, runtime, "", 0o644)
	evil := filepath.Join(dir, "evil.zip")
	writeZip(t, evil, map[string]string{"../../escape.py": "x"})
	cache := filepath.Join(dir, "cache")
	p := NewPreparer(Options{CacheDir: cache})
	_, err := p.Prepare(context.Background(), backend.Spec{RuntimePath: runtime, CodePath: evil, CodeHash: "evil", CodeEncoding: message.EncodingZip, Entrypoint: "x:app"})
	if err == nil {
		t.Fatal("path traversal archive accepted")
	}
	if imgs, _ := filepath.Glob(filepath.Join(cache, "*")); len(imgs) != 0 {
		t.Errorf("cache not clean after refusal: %v", imgs)
	}
}

func TestPrepareVolumes(t *testing.T) {
	requireTools(t, "mksquashfs", "unsquashfs", "mkfs.ext4")
	ctx := context.Background()
	dir := t.TempDir()
	runtime := filepath.Join(dir, "rt")
	writeFile(t, runtime, "", 0o644)
	immutable := filepath.Join(dir, "venv.squashfs")
	writeFile(t, immutable, "sq", 0o644)
	zipVol := filepath.Join(dir, "vol.zip")
	writeZip(t, zipVol, map[string]string{"lib/x.txt": "zipped volume"})
	dataZip := filepath.Join(dir, "data.zip")
	writeZip(t, dataZip, map[string]string{"d.txt": "data"})
	existing := filepath.Join(dir, "existing.ext4")
	writeFile(t, existing, "already there", 0o600)
	state := filepath.Join(dir, "state")
	persistDir := filepath.Join(dir, "persistent")

	p := NewPreparer(Options{CacheDir: filepath.Join(dir, "cache"), PersistentDir: persistDir})
	spec := backend.Spec{
		ProgramHash: "prog1", RuntimePath: runtime, StateDir: state,
		Volumes: []backend.Volume{
			{Mount: "/opt/venv", Kind: message.VolumeImmutable, Path: immutable},
			{Mount: "/opt/zipped", Kind: message.VolumeImmutable, Path: zipVol, Encoding: message.EncodingZip},
			{Mount: "/var/cache", Kind: message.VolumeEphemeral, SizeMiB: 8},
			{Mount: "/var/lib/sqlite", Kind: message.VolumePersistent, SizeMiB: 4},
			{Mount: "/var/lib/given", Kind: message.VolumePersistent, SizeMiB: 4, Path: existing},
		},
		DataPath: dataZip, DataEncoding: message.EncodingZip, DataMount: "/data",
	}
	got, err := p.Prepare(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Volumes) != 5 {
		t.Fatalf("volumes = %+v", got.Volumes)
	}
	if v := got.Volumes[0]; v.Path != immutable || !v.ReadOnly || v.FSType != FSSquashfs {
		t.Errorf("immutable squashfs volume = %+v", v)
	}
	if v := got.Volumes[1]; squashfsCat(t, v.Path, "lib/x.txt") != "zipped volume" || !v.ReadOnly {
		t.Errorf("zip volume not converted: %+v", v)
	}

	eph := got.Volumes[2]
	if !eph.Temporary || eph.ReadOnly || eph.FSType != FSExt4 || !strings.HasPrefix(eph.Path, state+"/") {
		t.Errorf("ephemeral volume = %+v", eph)
	}
	checkSparseExt4(t, eph.Path, 8<<20)

	pers := got.Volumes[3]
	// No path from the pool and no name: aleph-vm's unamed_volume_<i>.
	wantPers := filepath.Join(persistDir, "prog1", "unamed_volume_3.ext4")
	if pers.Path != wantPers || pers.Temporary || !isExt4(t, pers.Path) {
		t.Errorf("persistent volume = %+v, want ext4 at %s", pers, wantPers)
	}
	if v := got.Volumes[4]; v.Path != existing {
		t.Errorf("persistent volume with a path = %+v", v)
	}
	if b, _ := os.ReadFile(existing); string(b) != "already there" {
		t.Error("existing persistent image was overwritten")
	}
	if got.Data == nil || got.Data.Mount != "/data" || squashfsCat(t, got.Data.Path, "d.txt") != "data" {
		t.Errorf("data = %+v", got.Data)
	}

	// While this execution holds them, no other can have its persistent
	// volumes.
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err = p.Prepare(short, spec)
	cancel()
	if !errkind.Is(err, errkind.Conflict) {
		t.Errorf("second Prepare while the first holds the volume: %v, want a conflict", err)
	}

	// The persistent image is created once: data written survives.
	writeAt(t, pers.Path, 4<<20-4, "MARK")
	if err := got.Cleanup(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(eph.Path); !os.IsNotExist(err) {
		t.Error("Cleanup left the ephemeral image")
	}
	for _, keep := range []string{pers.Path, existing, immutable, got.Volumes[1].Path} {
		if _, err := os.Stat(keep); err != nil {
			t.Errorf("Cleanup removed %s", keep)
		}
	}
	again, err := p.Prepare(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if readAt(t, again.Volumes[3].Path, 4<<20-4, 4) != "MARK" {
		t.Error("persistent volume was recreated")
	}
	if err := again.Cleanup(); err != nil {
		t.Fatal(err)
	}
}

func TestPrepareErrors(t *testing.T) {
	dir := t.TempDir()
	runtime := filepath.Join(dir, "rt")
	writeFile(t, runtime, "", 0o644)
	for _, tc := range []struct {
		name string
		spec backend.Spec
		opts Options
		kind errkind.Kind
	}{
		{name: "no runtime", spec: backend.Spec{}, kind: errkind.InvalidInput},
		{name: "missing runtime", spec: backend.Spec{RuntimePath: filepath.Join(dir, "nope")}, kind: errkind.ResourceMissing},
		{name: "missing squashfs code", spec: backend.Spec{RuntimePath: runtime, CodePath: filepath.Join(dir, "nope"), CodeEncoding: message.EncodingSquashfs}, kind: errkind.ResourceMissing},
		{name: "hash unusable as file name", spec: backend.Spec{RuntimePath: runtime, CodePath: runtime, CodeHash: "../x", CodeEncoding: message.EncodingZip}, opts: Options{CacheDir: dir}, kind: errkind.InvalidInput},
		{name: "relative mount", spec: backend.Spec{RuntimePath: runtime, StateDir: dir, Volumes: []backend.Volume{{Mount: "rel", Kind: message.VolumeEphemeral}}}, kind: errkind.InvalidInput},
		{name: "persistent directory", spec: backend.Spec{RuntimePath: runtime, Volumes: []backend.Volume{{Mount: "/p", Kind: message.VolumePersistent, Path: dir, SizeMiB: 1}}}, kind: errkind.Unsupported},
		{name: "persistent without a place", spec: backend.Spec{RuntimePath: runtime, Volumes: []backend.Volume{{Mount: "/p", Kind: message.VolumePersistent, SizeMiB: 1}}}, kind: errkind.InvalidInput},
		{name: "plain data", spec: backend.Spec{RuntimePath: runtime, DataPath: runtime, DataMount: "/data", DataEncoding: message.EncodingPlain}, kind: errkind.Unsupported},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewPreparer(tc.opts).Prepare(context.Background(), tc.spec)
			if err == nil {
				t.Fatal("no error")
			}
			if got := errkind.Of(err); got != tc.kind {
				t.Errorf("kind = %v, want %v (%v)", got, tc.kind, err)
			}
		})
	}
}
