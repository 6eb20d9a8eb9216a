package pool

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend/volimage"
	"github.com/aleph-vm-go/vm-supervisor/internal/loopdev"
	"github.com/aleph-vm-go/vm-supervisor/internal/mountinfo"
	"github.com/aleph-vm-go/vm-supervisor/internal/procs"
)

// SweepExecutions removes what executions of an earlier run left under
// EXECUTION_ROOT/executions after a crash or kill -9: VMM processes still
// running from there (qemu and firecracker outlive the supervisor in
// their own process groups), mounts (root overlays, volumes) and the
// directories. Call it at start-up, after the backend reaped its
// sandboxes and before the pool starts any.
func SweepExecutions(ctx context.Context, executionRoot string, log *slog.Logger) error {
	dir := filepath.Join(executionRoot, "executions")
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) || (err == nil && len(entries) == 0) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("sweeping executions: %w", err)
	}
	log.Warn("removing what an earlier run left", "executions", len(entries), "dir", dir)
	if err := procs.KillMentioning(ctx, dir+"/"); err != nil {
		log.Warn("stray sandbox processes", "err", err)
	}
	if err := mountinfo.DetachUnder(dir); err != nil {
		return fmt.Errorf("sweeping executions: %w", err)
	}
	// Removing through a mount that did not go would delete what is
	// inside (a persistent volume's data): refuse instead.
	if left, err := mountinfo.Under(dir); err != nil {
		return fmt.Errorf("sweeping executions: %w", err)
	} else if len(left) > 0 {
		return fmt.Errorf("sweeping executions: mounts remain under %s: %v", dir, left)
	}
	var errs []error
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// SweepLoopDevices detaches loop devices bound to image files under dirs
// (EXECUTION_ROOT, PERSISTENT_VOLUMES_DIR): what a crash left attached.
// Every loop device the supervisor binds has autoclear set, so once
// SweepExecutions detached the mounts the kernel frees them by itself;
// this catches what escaped that (a device bound without autoclear, a
// mount that lived on). A device still in use is not torn away: the
// kernel then only turns its autoclear on. Call it at start-up, after
// SweepExecutions.
func SweepLoopDevices(log *slog.Logger, dirs ...string) {
	seen := map[string]bool{}
	for _, dir := range dirs {
		if dir == "" {
			continue
		}
		devs, err := loopdev.BackedUnder(dir)
		if err != nil {
			log.Warn("listing loop devices", "err", err)
			return
		}
		for _, d := range devs {
			if seen[d.Name] {
				continue
			}
			seen[d.Name] = true
			log.Warn("detaching a loop device an earlier run left", "device", d.Name, "file", d.Backing, "autoclear", d.Autoclear)
			if err := loopdev.Detach(d.Name); err != nil {
				log.Warn("detaching loop device", "device", d.Name, "err", err)
			}
		}
	}
}

// SweepVolumeImages removes the persistent volume images a crash left
// half-made (being formatted at kill -9) under PERSISTENT_VOLUMES_DIR:
// they never became volumes, and each may hold up to its size_mib. Call
// it at start-up, with SweepExecutions (which removes ephemeral images
// with their execution directories).
func SweepVolumeImages(ctx context.Context, persistentDir string, log *slog.Logger) error {
	return volimage.SweepTemporary(ctx, persistentDir, log)
}
