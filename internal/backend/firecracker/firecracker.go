// Package firecracker runs executions in Firecracker micro-VMs (v1.0.0 and
// later), under the jailer by default, as aleph-vm does.
//
// Firecracker is configured entirely from a --config-file (BuildConfig) and
// the guest is reached over hybrid vsock (DialVsock). Under the jailer each
// VM gets <JailBaseDir>/firecracker/<execution id>/root as its chroot, with
// kernel, initrd and drive images hard-linked in, runs as a dedicated
// uid/gid, and is confined by cgroup limits the jailer sets; the whole jail
// directory goes on Stop.
//
// With Spec.Network the VM gets one virtio-net card, eth0, on the host tap
// the pool created before Start (NetworkLink is backend.LinkTap; the tap
// must belong to TapOwner). The guest's address is the agent's business,
// from guest.Config.
//
// Neither /dev/kvm-backed runs nor the firecracker binary are available on
// the project's machines: what is tested there is everything around the
// VMM (configuration against the v1.0.0 schema, jailer command line and
// chroot layout, vsock handshake, start-up errors). Plan and Inspect show
// exactly what would run, without running it.
package firecracker

import (
	"context"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/codeprep"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/vmimage"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// Defaults for Options fields left at zero: aleph-vm's paths and user.
const (
	DefaultFirecrackerPath   = "/opt/firecracker/firecracker"
	DefaultJailerPath        = "/opt/firecracker/jailer"
	DefaultJailBaseDir       = "/srv/jailer"
	DefaultJailUser          = "jailman"
	DefaultKVMPath           = "/dev/kvm"
	DefaultMemoryOverheadMiB = 64
	DefaultStopGrace         = 2 * time.Second
)

// Options configure the backend.
type Options struct {
	FirecrackerPath string // DefaultFirecrackerPath when empty
	JailerPath      string // DefaultJailerPath when empty
	// UseJailer runs Firecracker under the jailer (aleph-vm's default; its
	// --no-jailer flag clears this).
	UseJailer bool
	// KernelPath is LINUX_PATH: an uncompressed ELF vmlinux built with
	// CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y. Required.
	KernelPath string
	// InitrdPath is the project's initramfs with the vm-agent as /init.
	// Without it the kernel boots the runtime drive and runs Init.
	InitrdPath string
	Init       string
	// CacheRoot holds converted code images (CacheRoot/vm-images). Required.
	CacheRoot string
	// PersistentDir holds persistent volume images that have no path of
	// their own (see vmimage.Options).
	PersistentDir string
	// JailBaseDir is the jailer's --chroot-base-dir; DefaultJailBaseDir
	// when empty. Keep it on the file system of the cache and volumes so
	// that images are hard-linked rather than copied.
	JailBaseDir string
	// JailUser names the user Firecracker runs as under the jailer;
	// DefaultJailUser when empty. JailerUID/JailerGID, when positive,
	// override the lookup.
	JailUser             string
	JailerUID, JailerGID int
	// CgroupVersion for the jailer: 0 detects it from /sys/fs/cgroup.
	CgroupVersion int
	// ParentCgroup is the jailer's --parent-cgroup; empty leaves the
	// jailer's default (the exec file's name).
	ParentCgroup string
	// MemoryOverheadMiB is added to the guest's memory for the cgroup
	// limit (the VMM's own memory is charged there too).
	// DefaultMemoryOverheadMiB when zero; negative means none.
	MemoryOverheadMiB int
	// PrintSystemLogs lets the guest kernel's log through to the
	// program's output (and Firecracker's log at level Info).
	PrintSystemLogs bool
	// StopGrace is how long Stop waits after SendCtrlAltDel before killing
	// the VMM; DefaultStopGrace when zero.
	StopGrace time.Duration
	// KVMPath is DefaultKVMPath when empty; a test seam.
	KVMPath    string
	CodeLimits codeprep.Limits
	Logger     *slog.Logger
}

func (o Options) withDefaults() Options {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.FirecrackerPath == "" {
		o.FirecrackerPath = DefaultFirecrackerPath
	}
	if o.JailerPath == "" {
		o.JailerPath = DefaultJailerPath
	}
	if o.JailBaseDir == "" {
		o.JailBaseDir = DefaultJailBaseDir
	}
	if o.JailUser == "" {
		o.JailUser = DefaultJailUser
	}
	if o.KVMPath == "" {
		o.KVMPath = DefaultKVMPath
	}
	if o.MemoryOverheadMiB == 0 {
		o.MemoryOverheadMiB = DefaultMemoryOverheadMiB
	} else if o.MemoryOverheadMiB < 0 {
		o.MemoryOverheadMiB = 0
	}
	if o.StopGrace <= 0 {
		o.StopGrace = DefaultStopGrace
	}
	if o.CgroupVersion == 0 {
		o.CgroupVersion = detectCgroupVersion()
	}
	return o
}

func detectCgroupVersion() int {
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return 2
	}
	return 1
}

