package codeprep

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/ctxio"
)

// LinkTree reproduces the tree at src (a cached tree, already checked and
// normalised) inside the existing directory dst: directories are made,
// links recreated and files hard-linked, so nothing is copied. Where a
// hard link is impossible (another file system) the file is copied with
// its holes kept, so a sparse file never becomes dense on the host.
func LinkTree(ctx context.Context, src, dst string) error {
	sroot, err := os.OpenRoot(src)
	if err != nil {
		return fmt.Errorf("code: %w", err)
	}
	defer sroot.Close()
	droot, err := os.OpenRoot(dst)
	if err != nil {
		return fmt.Errorf("code: %w", err)
	}
	defer droot.Close()
	n := 0
	return walk(sroot, func(_ *os.File, name string, fi fs.FileInfo) error {
		if n++; n%256 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		if name == "." {
			return nil
		}
		switch t := fi.Mode().Type(); {
		case t.IsDir():
			return droot.Mkdir(name, 0o755)
		case t&fs.ModeSymlink != 0:
			target, err := sroot.Readlink(name)
			if err != nil {
				return err
			}
			return droot.Symlink(target, name)
		case t.IsRegular():
			err := os.Link(filepath.Join(src, name), filepath.Join(dst, name))
			if err == nil {
				return nil
			}
			if !errors.Is(err, unix.EXDEV) && !errors.Is(err, unix.EPERM) && !errors.Is(err, unix.EMLINK) {
				return fmt.Errorf("code: %w", err)
			}
			return copySparse(ctx, sroot, droot, name)
		default:
			return fmt.Errorf("code: %s: unexpected file type %s in a cached tree", name, t)
		}
	})
}

// copySparse copies a regular file's data regions only (SEEK_DATA /
// SEEK_HOLE) and sets its size, so holes stay holes.
func copySparse(ctx context.Context, sroot, droot *os.Root, name string) error {
	in, err := sroot.Open(name)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	out, err := droot.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, fi.Mode().Perm())
	if err != nil {
		return err
	}
	err = copyData(ctx, in, out, fi.Size())
	if err == nil {
		err = out.Truncate(fi.Size())
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("code: copying %s: %w", name, err)
	}
	return nil
}

func copyData(ctx context.Context, in, out *os.File, size int64) error {
	var off int64
	for off < size {
		data, err := unix.Seek(int(in.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			return nil // only a hole is left
		}
		if err != nil {
			return err
		}
		hole, err := unix.Seek(int(in.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			return err
		}
		if _, err := io.Copy(io.NewOffsetWriter(out, data), ctxio.Reader(ctx, io.NewSectionReader(in, data, hole-data))); err != nil {
			return err
		}
		off = hole
	}
	return nil
}
