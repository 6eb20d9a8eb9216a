package firecracker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

func TestNetworkLink(t *testing.T) {
	var b backend.Backend = &Backend{}
	n, ok := b.(backend.Networker)
	if !ok || n.NetworkLink() != backend.LinkTap {
		t.Fatalf("firecracker backend: Networker %v, link %v", ok, n)
	}
}

func TestTapOwner(t *testing.T) {
	b := &Backend{opts: Options{UseJailer: true, JailerUID: 990, JailerGID: 991}}
	if uid, gid := b.TapOwner(); uid != 990 || gid != 991 {
		t.Errorf("jailed: tap owner %d:%d, want the jail user 990:991", uid, gid)
	}
	b.opts.UseJailer = false
	if uid, gid := b.TapOwner(); uid != os.Geteuid() || gid != os.Getegid() {
		t.Errorf("unjailed: tap owner %d:%d, want ours", uid, gid)
	}
}

func TestBuildConfigNetwork(t *testing.T) {
	t.Run("none", func(t *testing.T) {
		cfg := mustConfig(t, testSpec(1, 128), testDrives())
		b, _ := json.Marshal(cfg)
		if !strings.Contains(string(b), `"network-interfaces":[]`) {
			t.Errorf("no network must still give an empty network-interfaces: %s", b)
		}
	})
	t.Run("tap", func(t *testing.T) {
		spec := testSpec(1, 128)
		spec.Network = testNetwork()
		cfg := mustConfig(t, spec, testDrives())
		want := NetworkInterface{IfaceID: "eth0", HostDevName: "fc-0b5e4c1c", GuestMAC: "02:fc:0a:00:00:02"}
		if len(cfg.NetworkInterfaces) != 1 || cfg.NetworkInterfaces[0] != want {
			t.Errorf("network-interfaces %+v, want [%+v]", cfg.NetworkInterfaces, want)
		}
		// The network does not change the rest.
		plain := mustConfig(t, testSpec(1, 128), testDrives())
		plain.NetworkInterfaces = cfg.NetworkInterfaces
		a, _ := json.Marshal(plain)
		b, _ := json.Marshal(cfg)
		if string(a) != string(b) {
			t.Errorf("network changed more than network-interfaces:\n%s\n%s", a, b)
		}
	})
	t.Run("no mac", func(t *testing.T) {
		spec := testSpec(1, 128)
		spec.Network = testNetwork()
		spec.Network.GuestMAC = ""
		b, _ := json.Marshal(mustConfig(t, spec, testDrives()))
		if strings.Contains(string(b), "guest_mac") {
			t.Errorf("empty MAC must be left out (Firecracker then picks none): %s", b)
		}
	})
	for _, tc := range []struct {
		name string
		mod  func(n *backend.Network)
		want string
	}{
		{"namespace only", func(n *backend.Network) { n.TapName, n.NetnsPath = "", "/run/netns/x" }, "no tap device"},
		{"tap name too long", func(n *backend.Network) { n.TapName = "tap-0123456789ab" }, "not a valid tap device name"},
		{"tap name with slash", func(n *backend.Network) { n.TapName = "../tap" }, "not a valid tap device name"},
		{"tap name with space", func(n *backend.Network) { n.TapName = "tap 0" }, "not a valid tap device name"},
		{"mac with dashes", func(n *backend.Network) { n.GuestMAC = "02-fc-00-00-00-01" }, "not of the form"},
		{"mac short field", func(n *backend.Network) { n.GuestMAC = "02:fc:0:00:00:01" }, "not of the form"},
		{"mac too long", func(n *backend.Network) { n.GuestMAC = "aa:aa:aa:aa:aa:aa:aa" }, "not of the form"},
		{"mac not hex", func(n *backend.Network) { n.GuestMAC = "aa:aa:aa:aa:aa:ax" }, "not of the form"},
		{"multicast mac", func(n *backend.Network) { n.GuestMAC = "03:fc:00:00:00:01" }, "not a unicast address"},
		{"zero mac", func(n *backend.Network) { n.GuestMAC = "00:00:00:00:00:00" }, "not a unicast address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			spec := testSpec(1, 128)
			spec.Network = testNetwork()
			tc.mod(spec.Network)
			_, err := BuildConfig(spec, testDrives(), ConfigParams{KernelPath: "/vmlinux", VsockPath: "/v.sock"})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want %q", err, tc.want)
			}
		})
	}
	// Firecracker's own accepted example (mac.rs tests): mixed case.
	spec := testSpec(1, 128)
	spec.Network = testNetwork()
	spec.Network.GuestMAC = "12:34:56:78:9a:BC"
	if _, err := BuildConfig(spec, testDrives(), ConfigParams{KernelPath: "/vmlinux", VsockPath: "/v.sock"}); err != nil {
		t.Errorf("12:34:56:78:9a:BC: %v", err)
	}
}

