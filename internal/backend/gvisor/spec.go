package gvisor

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// AgentGuestPath is where the vm-agent binary appears inside the sandbox.
const AgentGuestPath = "/opt/aleph/vm-agent"

// agentProfileDir is where the agent writes its CPU profile when
// Options.AgentProfileDir asks for one.
const agentProfileDir = "/run/aleph-profile"

// runDir is the agent's private tmpfs (sockets of guest.GuestAPISocket and
// guest.ProgramSocket live there).
const runDir = "/run/aleph"

// defaultCaps is what a program may keep: enough to bind low ports, signal
// its children and manage files it owns, nothing that reaches the Sentry's
// more exotic paths (no SYS_ADMIN, NET_RAW, MKNOD, SYS_PTRACE, ...).
var defaultCaps = []string{
	"CAP_CHOWN",
	"CAP_DAC_OVERRIDE",
	"CAP_FOWNER",
	"CAP_KILL",
	"CAP_NET_BIND_SERVICE",
	"CAP_SETGID",
	"CAP_SETUID",
}

// Paths masked and made read-only as container runtimes usually do. gVisor
// synthesises /proc and /sys, so most of these are already harmless; they
// are kept for defence in depth and parity with runc.
var (
	maskedPaths = []string{
		"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
		"/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
		"/proc/sched_debug", "/proc/scsi", "/sys/firmware",
	}
	readonlyPaths = []string{
		"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
	}
)

// mountPlan is one mount the sandbox gets, with what the root skeleton
// needs to provide for it.
type mountPlan struct {
	spec   specs.Mount
	isFile bool // the mount point must be a file (bind mount of a file)
}

type specParams struct {
	id       string
	hostname string
	rootfs   string
	args     []string
	memLimit int64
	vcpus    int
	pids     int64
	cgroup   string
	mounts   []mountPlan
	netns    string // path of the execution's network namespace; empty: a new, empty one
}

func netnsPath(n *backend.Network) string {
	if n == nil {
		return ""
	}
	return n.NetnsPath
}

func buildSpec(p specParams) *specs.Spec {
	mounts := []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc"},
		{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
		{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"}},
		{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
		{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
	}
	for _, m := range p.mounts {
		mounts = append(mounts, m.spec)
	}
	memBytes := p.memLimit
	period := uint64(100_000)
	quota := int64(p.vcpus) * int64(period)
	pids := p.pids
	noFile := uint64(65536)

	return &specs.Spec{
		Version: specs.Version,
		Process: &specs.Process{
			Terminal: false,
			User:     specs.User{UID: 0, GID: 0},
			Args:     p.args,
			Env: []string{
				"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
				"HOME=/root",
				"LANG=C.UTF-8",
			},
			Cwd: "/",
			Capabilities: &specs.LinuxCapabilities{
				Bounding:  defaultCaps,
				Effective: defaultCaps,
				Permitted: defaultCaps,
			},
			Rlimits:         []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: noFile, Soft: noFile}},
			NoNewPrivileges: true,
		},
		// readonly stays false: with runsc's root overlay, writes then land
		// in the sandbox's memory; readonly:true would keep the root
		// read-only even with the overlay (measured with this runsc).
		Root:     &specs.Root{Path: p.rootfs, Readonly: false},
		Hostname: p.hostname,
		Mounts:   mounts,
		Linux: &specs.Linux{
			Resources: &specs.LinuxResources{
				Memory: &specs.LinuxMemory{Limit: &memBytes},
				CPU:    &specs.LinuxCPU{Quota: &quota, Period: &period},
				Pids:   &specs.LinuxPids{Limit: pids},
			},
			CgroupsPath: p.cgroup,
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace},
				{Type: specs.NetworkNamespace, Path: p.netns},
				{Type: specs.IPCNamespace},
				{Type: specs.UTSNamespace},
				{Type: specs.MountNamespace},
			},
			MaskedPaths:   maskedPaths,
			ReadonlyPaths: readonlyPaths,
		},
	}
}

func writeSpec(bundle string, s *specs.Spec) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(bundle, "config.json"), b, 0o600)
}

