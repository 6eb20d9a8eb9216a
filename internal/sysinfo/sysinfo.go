// Package sysinfo describes the host for GET /about/usage/system, in the
// shape aleph-vm 0.3 answers with, so schedulers that read it need no
// change.
package sysinfo

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/shirou/gopsutil/v4/cpu"
	"github.com/shirou/gopsutil/v4/disk"
	"github.com/shirou/gopsutil/v4/host"
	"github.com/shirou/gopsutil/v4/load"
	"github.com/shirou/gopsutil/v4/mem"
)

// Usage is the response body.
type Usage struct {
	CPU        CPUUsage   `json:"cpu"`
	Mem        MemUsage   `json:"mem"`
	Disk       DiskUsage  `json:"disk"`
	Period     Period     `json:"period"`
	Properties Properties `json:"properties"`
	GPU        GPU        `json:"gpu"`
	Active     bool       `json:"active"`
}

// GPU lists the node's GPUs and those free, as aleph-vm's GpuProperties;
// this node passes no GPU to programs, so both lists are empty (aleph-vm
// sends [] for a pool without GPUs).
type GPU struct {
	Devices          []any `json:"devices"`
	AvailableDevices []any `json:"available_devices"`
}

// Float is a float64 written as Python writes a float: always with a
// fraction or an exponent (60.0, 0.0, 2400.5), as aleph-vm's answers do.
type Float float64

// MarshalJSON writes f as Python's repr does in the range these figures
// live in (exponent form below 1e-4 and from 1e16 on).
func (f Float) MarshalJSON() ([]byte, error) {
	v := float64(f)
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return nil, fmt.Errorf("sysinfo: %v is not a JSON number", v)
	}
	if a := math.Abs(v); a != 0 && (a < 1e-4 || a >= 1e16) {
		return []byte(strconv.FormatFloat(v, 'e', -1, 64)), nil
	}
	s := strconv.FormatFloat(v, 'f', -1, 64)
	if !strings.Contains(s, ".") {
		s += ".0"
	}
	return []byte(s), nil
}

// CPUUsage is the host's core count and how busy the cores are.
type CPUUsage struct {
	Count           int             `json:"count"`
	LoadAverage     LoadAverage     `json:"load_average"`
	CoreFrequencies CoreFrequencies `json:"core_frequencies"`
}

// LoadAverage is the kernel's run-queue average over 1, 5 and 15 minutes.
type LoadAverage struct {
	Load1  Float `json:"load1"`
	Load5  Float `json:"load5"`
	Load15 Float `json:"load15"`
}

// CoreFrequencies are in MHz; 0 when the host does not expose them (VMs
// often do not), as psutil reports.
type CoreFrequencies struct {
	Min Float `json:"min"`
	Max Float `json:"max"`
}

// MemUsage and DiskUsage count kB of 1000 bytes, rounded up, as aleph-vm.
type MemUsage struct {
	TotalKB     uint64 `json:"total_kB"`
	AvailableKB uint64 `json:"available_kB"`
}

// DiskUsage is the room on the file system Collect is given (kB as
// MemUsage).
type DiskUsage struct {
	TotalKB     uint64 `json:"total_kB"`
	AvailableKB uint64 `json:"available_kB"`
}

// Period is the minute the figures stand for.
type Period struct {
	StartTimestamp  time.Time `json:"start_timestamp"`
	DurationSeconds Float     `json:"duration_seconds"`
}

// Properties are what does not change while the host runs.
type Properties struct {
	CPU CPUProperties `json:"cpu"`
}

// CPUProperties let a scheduler match programs to CPU kinds. Features
// are the confidential-computing ones aleph-vm lists (sev, sev_es,
// sev_snp) that this node offers: none, as it runs no confidential VM,
// whatever the CPU can do.
type CPUProperties struct {
	Architecture string   `json:"architecture"`
	Vendor       string   `json:"vendor"`
	Features     []string `json:"features"`
}

// cpufreqRoot is where Linux exposes per-core frequency limits; a variable
// so that tests can point it at a fake tree.
var cpufreqRoot = "/sys/devices/system/cpu"

// Collect measures the host now. diskPath is the file system whose space
// is reported (aleph-vm uses the persistent volumes directory).
func Collect(ctx context.Context, diskPath string) (*Usage, error) {
	count, err := cpu.CountsWithContext(ctx, true)
	if err != nil {
		return nil, fmt.Errorf("sysinfo: cpu count: %w", err)
	}
	avg, err := load.AvgWithContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("sysinfo: load average: %w", err)
	}
	vm, err := mem.VirtualMemoryWithContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("sysinfo: memory: %w", err)
	}
	du, err := disk.UsageWithContext(ctx, diskPath)
	if err != nil {
		return nil, fmt.Errorf("sysinfo: disk usage of %s: %w", diskPath, err)
	}
	u := &Usage{
		CPU: CPUUsage{
			Count:           count,
			LoadAverage:     LoadAverage{Load1: Float(avg.Load1), Load5: Float(avg.Load5), Load15: Float(avg.Load15)},
			CoreFrequencies: coreFrequencies(cpufreqRoot),
		},
		Mem:  MemUsage{TotalKB: kB(vm.Total), AvailableKB: kB(vm.Available)},
		Disk: DiskUsage{TotalKB: kB(du.Total), AvailableKB: kB(du.Free)},
		Period: Period{
			StartTimestamp:  time.Now().UTC().Truncate(time.Minute),
			DurationSeconds: 60,
		},
		Properties: Properties{CPU: CPUProperties{
			Architecture: architecture(),
			Vendor:       vendor(ctx),
			Features:     []string{},
		}},
		GPU:    GPU{Devices: []any{}, AvailableDevices: []any{}},
		Active: true,
	}
	return u, nil
}