// TestJailLeavesDevToJailer: the jailer mknods /dev/net/tun, /dev/kvm and
// /dev/urandom in the chroot and fails if they exist, so no planned file
// may be there, nor where it copies Firecracker.
func TestJailLeavesDevToJailer(t *testing.T) {
	spec := testSpec(1, 128)
	spec.Network = testNetwork()
	p, err := BuildPlan(Options{UseJailer: true, KernelPath: "/k/vmlinux", InitrdPath: "/k/initrd", JailerUID: 990, JailerGID: 990, CgroupVersion: 1}.withDefaults(), spec, testDrives())
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range p.Files {
		if err := checkJailDest(f.Dest, DefaultFirecrackerPath); err != nil {
			t.Error(err)
		}
	}
	for _, d := range append([]string{"/dev", "/dev/", "/dev/net/tun", "/drives/../dev/kvm", "/firecracker", "/", "drives/x"}, JailerDevices...) {
		if checkJailDest(d, DefaultFirecrackerPath) == nil {
			t.Errorf("%s accepted as a jail file path", d)
		}
	}
	for _, d := range []string{"/drives/rootfs", "/devices", "/vm_config.json", "/run/firecracker.socket"} {
		if err := checkJailDest(d, DefaultFirecrackerPath); err != nil {
			t.Errorf("%s refused: %v", d, err)
		}
	}
	for _, dev := range JailerDevices {
		if !strings.HasPrefix(dev, JailerDevDir+"/") {
			t.Errorf("jailer device %s outside %s", dev, JailerDevDir)
		}
	}
}

