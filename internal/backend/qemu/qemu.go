// Package qemu runs executions in QEMU micro-VMs (`-M microvm`): with KVM
// when /dev/kvm is usable, else emulated (TCG), which is slow but lets the
// whole VM path run on hosts without virtualisation.
//
// The guest boots a kernel and the project's initramfs, whose /init is the
// vm-agent (cmd/vm-agent, VM mode). Drives come from internal/backend/vmimage:
// the runtime squashfs (/dev/vda, the agent lays a tmpfs overlay on it), the
// code squashfs and volumes, all virtio-blk. The guest channel is a
// virtio-serial port named org.aleph.guest on a unix socket in the state
// directory, or vhost-vsock (port 52) where /dev/vhost-vsock exists. The
// serial console carries the agent's log and the program's output.
//
// QEMU starts paused (-S) so that the QMP connection is up before the
// guest runs and no event can be missed; the guest opening its channel
// (VSERPORT_CHANGE) marks the agent as reachable.
package qemu

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/codeprep"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/vmimage"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/hostcheck"
)

// ACPI selects how the guest kernel finds its virtio-mmio devices.
type ACPI string

const (
	// ACPIAuto is ACPIOff for an uncompressed ELF vmlinux (the kernel
	// Firecracker boots, built with virtio-mmio command-line devices) and
	// ACPIOn for a bzImage (Debian's cloud kernel knows devices only from
	// ACPI).
	ACPIAuto ACPI = ""
	// ACPIOn announces devices through ACPI tables, as on a PC.
	ACPIOn ACPI = "on"
	// ACPIOff announces devices on the kernel command line, exactly as
	// Firecracker does: it exercises Firecracker's guest boot path.
	ACPIOff ACPI = "off"
)

// Accel is QEMU's accelerator.
type Accel string

// Accelerators Options.Accel accepts.
const (
	AccelAuto Accel = "" // kvm when /dev/kvm is usable, else tcg
	AccelKVM  Accel = "kvm"
	AccelTCG  Accel = "tcg"
)

// Channel kinds of the guest channel.
const (
	ChannelAuto   = ""       // vsock when /dev/vhost-vsock is usable, else serial
	ChannelSerial = "serial" // virtio-serial port on a unix socket
	ChannelVsock  = "vsock"  // vhost-vsock
)

// Guest-side names shared with cmd/vm-agent (its aleph.channel setting).
const (
	GuestPortName  = "org.aleph.guest"
	GuestVsockPort = 52
)

// Defaults for Options fields left at zero.
const (
	DefaultQemuPath  = "qemu-system-x86_64"
	DefaultStopGrace = 20 * time.Second
	DefaultMemoryMiB = 128
)

// Options configure the backend.
type Options struct {
	// QemuPath is the QEMU binary; DefaultQemuPath from PATH when empty.
	QemuPath string
	// KernelPath is the guest kernel (bzImage or ELF vmlinux). Required.
	KernelPath string
	// InitrdPath is the initramfs with the vm-agent as /init and the
	// modules the kernel needs (kernels/initramfs/build.sh). Required.
	InitrdPath string
	ACPI       ACPI
	Accel      Accel
	// Channel is ChannelAuto, ChannelSerial or ChannelVsock.
	Channel string
	// CacheRoot holds code images converted to squashfs (CacheRoot/vm-images).
	// Required.
	CacheRoot string
	// PersistentDir holds persistent volume images (vmimage.Options).
	PersistentDir string
	// PrintSystemLogs adds the kernel's boot log and the agent's debug log
	// to the console, which always reaches Spec.ProgramOutput.
	PrintSystemLogs bool
	// KernelArgs are appended to the kernel command line.
	KernelArgs []string
	// StopGrace is how long Stop lets the guest power off by itself after
	// the channel closes (the program's shutdown runs first) before QEMU
	// is told to quit. DefaultStopGrace when zero.
	StopGrace  time.Duration
	CodeLimits codeprep.Limits
	Logger     *slog.Logger
}

// Backend starts QEMU micro-VMs. It is safe for concurrent use.
type Backend struct {
	opts    Options
	qemu    string
	acpi    ACPI
	accel   Accel
	channel string
	images  *vmimage.Preparer
	log     *slog.Logger
	// tscKHz is the host's TSC rate, told to TCG guests (see kernelArgs).
	tscKHz int
}

