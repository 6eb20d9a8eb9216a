package main

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/firecracker"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/gvisor"
	"github.com/aleph-vm-go/vm-supervisor/internal/config"
	"github.com/aleph-vm-go/vm-supervisor/internal/hostcheck"
)

// selectBackend builds the backend that HYPERVISOR names. `auto` prefers
// the micro-VM backends when the host can run them; until those exist in
// this build it settles on gVisor, which needs no KVM.
func selectBackend(s *config.Settings, log *slog.Logger) (backend.Backend, error) {
	switch s.Hypervisor {
	case config.HypervisorAuto, config.HypervisorGVisor:
		return newGVisor(s, log)
	default:
		return nil, fmt.Errorf("hypervisor %q is not available in this build (use gvisor)", s.Hypervisor)
	}
}

// hostReport checks the host with the configured paths.
func hostReport(s *config.Settings) *hostcheck.Report {
	return hostcheck.Check(hostcheck.Paths{
		Firecracker: s.FirecrackerPath,
		Jailer:      s.JailerPath,
		Qemu:        s.QemuPath,
		Runsc:       s.RunscPath,
		Kernel:      s.LinuxPath,
	})
}

func newGVisor(s *config.Settings, log *slog.Logger) (backend.Backend, error) {
	if _, err := os.Stat(s.AgentPath); err != nil {
		return nil, fmt.Errorf("vm-agent binary (ALEPH_VM_AGENT_PATH=%s): %w", s.AgentPath, err)
	}
	return gvisor.New(gvisor.Options{
		RunscPath: s.RunscPath,
		Platform:  s.RuntimePlatform,
		AgentPath: s.AgentPath,
		CacheRoot: s.CacheRoot,
		RootDir:   filepath.Join(s.ExecutionRoot, "runsc"),
		Logger:    log,
		Debug:     s.PrintSystemLogs,
	})
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
