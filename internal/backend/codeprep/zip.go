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

	x := &zipExtraction{root: root, lim: lim, remaining: lim.MaxBytes, dirs: map[string]struct{}{}}
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
			if err := x.mkdirAll(name); err != nil {
				return err
			}
		case mode&fs.ModeSymlink != 0:
			if err := x.mkdirAll(path.Dir(name)); err != nil {
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
			if err := x.mkdirAll(path.Dir(name)); err != nil {
				return err
			}
			if err := x.count(); err != nil {
				return err
			}
			perm := os.FileMode(0o644)
			if mode&0o111 != 0 {
				perm = 0o755
			}
			rc, err := zf.Open()
			if err != nil {
				return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: zip entry %q: %w", zf.Name, err))
			}
			err = writeFile(ctx, root, name, rc, perm, &x.remaining, lim.MaxBytes)
			rc.Close()
			if err != nil {
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

type zipExtraction struct {
	root      *os.Root
	lim       Limits
	remaining int64
	entries   int
	// dirs made so far; keys are substrings of entry names, so the map
	// costs no more than the names the zip reader already holds.
	dirs map[string]struct{}
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

// mkdirAll creates dir and its missing parents, counting each one made.
func (x *zipExtraction) mkdirAll(dir string) error {
	if dir == "." {
		return nil
	}
	if _, ok := x.dirs[dir]; ok {
		return nil
	}
	if err := x.mkdirAll(path.Dir(dir)); err != nil {
		return err
	}
	if err := x.count(); err != nil {
		return err
	}
	if err := x.root.Mkdir(dir, 0o755); err != nil {
		if !errors.Is(err, fs.ErrExist) {
			return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: %w", err))
		}
		// Only a file or link of that name can exist: directories are all
		// in x.dirs.
		return unsafe(errkind.InvalidInput, "entry %q is both a file and a directory", dir)
	}
	x.dirs[dir] = struct{}{}
	return nil
}

func readSmall(zf *zip.File, max int64) (string, error) {
	rc, err := zf.Open()
	if err != nil {
		return "", errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: zip entry %q: %w", zf.Name, err))
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, max+1))
	if err != nil {
		return "", errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: zip entry %q: %w", zf.Name, err))
	}
	if int64(len(b)) > max {
		return "", unsafe(errkind.InvalidInput, "link %q too long", zf.Name)
	}
	return string(b), nil
}
