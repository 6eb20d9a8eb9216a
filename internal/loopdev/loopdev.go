// Package loopdev attaches image files to loop devices and mounts them, and
// finds the loop devices that files under a directory still hold.
//
// It uses the kernel's LOOP_CONFIGURE ioctl (Linux 5.8+) through
// golang.org/x/sys/unix rather than a losetup library: one call binds the
// file and sets LO_FLAGS_AUTOCLEAR atomically, so no window exists in
// which a crash leaves a device bound without autoclear. With autoclear
// the kernel detaches the device when its last user goes — the mount, or
// our descriptor if the mount never happened — so unmounting (or a crash
// of the supervisor) is the only clean-up needed.
package loopdev

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Mount attaches image to a free loop device and mounts it at target as
// fstype with flags (MS_RDONLY is added for readOnly). data is passed to
// mount(2) as file system options.
func Mount(image, target, fstype string, readOnly bool, flags uintptr, data string) error {
	openFlags := os.O_RDWR
	if readOnly {
		openFlags = os.O_RDONLY
		flags |= unix.MS_RDONLY
	}
	backing, err := os.OpenFile(image, openFlags|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loop mount: %w", err)
	}
	defer backing.Close()

	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loop mount: %w", err)
	}
	defer ctl.Close()

	// Another process can take the free device between GET_FREE and
	// CONFIGURE; that shows as EBUSY and we simply ask again.
	for attempt := 0; ; attempt++ {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return fmt.Errorf("loop mount: no free loop device: %w", err)
		}
		dev := fmt.Sprintf("/dev/loop%d", n)
		if err := ensureNode(dev, n); err != nil {
			return err
		}
		loop, err := os.OpenFile(dev, openFlags|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("loop mount: %w", err)
		}
		cfg := unix.LoopConfig{Fd: uint32(backing.Fd())}
		cfg.Info.Flags = unix.LO_FLAGS_AUTOCLEAR
		if readOnly {
			cfg.Info.Flags |= unix.LO_FLAGS_READ_ONLY
		}
		copy(cfg.Info.File_name[:], image)
		err = unix.IoctlLoopConfigure(int(loop.Fd()), &cfg)
		if errors.Is(err, unix.EBUSY) && attempt < 16 {
			loop.Close()
			continue
		}
		if err != nil {
			loop.Close()
			return fmt.Errorf("loop mount: configure %s: %w", dev, err)
		}
		err = unix.Mount(dev, target, fstype, flags, data)
		// Closing our descriptor lets autoclear detach the device as soon
		// as the mount (if any) is gone.
		loop.Close()
		if err != nil {
			return fmt.Errorf("mount %s (%s) on %s: %w", image, fstype, target, err)
		}
		return nil
	}
}

// ensureNode creates /dev/loopN when the kernel handed out a number for
// which this /dev (often a static one in containers) has no node.
func ensureNode(dev string, n int) error {
	if _, err := os.Stat(dev); err == nil {
		return nil
	}
	const loopMajor = 7
	if err := unix.Mknod(dev, unix.S_IFBLK|0o660, int(unix.Mkdev(loopMajor, uint32(n)))); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("loop mount: create %s: %w", dev, err)
	}
	return nil
}

// Device is a bound loop device.
type Device struct {
	Name      string // loop0
	Backing   string // the backing file's path as the kernel reports it
	Deleted   bool   // the backing file was unlinked
	Autoclear bool
}

// List returns every bound loop device, from /sys/block.
func List() ([]Device, error) {
	entries, err := os.ReadDir("/sys/block")
	if err != nil {
		return nil, err
	}
	var out []Device
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "loop") {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/sys/block", e.Name(), "loop", "backing_file"))
		if err != nil {
			continue // not bound
		}
		d := Device{Name: e.Name(), Backing: strings.TrimSuffix(string(b), "\n")}
		if s, ok := strings.CutSuffix(d.Backing, " (deleted)"); ok {
			d.Backing, d.Deleted = s, true
		}
		if a, err := os.ReadFile(filepath.Join("/sys/block", e.Name(), "loop", "autoclear")); err == nil {
			d.Autoclear, _ = strconv.ParseBool(strings.TrimSpace(string(a)))
		}
		out = append(out, d)
	}
	return out, nil
}

// BackedUnder returns the loop devices whose backing file is at or below
// dir (symbolic links in dir resolved, as the kernel reports real paths).
func BackedUnder(dir string) ([]Device, error) {
	resolved, err := filepath.EvalSymlinks(dir)
	if err != nil {
		resolved = filepath.Clean(dir)
	}
	all, err := List()
	if err != nil {
		return nil, err
	}
	var out []Device
	for _, d := range all {
		if d.Backing == resolved || strings.HasPrefix(d.Backing, resolved+"/") {
			out = append(out, d)
		}
	}
	return out, nil
}

// BackedBy returns the loop devices bound to the file at path.
func BackedBy(path string) ([]Device, error) {
	resolved, err := filepath.EvalSymlinks(path)
	if err != nil {
		return nil, err
	}
	all, err := List()
	if err != nil {
		return nil, err
	}
	var out []Device
	for _, d := range all {
		if d.Backing == resolved && !d.Deleted {
			out = append(out, d)
		}
	}
	return out, nil
}

// Detach unbinds a loop device (LOOP_CLR_FD). On a device still mounted
// or open elsewhere the kernel defers: it turns autoclear on, so that the
// device goes with its last user.
func Detach(name string) error {
	f, err := os.OpenFile("/dev/"+name, os.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("loop %s: %w", name, err)
	}
	defer f.Close()
	if err := unix.IoctlSetInt(int(f.Fd()), unix.LOOP_CLR_FD, 0); err != nil && !errors.Is(err, unix.ENXIO) {
		return fmt.Errorf("loop %s: detach: %w", name, err)
	}
	return nil
}
