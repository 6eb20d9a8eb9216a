package gvisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/codeprep"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/volimage"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/loopdev"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/tailbuf"
)

// ErrMemoryLimit tells that the sandbox was killed for exceeding its
// memory limit.
var ErrMemoryLimit = errors.New("memory limit exceeded")

// instance is one running sandbox and everything Start created for it.
type instance struct {
	*backend.Process
	b    *Backend
	spec backend.Spec
	log  *slog.Logger
	id   string
	cg   cgroup

	// Filled by the start steps.
	codeDir      string
	codeLease    *codeprep.Lease   // the cached tree bound at codeDir
	treeLeases   []*codeprep.Lease // cached trees of the data archive and zip volumes
	runtimeMount string            // shared mount point, refcounted
	volumeMounts []string
	volumeLocks  []*volimage.Lock // persistent images, held until their unmount
	volumeImages []string         // their paths
	mounts       []mountPlan
	skelDir      string
	bundleDir    string
	rootfs       string
	memLimit     int64       // bytes, program memory plus the Sentry's overhead
	http         *httpSocket // the program's HTTP socket, seen from the host

	// Snapshots (snapshot.go): hold runs the agent with --hold; a sandbox
	// with restoreFrom is restored from that image instead of started,
	// releaseImage is called once it is gone, and early holds the agent's
	// first bytes, read to see the restore work. A fresh sandbox being
	// checkpointed has held, which keeps the channel quiet until its
	// agent is released; heldSeen tells the agent got warm, and adopted
	// that a program took the sandbox meanwhile (no checkpoint then).
	hold         bool
	restoreFrom  string
	releaseImage func()
	early        []byte
	held         *heldChannel
	heldSeen     bool
	adopted      atomic.Bool

	stdin     *os.File // our end: writes reach the agent's stdin
	stdout    *os.File // our end: reads come from the agent's stdout
	stderrEnd chan struct{}
	stderr    *tailbuf.Buffer // runsc's last words, for an exit by itself

	watchEnd chan struct{}
	cancel   context.CancelFunc

	stopper backend.StopOnce
}

func newInstance(b *Backend, spec backend.Spec, log *slog.Logger) *instance {
	i := &instance{
		b:      b,
		spec:   spec,
		log:    log,
		id:     spec.ExecutionID,
		cg:     newCgroup(b.opts.CgroupParent, spec.ExecutionID),
		stderr: tailbuf.New(3, 300),
	}
	i.Process = backend.NewProcess("gvisor", "sandbox", spec.ExecutionID, i.sampleUsage)
	return i
}

func (i *instance) prepareCode(ctx context.Context) (backend.Undo, error) {
	if err := i.placeCode(ctx); err != nil {
		return nil, err
	}
	if i.codeLease == nil {
		return nil, nil
	}
	// The code tree is bound below the sandbox's root; once that is gone
	// nothing uses it.
	return func(context.Context) error { i.codeLease.Release(); return nil }, nil
}

func (i *instance) placeCode(ctx context.Context) error {
	if i.spec.DeferCode {
		// A spare: an empty private directory now, filled by LoadCode. The
		// bind mount is revalidated by the gofer (file-access-mounts
		// shared), so files added later are seen inside.
		dir := filepath.Join(i.spec.StateDir, "code")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("code directory: %w", err)
		}
		i.codeDir = dir
		return nil
	}
	if i.spec.CodePath == "" {
		return nil // an executable may live in the runtime or a volume
	}
	// The cached tree is bind-mounted: the lease keeps it from eviction
	// until cleanup.
	lease, err := i.extractCode(ctx, i.spec)
	if err != nil {
		return err
	}
	i.codeLease, i.codeDir = lease, lease.Path
	return nil
}

