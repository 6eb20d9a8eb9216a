package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// The guest layout of micro-VMs. The first drive is always the runtime
// (internal/backend/vmimage assigns it /dev/vda); other drives are named
// in the Config.
const (
	runtimeDevice = "/dev/vda"
	modulesDir    = "/lib/modules"
	// Inside the initramfs, which stays the hidden root of the mount tree.
	lowerDir   = "/mnt/runtime"
	overlayDir = "/mnt/overlay" // tmpfs holding the overlay's upper and work dirs
	newRoot    = "/mnt/root"
	// serialConsole carries the agent's log and the program's output to
	// the host whatever the kernel's console= says.
	serialConsole = "/dev/ttyS0"
	// defaultVMChannel is aleph-vm's vsock port, what Firecracker's host
	// side expects when the kernel command line names no channel.
	defaultVMChannel = "vsock:52"
)

// How long the guest waits for devices: probing is asynchronous, and slow
// under emulation (TCG).
const (
	deviceTimeout  = 30 * time.Second
	channelTimeout = 2 * time.Minute
)

// Settings read from the kernel command line (aleph.NAME=VALUE), so that
// the VMM needs no other way into the guest than its boot arguments.
const (
	cmdlineChannel  = "aleph.channel"
	cmdlineLogLevel = "aleph.log"
	cmdlineHalt     = "aleph.halt" // poweroff | reboot; default: haltCommand
	// cmdlinePreload=1 marks a spare VM: its code drive is empty until
	// the host fills it, so the interpreter preloads meanwhile.
	cmdlinePreload = "aleph.preload"
)

// vmState records what the VM set-up mounted, for the final unmount.
type vmState struct {
	mounts []string // inside the new root, in mount order
}

