// Package gvisor runs executions in gVisor sandboxes (runsc), the backend
// for hosts without KVM.
//
// Each execution gets one OCI bundle in its state directory. The root is
// the runtime squashfs, loop-mounted read-only once on the host and shared
// by every sandbox of that runtime, under a per-sandbox read-only overlay
// that only adds the mount points; runsc's root overlay keeps the
// program's writes in the sandbox's memory. Code is extracted once per
// code hash into the cache and bind-mounted read-only at guest.CodeDir.
// The vm-agent is the container's process and speaks to the host over the
// sandbox's stdin/stdout; its stderr carries the program's output.
package gvisor

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/codeprep"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/mountinfo"
	"github.com/aleph-vm-go/vm-supervisor/internal/procs"
)

// Defaults for Options fields left at zero.
const (
	DefaultPlatform          = "systrap"
	DefaultCgroupParent      = "aleph-vm"
	DefaultPidsLimit         = 512
	DefaultMemoryOverheadMiB = 32
	DefaultStopGrace         = 2 * time.Second
)

// DefaultAgentArgs are passed to the vm-agent after its path.
var DefaultAgentArgs = []string{"--channel", "stdio", "--preload"}

// Options configure the backend.
type Options struct {
	// RunscPath is the runsc binary; "runsc" from PATH when empty.
	RunscPath string
	// Platform is runsc's --platform; DefaultPlatform when empty.
	Platform string
	// AgentPath is the host path of the static vm-agent binary, bind-mounted
	// read-only at AgentGuestPath and run as the sandbox's process with
	// AgentArgs. Required unless Command is set.
	AgentPath string
	// AgentArgs follow the agent's path on its command line;
	// DefaultAgentArgs when nil.
	AgentArgs []string
	// Command, when set, replaces the agent's whole command line inside the
	// sandbox (argv, resolved in the runtime image). For tests and
	// debugging only: nothing then serves the guest protocol.
	Command []string
	// CacheRoot holds shared runtime mounts (runtimes/<key>) and extracted
	// code (code/<hash>...). Required.
	CacheRoot string
	// RootDir is runsc's --root (container state), under EXECUTION_ROOT.
	// Required.
	RootDir string
	// PersistentDir holds the ext4 images of persistent volumes that have
	// no path of their own (volimage.PersistentPath).
	PersistentDir string
	// MkfsExt4Path and E2fsckPath default to the names in PATH
	// (e2fsprogs).
	MkfsExt4Path string
	E2fsckPath   string
	// CgroupParent groups the sandboxes' cgroups; DefaultCgroupParent when
	// empty.
	CgroupParent string
	// PidsLimit caps host tasks of one sandbox (the Sentry's threads count,
	// about 40 when idle under ptrace); DefaultPidsLimit when zero.
	PidsLimit int64
	// MemoryOverheadMiB is added to the program's memory for the cgroup
	// limit, because the Sentry's own memory (about 13 MiB idle, measured)
	// is charged to the same cgroup. DefaultMemoryOverheadMiB when zero;
	// negative means none.
	MemoryOverheadMiB int
	// StopGrace is how long Stop lets the agent exit on its own after the
	// channel closes before killing the sandbox; DefaultStopGrace when zero.
	StopGrace time.Duration
	// CodeLimits bound code extraction.
	CodeLimits codeprep.Limits
	// CodeCacheMaxBytes bounds the extracted code kept in
	// CacheRoot/code; codeprep.DefaultCacheMaxBytes when zero.
	CodeCacheMaxBytes int64
	Logger            *slog.Logger
	// Debug adds runsc's --debug and --debug-log (into DebugLogDir, or a
	// directory under the system's temp dir; kept after Stop on purpose).
	Debug       bool
	DebugLogDir string
	// AgentProfileDir, when set, makes every agent write a CPU profile to
	// AgentProfileDir/<sandbox id>/cpu.pprof, through a host directory
	// bind-mounted writable into the sandbox. For profiling only: the
	// program can write there too. Empty (the default): no such mount.
	AgentProfileDir string
	// SnapshotDir, when set, keeps checkpoints of warm sandboxes, one per
	// shape, that starts marked Spec.Snapshot restore (snapshot.go).
	// Empty: every sandbox starts afresh.
	SnapshotDir string
	// SnapshotMaxBytes bounds the images in SnapshotDir, least recently
	// used removed first; DefaultSnapshotMaxBytes when zero.
	SnapshotMaxBytes int64
}

// Backend starts gVisor sandboxes. It is safe for concurrent use.
type Backend struct {
	opts  Options
	runsc string
	log   *slog.Logger
	code  *codeprep.Cache
	snaps *snapshotStore // nil without Options.SnapshotDir

	binOnce sync.Once // hashes of runsc and the agent, for snapshot keys
	binIDs  string
	binErr  error
}

