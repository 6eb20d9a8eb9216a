// Package pack turns a program directory (or a single source file) into the
// code archive an Aleph PROGRAM message points at: zip, squashfs or plain.
//
// Packing is deterministic: entries are written in lexical order with fixed
// timestamps, owners and normalised permissions, so the same tree always
// gives the same bytes and therefore the same content hash.
package pack

import (
	"archive/zip"
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/ctxio"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// FixedTime is the modification time written for every zip entry
// (the earliest time the DOS date format can hold).
var FixedTime = time.Date(1980, 1, 1, 0, 0, 0, 0, time.UTC)

// skipDir reports directories left out of archives: Python byte-code caches
// are regenerated at run time and would make the archive depend on whether
// the program was run locally before being uploaded.
func skipDir(name string) bool { return name == "__pycache__" }

// Zip writes a deterministic zip archive of src to w. When src is a
// directory its contents are archived relative to it; when src is a regular
// file the archive holds that single file under its base name.
// Regular files keep only their executable bit (0755 or 0644), directories
// are 0755, symbolic links are stored as links (Info-ZIP convention), and
// other special files (sockets, devices, FIFOs) are refused.
func Zip(ctx context.Context, src string, w io.Writer) error {
	info, err := os.Stat(src)
	if err != nil {
		return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("pack: %w", err))
	}
	zw := zip.NewWriter(w)
	if info.Mode().IsRegular() {
		if err := addZipEntry(ctx, zw, src, filepath.Base(src), info); err != nil {
			return err
		}
		return zw.Close()
	}
	if !info.IsDir() {
		return errkind.New(errkind.InvalidInput, "pack: %s is neither a directory nor a regular file", src)
	}
	err = filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if path == src {
			return nil
		}
		if d.IsDir() && skipDir(d.Name()) {
			return filepath.SkipDir
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		fi, err := os.Lstat(path)
		if err != nil {
			return err
		}
		return addZipEntry(ctx, zw, path, filepath.ToSlash(rel), fi)
	})
	if err != nil {
		return err
	}
	return zw.Close()
}

func addZipEntry(ctx context.Context, zw *zip.Writer, path, name string, fi fs.FileInfo) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	hdr := &zip.FileHeader{Name: name, Modified: FixedTime}
	mode := fi.Mode()
	switch {
	case mode.IsDir():
		hdr.Name += "/"
		hdr.SetMode(fs.ModeDir | 0o755)
		_, err := zw.CreateHeader(hdr)
		return err
	case mode&fs.ModeSymlink != 0:
		target, err := os.Readlink(path)
		if err != nil {
			return err
		}
		hdr.SetMode(fs.ModeSymlink | 0o777)
		hdr.Method = zip.Store
		ew, err := zw.CreateHeader(hdr)
		if err != nil {
			return err
		}
		_, err = io.WriteString(ew, target)
		return err
	case mode.IsRegular():
		perm := fs.FileMode(0o644)
		if mode&0o111 != 0 {
			perm = 0o755
		}
		hdr.SetMode(perm)
		hdr.Method = zip.Deflate
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		ew, err := zw.CreateHeader(hdr)
		if err != nil {
			return err
		}
		_, err = io.Copy(ew, ctxio.Reader(ctx, f))
		return err
	default:
		return errkind.New(errkind.InvalidInput, "pack: %s: unsupported file type %s", path, mode.Type())
	}
}

// Plain copies a single source file to w (encoding "plain"). Directories are
// refused: plain code is one file.
func Plain(ctx context.Context, file string, w io.Writer) error {
	info, err := os.Stat(file)
	if err != nil {
		return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("pack: %w", err))
	}
	if !info.Mode().IsRegular() {
		return errkind.New(errkind.InvalidInput, "pack: encoding plain needs a single file, %s is not a regular file", file)
	}
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(w, ctxio.Reader(ctx, f))
	return err
}

// MksquashfsPath is the mksquashfs binary used by Squashfs.
var MksquashfsPath = "mksquashfs"

// Squashfs builds a squashfs image of src (a directory, or a single file
// placed at the image root) at out, overwriting it. Timestamps and owners
// are fixed so the image is reproducible; __pycache__ directories are left
// out as with Zip.
func Squashfs(ctx context.Context, src, out string) error {
	if _, err := os.Stat(src); err != nil {
		return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("pack: %w", err))
	}
	bin, err := exec.LookPath(MksquashfsPath)
	if err != nil {
		return errkind.Wrap(errkind.Unavailable,
			fmt.Errorf("pack: squashfs encoding needs mksquashfs (Debian package squashfs-tools): %w", err))
	}
	args := []string{src, out,
		"-noappend", "-quiet", "-no-progress",
		"-all-root", "-all-time", "0", "-mkfs-time", "0",
		"-wildcards", "-e", "... __pycache__",
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	var outBuf bytes.Buffer
	cmd.Stdout = &outBuf
	cmd.Stderr = &outBuf
	if err := cmd.Run(); err != nil {
		_ = os.Remove(out)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("pack: mksquashfs %s: %w: %s", src, err, strings.TrimSpace(outBuf.String()))
	}
	return nil
}