// fakeSysNet builds a /sys/class/net with one device and points checkTap
// at it.
func fakeSysNet(t *testing.T, name string, attrs map[string]string) {
	t.Helper()
	root := t.TempDir()
	dir := filepath.Join(root, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for k, v := range attrs {
		if err := os.WriteFile(filepath.Join(dir, k), []byte(v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	old := sysClassNet
	sysClassNet = root
	t.Cleanup(func() { sysClassNet = old })
}

func TestCheckTap(t *testing.T) {
	const uid, gid = 990, 991
	for _, tc := range []struct {
		name  string
		attrs map[string]string // nil: no device
		root  bool
		want  string // "" means accepted
	}{
		{"owned by jail user", map[string]string{"tun_flags": "0x1002", "owner": "990", "group": "991"}, false, ""},
		{"no owner set", map[string]string{"tun_flags": "0x1002", "owner": "-1", "group": "-1"}, false, ""},
		{"owner only", map[string]string{"tun_flags": "0x1002", "owner": "990", "group": "-1"}, false, ""},
		{"root's tap", map[string]string{"tun_flags": "0x1002", "owner": "0", "group": "0"}, false, "has owner 0"},
		{"root group", map[string]string{"tun_flags": "0x1002", "owner": "990", "group": "0"}, false, "has group 0"},
		{"root's tap, unjailed root", map[string]string{"tun_flags": "0x1002", "owner": "0", "group": "0"}, true, ""},
		{"missing", nil, false, "does not exist"},
		{"not a tun device", map[string]string{"mtu": "1500"}, false, "not a tun/tap device"},
		{"tun not tap", map[string]string{"tun_flags": "0x1001", "owner": "-1", "group": "-1"}, false, "tun device"},
		{"multi-queue", map[string]string{"tun_flags": "0x1102", "owner": "-1", "group": "-1"}, false, "multi-queue"},
		{"garbage", map[string]string{"tun_flags": "0x1002", "owner": "x", "group": "-1"}, false, "unexpected content"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.attrs != nil {
				fakeSysNet(t, "fc-tap", tc.attrs)
			} else {
				fakeSysNet(t, "other", map[string]string{})
			}
			err := checkTap("fc-tap", uid, gid, tc.root)
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("refused: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

// TestStartChecksTap: a wrong tap fails Start before anything is laid
// out, with the reason, rather than later in Firecracker's log.
func TestStartChecksTap(t *testing.T) {
	fakeSysNet(t, "fc-tap", map[string]string{"tun_flags": "0x1002", "owner": "0", "group": "0"})
	dir := t.TempDir()
	b := &Backend{opts: Options{UseJailer: true, KernelPath: "/k/vmlinux", CacheRoot: dir, JailBaseDir: filepath.Join(dir, "jails"), JailerUID: 990, JailerGID: 990, CgroupVersion: 1}.withDefaults()}
	b.log = b.opts.Logger
	spec := testSpec(1, 128)
	spec.StateDir = filepath.Join(dir, "state")
	spec.Network = testNetwork()
	spec.Network.TapName = "fc-tap"
	_, err := b.Start(context.Background(), spec)
	if err == nil || !strings.Contains(err.Error(), "check tap") || !strings.Contains(err.Error(), "has owner 0") {
		t.Fatalf("err = %v, want the tap check to refuse a root-owned tap", err)
	}
	// The check runs first: nothing was prepared or laid out.
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("files made despite the failed check: %v", entries)
	}
}

func TestInspectInternetWarning(t *testing.T) {
	dir := t.TempDir()
	spec := testSpec(1, 128)
	spec.ProgramHash = "prog"
	spec.RuntimePath = "/nonexistent/runtime.squashfs"
	spec.CodePath, spec.CodeHash, spec.CodeEncoding, spec.Entrypoint = "/nonexistent/code.zip", "codehash", message.EncodingZip, "main:app"
	spec.Internet = true
	opts := Options{KernelPath: "/opt/vm/vmlinux", CacheRoot: dir}
	p, err := Inspect(context.Background(), opts, spec)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(strings.Join(p.Warnings, "\n"), "is assigned at start and not shown") {
		t.Errorf("warnings = %v", p.Warnings)
	}
	if len(p.Config.NetworkInterfaces) != 0 {
		t.Errorf("interfaces without a network: %+v", p.Config.NetworkInterfaces)
	}
	// With a network (as a caller that has one would pass it), it is shown.
	spec.Network = testNetwork()
	if p, err = Inspect(context.Background(), opts, spec); err != nil {
		t.Fatal(err)
	}
	if len(p.Config.NetworkInterfaces) != 1 || !strings.Contains(string(p.ConfigJSON), `"host_dev_name": "fc-0b5e4c1c"`) {
		t.Errorf("config = %s", p.ConfigJSON)
	}
}

// tapAttachEnv makes the test binary attach to a tap the way Firecracker
// v1.0.0 does (Tap::open_named), as whatever user it was started as:
// "<tun node>:<tap name>". It exits 0 on success, else with the errno.
const tapAttachEnv = "FIRECRACKER_TEST_TAP_ATTACH"

func tapAttach(arg string) int {
	node, name, _ := strings.Cut(arg, ":")
	fd, err := unix.Open(node, unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, "open tun:", err)
		return 100
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return 101
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI | unix.IFF_VNET_HDR)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		fmt.Fprintln(os.Stderr, "TUNSETIFF:", err)
		var errno syscall.Errno
		if errors.As(err, &errno) {
			return int(errno)
		}
		return 102
	}
	return 0
}

// makeTap creates a persistent tap with the given owner and group (-1:
// unset), as the host would before Start, and removes it on cleanup.
func makeTap(t *testing.T, name string, owner, group int) {
	t.Helper()
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("no /dev/net/tun: %v", err)
	}
	defer unix.Close(fd)
	ifr, _ := unix.NewIfreq(name)
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		t.Skipf("cannot create a tap here: %v", err)
	}
	for _, s := range []struct {
		req uint
		v   int
	}{{unix.TUNSETOWNER, owner}, {unix.TUNSETGROUP, group}, {unix.TUNSETPERSIST, 1}} {
		if s.v < 0 {
			continue
		}
		if err := unix.IoctlSetInt(fd, s.req, s.v); err != nil {
			t.Fatalf("tap ioctl %#x: %v", s.req, err)
		}
	}
	t.Cleanup(func() {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			t.Error(err)
			return
		}
		defer unix.Close(fd)
		ifr, _ := unix.NewIfreq(name)
		ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			t.Errorf("remove tap %s: %v", name, err)
			return
		}
		if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 0); err != nil {
			t.Errorf("remove tap %s: %v", name, err)
		}
	})
}