// runVM is the life of PID 1 in a micro-VM. It never returns: whatever
// happens, the VM ends with the agent (a returning PID 1 panics the
// kernel, which the VMM would report less clearly).
func runVM(o options, explicit map[string]bool) {
	if os.Getpid() != 1 {
		// The VM set-up mounts over /proc and /dev and ends with reboot(2):
		// on a host that would be a disaster.
		fmt.Fprintln(os.Stderr, "vm-agent: --init only runs as PID 1 (the init of a micro-VM)")
		os.Exit(2)
	}
	early := mountEarly()
	redirectStdio()

	args := kernelArgs()
	if !explicit["channel"] {
		o.channel = defaultVMChannel
		if v, ok := args[cmdlineChannel]; ok {
			o.channel = v
		}
	}
	if v, ok := args[cmdlinePreload]; ok && !explicit["preload"] {
		o.preload = v == "1"
	}
	if v, ok := args[cmdlineLogLevel]; ok && !explicit["log-level"] {
		o.logLevel = v
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(o.logLevel)); err != nil {
		level = slog.LevelInfo
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("component", "vm-agent")
	if early != nil {
		log.Error("early mounts", "err", early)
	}
	halt := haltCommand(args[cmdlineHalt])
	began := time.Now()

	// Set-up failures are kept and reported on the channel once the host
	// is there: a clear start error beats a VM that silently powers off.
	st := &vmState{}
	setupErr := prepareRoot(log)
	if setupErr != nil {
		log.Error("preparing the root file system", "err", setupErr)
	} else {
		log.Info("root file system ready", "after", time.Since(began).Round(time.Millisecond))
	}

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	code := 1
	chCtx, chCancel := context.WithTimeout(ctx, channelTimeout)
	ch, err := openChannel(chCtx, o.channel, log)
	chCancel()
	if err != nil {
		log.Error("guest channel", "channel", o.channel, "err", err)
	} else {
		log.Info("guest channel open", "channel", o.channel, "after", time.Since(began).Round(time.Millisecond))
		a := newAgent(o, log)
		a.setup = func(ctx context.Context, cfg guest.Config, log *slog.Logger) error {
			if setupErr != nil {
				return fmt.Errorf("VM set-up: %w", setupErr)
			}
			return st.configure(ctx, cfg, log)
		}
		code, err = a.serve(ctx, ch)
		if err != nil {
			log.Error("agent failed", "err", err)
		}
	}
	cancel()
	st.shutdown(log, code)
	if err := unix.Reboot(halt); err != nil {
		log.Error("reboot", "err", err)
	}
	// Only reached when reboot(2) failed; the kernel panics once PID 1
	// exits, which with panic=-1 also ends the VM.
	os.Exit(code)
}

// haltCommand picks how the agent ends the VM. Measured under QEMU
// microvm with -no-reboot: with ACPI a power-off ends QEMU while a
// restart hangs; without ACPI (devices on the command line, as under
// Firecracker, whose reboot=k makes a restart end the VM) a power-off
// only halts the CPU and a restart is what ends QEMU.
func haltCommand(setting string) int {
	switch setting {
	case "poweroff":
		return unix.LINUX_REBOOT_CMD_POWER_OFF
	case "reboot":
		return unix.LINUX_REBOOT_CMD_RESTART
	}
	// The kernel registers /sys/firmware/acpi only when ACPI is in use.
	if _, err := os.Stat("/sys/firmware/acpi"); err == nil {
		return unix.LINUX_REBOOT_CMD_POWER_OFF
	}
	return unix.LINUX_REBOOT_CMD_RESTART
}

// mountEarly gives the initramfs the kernel interfaces PID 1 needs.
func mountEarly() error {
	var errs []error
	for _, m := range []struct{ src, dst, fstype, data string }{
		{"proc", "/proc", "proc", ""},
		{"sysfs", "/sys", "sysfs", ""},
		{"devtmpfs", "/dev", "devtmpfs", "mode=0755"},
	} {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			errs = append(errs, err)
			continue
		}
		flags := uintptr(unix.MS_NOSUID | unix.MS_NOEXEC)
		if m.fstype == "devtmpfs" {
			flags = unix.MS_NOSUID
		}
		if err := unix.Mount(m.src, m.dst, m.fstype, flags, m.data); err != nil && !errors.Is(err, unix.EBUSY) {
			errs = append(errs, fmt.Errorf("mount %s: %w", m.dst, err))
		}
	}
	return errors.Join(errs...)
}

// redirectStdio points the agent's stdout and stderr (its log and the
// program's output) at the serial port, and stdin at /dev/null. The
// kernel's /dev/console may be a VT nobody reads when the command line
// has no console=ttyS0, which VMMs leave out to boot faster.
func redirectStdio() {
	if fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0); err == nil {
		// Best effort, as the whole function: there is no log yet, and a
		// stdin left on the console is harmless.
		_ = unix.Dup3(fd, 0, 0)
		unix.Close(fd)
	}
	fd, err := unix.Open(serialConsole, unix.O_WRONLY|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return // keep /dev/console
	}
	// Plain \n: the host's log wants lines, not terminal \r\n.
	if t, err := unix.IoctlGetTermios(fd, unix.TCGETS); err == nil {
		t.Oflag &^= unix.OPOST
		_ = unix.IoctlSetTermios(fd, unix.TCSETS, t) // \r\n lines are still readable
	}
	// On failure the output stays on /dev/console: nowhere better to say so.
	_ = unix.Dup3(fd, 1, 0)
	_ = unix.Dup3(fd, 2, 0)
	unix.Close(fd)
}

// kernelArgs returns the aleph.* settings of /proc/cmdline.
func kernelArgs() map[string]string {
	out := map[string]string{}
	b, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return out
	}
	for _, f := range strings.Fields(string(b)) {
		k, v, ok := strings.Cut(f, "=")
		if ok && strings.HasPrefix(k, "aleph.") {
			out[k] = v
		}
	}
	return out
}