func (o Options) preparer() *vmimage.Preparer {
	return vmimage.NewPreparer(vmimage.Options{
		CacheDir:      filepath.Join(o.CacheRoot, "vm-images"),
		PersistentDir: o.PersistentDir,
		CodeLimits:    o.CodeLimits,
		Logger:        o.Logger,
	})
}

// Backend starts Firecracker micro-VMs. It is safe for concurrent use.
type Backend struct {
	opts Options
	log  *slog.Logger
}

var _ backend.Backend = (*Backend)(nil)

// New checks, without waiting on anything, that this host can run
// Firecracker VMs, and returns the backend. Errors are errkind.NoBackend
// and say what is missing.
func New(opts Options) (*Backend, error) {
	opts = opts.withDefaults()
	if err := checkKVM(opts.KVMPath); err != nil {
		return nil, err
	}
	if err := checkExecutable("firecracker", opts.FirecrackerPath, "FIRECRACKER_PATH"); err != nil {
		return nil, err
	}
	if opts.UseJailer {
		if err := checkExecutable("jailer", opts.JailerPath, "JAILER_PATH"); err != nil {
			return nil, err
		}
		if !strings.Contains(filepath.Base(opts.FirecrackerPath), "firecracker") {
			// The jailer refuses other names; say it before the first start.
			return nil, errkind.New(errkind.NoBackend, "firecracker backend: the jailer only runs an exec file whose name contains \"firecracker\", got %s", opts.FirecrackerPath)
		}
	}
	if err := checkKernel(opts.KernelPath); err != nil {
		return nil, err
	}
	if opts.InitrdPath != "" {
		if _, err := os.Stat(opts.InitrdPath); err != nil {
			return nil, errkind.Wrap(errkind.NoBackend, fmt.Errorf("firecracker backend: initrd: %w", err))
		}
	}
	if opts.CacheRoot == "" {
		return nil, errors.New("firecracker backend: CacheRoot is required")
	}
	if opts.UseJailer {
		uid, gid, err := opts.jailIDs()
		if err != nil {
			return nil, errkind.Wrap(errkind.NoBackend, err)
		}
		opts.JailerUID, opts.JailerGID = uid, gid
		if err := os.MkdirAll(opts.JailBaseDir, 0o755); err != nil {
			return nil, errkind.Wrap(errkind.NoBackend, fmt.Errorf("firecracker backend: jail base dir: %w", err))
		}
	} else {
		opts.Logger.Warn("firecracker runs without the jailer: no chroot, no uid drop, no cgroup limits")
	}
	return &Backend{opts: opts, log: opts.Logger.With("backend", "firecracker")}, nil
}

func checkKVM(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return errkind.New(errkind.NoBackend, "firecracker backend needs %s: not present on this host (use gvisor or qemu)", path)
		}
		return errkind.Wrap(errkind.NoBackend, fmt.Errorf("firecracker backend needs %s: %w", path, err))
	}
	if fi.Mode()&os.ModeCharDevice == 0 {
		return errkind.New(errkind.NoBackend, "firecracker backend needs %s: not a character device", path)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return errkind.Wrap(errkind.NoBackend, fmt.Errorf("firecracker backend needs %s: not usable: %w (use gvisor or qemu)", path, err))
	}
	return f.Close()
}

func checkExecutable(what, path, env string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return errkind.Wrap(errkind.NoBackend, fmt.Errorf("firecracker backend: %s binary %s: %w (set %s; releases at github.com/firecracker-microvm/firecracker)", what, path, err, env))
	}
	if !fi.Mode().IsRegular() || fi.Mode()&0o111 == 0 {
		return errkind.New(errkind.NoBackend, "firecracker backend: %s %s is not an executable file", what, path)
	}
	return nil
}