func (i *instance) extractCode(ctx context.Context, spec backend.Spec) (*codeprep.Lease, error) {
	return i.b.code.Acquire(ctx, codeprep.Source{
		Path:       spec.CodePath,
		Hash:       spec.CodeHash,
		Encoding:   spec.CodeEncoding,
		Entrypoint: spec.Entrypoint,
	})
}

// LoadCode implements backend.CodeLoader for spares: the program's cached
// tree is hard-linked (or, across file systems, copied with its holes)
// into the sandbox's so far empty read-only code directory. Errors from
// the code itself (errkind.InvalidInput, TooLarge, ResourceMissing) come
// before anything is written there: the spare can still take other code.
func (i *instance) LoadCode(ctx context.Context, spec backend.Spec) error {
	i.adopted.Store(true)
	if !i.spec.DeferCode {
		return errors.New("gvisor: LoadCode on a sandbox that already has its code")
	}
	if spec.CodePath == "" {
		return nil
	}
	lease, err := i.extractCode(ctx, spec)
	if err != nil {
		return err
	}
	// The links keep the files alive once linked; the lease only has to
	// last while they are made.
	defer lease.Release()
	if err := codeprep.LinkTree(ctx, lease.Path, i.codeDir); err != nil {
		return fmt.Errorf("gvisor: putting code into the sandbox: %w", err)
	}
	return nil
}

// mountRuntime acquires the runtime's shared mount; its undo releases it
// (the overlay root that pins it is gone by then).
func (i *instance) mountRuntime(ctx context.Context) (backend.Undo, error) {
	if _, err := os.Stat(i.spec.RuntimePath); err != nil {
		return nil, errkind.Wrap(errkind.ResourceMissing, fmt.Errorf("runtime: %w", err))
	}
	key, err := runtimeKey(i.spec)
	if err != nil {
		return nil, err
	}
	mp := filepath.Join(i.b.opts.CacheRoot, "runtimes", key)
	if err := acquireRuntime(ctx, i.log, i.spec.RuntimePath, mp); err != nil {
		return nil, err
	}
	i.runtimeMount = mp
	return func(context.Context) error { return releaseRuntime(i.log, mp) }, nil
}

// mountVolumes prepares the host side of each volume and of the data
// archive, and records the OCI mounts.
//
// Immutable squashfs volumes are loop-mounted read-only; zip volumes and
// the data archive (zip or squashfs) are extracted by codeprep, with the
// limits and the cache code archives have, and bound read-only, as VMs
// see them (vmimage packs the same trees as squashfs drives). Ephemeral
// volumes are tmpfs inside the sandbox, bounded by their size (and, being
// the Sentry's memory, by the sandbox's memory limit); persistent ones are
// the ext4 images every backend shares (volimage), loop-mounted on the
// host. The data archive comes last, as on VMs. The undo (also of a
// failure part way) unmounts them and lets go of their images and trees.
func (i *instance) mountVolumes(ctx context.Context) (backend.Undo, error) {
	return i.unmountVolumes, i.placeVolumes(ctx)
}

