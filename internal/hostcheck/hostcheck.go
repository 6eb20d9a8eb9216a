// Package hostcheck finds out what this host can run: which isolation
// backends, and what is missing for the others. `vm-supervisor check`
// prints it, and HYPERVISOR=auto picks a backend from it.
package hostcheck

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"

	"github.com/google/nftables"

	"github.com/aleph-vm-go/vm-supervisor/internal/network"
)

// Paths of the binaries and devices to look at; zero values use defaults.
type Paths struct {
	KVM         string // /dev/kvm
	VhostVsock  string // /dev/vhost-vsock
	Firecracker string
	Jailer      string
	Qemu        string
	Runsc       string
	// RunscPlatform is RUNSC_PLATFORM, shown with why it is used.
	RunscPlatform string
	Kernel        string // LINUX_PATH
	// Networking is ALLOW_VM_NETWORKING; Outbound is NETWORK_INTERFACE
	// (empty: the default route's).
	Networking bool
	Outbound   string
}

// Item is one line of the report.
type Item struct {
	Name   string
	OK     bool
	Detail string // what was found, or why not
	Hint   string // how to get it, when missing
}

// Report is what the host offers.
type Report struct {
	Items []Item
	// Backend is what HYPERVISOR=auto picks; empty when nothing can run.
	Backend string
	Reason  string
}

func (r *Report) item(name string) Item {
	for _, it := range r.Items {
		if it.Name == name {
			return it
		}
	}
	return Item{}
}

// OK reports whether the named item was found usable.
func (r *Report) OK(name string) bool { return r.item(name).OK }

// Check inspects the host. It runs no sandbox; the KVM probe runs one
// instruction in a throw-away VM.
func Check(p Paths) *Report {
	def := func(v, d string) string {
		if v == "" {
			return d
		}
		return v
	}
	p.KVM = def(p.KVM, "/dev/kvm")
	p.VhostVsock = def(p.VhostVsock, "/dev/vhost-vsock")
	p.Qemu = def(p.Qemu, "qemu-system-x86_64")
	p.Runsc = def(p.Runsc, "runsc")

	r := &Report{}
	add := func(it Item) { r.Items = append(r.Items, it) }

	if err := KVMUsable(p.KVM); err != nil {
		add(Item{"kvm", false, fmt.Sprintf("%s: %v", p.KVM, err), "hardware virtualisation is needed by firecracker, and makes qemu fast: enable VT-x/AMD-V (or nested virtualisation) and load kvm_intel/kvm_amd"})
	} else {
		add(Item{"kvm", true, p.KVM + ": a test VM ran", ""})
	}
	add(fileItem("vhost-vsock", p.VhostVsock, "modprobe vhost_vsock (optional: qemu falls back to a virtio-serial port)"))
	add(binItem("firecracker", p.Firecracker, "install Firecracker v1.x at FIRECRACKER_PATH (it is not packaged by Debian)"))
	add(binItem("jailer", p.Jailer, "install Firecracker's jailer at JAILER_PATH, or run with --no-jailer"))
	add(binItem("qemu", p.Qemu, "apt-get install qemu-system-x86"))
	runsc := binItem("runsc", p.Runsc, "make build (compiles runsc from the gVisor module pinned in go.mod)")
	if runsc.OK && p.RunscPlatform != "" {
		runsc.Detail += ", platform " + p.RunscPlatform + ": " + platformWhy[p.RunscPlatform]
	}
	add(runsc)
	if p.Kernel != "" {
		add(fileItem("guest kernel", p.Kernel, "make kernel (Debian cloud kernel, for qemu) or make kernel-custom (for firecracker)"))
	}
	add(cgroupItem())
	add(netnsItem())
	add(networkingItem(p.Networking, p.Outbound))
	add(fileItem("tun device", "/dev/net/tun", "modprobe tun (VM backends attach programs to taps)"))
	add(filesystemItem("squashfs", "modprobe squashfs"))
	add(fileItem("loop devices", "/dev/loop-control", "modprobe loop"))

	r.pick()
	return r
}

// pick applies auto's order of preference: firecracker, then qemu with
// KVM, then gVisor, and emulated qemu only when nothing else is there.
func (r *Report) pick() {
	switch {
	case r.OK("kvm") && r.OK("firecracker"):
		r.Backend, r.Reason = "firecracker", "KVM works and firecracker is installed"
	case r.OK("kvm") && r.OK("qemu"):
		r.Backend, r.Reason = "qemu", "KVM works and qemu is installed (firecracker is not)"
	case r.OK("runsc"):
		r.Backend, r.Reason = "gvisor", "no usable KVM micro-VM: gVisor needs no hardware virtualisation"
	case r.OK("qemu"):
		r.Backend, r.Reason = "qemu", "only qemu is installed: it runs emulated (TCG), slowly"
	default:
		r.Reason = "no backend can run: install runsc (apt-get install runsc)"
	}
}