// buildSkeleton creates, in skel, every mount point the sandbox needs that
// the runtime image lacks. The skeleton is laid over the image (overlayfs,
// read-only) to form the sandbox's root, because runsc's gofer creates
// missing mount points on the host side, which a read-only image forbids.
//
// Directories that already exist in the image are recreated in the
// skeleton with the image's mode and owner, since overlayfs shows the
// upper directory's attributes for merged directories.
func buildSkeleton(skel, image string, mounts []mountPlan) error {
	need := []mountPlan{
		{spec: specs.Mount{Destination: "/proc"}},
		{spec: specs.Mount{Destination: "/dev"}},
		{spec: specs.Mount{Destination: "/sys"}},
		{spec: specs.Mount{Destination: "/tmp"}},
	}
	need = append(need, mounts...)
	for _, m := range need {
		if err := addMountPoint(skel, image, m.spec.Destination, m.isFile); err != nil {
			return err
		}
	}
	return nil
}

func addMountPoint(skel, image, dest string, isFile bool) error {
	if !path.IsAbs(dest) || path.Clean(dest) != dest || dest == "/" {
		return fmt.Errorf("mount point %q: must be a clean absolute path", dest)
	}
	parts := strings.Split(strings.TrimPrefix(dest, "/"), "/")
	rel := ""
	for i, part := range parts {
		rel = path.Join(rel, part)
		last := i == len(parts)-1
		inImage := filepath.Join(image, rel)
		inSkel := filepath.Join(skel, rel)
		fi, err := os.Lstat(inImage)
		switch {
		case err == nil && fi.Mode()&fs.ModeSymlink != 0:
			// Overlaying a directory would silently replace the link.
			return fmt.Errorf("mount point %s: %s is a symbolic link in the runtime", dest, "/"+rel)
		case err == nil && fi.IsDir() && !(last && isFile):
			if err := mkdirLike(inSkel, fi); err != nil {
				return err
			}
		case err == nil && last && isFile && fi.Mode().IsRegular():
			// The image already has the file; nothing to add.
		case err == nil || errors.Is(err, fs.ErrNotExist):
			if last && isFile {
				f, err := os.OpenFile(inSkel, os.O_CREATE|os.O_WRONLY, 0o644)
				if err != nil {
					return fmt.Errorf("mount point %s: %w", dest, err)
				}
				f.Close()
			} else if err := os.Mkdir(inSkel, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
				return fmt.Errorf("mount point %s: %w", dest, err)
			}
		default:
			return fmt.Errorf("mount point %s: %w", dest, err)
		}
	}
	return nil
}

func mkdirLike(dir string, like fs.FileInfo) error {
	if err := os.Mkdir(dir, 0o755); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return nil
		}
		return fmt.Errorf("root skeleton: %w", err)
	}
	// Mkdir applies the umask and drops sticky bits: set them explicitly.
	if err := os.Chmod(dir, like.Mode()&(fs.ModePerm|fs.ModeSticky|fs.ModeSetgid)); err != nil {
		return fmt.Errorf("root skeleton: %w", err)
	}
	if st, ok := like.Sys().(*syscall.Stat_t); ok {
		if err := os.Lchown(dir, int(st.Uid), int(st.Gid)); err != nil {
			return fmt.Errorf("root skeleton: %w", err)
		}
	}
	return nil
}

// codeMount, agentMount and runMount are the mounts every sandbox gets.
func codeMount(hostDir string) mountPlan {
	return mountPlan{spec: specs.Mount{
		Destination: guest.CodeDir, Type: "bind", Source: hostDir,
		Options: []string{"rbind", "ro", "nosuid", "nodev"},
	}}
}

func agentMount(hostPath string) mountPlan {
	return mountPlan{isFile: true, spec: specs.Mount{
		Destination: AgentGuestPath, Type: "bind", Source: hostPath,
		Options: []string{"bind", "ro", "nosuid", "nodev"},
	}}
}

// tmpMount is /tmp, a tmpfs of sizeMiB. Without it runsc mounts its own
// tmpfs on an empty /tmp, sized at half the host's memory (measured: 11.7
// GiB on a 24 GiB host), which only the memory cgroup would bound, by
// killing the sandbox.
func tmpMount(sizeMiB int) mountPlan {
	return mountPlan{spec: specs.Mount{
		Destination: "/tmp", Type: "tmpfs", Source: "tmpfs",
		Options: []string{"nosuid", "nodev", "mode=1777", fmt.Sprintf("size=%dm", sizeMiB)},
	}}
}

func runMount() mountPlan {
	return mountPlan{spec: specs.Mount{
		Destination: runDir, Type: "tmpfs", Source: "tmpfs",
		Options: []string{"nosuid", "nodev", "mode=755", "size=16m"},
	}}
}
