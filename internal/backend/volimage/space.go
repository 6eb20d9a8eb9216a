package volimage

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/procs"
)

// Limits weigh new images against the node's disk. Images are sparse: a
// volume of size_mib costs little when made and up to size_mib as the
// program writes, so what an image may still claim (its size less what it
// already holds) counts as taken, as does the node's own reserve.
type Limits struct {
	// MaxSizeMiB caps one volume (MAX_VOLUME_SIZE_MIB); 0: no cap.
	MaxSizeMiB int
	// ReserveMiB of the file system holding the images is kept for the
	// node (HOST_DISK_RESERVED_MIB).
	ReserveMiB int64
	// Globs match the images the node has promised space to: their
	// unallocated part counts as taken. Only regular files count, and no
	// directory is walked (a mounted volume is a program's tree).
	Globs []string
}

var (
	limitsMu sync.Mutex // also serialises reservations: one is checked and made at a time
	limits   Limits
)

// SetLimits configures the weighing of new images, once at start-up.
func SetLimits(l Limits) {
	limitsMu.Lock()
	defer limitsMu.Unlock()
	limits = l
}

// PromiseGlobs are the images of a node with these directories: every
// persistent volume, and the ephemeral volume images of VM executions.
func PromiseGlobs(persistentDir, executionRoot string) []string {
	var g []string
	if persistentDir != "" {
		g = append(g, filepath.Join(persistentDir, "*", "*"))
	}
	if executionRoot != "" {
		g = append(g, filepath.Join(executionRoot, "executions", "*", "volumes", "*"))
	}
	return g
}

// reserve checks that an image of sizeMiB fits beside dst, then creates it
// there under a temporary name (sparse, at its full size, locked) and
// returns it open: from then on it counts as promised to the next check.
// A refusal wraps ENOSPC, which the HTTP layer answers 507.
func reserve(dst string, sizeMiB int) (*os.File, error) {
	limitsMu.Lock()
	defer limitsMu.Unlock()
	l := limits
	if l.MaxSizeMiB > 0 && sizeMiB > l.MaxSizeMiB {
		return nil, errkind.New(errkind.InvalidInput,
			"volume of %d MiB refused: this node allows at most %d MiB per volume (MAX_VOLUME_SIZE_MIB)", sizeMiB, l.MaxSizeMiB)
	}
	dir := filepath.Dir(dst)
	var fsStat unix.Statfs_t
	if err := unix.Statfs(dir, &fsStat); err != nil {
		return nil, fmt.Errorf("free disk of %s: %w", dir, err)
	}
	var dirStat unix.Stat_t
	if err := unix.Stat(dir, &dirStat); err != nil {
		return nil, fmt.Errorf("free disk of %s: %w", dir, err)
	}
	free := int64(fsStat.Bavail) * int64(fsStat.Bsize)
	promised := promisedOn(dirStat.Dev, l.Globs)
	need := int64(sizeMiB) << 20
	if free-promised-l.ReserveMiB<<20 < need {
		return nil, fmt.Errorf("insufficient storage: a volume of %d MiB does not fit on this node: %d MiB free, %d MiB promised to existing volumes, %d MiB kept for the node (HOST_DISK_RESERVED_MIB): %w",
			sizeMiB, free>>20, promised>>20, l.ReserveMiB, syscall.ENOSPC)
	}
	f, err := os.CreateTemp(dir, TempPrefix+filepath.Base(dst)+"-*")
	if err != nil {
		return nil, err
	}
	err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	if err == nil {
		err = f.Chmod(0o600)
	}
	if err == nil {
		err = f.Truncate(need)
	}
	if err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, fmt.Errorf("size image: %w", err)
	}
	return f, nil
}

// promisedOn adds up what the images matched by globs on device dev may
// still claim: their size less the blocks they hold.
func promisedOn(dev uint64, globs []string) int64 {
	var total int64
	for _, g := range globs {
		matches, _ := filepath.Glob(g)
		for _, m := range matches {
			var st unix.Stat_t
			if unix.Lstat(m, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || st.Dev != dev {
				continue
			}
			if rest := st.Size - st.Blocks*512; rest > 0 {
				total += rest
			}
		}
	}
	return total
}

// SweepTemporary removes the images a crash left half-made under dir
// (one level of program directories, as persistent volumes are laid
// out): files named TempPrefix… that no live process is making (each
// maker holds its file's lock). Call it at start-up.
func SweepTemporary(ctx context.Context, dir string, log *slog.Logger) error {
	if dir == "" {
		return nil
	}
	matches, err := filepath.Glob(filepath.Join(dir, "*", TempPrefix+"*"))
	if err != nil {
		return err
	}
	// Earlier versions named them ".<name>.ext4-<random>".
	old, _ := filepath.Glob(filepath.Join(dir, "*", ".*"+Suffix+"-*"))
	var errs []error
	for _, m := range append(matches, old...) {
		if !strings.HasPrefix(filepath.Base(m), ".") {
			continue
		}
		f, err := os.OpenFile(m, os.O_RDONLY|unix.O_NOFOLLOW, 0)
		if err != nil {
			continue // gone meanwhile, or a symbolic link: not ours
		}
		fi, err := f.Stat()
		if err != nil || !fi.Mode().IsRegular() {
			f.Close()
			continue
		}
		if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) != nil {
			f.Close()
			continue // being made right now
		}
		log.Warn("removing a volume image an earlier run left half-made", "file", m)
		// Its maker is dead; an mkfs it ran may still be writing.
		if err := procs.KillMentioning(ctx, m+"\x00"); err != nil {
			log.Warn("formatting process of an earlier run", "file", m, "err", err)
		}
		if err := os.Remove(m); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
		f.Close()
	}
	return errors.Join(errs...)
}