// checkKernel refuses what Firecracker v1.0.0 cannot boot on x86_64: it
// loads an uncompressed ELF vmlinux, not a bzImage.
func checkKernel(path string) error {
	if path == "" {
		return errkind.New(errkind.NoBackend, "firecracker backend: no guest kernel (set LINUX_PATH to an uncompressed vmlinux; `make kernel-custom` builds one)")
	}
	f, err := elf.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, os.ErrPermission) {
			return errkind.Wrap(errkind.NoBackend, fmt.Errorf("firecracker backend: guest kernel: %w", err))
		}
		return errkind.New(errkind.NoBackend, "firecracker backend: guest kernel %s is not an uncompressed ELF vmlinux (a bzImage does not boot under Firecracker v1.0.0): %v", path, err)
	}
	return f.Close()
}

// jailIDs resolves the jail user.
func (o Options) jailIDs() (int, int, error) {
	if o.JailerUID > 0 && o.JailerGID > 0 {
		return o.JailerUID, o.JailerGID, nil
	}
	u, err := user.Lookup(o.JailUser)
	if err != nil {
		return 0, 0, fmt.Errorf("firecracker backend: jail user %q: %w (create it: useradd --system --no-create-home %s)", o.JailUser, err, o.JailUser)
	}
	uid, err1 := strconv.Atoi(u.Uid)
	gid, err2 := strconv.Atoi(u.Gid)
	if err := errors.Join(err1, err2); err != nil {
		return 0, 0, fmt.Errorf("firecracker backend: jail user %q: %w", o.JailUser, err)
	}
	if uid == 0 || gid == 0 {
		return 0, 0, fmt.Errorf("firecracker backend: jail user %q must not be root", o.JailUser)
	}
	return uid, gid, nil
}

// Name implements backend.Backend.
func (b *Backend) Name() string { return "firecracker" }

// Plan is everything one execution would run, resolved but not started.
type Plan struct {
	ID     string
	Jailed bool
	Config *VMConfig
	// ConfigJSON is the --config-file content, as written.
	ConfigJSON []byte
	// Command is the argv started: the jailer's, or Firecracker's.
	Command []string
	// JailDir is removed on Stop; ChrootDir is its root/ (both empty
	// without the jailer).
	JailDir, ChrootDir string
	// Host paths of what Firecracker creates or reads.
	ConfigFile, APISocket, VsockPath, LogPath string
	// Files are placed into the chroot (jailed only).
	Files []JailFile
	// Drives in attachment order, with host paths and guest devices.
	Drives []vmimage.Drive
	// Guest has CodeDevice and Volumes as the agent will be told.
	Guest guest.Config
	// Warnings about the plan (e.g. an unresolved jail user in Inspect).
	Warnings []string
}

var jailIDPattern = regexp.MustCompile(`^[A-Za-z0-9-]{1,64}$`)

// maxSocketPath is the room for a unix socket path (sun_path minus NUL).
const maxSocketPath = 107