func (i *instance) placeVolumes(ctx context.Context) error {
	for n, v := range i.spec.Volumes {
		if err := ctx.Err(); err != nil {
			return err
		}
		switch v.Kind {
		case message.VolumeImmutable:
			if v.Encoding == message.EncodingZip {
				if err := i.bindTree(ctx, "volume "+v.Mount, v.Mount, codeprep.Source{Path: v.Path, Hash: v.Hash, Encoding: v.Encoding}); err != nil {
					return err
				}
				continue
			}
			if v.Encoding != "" && v.Encoding != message.EncodingSquashfs {
				return errkind.New(errkind.Unsupported, "volume %s: encoding %q not supported (squashfs or zip)", v.Mount, v.Encoding)
			}
			mp := filepath.Join(i.spec.StateDir, "volumes", fmt.Sprint(n))
			if err := os.MkdirAll(mp, 0o755); err != nil {
				return err
			}
			if err := loopdev.Mount(v.Path, mp, "squashfs", true, unix.MS_NODEV|unix.MS_NOSUID, ""); err != nil {
				os.Remove(mp)
				return fmt.Errorf("volume %s: %w", v.Mount, err)
			}
			i.volumeMounts = append(i.volumeMounts, mp)
			i.mounts = append(i.mounts, mountPlan{spec: specs.Mount{
				Destination: v.Mount, Type: "bind", Source: mp,
				Options: []string{"rbind", "ro", "nosuid", "nodev"},
			}})
		case message.VolumeEphemeral:
			size := v.SizeMiB
			if size <= 0 {
				size = 64
			}
			i.mounts = append(i.mounts, mountPlan{spec: specs.Mount{
				Destination: v.Mount, Type: "tmpfs", Source: "tmpfs",
				Options: []string{"nosuid", "nodev", "mode=1777", fmt.Sprintf("size=%dm", size)},
			}})
		case message.VolumePersistent:
			mp, err := i.mountPersistent(ctx, n, v)
			if err != nil {
				return err
			}
			opt := "rw"
			if v.ReadOnly {
				opt = "ro"
			}
			i.mounts = append(i.mounts, mountPlan{spec: specs.Mount{
				Destination: v.Mount, Type: "bind", Source: mp,
				Options: []string{"rbind", opt, "nosuid", "nodev"},
			}})
		default:
			return errkind.New(errkind.Unsupported, "volume %s: unknown kind %q", v.Mount, v.Kind)
		}
	}
	if i.spec.DataPath != "" {
		if i.spec.DataMount == "" {
			return errkind.New(errkind.InvalidInput, "data archive without a mount point")
		}
		switch i.spec.DataEncoding {
		case message.EncodingZip, message.EncodingSquashfs:
		default:
			return errkind.New(errkind.Unsupported, "data: encoding %q not supported (zip or squashfs)", i.spec.DataEncoding)
		}
		// The shared extracted tree, read-only where the agent copies it
		// from into the sandbox's in-memory root at DataMount: the program
		// writes its own copy, never the cache's.
		return i.bindTree(ctx, "data", guest.DataSourceDir, codeprep.Source{Path: i.spec.DataPath, Hash: i.spec.DataHash, Encoding: i.spec.DataEncoding})
	}
	return nil
}

// bindTree extracts an archive into the shared tree cache (or finds it
// there) and binds the tree read-only at mount; the lease keeps the tree
// from eviction until cleanup.
func (i *instance) bindTree(ctx context.Context, what, mount string, src codeprep.Source) error {
	lease, err := i.b.code.Acquire(ctx, src)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	i.treeLeases = append(i.treeLeases, lease)
	i.mounts = append(i.mounts, mountPlan{spec: specs.Mount{
		Destination: mount, Type: "bind", Source: lease.Path,
		Options: []string{"rbind", "ro", "nosuid", "nodev"},
	}})
	return nil
}

