// Package codeprep turns a program's published code (plain source, zip or
// squashfs) into a directory tree that backends can expose read-only at
// guest.CodeDir. Each distinct code is extracted once into a cache and
// reused by every later execution.
//
// Code is untrusted: archives are checked for path traversal, links that
// leave the tree, special files and decompression bombs before anything
// lands on the host's disk, and an extraction is only published (renamed
// into the cache) once it completed, so a crash never leaves a half tree
// that a later execution would trust.
package codeprep

import (
	"archive/zip"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// Defaults for Limits fields left at zero.
const (
	DefaultMaxBytes = 1 << 30 // uncompressed size of one code tree
	DefaultMaxFiles = 100_000
)

// Limits bound what one extraction may write to the host's disk.
type Limits struct {
	MaxBytes int64 // total size of regular files; 0 means DefaultMaxBytes
	MaxFiles int   // number of entries; 0 means DefaultMaxFiles
}

func (l Limits) withDefaults() Limits {
	if l.MaxBytes <= 0 {
		l.MaxBytes = DefaultMaxBytes
	}
	if l.MaxFiles <= 0 {
		l.MaxFiles = DefaultMaxFiles
	}
	return l
}

// Source names the code to prepare.
type Source struct {
	Path     string           // host file as downloaded
	Hash     string           // content hash; the cache key (computed when empty)
	Encoding message.Encoding // plain | zip | squashfs
	// Entrypoint decides the file name of plain code: "pkg.mod:app" is
	// written as pkg/mod.py so that the module imports as published; an
	// entrypoint without ':' (an executable) names the file itself.
	Entrypoint string
}

// ErrUnsafeArchive tags archives refused for their content.
var ErrUnsafeArchive = errors.New("unsafe code archive")

// PlainFileName is the path, relative to the code directory, where plain
// code with this entrypoint is written. Agents use the same rule to find
// it.
func PlainFileName(entrypoint string) (string, error) {
	if module, _, ok := strings.Cut(entrypoint, ":"); ok {
		if !modulePattern.MatchString(module) {
			return "", fmt.Errorf("entrypoint %q: module part is not a Python module path", entrypoint)
		}
		return filepath.Join(strings.Split(module, ".")...) + ".py", nil
	}
	if !fileNamePattern.MatchString(entrypoint) {
		return "", fmt.Errorf("entrypoint %q: not a plain file name", entrypoint)
	}
	return entrypoint, nil
}

var (
	modulePattern   = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$`)
	fileNamePattern = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.+-]*$`)
	cacheKeyPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.+-]*$`)
)

// keyLocks serialises preparations of the same cache entry within this
// process, so concurrent cold starts of one program extract only once.
var keyLocks sync.Map // cache dir -> *sync.Mutex

// Prepare returns a directory under cacheDir holding the extracted code,
// extracting it first when it is not cached yet.
func Prepare(ctx context.Context, cacheDir string, src Source, lim Limits) (string, error) {
	lim = lim.withDefaults()
	key, err := cacheKey(src)
	if err != nil {
		return "", err
	}
	dst := filepath.Join(cacheDir, key)

	mu, _ := keyLocks.LoadOrStore(dst, &sync.Mutex{})
	mu.(*sync.Mutex).Lock()
	defer mu.(*sync.Mutex).Unlock()

	if fi, err := os.Stat(dst); err == nil && fi.IsDir() {
		return dst, nil
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return "", fmt.Errorf("code cache: %w", err)
	}
	tmp, err := os.MkdirTemp(cacheDir, ".tmp-"+key+"-")
	if err != nil {
		return "", fmt.Errorf("code cache: %w", err)
	}
	// The tree lives one level below the temp dir so that unsquashfs can
	// create its destination itself.
	tree := filepath.Join(tmp, "tree")
	defer os.RemoveAll(tmp)

	if err := Extract(ctx, tree, src, lim); err != nil {
		return "", err
	}
	if err := os.Chmod(tree, 0o755); err != nil {
		return "", fmt.Errorf("code cache: %w", err)
	}
	if err := os.Rename(tree, dst); err != nil {
		// Another process may have published the same code meanwhile;
		// its tree is as good as ours.
		if fi, statErr := os.Stat(dst); statErr == nil && fi.IsDir() {
			return dst, nil
		}
		return "", fmt.Errorf("code cache: publish %s: %w", key, err)
	}
	return dst, nil
}

func cacheKey(src Source) (string, error) {
	hash := src.Hash
	if hash == "" {
		h, err := hashFile(src.Path)
		if err != nil {
			return "", err
		}
		hash = h
	}
	if !cacheKeyPattern.MatchString(hash) {
		return "", errkind.New(errkind.InvalidInput, "code hash %q is not usable as a file name", hash)
	}
	switch src.Encoding {
	case message.EncodingZip, message.EncodingSquashfs:
		return hash + "." + string(src.Encoding), nil
	case message.EncodingPlain, "":
		// The file name is part of the result, so it is part of the key.
		name, err := PlainFileName(src.Entrypoint)
		if err != nil {
			return "", errkind.Wrap(errkind.InvalidInput, err)
		}
		sum := sha256.Sum256([]byte(name))
		return hash + ".plain-" + hex.EncodeToString(sum[:6]), nil
	default:
		return "", errkind.New(errkind.InvalidInput, "unknown code encoding %q", src.Encoding)
	}
}

func hashFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", errkind.Wrap(errkind.ResourceMissing, fmt.Errorf("code: %w", err))
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("code: hash %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// Extract writes the code into dst, which must not exist yet.
func Extract(ctx context.Context, dst string, src Source, lim Limits) error {
	lim = lim.withDefaults()
	if _, err := os.Stat(src.Path); err != nil {
		return errkind.Wrap(errkind.ResourceMissing, fmt.Errorf("code: %w", err))
	}
	switch src.Encoding {
	case message.EncodingZip:
		return extractZip(ctx, dst, src.Path, lim)
	case message.EncodingSquashfs:
		return extractSquashfs(ctx, dst, src.Path, lim)
	case message.EncodingPlain, "":
		return writePlain(dst, src, lim)
	default:
		return errkind.New(errkind.InvalidInput, "unknown code encoding %q", src.Encoding)
	}
}

func writePlain(dst string, src Source, lim Limits) error {
	name, err := PlainFileName(src.Entrypoint)
	if err != nil {
		return errkind.Wrap(errkind.InvalidInput, err)
	}
	in, err := os.Open(src.Path)
	if err != nil {
		return fmt.Errorf("code: %w", err)
	}
	defer in.Close()
	target := filepath.Join(dst, name)
	if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
		return fmt.Errorf("code: %w", err)
	}
	mode := os.FileMode(0o644)
	if !strings.Contains(src.Entrypoint, ":") {
		mode = 0o755 // an executable program
	}
	return writeFile(target, in, mode, lim.MaxBytes)
}

// writeFile copies at most max bytes; the limit is counted on what is
// actually written, never on sizes an archive claims.
func writeFile(path string, r io.Reader, mode os.FileMode, max int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, mode)
	if err != nil {
		return fmt.Errorf("code: %w", err)
	}
	n, err := io.Copy(f, io.LimitReader(r, max+1))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("code: write %s: %w", filepath.Base(path), err)
	}
	if n > max {
		return errkind.Wrap(errkind.TooLarge, fmt.Errorf("%w: more than %d bytes once extracted", ErrUnsafeArchive, max))
	}
	return nil
}

func extractZip(ctx context.Context, dst, path string, lim Limits) error {
	zr, err := zip.OpenReader(path)
	if err != nil {
		return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: open zip: %w", err))
	}
	defer zr.Close()
	if len(zr.File) > lim.MaxFiles {
		return errkind.Wrap(errkind.TooLarge, fmt.Errorf("%w: %d entries (limit %d)", ErrUnsafeArchive, len(zr.File), lim.MaxFiles))
	}
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return fmt.Errorf("code: %w", err)
	}

	type link struct{ name, target string }
	var links []link
	remaining := lim.MaxBytes
	for _, zf := range zr.File {
		if err := ctx.Err(); err != nil {
			return err
		}
		name := strings.TrimSuffix(zf.Name, "/")
		if name == "" || name == "." {
			continue
		}
		if !filepath.IsLocal(name) {
			return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("%w: entry %q leaves the code directory", ErrUnsafeArchive, zf.Name))
		}
		target := filepath.Join(dst, name)
		mode := zf.Mode()
		switch {
		case mode.IsDir():
			if err := os.MkdirAll(target, 0o755); err != nil {
				return fmt.Errorf("code: %w", err)
			}
		case mode&fs.ModeSymlink != 0:
			// Links are created after every file is written, so no write
			// can ever go through a link taken from the archive.
			lt, err := readSmall(zf, 4096)
			if err != nil {
				return err
			}
			links = append(links, link{name, lt})
		case mode.IsRegular():
			if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
				return fmt.Errorf("code: %w", err)
			}
			perm := os.FileMode(0o644)
			if mode&0o111 != 0 {
				perm = 0o755
			}
			rc, err := zf.Open()
			if err != nil {
				return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: zip entry %q: %w", zf.Name, err))
			}
			err = writeFileCounting(target, rc, perm, &remaining)
			rc.Close()
			if remaining < 0 {
				return errkind.Wrap(errkind.TooLarge, fmt.Errorf("%w: more than %d bytes once extracted", ErrUnsafeArchive, lim.MaxBytes))
			}
			if err != nil {
				return errkind.Wrap(errkind.InvalidInput, err)
			}
		default:
			return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("%w: entry %q is a special file", ErrUnsafeArchive, zf.Name))
		}
	}
	for _, l := range links {
		if err := checkLink(l.name, l.target); err != nil {
			return err
		}
		if err := os.Symlink(l.target, filepath.Join(dst, l.name)); err != nil {
			return fmt.Errorf("code: %w", err)
		}
	}
	return nil
}

// writeFileCounting writes r to path and subtracts what it wrote from
// *remaining, failing once the budget is exhausted.
func writeFileCounting(path string, r io.Reader, mode os.FileMode, remaining *int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, mode)
	if err != nil {
		return fmt.Errorf("code: %w", err)
	}
	n, err := io.Copy(f, io.LimitReader(r, *remaining+1))
	*remaining -= n
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("code: write %s: %w", filepath.Base(path), err)
	}
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
		return "", errkind.Wrap(errkind.InvalidInput, fmt.Errorf("%w: link %q too long", ErrUnsafeArchive, zf.Name))
	}
	return string(b), nil
}

// checkLink accepts only relative links that resolve inside the tree, so
// the extracted code means the same thing on the host and in any guest.
func checkLink(name, target string) error {
	if target == "" || filepath.IsAbs(target) || strings.ContainsRune(target, 0) ||
		!filepath.IsLocal(filepath.Join(filepath.Dir(name), target)) {
		return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("%w: link %q -> %q leaves the code directory", ErrUnsafeArchive, name, target))
	}
	return nil
}

func extractSquashfs(ctx context.Context, dst, path string, lim Limits) error {
	unsquashfs, err := exec.LookPath("unsquashfs")
	if err != nil {
		return errkind.Wrap(errkind.Unavailable, fmt.Errorf("code: squashfs needs unsquashfs (squashfs-tools): %w", err))
	}
	// Check the listing first: unsquashfs would otherwise fill the disk
	// before a bomb could be noticed.
	out, err := exec.CommandContext(ctx, unsquashfs, "-lln", path).Output()
	if err != nil {
		return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: list squashfs: %w%s", err, stderrOf(err)))
	}
	if err := checkSquashfsListing(out, lim); err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, unsquashfs, "-no-xattrs", "-quiet", "-no-progress", "-d", dst, path)
	if out, err := cmd.CombinedOutput(); err != nil {
		return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: unsquashfs: %w: %s", err, bytes.TrimSpace(out)))
	}
	// unsquashfs keeps set-id bits; nothing in code needs them and the
	// host should never hold set-id files owned by an untrusted author.
	return filepath.WalkDir(dst, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type()&fs.ModeSymlink != 0 {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if fi.Mode()&(fs.ModeSetuid|fs.ModeSetgid|fs.ModeSticky) != 0 {
			return os.Chmod(p, fi.Mode().Perm())
		}
		return nil
	})
}

// checkSquashfsListing parses `unsquashfs -lln` lines such as
// "-rw-r--r-- 0/0  3 2024-01-01 00:00 squashfs-root/d/f".
func checkSquashfsListing(out []byte, lim Limits) error {
	var total int64
	entries := 0
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || len(fields[0]) != 10 {
			continue
		}
		entries++
		switch fields[0][0] {
		case '-':
			n, err := strconv.ParseInt(fields[2], 10, 64)
			if err != nil {
				return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: squashfs listing: %q: %w", sc.Text(), err))
			}
			total += n
		case 'd', 'l':
		default:
			return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("%w: squashfs holds a special file: %s", ErrUnsafeArchive, sc.Text()))
		}
		if entries > lim.MaxFiles {
			return errkind.Wrap(errkind.TooLarge, fmt.Errorf("%w: more than %d entries", ErrUnsafeArchive, lim.MaxFiles))
		}
		if total > lim.MaxBytes {
			return errkind.Wrap(errkind.TooLarge, fmt.Errorf("%w: more than %d bytes once extracted", ErrUnsafeArchive, lim.MaxBytes))
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("code: squashfs listing: %w", err)
	}
	return nil
}

func stderrOf(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) && len(ee.Stderr) > 0 {
		return ": " + string(bytes.TrimSpace(ee.Stderr))
	}
	return ""
}
