// Package backend defines the one small interface every isolation backend
// (gvisor, qemu, firecracker) implements. Nothing above this package knows
// which backend runs a program.
package backend

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"regexp"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// Volume is a resolved volume ready to be attached to a sandbox.
type Volume struct {
	Mount    string             // absolute path inside the guest
	Kind     message.VolumeKind // immutable | ephemeral | persistent
	Path     string             // host file (squashfs/ext4 image) or directory; empty for ephemeral
	Hash     string             // immutable volumes: content hash of Path, for caching extractions
	Encoding message.Encoding   // for immutable volumes: squashfs (default) or zip
	SizeMiB  int                // ephemeral/persistent size
	ReadOnly bool
	// LegacyPaths (persistent volumes): where earlier versions kept the
	// image under another file name; a missing image found there is moved
	// to Path (volimage.LegacyPaths).
	LegacyPaths []string
	// ParentPath (persistent volumes with a parent): the hash-checked
	// ext4 image a new volume starts as a copy of.
	ParentPath string
}

// Spec is everything a backend needs to start one execution.
type Spec struct {
	ExecutionID string // unique per execution (uuid)
	ProgramHash string // item hash of the PROGRAM message

	RuntimePath string // host path of the runtime root filesystem image (squashfs)
	RuntimeHash string // content hash of the runtime, for sharing mounts

	CodePath     string           // host path of the code file (zip, squashfs or plain source)
	CodeHash     string           // content hash of the code file, for caching extractions
	CodeEncoding message.Encoding // plain | zip | squashfs
	// DeferCode starts a sandbox before its program is known (a pre-warmed
	// spare): the code directory starts empty and Instance.LoadCode fills
	// it once a program is assigned. Backends without CodeLoader ignore it.
	DeferCode bool
	// Snapshot lets the backend start the sandbox by restoring a
	// checkpoint of a warm one of the same shape, when it keeps such
	// checkpoints (gVisor) and the spec has nothing a checkpoint cannot
	// share (network, volumes, data). Set for spare-shaped starts.
	Snapshot   bool
	Entrypoint string // module:attr (ASGI) or executable name; plain code is written as <module>.py

	DataPath     string // optional data archive (zip or squashfs)
	DataHash     string // content hash of DataPath, for caching extractions
	DataEncoding message.Encoding
	DataMount    string

	Volumes []Volume

	VCPUs     int
	MemoryMiB int
	Internet  bool
	// Network is the execution's own network, prepared on the host before
	// Start (internal/network); nil means loopback only.
	Network *Network

	// StateDir is a private, empty directory under EXECUTION_ROOT that the
	// backend may use for bundles, sockets and logs. The backend removes
	// everything it created there on Stop.
	StateDir string

	// ProgramOutput receives the guest's console / the program's
	// stdout+stderr, already tagged by the caller.
	ProgramOutput io.Writer
	Logger        *slog.Logger
}

// Network is one execution's network as the backend attaches it: a
// network namespace whose eth0 already has Address (gVisor's netstack
// takes it over), or a host tap device for a VM's virtio-net card.
type Network struct {
	NetnsPath string       // gVisor: path of the execution's network namespace
	TapName   string       // VMs: host tap device
	GuestMAC  string       // VMs: MAC address of the guest's card
	Address   netip.Prefix // the program's address and prefix length
	Gateway   netip.Addr   // the host side of the link
	DNS       []netip.Addr // nameservers the guest uses
}

// LinkKind is how a backend attaches an execution to its network.
type LinkKind int

// Link kinds.
const (
	LinkNone      LinkKind = iota // the backend cannot attach a network
	LinkNamespace                 // a network namespace with a veth inside (gVisor)
	LinkTap                       // a tap device on the host (QEMU, Firecracker)
)

// Networker is implemented by backends that can give programs a network;
// the pool prepares the link kind they name before Start.
type Networker interface {
	NetworkLink() LinkKind
}

// TapOwner is implemented by VM backends whose VMM opens its tap as
// another user than the supervisor (Firecracker under its jailer): the
// tap must belong to that user.
type TapOwner interface {
	TapOwner() (uid, gid int)
}

// Closer is implemented by backends that hold host state shared by all
// their sandboxes; the supervisor calls Close after the last one stopped.
type Closer interface {
	Close() error
}

// Reaper is implemented by backends whose sandboxes can outlive a crashed
// supervisor: Reap removes every one left, and is called at start-up
// before any Start.
type Reaper interface {
	Reap(ctx context.Context) error
}