// mountPersistent loop-mounts the ext4 image of a persistent volume (made
// at its size_mib the first time) under the state directory, for runsc to
// bind into the sandbox, and returns the mount point. The execution holds
// the image's lock until cleanup. The host mount is nosuid and nodev, so
// set-user-id files and device nodes a program leaves there are inert on
// the host, and no host code looks inside: symbolic links in it are only
// ever resolved by the sandbox.
func (i *instance) mountPersistent(ctx context.Context, n int, v backend.Volume) (string, error) {
	img := v.Path
	if img == "" {
		p, err := volimage.PersistentPath(i.b.opts.PersistentDir, i.spec.ProgramHash, n, "", v.Mount)
		if err != nil {
			return "", err
		}
		img = p
		v.LegacyPaths = volimage.LegacyPaths(i.b.opts.PersistentDir, i.spec.ProgramHash, n, "", v.Mount)
	}
	origin := volimage.Origin{OldPaths: v.LegacyPaths, Parent: v.ParentPath}
	if err := volimage.EnsurePersistent(ctx, i.b.opts.MkfsExt4Path, img, v.Mount, v.SizeMiB, v.ReadOnly, origin); err != nil {
		return "", err
	}
	lock, err := volimage.Acquire(ctx, img)
	if err != nil {
		return "", fmt.Errorf("volume %s: %w", v.Mount, err)
	}
	i.volumeLocks = append(i.volumeLocks, lock)
	i.volumeImages = append(i.volumeImages, img)
	// A loop device still bound to the image is a mount of it that lives
	// on (a sandbox a crash left, a lazy unmount still in use): mounting
	// the file system a second time would corrupt it.
	if err := waitLoopFree(ctx, img, 2*time.Second); err != nil {
		return "", errkind.Wrap(errkind.Conflict, fmt.Errorf("volume %s: %w", v.Mount, err))
	}
	if !v.ReadOnly {
		if err := volimage.Check(ctx, i.b.opts.E2fsckPath, img); err != nil {
			return "", fmt.Errorf("volume %s: %w", v.Mount, err)
		}
	}
	mp := filepath.Join(i.spec.StateDir, "volumes", fmt.Sprint(n))
	if err := os.MkdirAll(mp, 0o700); err != nil {
		return "", err
	}
	// errors=remount-ro overrides what the image's superblock asks for
	// (a VM could have set errors=panic).
	if err := loopdev.Mount(img, mp, "ext4", v.ReadOnly, unix.MS_NODEV|unix.MS_NOSUID|unix.MS_NOATIME, mountData(v.ReadOnly)); err != nil {
		os.Remove(mp)
		return "", fmt.Errorf("volume %s: %w", v.Mount, err)
	}
	i.volumeMounts = append(i.volumeMounts, mp)
	return mp, nil
}

// mountData is the ext4 options of a persistent volume's host mount.
// errors=remount-ro overrides what the image's superblock asks for (a VM
// could have set errors=panic). A writable volume also gets discard: the
// loop device punches the blocks of deleted files out of the sparse
// image, so the host's disk gets them back; and noinit_itable, so that
// the kernel does not zero the inode tables mkfs left lazily
// uninitialised (volimage.MakeExt4), which would write about 3% of the
// volume's size to the host's disk in the background.
func mountData(readOnly bool) string {
	if readOnly {
		return "errors=remount-ro"
	}
	return "errors=remount-ro,discard,noinit_itable"
}

