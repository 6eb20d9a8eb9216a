package firecracker

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Paths inside the jail (the chroot as the jailed Firecracker sees it).
const (
	JailConfigFile = "/vm_config.json"
	JailAPISocket  = "/run/firecracker.socket"
	JailVsock      = "/v.sock"
	JailLog        = "/firecracker.log"
	JailKernel     = "/vmlinux"
	JailInitrd     = "/initrd"
	// Drives are placed at /drives/<drive id>.
	JailDrivesDir = "/drives"
)

// JailerDevDir is where the jailer (v1.0.0, src/jailer/src/env.rs,
// Env::run) creates device nodes once inside the chroot, before dropping
// privileges: /dev/net/tun, /dev/kvm and /dev/urandom, each made with
// mknod (mode 0600) and chowned to --uid/--gid, the directories /dev and
// /dev/net made 0700 and the jail user's. mknod fails with EEXIST on an
// existing path and the jailer then gives up, so the chroot we lay out
// must have nothing under /dev: the jailer's nodes are the only way
// Firecracker reaches /dev/net/tun (for the tap) and /dev/kvm there.
// BuildPlan refuses a layout that would put a file there, and layOut
// removes a jail a crash left behind (its nodes included) before building.
const JailerDevDir = "/dev"

// JailerDevices are the nodes the jailer makes under JailerDevDir.
var JailerDevices = []string{"/dev/net/tun", "/dev/kvm", "/dev/urandom"}

// checkJailDest refuses a chroot path the jailer itself writes: anything
// under JailerDevDir, and /<exec file name>, where it copies Firecracker.
func checkJailDest(dest, execFile string) error {
	clean := filepath.Clean(dest)
	switch {
	case !filepath.IsAbs(clean) || clean == "/":
		return fmt.Errorf("jail path %q is not an absolute file path", dest)
	case clean == JailerDevDir || strings.HasPrefix(clean, JailerDevDir+"/"):
		return fmt.Errorf("jail path %s is under %s, where the jailer creates its device nodes", dest, JailerDevDir)
	case clean == "/"+filepath.Base(execFile):
		return fmt.Errorf("jail path %s is where the jailer copies the Firecracker binary", dest)
	}
	return nil
}

// JailerParams are the inputs of a jailer command line.
type JailerParams struct {
	JailerPath    string
	ID            string
	ExecFile      string // the firecracker binary; its base name must contain "firecracker"
	UID, GID      int
	ChrootBaseDir string
	// CgroupVersion 2 adds --cgroup-version 2; 1 (the jailer's default)
	// adds nothing.
	CgroupVersion int
	ParentCgroup  string   // --parent-cgroup when set
	Cgroups       []string // <file>=<value>, each as --cgroup
	// FirecrackerArgs follow "--" and go to Firecracker unchanged.
	FirecrackerArgs []string
}

// JailerCommand returns the jailer's argv (argv[0] is the jailer). No
// --daemonize: the jailer then execs Firecracker in place, so the process
// we started is Firecracker itself and its stdout (the guest's serial
// console) stays ours. No --new-pid-ns for the same reason: the pid we
// hold must be Firecracker's.
//
// No --netns either: the jailer then only unshares a mount namespace
// (pivot_root into the chroot), so Firecracker stays in the host network
// namespace, where the pool created the execution's tap before Start. It
// opens /dev/net/tun inside the chroot (the node the jailer made, see
// JailerDevDir) and attaches to the tap by name (TUNSETIFF), and tap names
// are looked up in the caller's network namespace. Attaching to an
// existing tap needs no capability only if the tap's owner and group are
// unset or are the jail user's uid and gid (the kernel's tun_not_capable);
// Firecracker has dropped to --uid/--gid by then, so the host must create
// the tap owned by Backend.TapOwner, which Start checks.
func JailerCommand(p JailerParams) []string {
	argv := []string{p.JailerPath,
		"--id", p.ID,
		"--exec-file", p.ExecFile,
		"--uid", strconv.Itoa(p.UID),
		"--gid", strconv.Itoa(p.GID),
		"--chroot-base-dir", p.ChrootBaseDir,
	}
	if p.CgroupVersion == 2 {
		argv = append(argv, "--cgroup-version", "2")
	}
	if p.ParentCgroup != "" {
		argv = append(argv, "--parent-cgroup", p.ParentCgroup)
	}
	for _, c := range p.Cgroups {
		argv = append(argv, "--cgroup", c)
	}
	argv = append(argv, "--")
	return append(argv, p.FirecrackerArgs...)
}