// prepareRoot builds the program's root: the runtime drive read-only
// under a tmpfs overlay (the program sees a writable root, the image
// stays untouched), with /proc, /sys, /dev and fresh /run and /tmp, and
// makes it the agent's root.
func prepareRoot(log *slog.Logger) error {
	if err := loadModules(log); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), deviceTimeout)
	defer cancel()
	if err := waitFile(ctx, runtimeDevice); err != nil {
		return fmt.Errorf("runtime drive %s: %w", runtimeDevice, err)
	}
	for _, d := range []string{lowerDir, overlayDir, newRoot} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if err := unix.Mount(runtimeDevice, lowerDir, "squashfs", unix.MS_RDONLY|unix.MS_NODEV, ""); err != nil {
		return fmt.Errorf("mount runtime %s: %w", runtimeDevice, err)
	}
	if err := unix.Mount("tmpfs", overlayDir, "tmpfs", 0, "mode=0755"); err != nil {
		return fmt.Errorf("overlay tmpfs: %w", err)
	}
	upper, work := filepath.Join(overlayDir, "upper"), filepath.Join(overlayDir, "work")
	for _, d := range []string{upper, work} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return err
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lowerDir, upper, work)
	if err := unix.Mount("overlay", newRoot, "overlay", 0, opts); err != nil {
		return fmt.Errorf("overlay root: %w", err)
	}
	for _, d := range []string{"/proc", "/sys", "/dev"} {
		dst := filepath.Join(newRoot, d)
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(d, dst, "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("move %s: %w", d, err)
		}
	}
	for _, m := range []struct{ dst, fstype, data string }{
		{"/run", "tmpfs", "mode=0755"},
		{"/tmp", "tmpfs", "mode=1777"},
		// Python's multiprocessing needs POSIX shared memory.
		{"/dev/shm", "tmpfs", "mode=1777"},
		{"/dev/pts", "devpts", "mode=0620,ptmxmode=0666"},
	} {
		dst := filepath.Join(newRoot, m.dst)
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.fstype, dst, m.fstype, unix.MS_NOSUID|unix.MS_NODEV, m.data); err != nil {
			return fmt.Errorf("mount %s: %w", m.dst, err)
		}
	}
	// The modules are files in RAM, of no use once loaded.
	if err := os.RemoveAll(modulesDir); err != nil {
		log.Debug("free modules", "err", err)
	}
	// The initramfs cannot be pivot_root'ed away: move the new root over
	// it and chroot, as switch_root(8) does.
	if err := os.Chdir(newRoot); err != nil {
		return err
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("move root: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("chroot: %w", err)
	}
	return os.Chdir("/")
}