// waitLoopFree waits (at most d) until no loop device is bound to image:
// with autoclear, the kernel lets a device go shortly after its last
// unmount.
func waitLoopFree(ctx context.Context, image string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		devs, err := loopdev.BackedBy(image)
		if err != nil {
			return err
		}
		if len(devs) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s is still attached to /dev/%s", image, devs[0].Name)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// assembleRoot lays a skeleton of mount points over the shared runtime
// mount. Both layers are read-only; runsc's overlay takes the writes. The
// undo unmounts the root, then removes the bundle and the skeleton.
func (i *instance) assembleRoot(ctx context.Context) (backend.Undo, error) {
	if err := i.layRoot(); err != nil {
		return i.removeRootDirs, err
	}
	return func(ctx context.Context) error {
		if err := unmountRetry(i.rootfs); err != nil {
			return backend.InUse(err)
		}
		return i.removeRootDirs(ctx)
	}, nil
}

func (i *instance) removeRootDirs(context.Context) error {
	return errors.Join(os.RemoveAll(i.bundleDir), os.RemoveAll(i.skelDir))
}

func (i *instance) layRoot() error {
	if i.codeDir != "" {
		i.mounts = append(i.mounts, codeMount(i.codeDir))
	}
	if len(i.b.opts.Command) == 0 {
		i.mounts = append(i.mounts, agentMount(i.b.opts.AgentPath))
	}
	i.mounts = append(i.mounts, runMount(), tmpMount(RootOverlayMiB(i.spec.MemoryMiB)))
	if d := i.b.opts.AgentProfileDir; d != "" && len(i.b.opts.Command) == 0 {
		host := filepath.Join(d, i.id)
		if err := os.MkdirAll(host, 0o755); err != nil {
			return fmt.Errorf("agent profile: %w", err)
		}
		i.mounts = append(i.mounts, mountPlan{spec: specs.Mount{
			Destination: agentProfileDir, Type: "bind", Source: host,
			Options: []string{"rbind", "rw", "nosuid", "nodev", "noexec"},
		}})
	}

	i.skelDir = filepath.Join(i.spec.StateDir, "skel")
	i.bundleDir = filepath.Join(i.spec.StateDir, "bundle")
	i.rootfs = filepath.Join(i.bundleDir, "rootfs")
	for _, d := range []string{i.skelDir, i.rootfs} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if strings.ContainsAny(i.skelDir+i.runtimeMount, ":,") {
		return fmt.Errorf("paths %q, %q must not contain ':' or ','", i.skelDir, i.runtimeMount)
	}
	if err := buildSkeleton(i.skelDir, i.runtimeMount, i.mounts); err != nil {
		return err
	}
	opts := fmt.Sprintf("lowerdir=%s:%s", i.skelDir, i.runtimeMount)
	if err := unix.Mount("overlay", i.rootfs, "overlay", unix.MS_RDONLY|unix.MS_NODEV|unix.MS_NOSUID, opts); err != nil {
		return fmt.Errorf("overlay root on %s: %w", i.rootfs, err)
	}
	return nil
}

func (i *instance) writeBundle(context.Context) (backend.Undo, error) {
	args := i.b.opts.Command
	if len(args) == 0 {
		args = append([]string{AgentGuestPath}, i.b.opts.AgentArgs...)
		if i.b.opts.AgentProfileDir != "" {
			args = append(args, "--cpu-profile", agentProfileDir+"/cpu.pprof")
		}
		if i.http != nil {
			args = append(args, "--program-socket", httpSocketDir+"/"+httpSocketName)
		}
		if i.hold {
			args = append(args, "--hold")
		}
	}
	vcpus := max(i.spec.VCPUs, 1)
	mem := i.spec.MemoryMiB
	if mem <= 0 {
		mem = 128
	}
	i.memLimit = int64(mem+i.b.opts.MemoryOverheadMiB) << 20
	s := buildSpec(specParams{
		id:       i.id,
		hostname: hostnameFor(i.id),
		rootfs:   i.rootfs,
		args:     args,
		memLimit: i.memLimit,
		vcpus:    vcpus,
		pids:     i.b.opts.PidsLimit,
		cgroup:   i.cg.ociPath(),
		mounts:   i.mounts,
		netns:    netnsPath(i.spec.Network),
	})
	return nil, writeSpec(i.bundleDir, s) // in the bundle, which assembleRoot's undo removes
}

// RootOverlayMiB is the size of the writable layer over a sandbox's root,
// and of its /tmp, for a program of memoryMiB. Both live in the Sentry's
// memory, charged to the sandbox's cgroup.
func RootOverlayMiB(memoryMiB int) int {
	if memoryMiB <= 0 {
		memoryMiB = 128
	}
	return max(memoryMiB/2, 8)
}

func (i *instance) prepareCgroup(context.Context) (backend.Undo, error) {
	// The marker comes first and goes last: a crash at any point leaves
	// one naming every cgroup of ours that may exist, for Reap.
	if err := markCgroup(i.b.opts.RootDir, i.id); err != nil {
		return nil, err
	}
	undo := func(ctx context.Context) error {
		if err := i.cg.remove(ctx); err != nil {
			return err
		}
		return unmarkCgroup(i.b.opts.RootDir, i.id)
	}
	return undo, i.cg.prepare(i.memLimit)
}

// startRunsc runs the sandbox. The process outlives Start's ctx: it is
// bound to the instance and ends with Stop. Its undo is endRunsc.
func (i *instance) startRunsc(ctx context.Context) (backend.Undo, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := i.runRunsc(); err != nil {
		return nil, err
	}
	return i.endRunsc, nil
}

func (i *instance) runRunsc() error {
	o := i.b.opts
	// With a network, runsc's netstack takes over the eth0 the host set up
	// in the execution's namespace (address and routes included); without
	// one the sandbox has only its own loopback.
	netMode := "none"
	if i.spec.Network != nil {
		netMode = "sandbox"
	}
	args := []string{"--root", o.RootDir, "--platform", o.Platform, "--network", netMode,
		// Only the root gets the memory overlay: with --overlay (all
		// mounts) writes to persistent volumes would also stay in memory
		// and never reach the host (measured). The overlay's upper layer
		// is a tmpfs in the Sentry's memory, charged to the sandbox's
		// cgroup: writes to / and /tmp never reach the host's disk. Its
		// size is half the program's memory, as tmpfs(5) defaults to half
		// of RAM, so a program filling / gets ENOSPC while it still has
		// memory left to handle it, instead of being killed.
		"--overlay2", fmt.Sprintf("root:memory,size=%dm", RootOverlayMiB(i.spec.MemoryMiB)),
		// The program may make sockets the host can reach (its HTTP
		// socket, httpsock.go), never reach the host's.
		"--host-uds", "create"}
	if o.Debug {
		dir := filepath.Join(o.DebugLogDir, i.id)
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return err
		}
		args = append(args, "--debug", "--debug-log", dir+"/")
	}
	if i.restoreFrom != "" {
		args = append(args, "restore", "--image-path", i.restoreFrom, "--bundle", i.bundleDir, i.id)
	} else {
		args = append(args, "run", "--bundle", i.bundleDir, i.id)
	}

	inR, inW, err := os.Pipe()
	if err != nil {
		return err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		return err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		inR.Close()
		inW.Close()
		outR.Close()
		outW.Close()
		return err
	}
	cmd := exec.Command(i.b.runsc, args...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = inR, outW, errW
	// Own process group: a Ctrl-C meant for the supervisor must not reach
	// runsc, which would forward it into the sandbox.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	i.log.Debug("starting runsc", "args", args)
	err = cmd.Start()
	inR.Close()
	outW.Close()
	errW.Close()
	if err != nil {
		inW.Close()
		outR.Close()
		errR.Close()
		return err
	}
	i.Started(cmd)
	i.stdin, i.stdout = inW, outR

	out := i.spec.ProgramOutput
	if out == nil {
		out = io.Discard
	}
	i.stderrEnd = make(chan struct{})
	go func() {
		defer close(i.stderrEnd)
		defer errR.Close()
		_, _ = io.Copy(io.MultiWriter(out, i.stderr.Writer()), errR)
	}()

	watchCtx, cancel := context.WithCancel(context.Background())
	i.cancel = cancel
	i.watchEnd = make(chan struct{})
	go func() {
		defer close(i.watchEnd)
		i.cg.watchOOM(watchCtx, i.log, i.onOOM)
	}()
	go i.Reap(i.exitDetails)
	return nil
}

// onOOM ends the whole sandbox at the first OOM kill inside it: the
// kernel may have picked any of its processes (a ptrace stub, the gofer),
// and a half-killed sandbox is worse than a clearly dead one.
func (i *instance) onOOM() {
	if !i.Halt(i.memoryLimitErr()) {
		return
	}
	i.log.Warn("sandbox exceeded its memory limit; killing it", "memory_mib", i.spec.MemoryMiB)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = i.b.runscCmd(ctx, "kill", i.id, "KILL").Run()
}

func (i *instance) memoryLimitErr() error {
	return fmt.Errorf("%w (%d MiB)", ErrMemoryLimit, i.spec.MemoryMiB)
}

// exitDetails runs once runsc ended by itself: an OOM kill makes it a
// memory limit error, and runsc's last words follow.
func (i *instance) exitDetails() string {
	// On cgroup v1 the memory cgroup is ours and still there: its count is
	// the authority. Elsewhere the watcher's report may trail the exit.
	if n, err := i.cg.oomKills(); err == nil && n > 0 {
		i.Halt(i.memoryLimitErr())
	} else {
		select {
		case <-i.watchEnd:
		case <-time.After(500 * time.Millisecond):
		}
	}
	if last := i.lastWords(); last != "" {
		return "; last output: " + last
	}
	return ""
}

// lastWords is the tail of runsc's stderr once it was read to its end
// (runsc exited, so the end comes soon): what names a failed start, e.g.
// a spec runsc refused.
func (i *instance) lastWords() string {
	select {
	case <-i.stderrEnd:
	case <-time.After(time.Second):
		return ""
	}
	return strings.ReplaceAll(i.stderr.String(), "\n", " | ")
}

// sampleUsage reads the sandbox's cgroup (every process of it, which
// vanishes with the sandbox) for CPU time, and /proc of its processes for
// I/O (see backend.Usage).
func (i *instance) sampleUsage() (backend.Usage, bool) {
	u, ok := i.cg.usage()
	if !ok {
		return u, false
	}
	for _, pid := range i.cg.pids() {
		if io, err := backend.ProcIO(pid); err == nil {
			u.IOReadCount += io.IOReadCount
			u.IOWriteCount += io.IOWriteCount
			u.IOReadBytes += io.IOReadBytes
			u.IOWriteBytes += io.IOWriteBytes
		}
	}
	return u, true
}

// Channel implements backend.Instance: the agent's stdin and stdout.
func (i *instance) Channel(ctx context.Context) (io.ReadWriteCloser, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := i.TakeChannel(); err != nil {
		return nil, err
	}
	c := &stdioChannel{w: i.stdin, r: i.stdout, early: i.early}
	if i.held != nil {
		c.held = i.held
	}
	return c, nil
}

// stdioChannel joins the two pipe ends into one stream. Closing it is what
// tells the agent that the host is gone (EOF on its stdin).
type stdioChannel struct {
	w, r  *os.File
	early []byte       // read from r before the channel was handed out
	held  *heldChannel // nil, or the hold of an agent being checkpointed
	once  sync.Once
	err   error
}

func (c *stdioChannel) Read(p []byte) (int, error) {
	if c.held != nil {
		<-c.held.released
	}
	if len(c.early) > 0 {
		n := copy(p, c.early)
		c.early = c.early[n:]
		return n, nil
	}
	return c.r.Read(p)
}
func (c *stdioChannel) Write(p []byte) (int, error) {
	if c.held != nil && c.held.keep(p) {
		return len(p), nil
	}
	return c.w.Write(p)
}

// heldChannel keeps a held agent's channel quiet: reads wait for the
// release, and writes are kept, then sent after the release line (the
// agent reads its stdin only then; a blocked write would time the host's
// session out if the agent takes long to get warm).
type heldChannel struct {
	mu       sync.Mutex
	kept     []byte
	done     bool
	released chan struct{}
}

func newHeldChannel() *heldChannel { return &heldChannel{released: make(chan struct{})} }

// keep holds p until the release; false once released.
func (h *heldChannel) keep(p []byte) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.done {
		return false
	}
	h.kept = append(h.kept, p...)
	return true
}

