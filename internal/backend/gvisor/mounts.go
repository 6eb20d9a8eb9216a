package gvisor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/loopdev"
	"github.com/aleph-vm-go/vm-supervisor/internal/mountinfo"
)

// unmountAll removes every mount stacked on path. It first tries a normal
// unmount and falls back to a lazy one, so that a stuck user (e.g. a
// sandbox left by a crash) cannot keep our cleanup from finishing.
func unmountAll(path string) error {
	for i := 0; i < 32; i++ {
		mounted, err := isMountPoint(path)
		if err != nil || !mounted {
			return err
		}
		if err := unix.Unmount(path, 0); err != nil {
			if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
				return nil
			}
			if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
				return fmt.Errorf("unmount %s: %w", path, err)
			}
		}
	}
	return fmt.Errorf("unmount %s: still mounted after many attempts", path)
}

// isMountPoint reports whether path is a mount point in our namespace.
func isMountPoint(path string) (bool, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return false, err
	}
	mps, err := mountPoints()
	if err != nil {
		return false, err
	}
	_, ok := mps[abs]
	return ok, nil
}

// mountPoints lists mount points from /proc/self/mountinfo.
func mountPoints() (map[string]struct{}, error) { return mountinfo.Points() }

// runtimeMounts shares one read-only mount of each runtime image between
// all sandboxes of this process. It is package-level so that two Backend
// values with the same cache cannot fight over one mount point.
var runtimeMounts = struct {
	sync.Mutex
	refs map[string]int // mount point -> users
}{refs: map[string]int{}}

// acquireRuntime returns the mount point of image under dir, mounting it
// for the first user.
func acquireRuntime(ctx context.Context, log *slog.Logger, image, mountPoint string) error {
	runtimeMounts.Lock()
	defer runtimeMounts.Unlock()
	if err := ctx.Err(); err != nil {
		return err
	}
	if runtimeMounts.refs[mountPoint] > 0 {
		runtimeMounts.refs[mountPoint]++
		return nil
	}
	// Nobody in this process uses it, so anything mounted there is stale
	// (left by a crash) and may even be another image: start afresh. A
	// lazy unmount keeps it alive for any orphaned sandbox still using it.
	if mounted, _ := isMountPoint(mountPoint); mounted {
		log.Warn("removing stale runtime mount", "path", mountPoint)
		if err := unmountAll(mountPoint); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(mountPoint, 0o755); err != nil {
		return fmt.Errorf("runtime mount point: %w", err)
	}
	if err := loopdev.Mount(image, mountPoint, "squashfs", true, unix.MS_NODEV|unix.MS_NOSUID, ""); err != nil {
		return fmt.Errorf("runtime %s: %w", image, err)
	}
	runtimeMounts.refs[mountPoint] = 1
	log.Debug("runtime mounted", "image", image, "path", mountPoint)
	return nil
}

// releaseRuntime drops one user of the mount and unmounts it after the
// last one.
func releaseRuntime(log *slog.Logger, mountPoint string) error {
	runtimeMounts.Lock()
	defer runtimeMounts.Unlock()
	n := runtimeMounts.refs[mountPoint]
	if n > 1 {
		runtimeMounts.refs[mountPoint] = n - 1
		return nil
	}
	delete(runtimeMounts.refs, mountPoint)
	if err := unmountRetry(mountPoint); err != nil {
		return err
	}
	if err := os.Remove(mountPoint); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("runtime mount point: %w", err)
	}
	log.Debug("runtime unmounted", "path", mountPoint)
	return nil
}

// unmountRetry gives the gofer of a just-killed sandbox a moment to let go
// of the mount before falling back to a lazy unmount.
func unmountRetry(path string) error {
	for i := 0; i < 20; i++ {
		mounted, err := isMountPoint(path)
		if err != nil || !mounted {
			return err
		}
		err = unix.Unmount(path, 0)
		if err == nil || errors.Is(err, unix.EINVAL) {
			continue
		}
		if !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("unmount %s: %w", path, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return unmountAll(path)
}
