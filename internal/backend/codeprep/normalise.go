package codeprep

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// normalise walks an extracted tree, whatever made it, and makes it safe
// to keep on the host:
//   - names, depth, path length, entry count and size within lim;
//   - only directories, regular files and links whose resolution stays
//     beneath the root;
//   - modes 0755 (directories, executables) or 0644, no set-id or sticky
//     bits; owners root:root when running as root.
//
// It returns the tree's disk usage (allocated blocks).
func normalise(ctx context.Context, dir string, lim Limits) (int64, error) {
	root, err := os.OpenRoot(dir)
	if err != nil {
		return 0, fmt.Errorf("code: %w", err)
	}
	defer root.Close()
	asRoot := os.Geteuid() == 0
	var apparent, disk int64
	entries := 0
	err = fs.WalkDir(root.FS(), ".", func(name string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("code: %w", err)
		}
		if entries%1024 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
		}
		if name != "." {
			if err := checkName(name, lim); err != nil {
				return err
			}
			entries++
			if entries > lim.MaxFiles {
				return tooMany(lim.MaxFiles)
			}
		}
		fi, err := d.Info()
		if err != nil {
			return fmt.Errorf("code: %w", err)
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			disk += st.Blocks * 512
		}
		apparent += entryCost
		if asRoot {
			// Before Chmod: a change of owner clears set-id bits anyway.
			if err := root.Lchown(name, 0, 0); err != nil {
				return fmt.Errorf("code: %w", err)
			}
		}
		var perm fs.FileMode
		switch {
		case fi.IsDir():
			perm = 0o755
		case fi.Mode().IsRegular():
			apparent += fi.Size() // sparse files count in full
			perm = 0o644
			if fi.Mode()&0o111 != 0 {
				perm = 0o755
			}
		case fi.Mode()&fs.ModeSymlink != 0:
			return checkResolvedLink(root, name)
		default:
			return unsafe(errkind.InvalidInput, "%q is a special file (%s)", name, fi.Mode().Type())
		}
		if apparent > lim.MaxBytes {
			return tooLarge(lim.MaxBytes)
		}
		if fi.Mode()&(fs.ModePerm|fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky) != perm {
			if err := root.Chmod(name, perm); err != nil {
				return fmt.Errorf("code: %w", err)
			}
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return disk, nil
}

// checkResolvedLink resolves the link at name beneath root, following
// chains: a link that leaves the tree, even through other links, is
// refused. One that leads nowhere inside it is harmless and kept.
func checkResolvedLink(root *os.Root, name string) error {
	target, err := root.Readlink(name)
	if err != nil {
		return fmt.Errorf("code: %w", err)
	}
	if err := checkLink(name, target); err != nil {
		return err
	}
	if _, err := root.Stat(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return unsafe(errkind.InvalidInput, "link %q -> %q does not resolve inside the code directory: %v", name, target, err)
	}
	return nil
}