// release writes line, then what was kept, to w, and opens the channel.
func (h *heldChannel) release(w io.Writer, line []byte) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.done {
		return nil
	}
	defer close(h.released)
	h.done = true
	_, err := w.Write(append(line, h.kept...))
	h.kept = nil
	return err
}
func (c *stdioChannel) Close() error {
	c.once.Do(func() { c.err = errors.Join(c.w.Close(), c.r.Close()) })
	return c.err
}

// Stop implements backend.Instance (see backend.StopOnce).
func (i *instance) Stop(ctx context.Context) error { return i.stopper.Do(ctx, i.stop) }

// stop closes the channel, which lets a well-behaved agent see EOF and
// exit; the undo stack does the rest (endRunsc first).
func (i *instance) stop(ctx context.Context) error {
	i.Stopping()
	i.stdin.Close()
	i.stdout.Close()
	i.WaitExit(i.b.opts.StopGrace)
	return backend.StopThenUnwind(ctx, i.log, i.Undos())
}

// endRunsc is the undo of startRunsc: the sandbox is killed if it still
// runs, and deleted from runsc's state.
func (i *instance) endRunsc(ctx context.Context) error {
	i.Stopping()
	if !i.Exited() {
		i.log.Debug("sandbox did not exit after channel close; killing")
		if out, err := i.b.runscCmd(ctx, "kill", i.id, "KILL").CombinedOutput(); err != nil {
			i.log.Debug("runsc kill", "err", err, "output", strings.TrimSpace(string(out)))
		}
		i.WaitExit(5 * time.Second)
	}
	var err error
	delCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	if out, derr := i.b.runscCmd(delCtx, "delete", "--force", i.id).CombinedOutput(); derr != nil {
		err = fmt.Errorf("runsc delete: %w: %s", derr, strings.TrimSpace(string(out)))
	}
	cancel()
	if !i.WaitExit(5 * time.Second) {
		// runsc itself is stuck; it is ours to end.
		i.KillGroup(syscall.SIGKILL)
		<-i.Done()
	}
	select {
	case <-i.stderrEnd:
	case <-time.After(2 * time.Second):
		i.log.Warn("sandbox output still open after stop")
	}
	i.cancel()
	if i.releaseImage != nil {
		i.releaseImage()
	}
	return err
}