var _ backend.Backend = (*Backend)(nil)

// New checks that runsc and the agent are usable and returns the backend.
func New(opts Options) (*Backend, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.RunscPath == "" {
		opts.RunscPath = "runsc"
	}
	runsc, err := exec.LookPath(opts.RunscPath)
	if err != nil {
		return nil, errkind.Wrap(errkind.NoBackend, fmt.Errorf("gvisor: runsc not found (%q; Debian package runsc): %w", opts.RunscPath, err))
	}
	if opts.Platform == "" {
		opts.Platform = DefaultPlatform
	}
	if len(opts.Command) == 0 {
		if opts.AgentPath == "" {
			return nil, errkind.New(errkind.NoBackend, "gvisor: no vm-agent binary configured")
		}
		fi, err := os.Stat(opts.AgentPath)
		if err != nil {
			return nil, errkind.Wrap(errkind.NoBackend, fmt.Errorf("gvisor: vm-agent: %w", err))
		}
		if !fi.Mode().IsRegular() || fi.Mode()&0o111 == 0 {
			return nil, errkind.New(errkind.NoBackend, "gvisor: vm-agent %s is not an executable file", opts.AgentPath)
		}
		if opts.AgentArgs == nil {
			opts.AgentArgs = DefaultAgentArgs
		}
	}
	if opts.CacheRoot == "" || opts.RootDir == "" {
		return nil, errors.New("gvisor: CacheRoot and RootDir are required")
	}
	for _, d := range []*string{&opts.CacheRoot, &opts.RootDir} {
		abs, err := filepath.Abs(*d)
		if err != nil {
			return nil, fmt.Errorf("gvisor: %w", err)
		}
		if strings.ContainsAny(abs, ":,") {
			// These paths end up in overlayfs mount options.
			return nil, fmt.Errorf("gvisor: path %q must not contain ':' or ','", abs)
		}
		if err := os.MkdirAll(abs, 0o700); err != nil {
			return nil, fmt.Errorf("gvisor: %w", err)
		}
		*d = abs
	}
	if opts.CgroupParent == "" {
		opts.CgroupParent = DefaultCgroupParent
	}
	if opts.PidsLimit <= 0 {
		opts.PidsLimit = DefaultPidsLimit
	}
	if opts.MemoryOverheadMiB == 0 {
		opts.MemoryOverheadMiB = DefaultMemoryOverheadMiB
	} else if opts.MemoryOverheadMiB < 0 {
		opts.MemoryOverheadMiB = 0
	}
	if opts.StopGrace <= 0 {
		opts.StopGrace = DefaultStopGrace
	}
	if opts.Debug && opts.DebugLogDir == "" {
		opts.DebugLogDir = filepath.Join(os.TempDir(), "aleph-vm-runsc-debug")
	}
	log := opts.Logger.With("backend", "gvisor")
	code, err := codeprep.OpenCache(filepath.Join(opts.CacheRoot, "code"), codeprep.CacheOptions{
		MaxBytes: opts.CodeCacheMaxBytes, Limits: opts.CodeLimits, Logger: log,
	})
	if err != nil {
		return nil, fmt.Errorf("gvisor: %w", err)
	}
	b := &Backend{opts: opts, runsc: runsc, log: log, code: code}
	if opts.SnapshotDir != "" {
		if opts.SnapshotMaxBytes <= 0 {
			opts.SnapshotMaxBytes = DefaultSnapshotMaxBytes
		}
		if b.snaps, err = openSnapshotStore(opts.SnapshotDir, opts.SnapshotMaxBytes, log); err != nil {
			return nil, fmt.Errorf("gvisor: snapshots: %w", err)
		}
	}
	return b, nil
}

// NetworkLink implements backend.Networker: runsc's netstack runs in a
// network namespace the host prepared.
func (b *Backend) NetworkLink() backend.LinkKind { return backend.LinkNamespace }

// Name implements backend.Backend.
func (b *Backend) Name() string { return "gvisor" }

// MakesSpares implements backend.SpareMaker: sandboxes take their code
// after starting (instance.LoadCode).
func (b *Backend) MakesSpares() {}

var (
	_ backend.SpareMaker   = (*Backend)(nil)
	_ backend.Reaper       = (*Backend)(nil)
	_ backend.CodeLoader   = (*instance)(nil)
	_ backend.DirectDialer = (*instance)(nil)
)