// SpareMaker is implemented by backends whose instances can start before
// their program is known (Spec.DeferCode) and take its code later: their
// instances implement CodeLoader. Only with them does the pool keep
// pre-warmed spares.
type SpareMaker interface {
	Backend
	// MakesSpares says nothing; it names the capability.
	MakesSpares()
}

// DirectDialer is implemented by instances whose ASGI program the host
// can reach without the guest channel: DialHTTP connects to the program's
// own HTTP server (uvicorn's unix socket), so requests bypass the agent
// and the channel's multiplexer. The pool uses it for ASGI programs only;
// executables, and backends without it, go through the guest channel.
type DirectDialer interface {
	DialHTTP(ctx context.Context) (net.Conn, error)
}

// GuestConfigurer is implemented by instances of VM backends: before the
// host sends the guest its Config, the instance fills in the devices the
// agent must mount (CodeDevice, Volumes).
type GuestConfigurer interface {
	ConfigureGuest(cfg *guest.Config)
}

// Usage is the resource usage of an instance, for execution records. Its
// figures are those of the sandbox's host processes (the VMM, whose vCPU
// threads run the guest; or gVisor's Sentry and gofer), as aleph-vm
// records its VM process's (psutil's cpu_times and io_counters):
//   - CPUTimeUser, CPUTimeSystem: CPU time;
//   - IOReadCount, IOWriteCount: read and write system calls
//     (/proc/<pid>/io syscr, syscw);
//   - IOReadBytes, IOWriteBytes: bytes fetched from and sent to storage
//     (read_bytes, write_bytes; after the exit, the kernel's rusage of the
//     same counters).
//
// They are sampled while the sandbox runs and only ever grow; after its
// exit they are the last sample, raised by the exit's rusage.
//
// MemoryBytes is the one figure that is not a counter: the memory the
// sandbox holds at the last sample (the cgroup's working set under gVisor,
// the VMM's resident set for VMs), for the node's metrics; 0 after exit.
type Usage struct {
	CPUTimeUser   time.Duration
	CPUTimeSystem time.Duration
	IOReadCount   uint64
	IOWriteCount  uint64
	IOReadBytes   uint64
	IOWriteBytes  uint64
	MemoryBytes   uint64
}

// Instance is a running sandbox.
type Instance interface {
	// Channel returns the single byte stream to the vm-agent in the guest
	// (sandbox stdio, vsock, or virtio-serial). It may block until the
	// guest side is reachable; ctx bounds that wait. Called once.
	Channel(ctx context.Context) (io.ReadWriteCloser, error)
	// Stop terminates the sandbox and frees everything Start created. It is
	// safe to call more than once and after the sandbox died by itself.
	Stop(ctx context.Context) error
	// Done is closed when the sandbox has exited, for whatever reason.
	Done() <-chan struct{}
	// Err tells why the sandbox exited (nil before Done, or on clean stop).
	Err() error
	// Usage reports resource usage so far (best effort).
	Usage() Usage
}

// CodeLoader is implemented by instances that can receive their code after
// starting (see Spec.DeferCode).
type CodeLoader interface {
	// LoadCode makes the code of spec (CodePath, CodeHash, CodeEncoding,
	// Entrypoint) appear at the guest's code directory. An error of kind
	// errkind.InvalidInput, TooLarge or ResourceMissing (the code itself
	// refused or missing) leaves the instance as it was: it can take other
	// code later.
	LoadCode(ctx context.Context, spec Spec) error
}

// Backend starts sandboxes of one kind.
type Backend interface {
	Name() string
	Start(ctx context.Context, spec Spec) (Instance, error)
}

// executionIDPattern keeps ids usable as container names, file names and
// socket names.
var executionIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// Check verifies what every backend needs of a Spec before starting.
func (s Spec) Check() error {
	if !executionIDPattern.MatchString(s.ExecutionID) {
		return errkind.New(errkind.InvalidInput, "execution id %q is not usable as a sandbox name", s.ExecutionID)
	}
	if s.StateDir == "" {
		return errors.New("spec has no StateDir")
	}
	return nil
}

// StartLogger is the logger of one start: the spec's (or fallback), tagged
// with the execution and the backend.
func (s Spec) StartLogger(fallback *slog.Logger, backendName string) *slog.Logger {
	log := s.Logger
	if log == nil {
		log = fallback
	}
	return log.With("execution", s.ExecutionID, "backend", backendName)
}