// unmountVolumes is the undo of mountVolumes. Directories are removed
// only once nothing is mounted below them, so a failed unmount can never
// turn into deleting the contents of a mounted volume.
func (i *instance) unmountVolumes(ctx context.Context) error {
	// The trees are bound below the sandbox's root, gone by now.
	for _, l := range i.treeLeases {
		l.Release()
	}
	i.treeLeases = nil
	var errs []error
	for _, mp := range i.volumeMounts {
		if err := unmountRetry(mp); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return backend.InUse(errors.Join(errs...))
	}
	// The images are free once their loop devices are: only then may
	// another execution mount them.
	for _, img := range i.volumeImages {
		if err := waitLoopFree(ctx, img, 5*time.Second); err != nil {
			i.log.Warn("persistent volume image still attached after unmount", "err", err)
		}
	}
	for _, l := range i.volumeLocks {
		if err := l.Release(); err != nil {
			errs = append(errs, err)
		}
	}
	errs = append(errs, os.RemoveAll(filepath.Join(i.spec.StateDir, "volumes")))
	return errors.Join(errs...)
}

// Steps implements backend.Starting.
func (i *instance) Steps() []backend.Step {
	return []backend.Step{
		{Name: "prepare code", Run: i.prepareCode},
		{Name: "mount runtime", Run: i.mountRuntime},
		{Name: "mount volumes", Run: i.mountVolumes},
		{Name: "prepare HTTP socket", Run: i.prepareHTTPSocket},
		{Name: "assemble root", Run: i.assembleRoot},
		{Name: "write bundle", Run: i.writeBundle},
		{Name: "prepare cgroup", Run: i.prepareCgroup},
		{Name: "start runsc", Run: i.startRunsc},
	}
}

// abandon opens the channel of an agent that will not be released (its
// sandbox is stopped): what was kept is dropped.
func (h *heldChannel) abandon() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.done {
		h.done = true
		h.kept = nil
		close(h.released)
	}
}
