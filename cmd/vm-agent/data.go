package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// unpackData makes the data archive writable at data.Mount, as aleph-vm's
// guest unzips it into its own root: the read-only tree at src (the
// shared extraction the backend placed there, or the VM's data drive) is
// copied into the sandbox's writable root, so the program writes its own
// copy and never the one other executions share. Entries already at the
// mount point (from the runtime) stay unless the archive has the same name.
func unpackData(ctx context.Context, src string, data *guest.DataCopy) error {
	if data == nil {
		return nil
	}
	if !filepath.IsAbs(data.Mount) || filepath.Clean(data.Mount) == "/" {
		return fmt.Errorf("data: mount point %q must be an absolute path below /", data.Mount)
	}
	if err := copyTree(ctx, src, filepath.Clean(data.Mount)); err != nil {
		return fmt.Errorf("data: %w", err)
	}
	return nil
}

// copyTree copies directories, regular files (mode bits and modification
// times kept) and symbolic links (as links) from src into dst; other kinds
// of files are left out.
func copyTree(ctx context.Context, src, dst string) error {
	type dirTime struct {
		path string
		fi   fs.FileInfo
	}
	var dirs []dirTime
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		to := filepath.Join(dst, rel)
		fi, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			if err := os.MkdirAll(to, 0o755); err != nil {
				return err
			}
			if err := os.Chmod(to, fi.Mode().Perm()); err != nil {
				return err
			}
			dirs = append(dirs, dirTime{to, fi})
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(path)
			if err != nil {
				return err
			}
			if err := os.Remove(to); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
			return os.Symlink(target, to)
		case d.Type().IsRegular():
			return copyFile(path, to, fi)
		}
		return nil
	})
	if err != nil {
		return err
	}
	// Deepest last: set after their contents were written.
	for i := len(dirs) - 1; i >= 0; i-- {
		_ = os.Chtimes(dirs[i].path, dirs[i].fi.ModTime(), dirs[i].fi.ModTime())
	}
	return nil
}

func copyFile(from, to string, fi fs.FileInfo) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	// A link the runtime left there is replaced, not followed.
	if err := os.Remove(to); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_EXCL, fi.Mode().Perm())
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Chmod(fi.Mode().Perm()); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Chtimes(to, fi.ModTime(), fi.ModTime())
}
