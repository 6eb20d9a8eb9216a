package firecracker

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/vmimage"
)

func TestJailerCommand(t *testing.T) {
	base := JailerParams{
		JailerPath: "/opt/firecracker/jailer", ID: "abc-123", ExecFile: "/opt/firecracker/firecracker",
		UID: 990, GID: 991, ChrootBaseDir: "/srv/jailer",
		FirecrackerArgs: VMMArgs(JailConfigFile, JailAPISocket),
	}
	for _, tc := range []struct {
		name string
		mod  func(p *JailerParams)
		want string
	}{
		{
			name: "minimal",
			want: "/opt/firecracker/jailer --id abc-123 --exec-file /opt/firecracker/firecracker --uid 990 --gid 991 --chroot-base-dir /srv/jailer -- --api-sock /run/firecracker.socket --config-file /vm_config.json",
		},
		{
			name: "cgroup v1 limits",
			mod:  func(p *JailerParams) { p.CgroupVersion = 1; p.Cgroups = CgroupLimits(1, 2, 576) },
			want: "/opt/firecracker/jailer --id abc-123 --exec-file /opt/firecracker/firecracker --uid 990 --gid 991 --chroot-base-dir /srv/jailer --cgroup memory.limit_in_bytes=603979776 --cgroup cpu.cfs_period_us=100000 --cgroup cpu.cfs_quota_us=300000 -- --api-sock /run/firecracker.socket --config-file /vm_config.json",
		},
		{
			name: "cgroup v2 with parent",
			mod: func(p *JailerParams) {
				p.CgroupVersion = 2
				p.ParentCgroup = "aleph-vm"
				p.Cgroups = CgroupLimits(2, 1, 192)
			},
			want: "/opt/firecracker/jailer --id abc-123 --exec-file /opt/firecracker/firecracker --uid 990 --gid 991 --chroot-base-dir /srv/jailer --cgroup-version 2 --parent-cgroup aleph-vm --cgroup memory.max=201326592 --cgroup cpu.max=200000 100000 -- --api-sock /run/firecracker.socket --config-file /vm_config.json",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := base
			if tc.mod != nil {
				tc.mod(&p)
			}
			argv := JailerCommand(p)
			if got := strings.Join(argv, " "); got != tc.want {
				t.Errorf("got  %s\nwant %s", got, tc.want)
			}
			// Everything after "--" goes to Firecracker untouched.
			sep := slices.Index(argv, "--")
			if !reflect.DeepEqual(argv[sep+1:], p.FirecrackerArgs) {
				t.Errorf("firecracker args = %v", argv[sep+1:])
			}
		})
	}
}

func TestBuildPlanPaths(t *testing.T) {
	spec := testSpec(1, 128)
	for _, tc := range []struct {
		name    string
		opts    Options
		command string
		vsock   string
	}{
		{
			name:    "jailed",
			opts:    Options{UseJailer: true, KernelPath: "/k/vmlinux", JailerUID: 990, JailerGID: 990, CgroupVersion: 1},
			command: "/opt/firecracker/jailer --id " + spec.ExecutionID + " --exec-file /opt/firecracker/firecracker --uid 990 --gid 990 --chroot-base-dir /srv/jailer --cgroup memory.limit_in_bytes=201326592 --cgroup cpu.cfs_period_us=100000 --cgroup cpu.cfs_quota_us=200000 -- --api-sock /run/firecracker.socket --config-file /vm_config.json",
			vsock:   "/srv/jailer/firecracker/" + spec.ExecutionID + "/root/v.sock",
		},
		{
			name:    "no jailer",
			opts:    Options{KernelPath: "/k/vmlinux", CgroupVersion: 1},
			command: "/opt/firecracker/firecracker --api-sock " + spec.StateDir + "/firecracker.socket --config-file " + spec.StateDir + "/vm_config.json",
			vsock:   spec.StateDir + "/v.sock",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := BuildPlan(tc.opts.withDefaults(), spec, testDrives())
			if err != nil {
				t.Fatal(err)
			}
			if got := strings.Join(p.Command, " "); got != tc.command {
				t.Errorf("command\n got  %s\n want %s", got, tc.command)
			}
			if p.VsockPath != tc.vsock {
				t.Errorf("vsock host path %s, want %s", p.VsockPath, tc.vsock)
			}
			if p.Guest.CodeDevice != "/dev/vdb" || len(p.Guest.Volumes) != 2 {
				t.Errorf("guest = %+v", p.Guest)
			}
			if tc.opts.UseJailer {
				if p.Config.BootSource.KernelImagePath != JailKernel || p.Config.Vsock.UDSPath != JailVsock {
					t.Errorf("jailed config must use paths inside the chroot: %s", p.ConfigJSON)
				}
				var dests []string
				for _, f := range p.Files {
					dests = append(dests, f.Dest)
				}
				want := []string{"/vmlinux", "/drives/rootfs", "/drives/code", "/drives/vol0", "/drives/vol1"}
				if !reflect.DeepEqual(dests, want) {
					t.Errorf("jail files %v, want %v", dests, want)
				}
			}
		})
	}
}

