package codeprep

import (
	"archive/zip"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// extractZip writes the archive beneath dst through an os.Root, so no
// entry or link can make a write land outside it. Every directory it
// creates, implicit parents included, counts as an entry.
func extractZip(ctx context.Context, dst, file string, lim Limits) error {
	zr, err := zip.OpenReader(file)
	if err != nil {
		return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: open zip: %w", err))
	}
	defer zr.Close()
	if len(zr.File) > lim.MaxFiles {
		return tooMany(lim.MaxFiles)
	}
	if err := os.Mkdir(dst, 0o700); err != nil {
		return fmt.Errorf("code: %w", err)
	}
	root, err := os.OpenRoot(dst)
	if err != nil {
		return fmt.Errorf("code: %w", err)
	}
	defer root.Close()
	top, err := os.Open(dst)
	if err != nil {
		return fmt.Errorf("code: %w", err)
	}
	x := &zipExtraction{lim: lim, remaining: lim.MaxBytes, dirs: map[string]struct{}{}, open: []*os.File{top}}
	defer x.closeAll()
	type link struct{ name, target string }
	var links []link
	for _, zf := range zr.File {
		if err := ctx.Err(); err != nil {
			return err
		}
		name := path.Clean(zf.Name)
		if name == "." {
			continue
		}
		if !filepath.IsLocal(name) {
			return unsafe(errkind.InvalidInput, "entry %q leaves the code directory", zf.Name)
		}
		if err := checkName(name, lim); err != nil {
			return err
		}
		mode := zf.Mode()
		switch {
		case mode.IsDir():
			if _, err := x.enter(name); err != nil {
				return err
			}
		case mode&fs.ModeSymlink != 0:
			if _, err := x.enter(path.Dir(name)); err != nil {
				return err
			}
			if err := x.count(); err != nil {
				return err
			}
			// Links are created after every file is written, so no write
			// can ever go through a link taken from the archive (os.Root
			// would refuse one leaving the tree anyway).
			lt, err := readSmall(zf, maxLinkTarget)
			if err != nil {
				return err
			}
			if err := checkLink(name, lt); err != nil {
				return err
			}
			links = append(links, link{name, lt})
		case mode.IsRegular():
			if err := x.extractFile(ctx, zf, name); err != nil {
				return err
			}
		default:
			return unsafe(errkind.InvalidInput, "entry %q is a special file", zf.Name)
		}
	}
	for _, l := range links {
		if err := root.Symlink(l.target, l.name); err != nil {
			if errors.Is(err, fs.ErrExist) {
				return unsafe(errkind.InvalidInput, "entry %q appears twice", l.name)
			}
			return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: %w", err))
		}
	}
	return nil
}

// extractFile writes the regular file zf as name, in a directory it
// enters (creating it) without following links; a name written twice is
// refused.
func (x *zipExtraction) extractFile(ctx context.Context, zf *zip.File, name string) error {
	parent, err := x.enter(path.Dir(name))
	if err != nil {
		return err
	}
	if err := x.count(); err != nil {
		return err
	}
	perm := uint32(0o644)
	if zf.Mode()&0o111 != 0 {
		perm = 0o755
	}
	fd, err := unix.Openat(int(parent.Fd()), path.Base(name), unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, perm)
	if err != nil {
		if errors.Is(err, unix.EEXIST) {
			return unsafe(errkind.InvalidInput, "entry %q appears twice", name)
		}
		return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: create %s: %w", name, err))
	}
	rc, err := zf.Open()
	if err != nil {
		unix.Close(fd)
		return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: zip entry %q: %w", zf.Name, err))
	}
	err = writeFile(ctx, os.NewFile(uintptr(fd), name), name, rc, &x.remaining, x.lim.MaxBytes)
	rc.Close()
	return err
}

type zipExtraction struct {
	lim       Limits
	remaining int64
	entries   int
	// dirs made so far; keys are substrings of entry names, so the map
	// costs no more than the names the zip reader already holds.
	dirs map[string]struct{}
	// open holds the directories of the last path entered, the tree's
	// root first: entries of one directory follow each other in most
	// archives, so each directory is opened once, not once per entry.
	// Each is opened beneath its parent without following links, so the
	// chain stays beneath the root.
	open  []*os.File
	names []string // path components of open[1:]
}

// count accounts for one more entry.
func (x *zipExtraction) count() error {
	x.entries++
	x.remaining -= entryCost
	if x.entries > x.lim.MaxFiles {
		return tooMany(x.lim.MaxFiles)
	}
	if x.remaining < 0 {
		return tooLarge(x.lim.MaxBytes)
	}
	return nil
}

// enter creates dir and its missing parents, counting each one made, and
// returns it open.
func (x *zipExtraction) enter(dir string) (*os.File, error) {
	var comps []string
	if dir != "." {
		comps = strings.Split(dir, "/")
	}
	common := 0
	for common < len(comps) && common < len(x.names) && comps[common] == x.names[common] {
		common++
	}
	for len(x.names) > common {
		x.open[len(x.open)-1].Close()
		x.open = x.open[:len(x.open)-1]
		x.names = x.names[:len(x.names)-1]
	}
	for i := common; i < len(comps); i++ {
		parent := x.open[len(x.open)-1]
		sub := strings.Join(comps[:i+1], "/")
		if _, ok := x.dirs[sub]; !ok {
			if err := x.count(); err != nil {
				return nil, err
			}
			if err := unix.Mkdirat(int(parent.Fd()), comps[i], 0o755); err != nil {
				if errors.Is(err, unix.EEXIST) {
					// Only a file or link can be there: directories are
					// all in x.dirs.
					return nil, unsafe(errkind.InvalidInput, "entry %q is both a file and a directory", sub)
				}
				return nil, errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: mkdir %s: %w", sub, err))
			}
			x.dirs[sub] = struct{}{}
		}
		fd, err := unix.Openat(int(parent.Fd()), comps[i], unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: open %s: %w", sub, err))
		}
		x.open = append(x.open, os.NewFile(uintptr(fd), sub))
		x.names = append(x.names, comps[i])
	}
	return x.open[len(x.open)-1], nil
}

func (x *zipExtraction) closeAll() {
	for _, f := range x.open {
		f.Close()
	}
	x.open, x.names = nil, nil
}

func readSmall(zf *zip.File, limit int64) (string, error) {
	rc, err := zf.Open()
	if err != nil {
		return "", errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: zip entry %q: %w", zf.Name, err))
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, limit+1))
	if err != nil {
		return "", errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: zip entry %q: %w", zf.Name, err))
	}
	if int64(len(b)) > limit {
		return "", unsafe(errkind.InvalidInput, "link %q too long", zf.Name)
	}
	return string(b), nil
}
