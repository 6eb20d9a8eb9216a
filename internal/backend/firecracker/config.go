package firecracker

import (
	"errors"
	"fmt"
	"strings"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/vmimage"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// VMConfig is the JSON document Firecracker v1.0.0 reads with
// --config-file (top-level keys as in its vm_config.json example; each
// section is the body of the matching API request, whose definitions are
// in its OpenAPI spec, firecracker.yaml).
type VMConfig struct {
	BootSource    BootSource    `json:"boot-source"`
	Drives        []Drive       `json:"drives"`
	MachineConfig MachineConfig `json:"machine-config"`
	// Always present, even empty: the example file has it and it costs
	// nothing to be explicit.
	NetworkInterfaces []NetworkInterface `json:"network-interfaces"`
	Vsock             *Vsock             `json:"vsock,omitempty"`
	Logger            *Logger            `json:"logger,omitempty"`
	Metrics           *Metrics           `json:"metrics,omitempty"`
}

// BootSource is definitions.BootSource.
type BootSource struct {
	KernelImagePath string `json:"kernel_image_path"`
	BootArgs        string `json:"boot_args,omitempty"`
	InitrdPath      string `json:"initrd_path,omitempty"`
}

// Drive is definitions.Drive.
type Drive struct {
	DriveID      string `json:"drive_id"`
	PathOnHost   string `json:"path_on_host"`
	IsRootDevice bool   `json:"is_root_device"`
	IsReadOnly   bool   `json:"is_read_only"`
	// CacheType "Writeback" makes Firecracker honour the guest's flushes;
	// the default "Unsafe" ignores them, which is fine for read-only and
	// throwaway drives but could lose acknowledged writes of a persistent
	// volume if the host crashes.
	CacheType string `json:"cache_type,omitempty"`
}

// MachineConfig is definitions.MachineConfiguration.
type MachineConfig struct {
	VCPUCount  int  `json:"vcpu_count"`
	MemSizeMiB int  `json:"mem_size_mib"`
	SMT        bool `json:"smt"`
}

// NetworkInterface is definitions.NetworkInterface (unused until the
// network is wired up).
type NetworkInterface struct {
	IfaceID     string `json:"iface_id"`
	HostDevName string `json:"host_dev_name"`
	GuestMAC    string `json:"guest_mac,omitempty"`
}

// Vsock is definitions.Vsock. vsock_id is left out: v1.0.0 deprecated it
// and logs a warning when it is given.
type Vsock struct {
	GuestCID uint32 `json:"guest_cid"`
	UDSPath  string `json:"uds_path"`
}

// Logger is definitions.Logger.
type Logger struct {
	LogPath   string `json:"log_path"`
	Level     string `json:"level,omitempty"`
	ShowLevel bool   `json:"show_level"`
}

// Metrics is definitions.Metrics.
type Metrics struct {
	MetricsPath string `json:"metrics_path"`
}

// Guest-side constants of the vsock link.
const (
	// GuestCID is the guest's vsock context id; 3 is the first one free
	// (0-2 are reserved) and each VM has its own vsock device, so every
	// guest can use it.
	GuestCID = 3
	// GuestVsockPort is where the vm-agent listens inside the VM.
	// TODO(lead): move to internal/guest so the agent shares it.
	GuestVsockPort = 52
)

// Limits of Firecracker v1.0.0's machine configuration.
const (
	MaxVCPUs = 32
)

// BaseBootArgs are aleph-vm's kernel arguments for Firecracker guests
// (DESIGN §3), without the console part.
const BaseBootArgs = "reboot=k panic=1 pci=off ro noapic nomodules random.trust_cpu=on"

// BootArgs returns the kernel command line.
//
// The serial console stays on in every case because the vm-agent writes the
// program's output to it (guest protocol): dropping console= would silence
// programs, not just the kernel. What makes boots slow with a console is
// the kernel's own log going out byte by byte through the emulated UART,
// so without system logs "quiet" keeps only warnings and errors.
//
// init names the guest's init when there is no initramfs (the kernel then
// mounts the root drive itself); with an initramfs its /init runs.
func BootArgs(printSystemLogs bool, hasInitrd bool, init string) string {
	args := []string{"console=ttyS0"}
	if !printSystemLogs {
		args = append(args, "quiet")
	}
	args = append(args, BaseBootArgs)
	if !hasInitrd && init != "" {
		args = append(args, "init="+init)
	}
	return strings.Join(args, " ")
}

// ConfigParams are the paths of a configuration as Firecracker sees them
// (inside the jail when jailed) plus boot choices.
type ConfigParams struct {
	KernelPath      string
	InitrdPath      string // optional
	VsockPath       string
	LogPath         string // optional
	MetricsPath     string // optional
	PrintSystemLogs bool
	// Init is the guest's init when there is no initrd (see BootArgs).
	Init string
}

// BuildConfig produces the --config-file document for spec. drives come
// from vmimage.GuestDrives, in attachment order, with PathOnHost as
// Firecracker must open it (the caller rewrites paths for the jail). It
// touches no file.
func BuildConfig(spec backend.Spec, drives []vmimage.Drive, p ConfigParams) (*VMConfig, error) {
	vcpus := spec.VCPUs
	if vcpus == 0 {
		vcpus = message.DefaultVCPUs
	}
	mem := spec.MemoryMiB
	if mem == 0 {
		mem = message.DefaultMemory
	}
	switch {
	case vcpus < 1 || vcpus > MaxVCPUs:
		return nil, fmt.Errorf("firecracker: %d vCPUs requested; Firecracker v1.0.0 supports 1 to %d", vcpus, MaxVCPUs)
	case mem < 1:
		return nil, fmt.Errorf("firecracker: invalid memory size %d MiB", mem)
	case p.KernelPath == "":
		return nil, errors.New("firecracker: no kernel image")
	case p.VsockPath == "":
		return nil, errors.New("firecracker: no vsock socket path")
	case len(drives) == 0 || !drives[0].Root:
		return nil, errors.New("firecracker: the first drive must be the runtime root drive")
	}
	cfg := &VMConfig{
		BootSource: BootSource{
			KernelImagePath: p.KernelPath,
			BootArgs:        BootArgs(p.PrintSystemLogs, p.InitrdPath != "", p.Init),
			InitrdPath:      p.InitrdPath,
		},
		MachineConfig:     MachineConfig{VCPUCount: vcpus, MemSizeMiB: mem, SMT: false},
		NetworkInterfaces: []NetworkInterface{},
		Vsock:             &Vsock{GuestCID: GuestCID, UDSPath: p.VsockPath},
	}
	seen := map[string]bool{}
	for i, d := range drives {
		if d.Root != (i == 0) {
			return nil, fmt.Errorf("firecracker: drive %q: only the first drive may be the root device", d.ID)
		}
		if d.ID == "" || seen[d.ID] {
			return nil, fmt.Errorf("firecracker: drive %d: missing or duplicate id %q", i, d.ID)
		}
		seen[d.ID] = true
		fd := Drive{DriveID: d.ID, PathOnHost: d.HostPath, IsRootDevice: d.Root, IsReadOnly: d.ReadOnly}
		if !d.ReadOnly && !d.Temporary {
			fd.CacheType = "Writeback"
		}
		cfg.Drives = append(cfg.Drives, fd)
	}
	if p.LogPath != "" {
		level := "Warning"
		if p.PrintSystemLogs {
			level = "Info"
		}
		cfg.Logger = &Logger{LogPath: p.LogPath, Level: level, ShowLevel: true}
	}
	if p.MetricsPath != "" {
		cfg.Metrics = &Metrics{MetricsPath: p.MetricsPath}
	}
	return cfg, nil
}