// loadModules loads the kernel modules listed in modules.order, in order.
// A kernel with everything built in comes with no list (or an empty one).
func loadModules(log *slog.Logger) error {
	b, err := os.ReadFile(filepath.Join(modulesDir, "modules.order"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	began := time.Now()
	n := 0
	for _, name := range strings.Fields(string(b)) {
		path := name
		if !filepath.IsAbs(path) {
			path = filepath.Join(modulesDir, name)
		}
		if err := loadModule(path); err != nil {
			if errors.Is(err, unix.EEXIST) {
				continue
			}
			// The rest may still be enough (say, a network driver failed
			// but this VM has no network): let the mounts tell.
			log.Warn("kernel module", "module", name, "err", err)
			continue
		}
		n++
	}
	log.Debug("kernel modules loaded", "count", n, "took", time.Since(began).Round(time.Millisecond))
	return nil
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.FinitModule(int(f.Fd()), "", 0)
}

func waitFile(ctx context.Context, path string) error {
	return pollUntil(ctx, 10*time.Millisecond, func() (bool, error) {
		_, err := os.Stat(path)
		return err == nil, nil
	})
}

// configure mounts the code and volume drives of cfg and applies its
// host name and network, inside the new root.
func (st *vmState) configure(ctx context.Context, cfg guest.Config, log *slog.Logger) error {
	ctx, cancel := context.WithTimeout(ctx, deviceTimeout)
	defer cancel()
	if cfg.CodeDevice != "" {
		if err := st.mount(ctx, cfg.CodeDevice, guest.CodeDir, "squashfs", true); err != nil {
			return fmt.Errorf("code: %w", err)
		}
	}
	for _, v := range cfg.Volumes {
		if !filepath.IsAbs(v.Mount) || filepath.Clean(v.Mount) == "/" {
			return fmt.Errorf("volume %s: mount point must be an absolute path below /", v.Mount)
		}
		fstype := v.FSType
		if fstype == "" {
			fstype = "squashfs"
		}
		if err := st.mount(ctx, v.Device, v.Mount, fstype, v.ReadOnly); err != nil {
			return fmt.Errorf("volume %s: %w", v.Mount, err)
		}
	}
	if cfg.Data != nil && cfg.Data.Device != "" {
		// Read-only where unpackData copies it from.
		if err := st.mount(ctx, cfg.Data.Device, guest.DataSourceDir, "squashfs", true); err != nil {
			return fmt.Errorf("data: %w", err)
		}
	}
	hostname := cfg.Hostname
	if hostname == "" {
		hostname = "aleph"
	}
	if err := setHostname(hostname); err != nil {
		log.Warn("hostname", "err", err)
	}
	if err := configureNetwork(cfg, log); err != nil {
		return fmt.Errorf("network: %w", err)
	}
	return nil
}

func (st *vmState) mount(ctx context.Context, device, dir, fstype string, readOnly bool) error {
	if !strings.HasPrefix(device, "/dev/") {
		return fmt.Errorf("device %q is not under /dev", device)
	}
	if err := waitFile(ctx, device); err != nil {
		return fmt.Errorf("waiting for %s: %w", device, err)
	}
	// A spare's code drive exists from boot with no content; the host
	// fills it and resizes it just before the Config, and the kernel
	// learns the new capacity asynchronously.
	if err := waitNonEmpty(ctx, device); err != nil {
		return fmt.Errorf("waiting for %s to have content: %w", device, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	flags := uintptr(unix.MS_NODEV | unix.MS_NOSUID)
	if readOnly {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount(device, dir, fstype, flags, ""); err != nil {
		return fmt.Errorf("mount %s (%s) on %s: %w", device, fstype, dir, err)
	}
	st.mounts = append(st.mounts, dir)
	return nil
}

// waitNonEmpty waits until the block device has a non-zero capacity.
// Devices without a sysfs size (not a whole disk) are not waited for.
func waitNonEmpty(ctx context.Context, device string) error {
	sizeFile := filepath.Join("/sys/class/block", filepath.Base(device), "size")
	return pollUntil(ctx, 5*time.Millisecond, func() (bool, error) {
		b, err := os.ReadFile(sizeFile)
		if err != nil {
			return true, nil
		}
		return strings.TrimSpace(string(b)) != "0", nil
	})
}

// shutdown leaves the drives consistent before the VM ends: nothing may
// still write (the program was stopped; orphans are killed here), data is
// flushed and writable volumes are unmounted so ext4 is clean.
func (st *vmState) shutdown(log *slog.Logger, code int) {
	_ = unix.Kill(-1, unix.SIGKILL) // ESRCH: no orphans left
	unix.Sync()
	for i := len(st.mounts) - 1; i >= 0; i-- {
		if err := unix.Unmount(st.mounts[i], 0); err != nil {
			log.Warn("unmount", "dir", st.mounts[i], "err", err)
			// Read-only keeps the file system consistent all the same.
			if err := unix.Mount("", st.mounts[i], "", unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
				log.Warn("remount read-only", "dir", st.mounts[i], "err", err)
			}
		}
	}
	unix.Sync()
	log.Info("powering off", "exit_code", code)
}