var _ backend.Backend = (*Backend)(nil)

// New checks that QEMU, the kernel and the initramfs are there and decides
// accelerator, ACPI mode and channel once.
func New(opts Options) (*Backend, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	log := opts.Logger.With("backend", "qemu")
	if opts.QemuPath == "" {
		opts.QemuPath = DefaultQemuPath
	}
	qemu, err := exec.LookPath(opts.QemuPath)
	if err != nil {
		return nil, errkind.Wrap(errkind.NoBackend, fmt.Errorf("qemu: %q not found (Debian package qemu-system-x86): %w", opts.QemuPath, err))
	}
	if opts.KernelPath == "" {
		return nil, errkind.New(errkind.NoBackend, "qemu: no guest kernel configured (LINUX_PATH; `make kernel` builds one)")
	}
	if opts.InitrdPath == "" {
		return nil, errkind.New(errkind.NoBackend, "qemu: no initramfs configured (INITRD_PATH; `make kernel` builds one)")
	}
	for what, p := range map[string]*string{"guest kernel": &opts.KernelPath, "initramfs": &opts.InitrdPath} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			return nil, fmt.Errorf("qemu: %w", err)
		}
		fi, err := os.Stat(abs)
		if err != nil {
			return nil, errkind.Wrap(errkind.NoBackend, fmt.Errorf("qemu: %s: %w", what, err))
		}
		if !fi.Mode().IsRegular() {
			return nil, errkind.New(errkind.NoBackend, "qemu: %s %s is not a regular file", what, abs)
		}
		*p = abs
	}
	if opts.CacheRoot == "" {
		return nil, errors.New("qemu: CacheRoot is required")
	}
	if opts.StopGrace <= 0 {
		opts.StopGrace = DefaultStopGrace
	}

	b := &Backend{opts: opts, qemu: qemu, log: log}
	switch opts.Accel {
	case AccelAuto:
		b.accel = AccelTCG
		if err := kvmUsable(); err == nil {
			b.accel = AccelKVM
		} else if !errors.Is(err, os.ErrNotExist) {
			log.Warn("not using /dev/kvm", "reason", err)
		}
	case AccelKVM:
		if err := kvmUsable(); err != nil {
			return nil, errkind.Wrap(errkind.NoBackend, fmt.Errorf("qemu: accelerator kvm asked for, but: %w", err))
		}
		b.accel = AccelKVM
	case AccelTCG:
		b.accel = AccelTCG
	default:
		return nil, fmt.Errorf("qemu: unknown accelerator %q", opts.Accel)
	}
	switch opts.ACPI {
	case ACPIAuto:
		elf, err := isELF(opts.KernelPath)
		if err != nil {
			return nil, fmt.Errorf("qemu: guest kernel: %w", err)
		}
		b.acpi = ACPIOn
		if elf {
			b.acpi = ACPIOff
		}
	case ACPIOn, ACPIOff:
		b.acpi = opts.ACPI
	default:
		return nil, fmt.Errorf("qemu: unknown ACPI mode %q", opts.ACPI)
	}
	switch opts.Channel {
	case ChannelAuto:
		b.channel = ChannelSerial
		if usable("/dev/vhost-vsock") {
			b.channel = ChannelVsock
		}
	case ChannelSerial, ChannelVsock:
		b.channel = opts.Channel
	default:
		return nil, fmt.Errorf("qemu: unknown channel %q", opts.Channel)
	}
	if b.accel == AccelTCG {
		b.tscKHz = hostTSCKHz()
	}
	b.images = vmimage.NewPreparer(vmimage.Options{
		CacheDir:      filepath.Join(opts.CacheRoot, "vm-images"),
		PersistentDir: opts.PersistentDir,
		CodeLimits:    opts.CodeLimits,
		Logger:        log,
	})
	log.Info("qemu backend ready", "accel", b.accel, "acpi", b.acpi, "channel", b.channel,
		"kernel", opts.KernelPath, "initrd", opts.InitrdPath)
	if b.accel == AccelTCG {
		log.Warn("no usable /dev/kvm: QEMU emulates the CPU (TCG); VMs are slow")
	}
	return b, nil
}