// BuildPlan lays out one execution from drives (vmimage.GuestDrives, with
// host paths). opts must have defaults applied and, when jailed, resolved
// JailerUID/JailerGID. It touches no file.
func BuildPlan(opts Options, spec backend.Spec, drives []vmimage.Drive) (*Plan, error) {
	if !jailIDPattern.MatchString(spec.ExecutionID) {
		return nil, errkind.New(errkind.InvalidInput, "execution id %q is not a valid jail id (letters, digits, '-', at most 64)", spec.ExecutionID)
	}
	p := &Plan{ID: spec.ExecutionID, Jailed: opts.UseJailer, Drives: drives}
	vmimage.FillGuest(drives, &p.Guest)

	params := ConfigParams{PrintSystemLogs: opts.PrintSystemLogs, Init: opts.Init}
	seen := make([]vmimage.Drive, len(drives))
	copy(seen, drives)
	if opts.UseJailer {
		p.JailDir = JailDir(opts.JailBaseDir, opts.FirecrackerPath, p.ID)
		p.ChrootDir = filepath.Join(p.JailDir, "root")
		host := func(in string) string { return filepath.Join(p.ChrootDir, in) }
		p.ConfigFile, p.APISocket = host(JailConfigFile), host(JailAPISocket)
		p.VsockPath, p.LogPath = host(JailVsock), host(JailLog)
		params.KernelPath, params.VsockPath, params.LogPath = JailKernel, JailVsock, JailLog
		p.Files = append(p.Files, JailFile{Source: opts.KernelPath, Dest: JailKernel})
		if opts.InitrdPath != "" {
			params.InitrdPath = JailInitrd
			p.Files = append(p.Files, JailFile{Source: opts.InitrdPath, Dest: JailInitrd})
		}
		for i, d := range seen {
			dest := JailDrivesDir + "/" + d.ID
			p.Files = append(p.Files, JailFile{Source: d.HostPath, Dest: dest, Writable: !d.ReadOnly, Temporary: d.Temporary})
			seen[i].HostPath = dest
		}
		dests := []string{JailConfigFile, JailAPISocket, JailVsock, JailLog}
		for _, f := range p.Files {
			dests = append(dests, f.Dest)
		}
		for _, d := range dests {
			if err := checkJailDest(d, opts.FirecrackerPath); err != nil {
				return nil, err
			}
		}
	} else {
		if spec.StateDir == "" {
			return nil, errors.New("spec has no StateDir")
		}
		p.ConfigFile = filepath.Join(spec.StateDir, "vm_config.json")
		p.APISocket = filepath.Join(spec.StateDir, "firecracker.socket")
		p.VsockPath = filepath.Join(spec.StateDir, "v.sock")
		p.LogPath = filepath.Join(spec.StateDir, "firecracker.log")
		params.KernelPath, params.InitrdPath = opts.KernelPath, opts.InitrdPath
		params.VsockPath, params.LogPath = p.VsockPath, p.LogPath
	}
	for _, s := range []string{p.APISocket, p.VsockPath + "_4294967295"} {
		if len(s) > maxSocketPath {
			return nil, fmt.Errorf("socket path %s is too long for a unix socket (%d > %d bytes); use a shorter jail base or execution root", s, len(s), maxSocketPath)
		}
	}
	cfg, err := BuildConfig(spec, seen, params)
	if err != nil {
		return nil, err
	}
	p.Config = cfg
	if p.ConfigJSON, err = json.MarshalIndent(cfg, "", "  "); err != nil {
		return nil, err
	}
	if opts.UseJailer {
		p.Command = JailerCommand(JailerParams{
			JailerPath:      opts.JailerPath,
			ID:              p.ID,
			ExecFile:        opts.FirecrackerPath,
			UID:             opts.JailerUID,
			GID:             opts.JailerGID,
			ChrootBaseDir:   opts.JailBaseDir,
			CgroupVersion:   opts.CgroupVersion,
			ParentCgroup:    opts.ParentCgroup,
			Cgroups:         CgroupLimits(opts.CgroupVersion, cfg.MachineConfig.VCPUCount, cfg.MachineConfig.MemSizeMiB+opts.MemoryOverheadMiB),
			FirecrackerArgs: VMMArgs(JailConfigFile, JailAPISocket),
		})
	} else {
		p.Command = append([]string{opts.FirecrackerPath}, VMMArgs(p.ConfigFile, p.APISocket)...)
	}
	return p, nil
}

// Inspect returns the plan of spec on this host without checking that
// Firecracker can run here and without creating anything (images are
// planned, not converted). For `vm-supervisor program inspect`.
func Inspect(ctx context.Context, opts Options, spec backend.Spec) (*Plan, error) {
	opts = opts.withDefaults()
	var warnings []string
	if opts.UseJailer {
		uid, gid, err := opts.jailIDs()
		if err != nil {
			warnings = append(warnings, err.Error()+"; uid/gid shown as 0")
		}
		opts.JailerUID, opts.JailerGID = uid, gid
	}
	if spec.StateDir == "" {
		spec.StateDir = filepath.Join(os.TempDir(), "aleph-vm-inspect", spec.ExecutionID)
		warnings = append(warnings, "no state dir given; shown under "+spec.StateDir)
	}
	prep, err := opts.preparer().Plan(ctx, spec)
	if err != nil {
		return nil, err
	}
	p, err := BuildPlan(opts, spec, vmimage.GuestDrives(prep, nil))
	if err != nil {
		return nil, fmt.Errorf("firecracker: %w", err)
	}
	if spec.Internet && spec.Network == nil {
		warnings = append(warnings, "the program asks for internet access: its network interface (when networking is enabled) is assigned at start and not shown here")
	}
	p.Warnings = append(p.Warnings, warnings...)
	return p, nil
}

// Start implements backend.Backend.
func (b *Backend) Start(ctx context.Context, spec backend.Spec) (backend.Instance, error) {
	log := spec.StartLogger(b.log, "firecracker")
	if spec.Internet && spec.Network == nil {
		log.Info("internet access requested but no network was prepared; the VM has no network")
	}
	return backend.Start(ctx, "firecracker", spec, log, newInstance(b, spec, log))
}
