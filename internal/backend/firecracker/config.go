package firecracker

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
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

// NetworkInterface is definitions.NetworkInterface: one virtio-net card
// backed by a host tap device (host_dev_name). The rate limiters are left
// out.
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

// GuestIfaceID is the iface_id of the guest's one network card. It is
// only Firecracker's name for the device; the guest kernel names the card
// eth0 too, as it is the only one, and the agent configures eth0.
const GuestIfaceID = "eth0"

// macPattern is the form Firecracker v1.0.0 parses guest_mac in
// (utils::net::mac::MacAddr::parse_str: six ':'-separated pairs of hex
// digits). The API spec has no pattern for it; a bad value only fails
// when Firecracker reads the file.
var macPattern = regexp.MustCompile(`^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$`)

// ifNameMax is IFNAMSIZ-1: Firecracker refuses longer tap names, and the
// kernel could not have created one.
const ifNameMax = 15

// networkInterface is the config of spec's network: the tap the host
// prepared, with the guest card's MAC address.
func networkInterface(n *backend.Network) (NetworkInterface, error) {
	tap := n.TapName
	switch {
	case tap == "":
		return NetworkInterface{}, errors.New("the network has no tap device (Firecracker attaches a host tap, not a network namespace)")
	case len(tap) > ifNameMax || tap == "." || tap == ".." || strings.ContainsAny(tap, "/: \t\n"):
		return NetworkInterface{}, fmt.Errorf("%q is not a valid tap device name", tap)
	}
	if n.GuestMAC != "" {
		if !macPattern.MatchString(n.GuestMAC) {
			return NetworkInterface{}, fmt.Errorf("guest MAC address %q is not of the form 02:fc:00:00:00:01", n.GuestMAC)
		}
		// The low bit of the first octet marks a multicast address, which
		// no card can have; all zeros is no address at all.
		first, _ := strconv.ParseUint(n.GuestMAC[:2], 16, 8) // checked by macPattern
		if first&1 != 0 || n.GuestMAC == "00:00:00:00:00:00" {
			return NetworkInterface{}, fmt.Errorf("guest MAC address %s is not a unicast address", n.GuestMAC)
		}
	}
	return NetworkInterface{IfaceID: GuestIfaceID, HostDevName: tap, GuestMAC: n.GuestMAC}, nil
}

// Limits of Firecracker v1.0.0's machine configuration.
const (
	MaxVCPUs = 32
)

// BaseBootArgs are aleph-vm's kernel arguments for Firecracker guests
// (its firecracker controller), without the console part.
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

// PreloadArg marks a spare (Spec.DeferCode) on the kernel command line:
// the agent preloads the interpreter while its code drive is empty.
const PreloadArg = "aleph.preload=1"

func bootArgs(spec backend.Spec, p ConfigParams) string {
	args := BootArgs(p.PrintSystemLogs, p.InitrdPath != "", p.Init)
	if spec.DeferCode {
		args += " " + PreloadArg
	}
	return args
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

// BuildConfig produces the --config-file document for spec. With
// spec.Network it has one network interface on spec.Network.TapName,
// which must exist when Firecracker starts (see JailerCommand for how a
// jailed Firecracker reaches it). drives come
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
		return nil, fmt.Errorf("%d vCPUs requested; Firecracker v1.0.0 supports 1 to %d", vcpus, MaxVCPUs)
	case mem < 1:
		return nil, fmt.Errorf("invalid memory size %d MiB", mem)
	case p.KernelPath == "":
		return nil, errors.New("no kernel image")
	case p.VsockPath == "":
		return nil, errors.New("no vsock socket path")
	case len(drives) == 0 || !drives[0].Root:
		return nil, errors.New("the first drive must be the runtime root drive")
	}
	cfg := &VMConfig{
		BootSource: BootSource{
			KernelImagePath: p.KernelPath,
			BootArgs:        bootArgs(spec, p),
			InitrdPath:      p.InitrdPath,
		},
		MachineConfig:     MachineConfig{VCPUCount: vcpus, MemSizeMiB: mem, SMT: false},
		NetworkInterfaces: []NetworkInterface{},
		Vsock:             &Vsock{GuestCID: GuestCID, UDSPath: p.VsockPath},
	}
	if spec.Network != nil {
		nic, err := networkInterface(spec.Network)
		if err != nil {
			return nil, err
		}
		cfg.NetworkInterfaces = append(cfg.NetworkInterfaces, nic)
	}
	seen := map[string]bool{}
	for i, d := range drives {
		if d.Root != (i == 0) {
			return nil, fmt.Errorf("drive %q: only the first drive may be the root device", d.ID)
		}
		if d.ID == "" || seen[d.ID] {
			return nil, fmt.Errorf("drive %d: missing or duplicate id %q", i, d.ID)
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