// TestTapReachableFromJail checks, with real taps and the kernel's own
// permission check, what the jailed start relies on: a process running
// as the jail user, with no capabilities, holding a /dev/net/tun node made
// as the jailer makes it (mknod c 10 200, mode 0600, chowned to the jail
// user) and in the host network namespace (no --netns), attaches to a tap
// the host created for it, and is refused a root-owned one; checkTap
// agrees with the kernel in each case.
func TestTapReachableFromJail(t *testing.T) {
	requireRoot(t)
	const uid, gid = 4242, 4343
	dir, err := os.MkdirTemp("", "fctap")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// The jailer's node.
	node := filepath.Join(dir, "tun")
	if err := unix.Mknod(node, unix.S_IFCHR|0o600, int(unix.Mkdev(10, 200))); err != nil {
		t.Skipf("mknod: %v", err)
	}
	if err := os.Chown(node, uid, gid); err != nil {
		t.Fatal(err)
	}
	// A copy of the test binary the jail user can run.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "fc.test")
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(exe, data, 0o755); err != nil {
		t.Fatal(err)
	}
	attach := func(tap string) (int, string) {
		cmd := exec.Command(exe, "-test.run=^$")
		cmd.Env = append(os.Environ(), tapAttachEnv+"="+node+":"+tap)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: []uint32{}}}
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode(), string(out)
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0, string(out)
	}
	for _, tc := range []struct {
		name         string
		owner, group int
		ok           bool
	}{
		{"fcjail-own", uid, gid, true},
		{"fcjail-none", -1, -1, true},
		{"fcjail-root", 0, 0, false},
		{"fcjail-rgrp", uid, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			makeTap(t, tc.name, tc.owner, tc.group)
			code, out := attach(tc.name)
			if (code == 0) != tc.ok {
				t.Fatalf("jail user attaching to tap owned %d:%d: exit %d (%s), want success %v", tc.owner, tc.group, code, strings.TrimSpace(out), tc.ok)
			}
			if !tc.ok && code != int(syscall.EPERM) {
				t.Errorf("refused with exit %d (%s), want EPERM", code, strings.TrimSpace(out))
			}
			if err := checkTap(tc.name, uid, gid, false); (err == nil) != tc.ok {
				t.Errorf("checkTap = %v, kernel says attach ok = %v", err, tc.ok)
			}
		})
	}
}