// Reap kills and deletes every container left in RootDir, e.g. by a
// crashed supervisor. Call it at start-up, before any Start: it does not
// spare sandboxes of this process.
func (b *Backend) Reap(ctx context.Context) error {
	// runsc processes of a crashed run (a start under way, sandboxes,
	// gofers) carry our --root; ended first, none of them can register a
	// container after the listing below.
	if err := procs.KillMentioning(ctx, b.opts.RootDir+"\x00"); err != nil {
		b.log.Warn("runsc processes of an earlier run", "err", err)
	}
	out, err := b.runscCmd(ctx, "list", "-quiet").Output()
	if err != nil {
		return fmt.Errorf("gvisor: runsc list: %w", err)
	}
	var errs []error
	for _, id := range strings.Fields(string(out)) {
		b.log.Warn("removing leftover sandbox", "id", id)
		_ = b.runscCmd(ctx, "kill", id, "KILL").Run()
		if out, err := b.runscCmd(ctx, "delete", "--force", id).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("gvisor: runsc delete %s: %w: %s", id, err, strings.TrimSpace(string(out))))
		}
		_ = newCgroup(b.opts.CgroupParent, id).remove(ctx)
	}
	// Cgroups outlive runsc (ours on purpose, runsc's when it was killed)
	// and `runsc list` forgets a container whose state it lost: every
	// cgroup a sandbox of ours may have left is named by a marker under
	// our --root.
	if err := b.reapCgroups(ctx); err != nil {
		errs = append(errs, err)
	}
	unmountNullNetns(b.opts.RootDir)
	// No sandbox of ours runs any more: runtime mounts left by a crash
	// serve nobody.
	if err := mountinfo.DetachUnder(filepath.Join(b.opts.CacheRoot, "runtimes")); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Close releases what runsc keeps for all sandboxes: the empty network
// namespace its gofers share, bind-mounted under RootDir. Call it once
// every sandbox is stopped.
func (b *Backend) Close() error {
	unmountNullNetns(b.opts.RootDir)
	return nil
}

// unmountNullNetns removes runsc's shared "null" network namespace mounts
// (concurrent runsc starts may stack several on the same file).
func unmountNullNetns(rootDir string) {
	path := filepath.Join(rootDir, "null-netns")
	for {
		if err := unix.Unmount(path, unix.MNT_DETACH); err != nil {
			return
		}
	}
}

// runscCmd is a short-lived runsc management command (not `run`).
func (b *Backend) runscCmd(ctx context.Context, args ...string) *exec.Cmd {
	full := append([]string{"--root", b.opts.RootDir}, args...)
	return exec.CommandContext(ctx, b.runsc, full...)
}

var containerIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// Start implements backend.Backend. It creates the bundle step by step and
// undoes whatever was done when a step fails.
func (b *Backend) Start(ctx context.Context, spec backend.Spec) (backend.Instance, error) {
	log := spec.StartLogger(b.log, "gvisor")
	if b.restorable(spec) {
		inst, fallback, err := b.startFromSnapshot(ctx, spec, log)
		if err == nil || !fallback {
			return inst, err
		}
		if !errors.Is(err, errNoSnapshot) {
			log.Warn("could not restore a warm sandbox; starting afresh", "err", err)
		}
	}
	return backend.Start(ctx, "gvisor", spec, log, newInstance(b, spec, log))
}

// runtimeKey names the shared mount of a runtime. The content hash is the
// natural key; without one, the image's identity on disk stands in (hashing
// a few hundred MiB at every start would cost more than it protects).
func runtimeKey(spec backend.Spec) (string, error) {
	if spec.RuntimeHash != "" {
		if !containerIDPattern.MatchString(spec.RuntimeHash) {
			return "", errkind.New(errkind.InvalidInput, "runtime hash %q is not usable as a file name", spec.RuntimeHash)
		}
		return spec.RuntimeHash, nil
	}
	fi, err := os.Stat(spec.RuntimePath)
	if err != nil {
		return "", errkind.Wrap(errkind.ResourceMissing, fmt.Errorf("runtime: %w", err))
	}
	abs, _ := filepath.Abs(spec.RuntimePath)
	sum := sha256.Sum256(fmt.Appendf(nil, "%s\x00%d\x00%d", abs, fi.Size(), fi.ModTime().UnixNano()))
	return "path-" + hex.EncodeToString(sum[:12]), nil
}

// hostnameFor derives the sandbox's hostname from its execution id.
func hostnameFor(id string) string {
	h := strings.ToLower(id)
	h = regexp.MustCompile(`[^a-z0-9-]`).ReplaceAllString(h, "-")
	if len(h) > 12 {
		h = h[:12]
	}
	return "aleph-" + strings.Trim(h, "-")
}
