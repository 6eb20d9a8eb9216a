package codeprep

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"syscall"

	"golang.org/x/sys/unix"

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
	err = walk(root, func(at *os.File, name string, fi fs.FileInfo) error {
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
		st, _ := fi.Sys().(*syscall.Stat_t)
		if st != nil {
			disk += st.Blocks * 512
		}
		apparent += entryCost
		// Changes go through the open parent directory (the tree is
		// private to this process until published, so the entry seen by
		// the walk is the one changed); "." goes through the root.
		if asRoot && (st == nil || st.Uid != 0 || st.Gid != 0) {
			// Before Chmod: a change of owner clears set-id bits anyway.
			var err error
			if at == nil {
				err = root.Lchown(name, 0, 0)
			} else {
				err = unix.Fchownat(int(at.Fd()), path.Base(name), 0, 0, unix.AT_SYMLINK_NOFOLLOW)
			}
			if err != nil {
				return fmt.Errorf("code: chown %s: %w", name, err)
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
		if fi.Mode()&(fs.ModePerm|fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky) != perm || asRoot && st != nil && st.Uid != 0 {
			var err error
			if at == nil {
				err = root.Chmod(name, perm)
			} else {
				// Not a link (checked above): fchmodat has nothing to follow.
				err = unix.Fchmodat(int(at.Fd()), path.Base(name), uint32(perm), 0)
			}
			if err != nil {
				return fmt.Errorf("code: chmod %s: %w", name, err)
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

// walk calls fn for every entry beneath root ("." first), parents before
// their children, without following links; at is the entry's open parent
// directory (nil for "."). Directories are read in batches, so memory
// stays small however many entries one holds.
func walk(root *os.Root, fn func(at *os.File, name string, fi fs.FileInfo) error) error {
	fi, err := root.Lstat(".")
	if err != nil {
		return fmt.Errorf("code: %w", err)
	}
	if err := fn(nil, ".", fi); err != nil {
		return err
	}
	return walkDir(root, ".", fn)
}

func walkDir(root *os.Root, dir string, fn func(at *os.File, name string, fi fs.FileInfo) error) error {
	f, err := root.Open(dir)
	if err != nil {
		return fmt.Errorf("code: %w", err)
	}
	defer f.Close()
	for {
		ents, err := f.ReadDir(256)
		for _, e := range ents {
			name := path.Join(dir, e.Name())
			fi, err := e.Info()
			if err != nil {
				return fmt.Errorf("code: %w", err)
			}
			if err := fn(f, name, fi); err != nil {
				return err
			}
			if fi.IsDir() {
				if err := walkDir(root, name, fn); err != nil {
					return err
				}
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("code: %w", err)
		}
	}
}
