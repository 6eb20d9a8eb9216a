package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/firecracker"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/gvisor"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/qemu"
	"github.com/aleph-vm-go/vm-supervisor/internal/config"
	"github.com/aleph-vm-go/vm-supervisor/internal/hostcheck"
)

// buildCache is where `make kernel` and `make kernel-custom` leave their
// outputs; the qemu backend looks there when LINUX_PATH does not exist.
const buildCache = "/var/cache/aleph-vm-build"

// emulatedInitTimeout is the least INIT_TIMEOUT that lets a VM boot and
// import FastAPI under TCG emulation (measured: 9–34 s on 2 cores).
const emulatedInitTimeout = 120 * time.Second

// selectBackend builds the backend that HYPERVISOR names. `auto` follows
// hostcheck's order (firecracker, qemu with KVM, gvisor, emulated qemu)
// and moves on when a candidate cannot be built here.
// selectBackend builds the backend HYPERVISOR names, or the best one this
// host runs for auto. agentProfileDir, when set (--profile), makes gVisor
// agents profile themselves there.
func selectBackend(s *config.Settings, agentProfileDir string, log *slog.Logger) (backend.Backend, error) {
	switch s.Hypervisor {
	case config.HypervisorGVisor:
		return newGVisor(s, agentProfileDir, log)
	case config.HypervisorQemu:
		return newQemu(s, log)
	case config.HypervisorFirecracker:
		return newFirecracker(s, log)
	}
	report := hostReport(s)
	type candidate struct {
		name string
		ok   bool
		make func() (backend.Backend, error)
	}
	kvm := report.OK("kvm")
	candidates := []candidate{
		{"firecracker", kvm && report.OK("firecracker"), func() (backend.Backend, error) { return newFirecracker(s, log) }},
		{"qemu (KVM)", kvm && report.OK("qemu"), func() (backend.Backend, error) { return newQemu(s, log) }},
		{"gvisor", report.OK("runsc"), func() (backend.Backend, error) { return newGVisor(s, agentProfileDir, log) }},
		{"qemu (emulated)", !kvm && report.OK("qemu"), func() (backend.Backend, error) { return newQemu(s, log) }},
	}
	var errs []error
	for _, c := range candidates {
		if !c.ok {
			continue
		}
		b, err := c.make()
		if err == nil {
			return b, nil
		}
		log.Info("auto: backend not usable here", "backend", c.name, "err", err)
		errs = append(errs, fmt.Errorf("%s: %w", c.name, err))
	}
	if len(errs) == 0 {
		return nil, errors.New(report.Reason)
	}
	return nil, errors.Join(errs...)
}

// hostReport checks the host with the configured paths.
func hostReport(s *config.Settings) *hostcheck.Report {
	return hostcheck.Check(hostcheck.Paths{
		Firecracker:   s.FirecrackerPath,
		Jailer:        s.JailerPath,
		Qemu:          s.QemuPath,
		Runsc:         s.RunscPath,
		RunscPlatform: s.RuntimePlatform,
		Kernel:        s.LinuxPath,
		Networking:    s.AllowVMNetworking,
		Outbound:      s.NetworkInterface,
	})
}

func newGVisor(s *config.Settings, agentProfileDir string, log *slog.Logger) (backend.Backend, error) {
	if _, err := os.Stat(s.AgentPath); err != nil {
		return nil, fmt.Errorf("vm-agent binary (ALEPH_VM_AGENT_PATH=%s): %w", s.AgentPath, err)
	}
	b, err := gvisor.New(gvisor.Options{
		RunscPath: s.RunscPath,
		Platform:  s.RuntimePlatform,
		AgentPath: s.AgentPath,
		CacheRoot: s.CacheRoot,
		RootDir:   filepath.Join(s.ExecutionRoot, "runsc"),
		// Persistent volumes: the same ext4 images as the VM backends.
		PersistentDir: s.PersistentVolumesDir,
		// The program archive is at most MAX_PROGRAM_ARCHIVE_SIZE; what it
		// unpacks to is bounded by codeprep's limits.
		CodeCacheMaxBytes: s.CodeCacheMaxMiB << 20,
		SnapshotDir:       snapshotDir(s),
		SnapshotMaxBytes:  s.SnapshotCacheMaxMiB << 20,
		Logger:            log,
		Debug:             s.PrintSystemLogs,
		AgentProfileDir:   agentProfileDir,
	})
	if err != nil {
		return nil, err // not b: a nil *Backend in an interface is not nil
	}
	return b, nil
}