func fileItem(name, path, hint string) Item {
	if _, err := os.Stat(path); err != nil {
		return Item{name, false, path + ": not present", hint}
	}
	return Item{name, true, path, ""}
}

func binItem(name, path, hint string) Item {
	if path == "" {
		return Item{name, false, "no path configured", hint}
	}
	found, err := exec.LookPath(path)
	if err != nil {
		return Item{name, false, path + ": not found", hint}
	}
	return Item{name, true, found, ""}
}

func cgroupItem() Item {
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return Item{"cgroups", true, "cgroup v2 (unified)", ""}
	}
	if _, err := os.Stat("/sys/fs/cgroup/memory"); err == nil {
		return Item{"cgroups", true, "cgroup v1 (memory controller mounted)", ""}
	}
	return Item{"cgroups", false, "no memory controller under /sys/fs/cgroup", "mount cgroups (systemd does this on a standard host)"}
}

func netnsItem() Item {
	if _, err := os.Stat("/proc/self/ns/net"); err != nil {
		return Item{"network namespaces", false, "kernel without network namespaces", "CONFIG_NET_NS"}
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return Item{"network namespaces", true, "supported (iproute2 missing: apt-get install iproute2)", ""}
	}
	return Item{"network namespaces", true, "supported", ""}
}

var platformWhy = map[string]string{
	"systrap": "the fastest without KVM (seccomp traps, no ptrace stops); the default",
	"ptrace":  "the slowest, for kernels where systrap fails (RUNSC_PLATFORM=ptrace)",
	"kvm":     "needs a usable /dev/kvm",
}

// networkingItem tells whether programs can get the internet here: our
// firewall needs nftables, NAT needs an outbound interface.
func networkingItem(enabled bool, outbound string) Item {
	const name = "program network"
	if !enabled {
		return Item{name, true, "off (ALLOW_VM_NETWORKING=false): programs get loopback only", ""}
	}
	c, err := nftables.New()
	if err == nil {
		_, err = c.ListTablesOfFamily(nftables.TableFamilyINet)
	}
	if err != nil {
		return Item{name, false, fmt.Sprintf("nftables unusable: %v", err), "run as root on a kernel with nf_tables (CONFIG_NF_TABLES, NFT_MASQ, NFT_CT)"}
	}
	if outbound == "" {
		if outbound, err = network.DefaultRouteInterface(); err != nil {
			return Item{name, false, err.Error(), "set ALEPH_VM_NETWORK_INTERFACE to the interface that reaches the internet"}
		}
	}
	if _, err := net.InterfaceByName(outbound); err != nil {
		return Item{name, false, fmt.Sprintf("outbound interface %q: %v", outbound, err), "set ALEPH_VM_NETWORK_INTERFACE to an existing interface"}
	}
	return Item{name, true, "nftables usable, NAT through " + outbound, ""}
}

func filesystemItem(fs, hint string) Item {
	b, err := os.ReadFile("/proc/filesystems")
	if err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if strings.TrimSpace(strings.TrimPrefix(line, "nodev")) == fs {
				return Item{fs, true, "in /proc/filesystems", ""}
			}
		}
	}
	// A module not loaded yet is loaded by mount(2) on demand.
	if _, err := exec.LookPath("mount"); err == nil {
		return Item{fs, true, "not loaded yet (mount loads the module on demand)", ""}
	}
	return Item{fs, false, "not available", hint}
}

// Print writes the report for an operator.
func (r *Report) Print(w io.Writer) {
	for _, it := range r.Items {
		mark := "ok     "
		if !it.OK {
			mark = "missing"
		}
		fmt.Fprintf(w, "%s  %-18s %s\n", mark, it.Name, it.Detail)
		if !it.OK && it.Hint != "" {
			fmt.Fprintf(w, "         %-18s → %s\n", "", it.Hint)
		}
	}
	if r.Backend != "" {
		fmt.Fprintf(w, "\nHYPERVISOR=auto picks: %s (%s)\n", r.Backend, r.Reason)
	} else {
		fmt.Fprintf(w, "\nHYPERVISOR=auto picks nothing: %s\n", r.Reason)
	}
}
