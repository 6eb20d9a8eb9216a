package pool

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/mountinfo"
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
	if err := killProcessesUsing(ctx, dir+"/"); err != nil {
		log.Warn("stray sandbox processes", "err", err)
	}
	if err := mountinfo.DetachUnder(dir); err != nil {
		return fmt.Errorf("sweeping executions: %w", err)
	}
	var errs []error
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// killProcessesUsing SIGKILLs every process whose command line mentions
// prefix, and waits (up to 5 s) until they are gone.
func killProcessesUsing(ctx context.Context, prefix string) error {
	pids := processesMentioning(prefix)
	for _, pid := range pids {
		_ = unix.Kill(pid, unix.SIGKILL)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(pids) > 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("processes %v did not die", pids)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		pids = processesMentioning(prefix)
	}
	return nil
}

func processesMentioning(prefix string) []int {
	entries, _ := os.ReadDir("/proc")
	self := os.Getpid()
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, []byte(prefix)) {
			out = append(out, pid)
		}
	}
	return out
}