func newFirecracker(s *config.Settings, log *slog.Logger) (backend.Backend, error) {
	b, err := firecracker.New(firecrackerOptions(s, log))
	if err != nil {
		return nil, err
	}
	return b, nil
}

// guestKernel finds the kernel and initramfs for qemu: LINUX_PATH and
// INITRD_PATH when they exist, else what `make kernel-custom` or `make
// kernel` built. An initramfs belongs to its kernel (the Debian one
// carries that kernel's modules), so it defaults to the one beside it.
func guestKernel(s *config.Settings) (kernel, initrd string) {
	kernel = s.LinuxPath
	if _, err := os.Stat(kernel); err != nil {
		for _, k := range []string{
			filepath.Join(buildCache, "kernels/out/custom/vmlinux"),
			filepath.Join(buildCache, "kernels/out/debian-cloud/vmlinuz"),
		} {
			if _, err := os.Stat(k); err == nil {
				kernel = k
				break
			}
		}
	}
	initrd = s.InitrdPath
	if initrd == "" {
		initrd = filepath.Join(filepath.Dir(kernel), "initramfs.cpio.gz")
	}
	return kernel, initrd
}

func newQemu(s *config.Settings, log *slog.Logger) (backend.Backend, error) {
	kernel, initrd := guestKernel(s)
	b, err := qemu.New(qemu.Options{
		QemuPath:        s.QemuPath,
		KernelPath:      kernel,
		InitrdPath:      initrd,
		CacheRoot:       s.CacheRoot,
		PersistentDir:   s.PersistentVolumesDir,
		PrintSystemLogs: s.PrintSystemLogs,
		Logger:          log,
	})
	if err != nil {
		return nil, err
	}
	log.Info("qemu backend", "kernel", kernel, "initrd", initrd, "accel", b.Accel(), "acpi", b.ACPI())
	return b, nil
}

func firecrackerOptions(s *config.Settings, log *slog.Logger) firecracker.Options {
	return firecracker.Options{
		FirecrackerPath: s.FirecrackerPath,
		JailerPath:      s.JailerPath,
		UseJailer:       s.UseJailer,
		KernelPath:      s.LinuxPath,
		InitrdPath:      s.InitrdPath,
		CacheRoot:       s.CacheRoot,
		PersistentDir:   s.PersistentVolumesDir,
		PrintSystemLogs: s.PrintSystemLogs,
		Logger:          log,
	}
}

// startTimeout is how long the pool gives a sandbox to start: INIT_TIMEOUT,
// or more for a VM that runs emulated, whose boot alone can take longer
// than aleph-vm's default.
func startTimeout(s *config.Settings, be backend.Backend, log *slog.Logger) time.Duration {
	q, ok := be.(*qemu.Backend)
	if !ok || q.Accel() != qemu.AccelTCG || s.InitTimeout >= emulatedInitTimeout {
		return s.InitTimeout
	}
	log.Warn("qemu runs emulated (no usable KVM): starts get more than INIT_TIMEOUT", "init_timeout", s.InitTimeout, "used", emulatedInitTimeout)
	return emulatedInitTimeout
}

// qemuWithKVM tells whether this node runs its VMs in QEMU with KVM: what
// aleph-vm's ENABLE_QEMU_SUPPORT tells the network (this node can take
// QEMU executions). QEMU emulated (TCG) is a slow fallback and does not
// count, nor do the other backends.
func qemuWithKVM(be backend.Backend) bool {
	q, ok := be.(*qemu.Backend)
	return ok && q.Accel() == qemu.AccelKVM
}

// snapshotDir is where gVisor keeps checkpoints of warm sandboxes, or ""
// when SNAPSHOT_CACHE_MAX_MIB turns them off.
func snapshotDir(s *config.Settings) string {
	if s.SnapshotCacheMaxMiB <= 0 {
		return ""
	}
	return filepath.Join(s.CacheRoot, config.SnapshotDirName)
}
