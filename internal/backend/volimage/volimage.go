// Package volimage keeps the ext4 images of volumes, the same for every
// backend: VMs attach them as drives, gVisor loop-mounts them on the host.
//
// A persistent volume is one sparse ext4 file of the volume's size_mib,
// laid out as aleph-vm lays them out:
//
//	<PERSISTENT_VOLUMES_DIR>/<program hash>/<volume name>.ext4
//
// with aleph-vm's names: unnamed volumes are unamed_volume_<i> (sic),
// other characters than letters, digits, "_" and "-" become "_"
//
// so that the same volume keeps its data across executions, supervisor
// restarts and a change of backend. The file system bounds what a program
// can write (ENOSPC at size_mib); the host never reads what is inside.
//
// A plain host directory where the image should be
// (<program hash>/<volume name>/) is refused with a message telling how to
// convert it (mkfs.ext4 -d), never converted by the supervisor: that would
// have host code walk a tree a program wrote.
package volimage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// Suffix ends the file name of every persistent volume image.
const Suffix = ".ext4"

var (
	hashPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$`)
	// namePattern is what message validation lets through as a volume
	// name (a single file name).
	namePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
	nonName     = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)
	// fileName is what message.PersistentVolumeName can give.
	fileName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,128}$`)
)

// PersistentPath is where persistent volume n (its index among all the
// message's volumes) of a program lives: aleph-vm's own path,
// <dir>/<program hash>/<message.PersistentVolumeName>.ext4, so that
// an operator moving a node keeps the data.
func PersistentPath(dir, programHash string, n int, name, mount string) (string, error) {
	if dir == "" {
		return "", errkind.New(errkind.InvalidInput, "volume %s: no PERSISTENT_VOLUMES_DIR configured", mount)
	}
	if !hashPattern.MatchString(programHash) {
		return "", errkind.New(errkind.InvalidInput, "volume %s: program hash %q is not usable as a directory name", mount, programHash)
	}
	file := message.PersistentVolumeName(n, name)
	if !fileName.MatchString(file) {
		return "", errkind.New(errkind.InvalidInput, "volume %s: name %q is not usable as a file name", mount, name)
	}
	return filepath.Join(dir, programHash, file+Suffix), nil
}

// LegacyPaths are where earlier versions of this supervisor kept the same
// volume when its file name differed from aleph-vm's: the message's name
// as it was (a name with a dot), or, without a name, one derived from the
// mount point. EnsurePersistent moves such an image to PersistentPath.
func LegacyPaths(dir, programHash string, n int, name, mount string) []string {
	image, err := PersistentPath(dir, programHash, n, name, mount)
	if err != nil {
		return nil
	}
	old := name
	if !namePattern.MatchString(old) {
		old = nameFromMount(n, mount)
	}
	if p := filepath.Join(dir, programHash, old+Suffix); p != image {
		return []string{p}
	}
	return nil
}

func nameFromMount(n int, mount string) string {
	name := strings.Trim(nonName.ReplaceAllString(strings.Trim(path.Clean(mount), "/"), "_"), "._-")
	if mount == "" || name == "" {
		return fmt.Sprintf("volume-%d", n)
	}
	return name
}

// migrate moves the first legacy image found to image, with rename(2)
// refusing to replace anything (RENAME_NOREPLACE): the data is never
// copied, so never lost half-way, and an image already at the new path
// always wins. The image's lock (flock on the inode) and any execution of
// an older supervisor using it are unaffected by the rename. It reports
// whether image exists afterwards.
func migrate(log *slog.Logger, image string, legacy []string) (bool, error) {
	for _, old := range legacy {
		fi, err := os.Lstat(old)
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		err = unix.Renameat2(unix.AT_FDCWD, old, unix.AT_FDCWD, image, unix.RENAME_NOREPLACE)
		switch {
		case err == nil:
			log.Info("moved a persistent volume to aleph-vm's file name", "from", old, "to", image)
			return true, nil
		case errors.Is(err, unix.EEXIST):
			return true, nil
		case errors.Is(err, unix.ENOENT):
			continue // moved meanwhile by another start
		default:
			return false, fmt.Errorf("move %s to %s: %w", old, image, err)
		}
	}
	return false, nil
}

// Origin is where a persistent volume's image comes from when it does
// not exist yet.
type Origin struct {
	// OldPaths (LegacyPaths) are where earlier versions kept it: an image
	// found there is moved, never copied or formatted over.
	OldPaths []string
	// Parent is a hash-checked ext4 image (the volume's parent ref): a
	// new volume starts as a sparse copy of it, grown by sizeMiB.
	Parent string
	// Resize2fs defaults to the name in PATH.
	Resize2fs string
}