func kB(bytes uint64) uint64 {
	return uint64(math.Ceil(float64(bytes) / 1000))
}

// coreFrequencies reads the lowest and highest frequency any core supports
// (sysfs gives kHz). Missing files are normal on VMs and yield zeros.
func coreFrequencies(root string) CoreFrequencies {
	var f CoreFrequencies
	dirs, _ := filepath.Glob(filepath.Join(root, "cpu[0-9]*", "cpufreq"))
	for _, d := range dirs {
		if lo, ok := readKHz(filepath.Join(d, "cpuinfo_min_freq")); ok && (f.Min == 0 || Float(lo) < f.Min) {
			f.Min = Float(lo)
		}
		if hi, ok := readKHz(filepath.Join(d, "cpuinfo_max_freq")); ok && Float(hi) > f.Max {
			f.Max = Float(hi)
		}
	}
	return f
}

func readKHz(path string) (mhz float64, ok bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	v, err := strconv.ParseFloat(strings.TrimSpace(string(b)), 64)
	if err != nil || v <= 0 {
		return 0, false
	}
	return v / 1000, true
}

// architecture is the kernel's machine name (x86_64, aarch64), as Python's
// platform.machine() gives it; GOARCH spelled the same way is the fallback.
func architecture() string {
	if a, err := host.KernelArch(); err == nil && a != "" {
		return a
	}
	switch runtime.GOARCH {
	case "amd64":
		return "x86_64"
	case "arm64":
		return "aarch64"
	default:
		return runtime.GOARCH
	}
}

// vendor is the CPU's vendor id (GenuineIntel, AuthenticAMD); empty when
// the host does not say, which is no reason to fail the whole answer.
func vendor(ctx context.Context) string {
	infos, err := cpu.InfoWithContext(ctx)
	if err != nil {
		return ""
	}
	for _, i := range infos {
		if i.VendorID != "" {
			return i.VendorID
		}
	}
	return ""
}

// Capability is aleph-vm's MachineCapability (GET /about/capability):
// what the host is, in the order of its fields.
type Capability struct {
	CPU    CPUCapability    `json:"cpu"`
	Memory MemoryCapability `json:"memory"`
}

// CPUCapability is aleph-vm's ExtendedCpuProperties. Frequency is the
// highest a core reaches, in Hz (lshw's capacity); null when the host does
// not say.
type CPUCapability struct {
	Architecture string   `json:"architecture"`
	Vendor       string   `json:"vendor"`
	Features     []string `json:"features"`
	Model        *string  `json:"model"`
	Frequency    *int64   `json:"frequency"`
	Count        int      `json:"count"`
}

// MemoryCapability is aleph-vm's MemoryProperties as it fills it: size in
// bytes; the memory's type and clock come from DMI tables that need root
// and a tool (lshw): "" and null here, as aleph-vm answers when lshw
// finds no bank.
type MemoryCapability struct {
	Size       uint64  `json:"size"`
	Units      string  `json:"units"`
	Type       string  `json:"type"`
	Clock      *int64  `json:"clock"`
	ClockUnits *string `json:"clock_units"`
}

// CollectCapability describes the host's CPU and memory.
func CollectCapability(ctx context.Context) (*Capability, error) {
	count, err := cpu.CountsWithContext(ctx, true)
	if err != nil {
		return nil, fmt.Errorf("sysinfo: cpu count: %w", err)
	}
	vm, err := mem.VirtualMemoryWithContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("sysinfo: memory: %w", err)
	}
	c := &Capability{
		CPU: CPUCapability{
			Architecture: architecture(),
			Vendor:       vendor(ctx),
			Features:     []string{},
			Count:        count,
		},
		Memory: MemoryCapability{Size: vm.Total, Units: "bytes"},
	}
	if infos, err := cpu.InfoWithContext(ctx); err == nil && len(infos) > 0 && infos[0].ModelName != "" {
		model := infos[0].ModelName
		c.CPU.Model = &model
		if infos[0].Mhz > 0 {
			hz := int64(infos[0].Mhz * 1e6)
			c.CPU.Frequency = &hz
		}
	}
	if f := coreFrequencies(cpufreqRoot); f.Max > 0 {
		hz := int64(float64(f.Max) * 1e6)
		c.CPU.Frequency = &hz
	}
	return c, nil
}