func TestBuildPlanRejects(t *testing.T) {
	opts := Options{KernelPath: "/k", CgroupVersion: 1}.withDefaults()
	for _, tc := range []struct {
		name string
		mod  func(o *Options, s *backend.Spec)
		want string
	}{
		{"bad jail id", func(o *Options, s *backend.Spec) { s.ExecutionID = "../escape" }, "not a valid jail id"},
		{"too many vcpus", func(o *Options, s *backend.Spec) { s.VCPUs = 64 }, "supports 1 to 32"},
		{"socket path too long", func(o *Options, s *backend.Spec) { s.StateDir = "/" + strings.Repeat("x", 120) }, "too long for a unix socket"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o, s := opts, testSpec(1, 128)
			tc.mod(&o, &s)
			_, err := BuildPlan(o, s, testDrives())
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

func TestBootArgs(t *testing.T) {
	for _, tc := range []struct {
		logs, initrd bool
		init, want   string
	}{
		{false, true, "", "console=ttyS0 quiet " + BaseBootArgs},
		{true, true, "/sbin/init", "console=ttyS0 " + BaseBootArgs},
		{false, false, "/sbin/init", "console=ttyS0 quiet " + BaseBootArgs + " init=/sbin/init"},
	} {
		if got := BootArgs(tc.logs, tc.initrd, tc.init); got != tc.want {
			t.Errorf("BootArgs(%v, %v, %q) = %q, want %q", tc.logs, tc.initrd, tc.init, got, tc.want)
		}
	}
}

func requireRoot(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs root: skipped with -short")
	}
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("prerequisite missing in CI: must run as root")
		}
		t.Skip("must run as root (chown, tmpfs)")
	}
}

func inode(t *testing.T, p string) (ino uint64, uid, gid uint32) {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino, st.Uid, st.Gid
}