// EnsurePersistent makes sure the image of a persistent volume exists at
// image: an existing regular file is used as it is; a missing one is
// moved from origin.OldPaths, else copied from origin.Parent, else
// created with sizeMiB (refused for a read-only volume, which would stay
// empty). A directory there, or beside it where earlier versions kept the
// volume, is refused with a message explaining the migration.
func EnsurePersistent(ctx context.Context, mkfs, image, mount string, sizeMiB int, readOnly bool, origin Origin) error {
	fi, err := os.Lstat(image)
	if errors.Is(err, fs.ErrNotExist) && len(origin.OldPaths) > 0 {
		moved, merr := migrate(slog.Default(), image, origin.OldPaths)
		if merr != nil {
			return fmt.Errorf("volume %s: %w", mount, merr)
		}
		if moved {
			fi, err = os.Lstat(image)
		}
	}
	switch {
	case err == nil && fi.Mode().IsRegular():
		return nil
	case err == nil && fi.IsDir():
		return legacy(mount, image, image)
	case err == nil:
		return errkind.New(errkind.Unsupported, "volume %s: %s is not a regular file", mount, image)
	case !errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("volume %s: %w", mount, err)
	}
	if old := strings.TrimSuffix(image, Suffix); old != image {
		if fi, err := os.Lstat(old); err == nil && fi.IsDir() {
			return legacy(mount, old, image)
		}
	}
	if readOnly && origin.Parent == "" {
		return errkind.New(errkind.ResourceMissing, "volume %s: read-only persistent volume %s does not exist", mount, image)
	}
	if sizeMiB <= 0 {
		return errkind.New(errkind.InvalidInput, "volume %s: persistent volume needs a size", mount)
	}
	if origin.Parent != "" {
		if err := CopyParent(ctx, origin.Resize2fs, origin.Parent, image, sizeMiB); err != nil {
			return fmt.Errorf("volume %s: %w", mount, err)
		}
		return nil
	}
	if err := MakeExt4(ctx, mkfs, image, sizeMiB, true); err != nil {
		return fmt.Errorf("volume %s: %w", mount, err)
	}
	return nil
}

// CopyParent makes dst a sparse copy of the ext4 image parent grown by
// sizeMiB, as aleph-vm sizes a volume with a parent (the parent's blocks
// followed by size_mib of zeroes, the file system then resized to fill
// them), weighed against the free disk like any new image and published
// only when complete, never over an existing dst. The parent, a file of
// the content cache, is only read.
func CopyParent(ctx context.Context, resize2fs, parent, dst string, sizeMiB int) error {
	if resize2fs == "" {
		resize2fs = "resize2fs"
	}
	src, err := os.Open(parent)
	if err != nil {
		return fmt.Errorf("parent image: %w", err)
	}
	defer src.Close()
	fi, err := src.Stat()
	if err != nil || !fi.Mode().IsRegular() {
		return errkind.New(errkind.InvalidInput, "parent image %s is not a regular file", parent)
	}
	parentMiB := int((fi.Size() + 1<<20 - 1) >> 20)
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return err
	}
	f, err := reserve(dst, parentMiB+sizeMiB)
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	defer f.Close()
	if err := sparseCopy(ctx, f, src); err != nil {
		return fmt.Errorf("copy parent image: %w", err)
	}
	if err := f.Sync(); err != nil {
		return err
	}
	// Anyone can publish a parent: a full e2fsck first, so that neither
	// resize2fs nor, later, a host mount meets metadata it cannot repair.
	if err := Check(ctx, "", tmp); err != nil {
		return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("parent image is not a usable ext4 file system: %w", err))
	}
	out, err := exec.CommandContext(ctx, resize2fs, tmp).CombinedOutput()
	if err != nil {
		return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("parent image is not a usable ext4 file system: resize2fs: %w: %s", err, strings.TrimSpace(string(out))))
	}
	if err := os.Link(tmp, dst); err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil
		}
		return fmt.Errorf("publish %s: %w", dst, err)
	}
	return nil
}