// VMMArgs are Firecracker's own arguments: configured entirely
// from the file, with the API socket kept for the stop action.
func VMMArgs(configFile, apiSocket string) []string {
	return []string{"--api-sock", apiSocket, "--config-file", configFile}
}

// CgroupPeriodUS is the CPU bandwidth period used for the quota.
const CgroupPeriodUS = 100_000

// CgroupLimits returns the jailer's --cgroup values for a VM of vcpus and
// memMiB (already including the VMM's overhead). The CPU quota grants one
// CPU more than the guest's vCPUs, so that device emulation is never
// starved by a busy guest, while a runaway VMM still cannot take the host.
func CgroupLimits(version, vcpus, memMiB int) []string {
	quota := (vcpus + 1) * CgroupPeriodUS
	mem := strconv.FormatInt(int64(memMiB)<<20, 10)
	if version == 2 {
		return []string{
			"memory.max=" + mem,
			fmt.Sprintf("cpu.max=%d %d", quota, CgroupPeriodUS),
		}
	}
	return []string{
		"memory.limit_in_bytes=" + mem,
		fmt.Sprintf("cpu.cfs_period_us=%d", CgroupPeriodUS),
		fmt.Sprintf("cpu.cfs_quota_us=%d", quota),
	}
}

// JailDir is <base>/<exec-name>/<id>, the directory the jailer builds
// (and we remove on Stop); the chroot is its "root" subdirectory.
func JailDir(base, execFile, id string) string {
	return filepath.Join(base, filepath.Base(execFile), id)
}

// JailFile is one file placed in the chroot.
type JailFile struct {
	Source string // host path
	Dest   string // path inside the chroot (absolute, as Firecracker sees it)
	// Writable files are opened read-write by Firecracker, so the jail
	// user must own them.
	Writable bool
	// Temporary files belong to this execution: copying them when a hard
	// link is impossible loses nothing.
	Temporary bool
}

// ErrCrossDevice reports a writable, non-temporary file (a persistent
// volume) on another file system than the jail: a copy would fork its
// data, so it is refused.
var ErrCrossDevice = errors.New("cannot hard-link a persistent image into the jail across file systems")

// placeFile puts f into the chroot at root: a hard link when possible (no
// copy of large images, and writes to a writable image reach the original),
// a copy when the source is on another file system (EXDEV) or not readable
// by the jail user.
//
// Shared read-only files (runtime, kernel, cached code) are linked but not
// chowned: chown would act on the shared inode and let a compromised VMM,
// running as the jail user, rewrite an image other VMs boot from. They only
// need to be world-readable. Copies and writable images are given to the
// jail user. It reports whether a hard link was made.
func placeFile(root string, f JailFile, uid, gid int) (linked bool, err error) {
	dst := filepath.Join(root, f.Dest)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return false, err
	}
	fi, err := os.Stat(f.Source)
	if err != nil {
		return false, err
	}
	if !fi.Mode().IsRegular() {
		return false, fmt.Errorf("%s is not a regular file", f.Source)
	}
	if f.Writable || fi.Mode().Perm()&0o004 != 0 {
		err := os.Link(f.Source, dst)
		switch {
		case err == nil:
			if f.Writable {
				if err := os.Chown(dst, uid, gid); err != nil {
					return true, err
				}
			}
			return true, nil
		case !errors.Is(err, unix.EXDEV):
			return false, fmt.Errorf("link %s into jail: %w", f.Source, err)
		case f.Writable && !f.Temporary:
			return false, fmt.Errorf("%s: %w", f.Source, ErrCrossDevice)
		}
	}
	if err := copySparse(f.Source, dst); err != nil {
		return false, fmt.Errorf("copy %s into jail: %w", f.Source, err)
	}
	return false, os.Chown(dst, uid, gid)
}

// copySparse copies src to a new file dst, skipping holes so that a large
// sparse ext4 image stays sparse.
func copySparse(src, dst string) (err error) {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(dst)
		}
	}()
	size := fi.Size()
	if err := out.Truncate(size); err != nil {
		return err
	}
	fd := int(in.Fd())
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, syscall.ENXIO) {
			break // only a hole remains
		}
		if err != nil {
			return err
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		if _, err := io.Copy(io.NewOffsetWriter(out, data), io.NewSectionReader(in, data, hole-data)); err != nil {
			return err
		}
		off = hole
	}
	return nil
}