// TestJailLayout builds a real chroot the way Start does and checks it:
// hard links (same inode) for images on the jail's file system, ownership,
// config file, and removal on cleanup.
func TestJailLayout(t *testing.T) {
	requireRoot(t)
	// Short: the host path of the API socket must fit a unix socket name.
	dir, err := os.MkdirTemp("", "fcj")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	write := func(name string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(name), mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	kernel := write("vmlinux", 0o644)
	initrd := write("initrd", 0o644)
	runtime := write("runtime.squashfs", 0o644)
	private := write("private-code.squashfs", 0o600) // not world-readable: copied
	persistent := write("db.ext4", 0o600)
	eph := write("eph.ext4", 0o600)
	drives := vmimage.GuestDrives(&vmimage.Prepared{
		Runtime: vmimage.Image{Path: runtime, FSType: vmimage.FSSquashfs, ReadOnly: true},
		Code:    &vmimage.Image{Path: private, FSType: vmimage.FSSquashfs, ReadOnly: true},
		Volumes: []vmimage.VolumeImage{
			{Image: vmimage.Image{Path: persistent, FSType: vmimage.FSExt4}, Mount: "/db"},
			{Image: vmimage.Image{Path: eph, FSType: vmimage.FSExt4, Temporary: true}, Mount: "/tmp2"},
		},
	}, nil)
	const uid, gid = 4242, 4343
	b := &Backend{opts: Options{
		UseJailer: true, KernelPath: kernel, InitrdPath: initrd, JailBaseDir: filepath.Join(dir, "jails"),
		JailerUID: uid, JailerGID: gid, CgroupVersion: 1,
	}.withDefaults(), log: slog.Default()}
	spec := testSpec(1, 128)
	inst := newInstance(b, spec, slog.Default())
	inst.drives = drives
	if _, err := inst.plan(context.Background()); err != nil {
		t.Fatal(err)
	}
	removeLayout, err := inst.layOut(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(dir, "jails", "firecracker", spec.ExecutionID, "root")
	if inst.p.ChrootDir != root {
		t.Fatalf("chroot %s, want %s", inst.p.ChrootDir, root)
	}
	for _, tc := range []struct {
		src, dest string
		linked    bool
		owned     bool
	}{
		{kernel, "vmlinux", true, false},
		{initrd, "initrd", true, false},
		{runtime, "drives/rootfs", true, false},
		{private, "drives/code", false, true},
		{persistent, "drives/vol0", true, true},
		{eph, "drives/vol1", true, true},
	} {
		srcIno, _, _ := inode(t, tc.src)
		ino, u, g := inode(t, filepath.Join(root, tc.dest))
		if (srcIno == ino) != tc.linked {
			t.Errorf("%s: hard link = %v, want %v", tc.dest, srcIno == ino, tc.linked)
		}
		if (u == uid && g == gid) != tc.owned {
			t.Errorf("%s: owner %d:%d, jail-owned want %v", tc.dest, u, g, tc.owned)
		}
	}
	if _, u, g := inode(t, runtime); u != 0 || g != 0 {
		t.Errorf("shared runtime image was chowned to %d:%d", u, g)
	}
	if _, u, _ := inode(t, filepath.Join(root, "run")); u != uid {
		t.Error("run/ is not the jail user's: Firecracker cannot create its API socket")
	}
	if _, u, _ := inode(t, filepath.Join(root, "firecracker.log")); u != uid {
		t.Error("log file is not the jail user's")
	}
	// The jailer mknods its device nodes there and fails on existing ones.
	if _, err := os.Lstat(filepath.Join(root, JailerDevDir)); !os.IsNotExist(err) {
		t.Errorf("chroot has %s before the jailer runs (err %v)", JailerDevDir, err)
	}
	got, err := os.ReadFile(filepath.Join(root, "vm_config.json"))
	if err != nil || string(got) != string(inst.p.ConfigJSON) {
		t.Errorf("config file: %v", err)
	}

	if err := removeLayout(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "jails", "firecracker", spec.ExecutionID)); !os.IsNotExist(err) {
		t.Error("jail dir left after cleanup")
	}
	for _, p := range []string{kernel, runtime, persistent, private} {
		if b, err := os.ReadFile(p); err != nil || string(b) != filepath.Base(p) {
			t.Errorf("%s damaged by cleanup", p)
		}
	}
}

// TestJailCrossDevice mounts a tmpfs as the jail base so that links fail
// with EXDEV: read-only and temporary images are copied (sparse stays
// sparse), a persistent writable image is refused.
func TestJailCrossDevice(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	jailFS := filepath.Join(dir, "tmpfs")
	if err := os.Mkdir(jailFS, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", jailFS, "tmpfs", 0, "size=64m"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("cannot mount tmpfs: %v", err)
		}
		t.Skipf("cannot mount tmpfs: %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(jailFS, unix.MNT_DETACH) }) // the test directory's removal reports a leftover
	root := filepath.Join(jailFS, "root")

	ro := filepath.Join(dir, "ro.squashfs")
	writeFile(t, ro, "read-only image", 0o644)
	sparse := filepath.Join(dir, "eph.ext4")
	writeSparse(t, sparse, 32<<20)
	persistent := filepath.Join(dir, "db.ext4")
	writeFile(t, persistent, "db", 0o600)

	if _, err := os.Stat(root); err == nil {
		t.Fatal("unexpected")
	}
	linked, err := placeFile(root, JailFile{Source: ro, Dest: "/drives/ro"}, 4242, 4242)
	if err != nil || linked {
		t.Fatalf("read-only across devices: linked=%v err=%v", linked, err)
	}
	if b, _ := os.ReadFile(filepath.Join(root, "drives/ro")); string(b) != "read-only image" {
		t.Errorf("copy = %q", b)
	}
	if _, u, _ := inode(t, filepath.Join(root, "drives/ro")); u != 4242 {
		t.Error("copy not owned by the jail user")
	}

	linked, err = placeFile(root, JailFile{Source: sparse, Dest: "/drives/eph", Writable: true, Temporary: true}, 4242, 4242)
	if err != nil || linked {
		t.Fatalf("temporary across devices: linked=%v err=%v", linked, err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(root, "drives/eph"), &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != 32<<20 || st.Blocks*512 > 1<<20 {
		t.Errorf("sparse copy: size %d, allocated %d", st.Size, st.Blocks*512)
	}
	if head, tail := headTail(t, filepath.Join(root, "drives/eph")); head != "head" || tail != "tail" {
		t.Errorf("sparse copy lost data: %q %q", head, tail)
	}

	_, err = placeFile(root, JailFile{Source: persistent, Dest: "/drives/db", Writable: true}, 4242, 4242)
	if !errors.Is(err, ErrCrossDevice) {
		t.Errorf("persistent across devices: err = %v, want ErrCrossDevice", err)
	}
}

// writeSparse creates a sparse file of size bytes holding "head" at its
// start and "tail" at its end, with a hole between.
func writeSparse(t *testing.T, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("head"), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("tail"), size-4); err != nil {
		t.Fatal(err)
	}
}

// headTail reads back the first and last four bytes of a file.
func headTail(t *testing.T, path string) (head, tail string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	h, tl := make([]byte, 4), make([]byte, 4)
	if _, err := f.ReadAt(h, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(tl, st.Size()-4); err != nil {
		t.Fatal(err)
	}
	return string(h), string(tl)
}