// sparseCopy copies src into dst (already sized) from offset 0, leaving
// holes where src has holes or blocks of zeroes.
func sparseCopy(ctx context.Context, dst, src *os.File) error {
	buf := make([]byte, 1<<20)
	var off int64
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, err := io.ReadFull(src, buf)
		if n > 0 {
			chunk := buf[:n]
			for len(chunk) > 0 {
				k := min(len(chunk), 64<<10)
				if !allZero(chunk[:k]) {
					if _, werr := dst.WriteAt(chunk[:k], off); werr != nil {
						return werr
					}
				}
				off += int64(k)
				chunk = chunk[k:]
			}
		}
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

func legacy(mount, dir, image string) error {
	return errkind.New(errkind.Unsupported,
		"volume %s: %s is a host directory (the layout of earlier versions); persistent volumes are now "+
			"size-limited ext4 images. An operator can convert it, while the program is stopped, with "+
			"`truncate -s <size_mib>M %s.new && mkfs.ext4 -q -d %s %s.new && mv %s.new %s`, "+
			"then remove the directory", mount, dir, image, dir, image, image, image)
}

// TempPrefix starts the name of an image being made, beside where it
// will be published: what a crash left half-made carries it, and
// SweepTemporary removes it at the next start.
const TempPrefix = ".making-"

// MakeExt4 makes a sparse ext4 image of sizeMiB at dst, after weighing it
// against the free disk of dst's file system (Reserve). With keepExisting
// (persistent volumes) the image is built beside dst and published with
// link(2), which fails when dst appeared meanwhile: an existing volume is
// never formatted over. Without it, dst is replaced. The image is built
// under a TempPrefix name, locked while it is made, so a crash leaves
// nothing that looks like a volume.
func MakeExt4(ctx context.Context, mkfs, dst string, sizeMiB int, keepExisting bool) error {
	if mkfs == "" {
		mkfs = "mkfs.ext4"
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return err
	}
	f, err := reserve(dst, sizeMiB)
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	// Held until the image is published or removed: a sweep of another
	// supervisor on the same directory leaves it alone meanwhile.
	defer f.Close()
	// Root may use the reserved blocks and every execution writes as
	// root: reserving none keeps size_mib what the program gets. Lazy
	// initialisation leaves the inode tables and the journal unwritten
	// (the file stays sparse: 0.7 MiB allocated for 1 GiB instead of 33),
	// and the kernel mounts such a file system as it is.
	cmd := exec.CommandContext(ctx, mkfs, "-q", "-F", "-m", "0",
		"-E", "lazy_itable_init=1,lazy_journal_init=1", tmp)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("mkfs.ext4: %w: %s", err, strings.TrimSpace(string(out)))
	}
	if keepExisting {
		if err := os.Link(tmp, dst); err != nil {
			if errors.Is(err, os.ErrExist) {
				return nil
			}
			return fmt.Errorf("publish %s: %w", dst, err)
		}
		return nil
	}
	return os.Rename(tmp, dst)
}

// Check runs a full e2fsck on an image before the host kernel mounts it,
// repairing what it safely can. A VM had raw access to the image's blocks,
// so its file system may be anything: a full check keeps the host's ext4
// driver from meeting most crafted or torn metadata (it narrows, it does
// not remove, that exposure). An image e2fsck cannot repair is refused.
func Check(ctx context.Context, e2fsck, image string) error {
	if e2fsck == "" {
		e2fsck = "e2fsck"
	}
	out, err := exec.CommandContext(ctx, e2fsck, "-f", "-p", image).CombinedOutput()
	var ee *exec.ExitError
	// Exit status bits: 1 errors corrected, 2 "reboot" (only meaningful
	// for a mounted root); 4 and above: left uncorrected or failed.
	if errors.As(err, &ee) && ee.ExitCode() > 0 && ee.ExitCode() < 4 {
		return nil
	}
	if err != nil {
		return fmt.Errorf("e2fsck %s: %w: %s", filepath.Base(image), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// Lock is one execution's exclusive hold on an image.
type Lock struct{ f *os.File }

// Acquire takes the image's exclusive lock (flock(2), released by the
// kernel if the supervisor dies), waiting until ctx ends while another
// execution holds it: an execution of the same program that is still
// stopping lets go within its stop.
func Acquire(ctx context.Context, image string) (*Lock, error) {
	f, err := os.Open(image)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", image, err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return &Lock{f: f}, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", image, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, errkind.Wrap(errkind.Conflict, fmt.Errorf("volume %s is in use by another execution: %w", image, ctx.Err()))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Release lets the image go. Safe on a nil Lock and more than once.
func (l *Lock) Release() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := l.f.Close()
	l.f = nil
	return err
}
