package hostcheck

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// KVM ioctl numbers from <linux/kvm.h> (x86_64).
const (
	kvmGetAPIVersion       = 0xAE00
	kvmCreateVM            = 0xAE01
	kvmGetVCPUMmapSize     = 0xAE04
	kvmCreateVCPU          = 0xAE41
	kvmSetUserMemoryRegion = 0x4020AE46
	kvmRun                 = 0xAE80
	kvmSetRegs             = 0x4090AE82
	kvmGetSregs            = 0x8138AE83
	kvmSetSregs            = 0x4138AE84
	kvmExitHLT             = 5
)

// KVMUsable tells whether micro-VMs can use hardware virtualisation here:
// the CPU must advertise VMX or SVM, and a test VM must actually run. The
// flag check matters: paravirtual KVM (kvm-pvm) passes the probe but fails
// at the first instruction of a real guest kernel.
func KVMUsable(path string) error {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return err
	}
	hasVirt := false
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok || strings.TrimSpace(k) != "flags" {
			continue
		}
		for _, f := range strings.Fields(v) {
			hasVirt = hasVirt || f == "vmx" || f == "svm"
		}
		break
	}
	if !hasVirt {
		if _, err := os.Stat(path); err != nil {
			return err
		}
		return errors.New(path + " exists but the CPU has no vmx/svm flag (paravirtual KVM such as kvm-pvm cannot run guest kernels)")
	}
	return ProbeKVM(path)
}

// ProbeKVM proves that hardware virtualisation works by running one HLT
// instruction in a throw-away VM. Opening /dev/kvm, or even creating a VM,
// is not enough: on some hosts (nested setups without VMX exposed) both
// succeed and every real VMM then fails at its first instruction.
func ProbeKVM(path string) error {
	done := make(chan error, 1)
	go func() { done <- probeKVM(path) }()
	select {
	case err := <-done:
		return err
	case <-time.After(3 * time.Second):
		return errors.New("a test VM did not halt within 3s")
	}
}

func probeKVM(path string) error {
	kvm, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer kvm.Close()
	ioctl := func(fd uintptr, req, arg uintptr) (uintptr, error) {
		r, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, req, arg)
		if errno != 0 {
			return 0, errno
		}
		return r, nil
	}
	if v, err := ioctl(kvm.Fd(), kvmGetAPIVersion, 0); err != nil || v != 12 {
		return fmt.Errorf("KVM API version %d (%v), want 12", v, err)
	}
	vmfd, err := ioctl(kvm.Fd(), kvmCreateVM, 0)
	if err != nil {
		return fmt.Errorf("KVM_CREATE_VM: %w", err)
	}
	defer unix.Close(int(vmfd))

	mem, err := unix.Mmap(-1, 0, 0x2000, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_ANONYMOUS)
	if err != nil {
		return err
	}
	// Munmap fails only on a bad address.
	defer func() { _ = unix.Munmap(mem) }()
	mem[0x1000] = 0xf4 // hlt
	region := struct {
		slot, flags                    uint32
		guestPhys, size, userspaceAddr uint64
	}{0, 0, 0, 0x2000, uint64(uintptr(unsafe.Pointer(&mem[0])))}
	if _, err := ioctl(vmfd, kvmSetUserMemoryRegion, uintptr(unsafe.Pointer(&region))); err != nil {
		return fmt.Errorf("KVM_SET_USER_MEMORY_REGION: %w", err)
	}
	vcpu, err := ioctl(vmfd, kvmCreateVCPU, 0)
	if err != nil {
		return fmt.Errorf("KVM_CREATE_VCPU: %w", err)
	}
	defer unix.Close(int(vcpu))
	runSize, err := ioctl(kvm.Fd(), kvmGetVCPUMmapSize, 0)
	if err != nil {
		return fmt.Errorf("KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	run, err := unix.Mmap(int(vcpu), 0, int(runSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return err
	}
	defer func() { _ = unix.Munmap(run) }()

	// Real mode, code segment at 0, instruction pointer on the HLT.
	var sregs [312]byte
	if _, err := ioctl(vcpu, kvmGetSregs, uintptr(unsafe.Pointer(&sregs[0]))); err != nil {
		return fmt.Errorf("KVM_GET_SREGS: %w", err)
	}
	binary.LittleEndian.PutUint64(sregs[0:], 0)  // cs.base
	binary.LittleEndian.PutUint16(sregs[12:], 0) // cs.selector
	if _, err := ioctl(vcpu, kvmSetSregs, uintptr(unsafe.Pointer(&sregs[0]))); err != nil {
		return fmt.Errorf("KVM_SET_SREGS: %w", err)
	}
	var regs [18]uint64
	regs[16] = 0x1000 // rip
	regs[17] = 0x2    // rflags: the always-one bit
	if _, err := ioctl(vcpu, kvmSetRegs, uintptr(unsafe.Pointer(&regs[0]))); err != nil {
		return fmt.Errorf("KVM_SET_REGS: %w", err)
	}
	if _, err := ioctl(vcpu, kvmRun, 0); err != nil {
		return fmt.Errorf("KVM_RUN: %w", err)
	}
	if reason := binary.LittleEndian.Uint32(run[8:]); reason != kvmExitHLT {
		return fmt.Errorf("test VM exited with reason %d, want HLT", reason)
	}
	return nil
}
