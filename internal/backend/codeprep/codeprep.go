// Package codeprep turns a program's published code (plain source, zip or
// squashfs) into a directory tree that backends can expose read-only at
// guest.CodeDir. Each distinct code is extracted once into a Cache and
// reused by every later execution.
//
// Code is untrusted. Everything an archive makes is bounded and checked:
//   - the number of entries (every directory counts, implicit parents
//     too), their total size (apparent file sizes, so sparse files count
//     in full, plus a block per entry), path length and depth;
//   - names with control characters, special files, links whose
//     resolution leaves the tree (resolved through os.Root, not
//     lexically) are refused;
//   - squashfs listings are read as a stream and parsed strictly, so a
//     name cannot forge a listing line;
//   - every mode is normalised (0644, 0755 for executables and
//     directories, no set-id or sticky bits) and, when the supervisor runs
//     as root, every owner becomes root:root;
//   - extraction stops when its context ends, child processes included.
//
// A tree is only published (renamed into the cache) once extraction and
// checks completed, so a crash never leaves a half tree that a later
// execution would trust.
package codeprep

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/aleph-vm-go/vm-supervisor/internal/ctxio"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// Defaults for Limits fields left at zero.
const (
	DefaultMaxBytes   = 1 << 30 // size of one code tree, see Limits.MaxBytes
	DefaultMaxFiles   = 50_000  // creating one costs ~0.2 ms of disk time on a slow node
	DefaultMaxDepth   = 48
	DefaultMaxPathLen = 1024
)

// entryCost is what each entry (file, directory, link) counts against
// Limits.MaxBytes on top of its content: a file system block, so that a
// tree of empty files or directories is bounded by size too.
const entryCost = 4096

// maxLinkTarget bounds a symbolic link's target.
const maxLinkTarget = 1024

// Limits bound what one extraction may write to the host's disk.
type Limits struct {
	// MaxBytes bounds the apparent size of all regular files (a sparse
	// file counts in full) plus 4 KiB per entry; 0 means DefaultMaxBytes.
	MaxBytes int64
	// MaxFiles bounds the number of entries of every kind, directories
	// included; 0 means DefaultMaxFiles.
	MaxFiles int
	// MaxDepth bounds the number of components of a path; 0 means
	// DefaultMaxDepth.
	MaxDepth int
	// MaxPathLen bounds a path's length in bytes; 0 means
	// DefaultMaxPathLen.
	MaxPathLen int
}

func (l Limits) withDefaults() Limits {
	if l.MaxBytes <= 0 {
		l.MaxBytes = DefaultMaxBytes
	}
	if l.MaxFiles <= 0 {
		l.MaxFiles = DefaultMaxFiles
	}
	if l.MaxDepth <= 0 {
		l.MaxDepth = DefaultMaxDepth
	}
	if l.MaxPathLen <= 0 {
		l.MaxPathLen = DefaultMaxPathLen
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

// ErrUnsafeArchive tags archives refused for their content. Such errors
// also carry errkind.InvalidInput or errkind.TooLarge.
var ErrUnsafeArchive = errors.New("unsafe code archive")

// unsafe builds a refusal of kind k.
func unsafe(k errkind.Kind, format string, args ...any) error {
	return errkind.Wrap(k, fmt.Errorf("%w: "+format, append([]any{ErrUnsafeArchive}, args...)...))
}

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
)

// Extract writes the code into dst, which must not exist yet, and checks
// and normalises the result (see the package comment). On error dst may
// hold a partial tree: the caller removes it.
func Extract(ctx context.Context, dst string, src Source, lim Limits) error {
	_, err := extract(ctx, dst, src, lim)
	return err
}

// extract is Extract returning the tree's disk usage.
func extract(ctx context.Context, dst string, src Source, lim Limits) (int64, error) {
	lim = lim.withDefaults()
	if _, err := os.Stat(src.Path); err != nil {
		return 0, errkind.Wrap(errkind.ResourceMissing, fmt.Errorf("code: %w", err))
	}
	var err error
	switch src.Encoding {
	case message.EncodingZip:
		err = extractZip(ctx, dst, src.Path, lim)
	case message.EncodingSquashfs:
		err = extractSquashfs(ctx, dst, src.Path, lim)
	case message.EncodingPlain, "":
		err = writePlain(ctx, dst, src, lim)
	default:
		return 0, errkind.New(errkind.InvalidInput, "unknown code encoding %q", src.Encoding)
	}
	if err != nil {
		return 0, err
	}
	return normalise(ctx, dst, lim)
}

func writePlain(ctx context.Context, dst string, src Source, lim Limits) error {
	name, err := PlainFileName(src.Entrypoint)
	if err != nil {
		return errkind.Wrap(errkind.InvalidInput, err)
	}
	in, err := os.Open(src.Path)
	if err != nil {
		return fmt.Errorf("code: %w", err)
	}
	defer in.Close()
	if err := os.Mkdir(dst, 0o700); err != nil {
		return fmt.Errorf("code: %w", err)
	}
	root, err := os.OpenRoot(dst)
	if err != nil {
		return fmt.Errorf("code: %w", err)
	}
	defer root.Close()
	if dir := filepath.Dir(name); dir != "." {
		if err := root.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("code: %w", err)
		}
	}
	f, err := root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("code: %w", err)
	}
	remaining := lim.MaxBytes
	return writeFile(ctx, f, name, in, &remaining, lim.MaxBytes)
}

// writeFile copies r into f, which it closes, at most *remaining bytes,
// which it decreases; the limit is counted on what is actually written,
// never on sizes an archive claims.
func writeFile(ctx context.Context, f *os.File, name string, r io.Reader, remaining *int64, limit int64) error {
	n, err := io.Copy(f, io.LimitReader(ctxio.Reader(ctx, r), *remaining+1))
	*remaining -= n
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if *remaining < 0 {
		return tooLarge(limit)
	}
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("code: write %s: %w", name, err))
	}
	return nil
}

func tooLarge(limit int64) error {
	return unsafe(errkind.TooLarge, "more than %d bytes once extracted (file sizes plus %d bytes per entry)", limit, entryCost)
}

func tooMany(limit int) error {
	return unsafe(errkind.TooLarge, "more than %d entries once extracted (directories included)", limit)
}

// checkName refuses names an attacker could use to confuse listings, logs
// or host tools, and paths beyond the length and depth limits. name is
// relative to the tree's root, with '/' separators.
func checkName(name string, lim Limits) error {
	if len(name) > lim.MaxPathLen {
		return unsafe(errkind.InvalidInput, "path %.64q... longer than %d bytes", name, lim.MaxPathLen)
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; c < 0x20 || c == 0x7f {
			return unsafe(errkind.InvalidInput, "name %q holds a control character", name)
		}
	}
	if d := strings.Count(name, "/") + 1; d > lim.MaxDepth {
		return unsafe(errkind.InvalidInput, "path %.64q... is %d levels deep (limit %d)", name, d, lim.MaxDepth)
	}
	return nil
}

// checkLink accepts only relative links whose target, read lexically,
// stays inside the tree; normalise then resolves each link for real.
func checkLink(name, target string) error {
	if target == "" || filepath.IsAbs(target) || len(target) > maxLinkTarget ||
		!filepath.IsLocal(filepath.Join(filepath.Dir(name), target)) {
		return unsafe(errkind.InvalidInput, "link %q -> %q leaves the code directory", name, target)
	}
	for i := 0; i < len(target); i++ {
		if c := target[i]; c < 0x20 || c == 0x7f {
			return unsafe(errkind.InvalidInput, "link %q: target holds a control character", name)
		}
	}
	return nil
}