// NetworkLink implements backend.Networker: a VM gets a virtio-net card
// on a host tap.
func (b *Backend) NetworkLink() backend.LinkKind { return backend.LinkTap }

// Name implements backend.Backend.
func (b *Backend) Name() string { return "qemu" }

// Accel tells which accelerator VMs use.
func (b *Backend) Accel() Accel { return b.accel }

// ACPI tells the ACPI mode VMs use.
func (b *Backend) ACPI() ACPI { return b.acpi }

// kvmUsable tells whether QEMU can use /dev/kvm for an ordinary guest
// kernel. Opening it is not enough: on these hosts /dev/kvm is kvm-pvm,
// a paravirtual KVM without VT-x/AMD-V that runs only PVM-aware guest
// kernels (measured: our kernels stop at once with a KVM internal error).
// Hardware KVM needs the vmx or svm CPU flag.
func kvmUsable() error { return hostcheck.KVMUsable("/dev/kvm") }

func cpuFlags() (map[string]bool, error) {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), ":")
		if ok && strings.TrimSpace(k) == "flags" {
			flags := map[string]bool{}
			for _, fl := range strings.Fields(v) {
				flags[fl] = true
			}
			return flags, nil
		}
	}
	return nil, errors.New("no CPU flags in /proc/cpuinfo")
}

func usable(dev string) bool {
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

func isELF(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	magic := make([]byte, 4)
	if _, err := f.ReadAt(magic, 0); err != nil {
		return false, err
	}
	return string(magic) == "\x7fELF", nil
}

// hostTSCKHz is the host's TSC rate in kHz, or 0 when it is not constant
// (then there is no single rate to tell a guest).
func hostTSCKHz() int {
	flags, err := cpuFlags()
	if err != nil || !flags["constant_tsc"] {
		return 0
	}
	return measureTSCKHz()
}

// Start implements backend.Backend: images, then QEMU (paused), then the
// QMP connection that lets the guest run. A failed step undoes the
// earlier ones.
func (b *Backend) Start(ctx context.Context, spec backend.Spec) (backend.Instance, error) {
	log := spec.StartLogger(b.log, "qemu")
	return backend.Start(ctx, "qemu", spec, log, newInstance(b, spec, log))
}

// kernelArgs is the guest's command line.
func (b *Backend) kernelArgs() []string {
	args := []string{
		// The console always exists so that a panic is seen; without
		// system logs only emergencies (a panic) are printed on it, which
		// keeps the boot fast and the program's log clean.
		"console=ttyS0",
		// A panic reboots at once, and -no-reboot turns that into QEMU's
		// exit: a dead guest is a dead VM.
		"panic=-1",
		"pci=off",
		"random.trust_cpu=on",
	}
	if b.opts.PrintSystemLogs {
		args = append(args, "aleph.log=debug")
	} else {
		args = append(args, "loglevel=1")
	}
	if b.acpi == ACPIOff {
		// The agent ends the VM with a restart when there is no ACPI; a
		// triple fault resets at once, where the default first spends
		// about 3 s (measured) knocking on a keyboard controller that
		// microvm does not have.
		args = append(args, "reboot=t")
	}
	if b.accel == AccelTCG && b.tscKHz > 0 {
		// Measured: on a busy host an emulated guest fails to calibrate
		// its TSC against the emulated PIT and hangs early in boot. Under
		// TCG the guest TSC runs at the host's constant rate, so telling
		// the rate is exact, and trusting it keeps the clocksource
		// watchdog from swapping in coarse jiffies when the vCPU lags.
		args = append(args, fmt.Sprintf("tsc_early_khz=%d", b.tscKHz), "tsc=reliable")
	}
	switch b.channel {
	case ChannelVsock:
		args = append(args, fmt.Sprintf("aleph.channel=vsock:%d", GuestVsockPort))
	default:
		args = append(args, "aleph.channel=serial:"+GuestPortName)
	}
	return append(args, b.opts.KernelArgs...)
}

// qemuEscape escapes a value for QEMU's comma-separated options.
func qemuEscape(s string) string { return strings.ReplaceAll(s, ",", ",,") }

// maxSocketPath is sun_path's size minus its terminating NUL.
const maxSocketPath = len(unix.RawSockaddrUnix{}.Path) - 1
