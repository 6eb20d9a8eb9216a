package store

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/pack"
)

// Defaults of program upload, those of aleph-client.
const (
	DefaultUploadMemoryMiB      = 128
	DefaultUploadVCPUs          = 1
	DefaultUploadTimeoutSeconds = 30
)

// UploadOptions describes a program to add to the local store.
type UploadOptions struct {
	// Path is the program: a directory, or a single file.
	Path string
	// Entrypoint is "module:attr" for an ASGI app (e.g. "main:app") or the
	// path of an executable relative to the code root.
	Entrypoint string
	// Encoding of the code: zip (default for a directory), squashfs, or
	// plain (single file only, and the default for one).
	Encoding message.Encoding

	MemoryMiB      int // default 128
	VCPUs          int // default 1
	TimeoutSeconds int // resources.seconds, default 30
	Internet       bool
	Persistent     bool
	// RuntimeRef is the STORE message of the runtime; default: the
	// store's default runtime.
	RuntimeRef string
	Variables  map[string]string
	// Volumes are put in the message as given (e.g. a persistent volume
	// of the diagnostic program).
	Volumes []message.Volume

	// Time stamps the messages. Zero keeps a fixed time, so that uploading
	// the same code with the same options gives the same item hash.
	Time time.Time
	// Progress, when set, receives human-readable progress lines.
	Progress func(format string, args ...any)
}

// UploadResult tells what UploadProgram stored.
type UploadResult struct {
	ProgramHash string           // item hash of the PROGRAM message: the /vm/{ref}
	CodeRef     string           // item hash of the code's STORE message
	CodeHash    string           // sha256 of the code file
	CodeSize    int64            // bytes
	Encoding    message.Encoding // of the code file
	RuntimeRef  string
	Message     *message.Message // the PROGRAM message
}

var (
	envName     = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	pyIdent     = `[A-Za-z_][A-Za-z0-9_]*`
	asgiEntry   = regexp.MustCompile(`^` + pyIdent + `(\.` + pyIdent + `)*:` + pyIdent + `(\.` + pyIdent + `)*$`)
	plainAttr   = regexp.MustCompile(`^` + pyIdent + `$`)
	badExecPath = regexp.MustCompile(`[\s\x00-\x1f\x7f]`)
)

func invalidf(format string, args ...any) error {
	return errkind.New(errkind.InvalidInput, format, args...)
}

// ValidateVariables checks that every key is a valid environment variable
// name.
func ValidateVariables(vars map[string]string) error {
	for k, v := range vars {
		if !envName.MatchString(k) {
			return invalidf("invalid variable name %q: use letters, digits and _, not starting with a digit", k)
		}
		if strings.ContainsRune(v, 0) {
			return invalidf("variable %s: value contains a NUL byte", k)
		}
	}
	return nil
}

// ValidateEntrypoint checks entrypoint against the program at path (a
// directory or a single file) packed with encoding. An ASGI entrypoint
// "pkg.mod:app" needs pkg/mod.py (or the package pkg/mod/) in the
// directory; an executable entrypoint needs that file. For a single file,
// the module must be the file's name.
func ValidateEntrypoint(entrypoint, path string, isDir bool, encoding message.Encoding) error {
	if entrypoint == "" {
		return invalidf("missing entrypoint (e.g. main:app)")
	}
	if strings.Contains(entrypoint, ":") {
		if !asgiEntry.MatchString(entrypoint) {
			return invalidf("invalid entrypoint %q: expected module:attribute, e.g. main:app", entrypoint)
		}
		module, _, _ := strings.Cut(entrypoint, ":")
		if !isDir {
			if encoding == message.EncodingPlain {
				return nil // plain code is one module whatever its name
			}
			stem := strings.TrimSuffix(filepath.Base(path), ".py")
			if module != stem {
				return invalidf("invalid entrypoint %q: the program is the single file %s, so the module must be %q", entrypoint, filepath.Base(path), stem)
			}
			return nil
		}
		rel := filepath.FromSlash(strings.ReplaceAll(module, ".", "/"))
		for _, cand := range []string{rel + ".py", filepath.Join(rel, "__init__.py"), rel} {
			if _, err := os.Stat(filepath.Join(path, cand)); err == nil {
				return nil
			}
		}
		return invalidf("invalid entrypoint %q: no module %s (%s.py) in %s", entrypoint, module, rel, path)
	}
	if encoding == message.EncodingPlain && plainAttr.MatchString(entrypoint) {
		return nil // plain code: the name of the app object in that file
	}
	// An executable, relative to the code root.
	if badExecPath.MatchString(entrypoint) || filepath.IsAbs(entrypoint) ||
		strings.HasPrefix(filepath.Clean(entrypoint), "..") {
		return invalidf("invalid entrypoint %q: expected module:attribute or a relative executable path", entrypoint)
	}
	if !isDir {
		if filepath.Clean(entrypoint) != filepath.Base(path) {
			return invalidf("invalid entrypoint %q: the program is the single file %s", entrypoint, filepath.Base(path))
		}
		return nil
	}
	fi, err := os.Stat(filepath.Join(path, entrypoint))
	if err != nil || !fi.Mode().IsRegular() {
		return invalidf("invalid entrypoint %q: no such file in %s (for an ASGI app use module:attribute, e.g. main:app)", entrypoint, path)
	}
	if fi.Mode()&0o111 == 0 {
		return invalidf("invalid entrypoint %q: %s is not executable (chmod +x it, or use module:attribute for an ASGI app)", entrypoint, filepath.Join(path, entrypoint))
	}
	return nil
}

// UploadProgram packs the program at o.Path, stores the code file, a STORE
// message pointing at it and a PROGRAM message using it, and returns the
// PROGRAM item hash. Bad options are InvalidInput errors; a missing
// default runtime is a ResourceMissing error telling to run `make runtime`.
func (s *Store) UploadProgram(ctx context.Context, o UploadOptions) (*UploadResult, error) {
	progress := o.Progress
	if progress == nil {
		progress = func(string, ...any) {}
	}
	if o.Path == "" {
		return nil, invalidf("missing program path")
	}
	fi, err := os.Stat(o.Path)
	if err != nil {
		return nil, invalidf("program path %s: %v", o.Path, unwrapPathError(err))
	}
	isDir := fi.IsDir()
	if !isDir && !fi.Mode().IsRegular() {
		return nil, invalidf("program path %s is neither a directory nor a regular file", o.Path)
	}
	enc := o.Encoding
	switch enc {
	case "":
		enc = message.EncodingZip
		if !isDir {
			enc = message.EncodingPlain
		}
	case message.EncodingZip, message.EncodingSquashfs:
	case message.EncodingPlain:
		if isDir {
			return nil, invalidf("encoding plain needs a single file, %s is a directory (use zip or squashfs)", o.Path)
		}
	default:
		return nil, invalidf("unknown encoding %q: use zip, squashfs or plain", enc)
	}
	if err := ValidateEntrypoint(o.Entrypoint, o.Path, isDir, enc); err != nil {
		return nil, err
	}
	if err := ValidateVariables(o.Variables); err != nil {
		return nil, err
	}
	if o.MemoryMiB == 0 {
		o.MemoryMiB = DefaultUploadMemoryMiB
	}
	if o.VCPUs == 0 {
		o.VCPUs = DefaultUploadVCPUs
	}
	if o.TimeoutSeconds == 0 {
		o.TimeoutSeconds = DefaultUploadTimeoutSeconds
	}
	if o.MemoryMiB < 0 || o.VCPUs < 0 || o.TimeoutSeconds < 0 {
		return nil, invalidf("memory, vcpus and timeout must be positive")
	}

	runtimeRef := o.RuntimeRef
	if runtimeRef == "" {
		if runtimeRef, err = s.DefaultRuntime(); err != nil {
			return nil, err
		}
	} else if err := message.ValidateItemHash(runtimeRef); err != nil {
		return nil, fmt.Errorf("runtime: %w", err)
	}
	runtimeComment := ""
	if rm, err := s.GetMessage(runtimeRef); err == nil {
		if sc, err := rm.Store(); err == nil {
			runtimeComment, _ = sc.Metadata["comment"].(string)
		}
	} else if errkind.Is(err, errkind.NotFound) {
		progress("runtime %s is not in the local store; it will be fetched from the Aleph API when the program runs", runtimeRef)
	}

	at := o.Time
	if at.IsZero() {
		at = epoch
	}

	progress("packing %s (%s)", o.Path, enc)
	codeHash, size, err := s.packAndAdd(ctx, o.Path, enc)
	if err != nil {
		return nil, err
	}
	progress("stored code %s (%d bytes)", codeHash, size)

	storeMsg, err := s.storeMessage(codeHash, size, nil, at)
	if err != nil {
		return nil, err
	}
	persistent := o.Persistent
	content := message.ProgramContent{
		Type:       message.ProgramType,
		Address:    s.address,
		Time:       unixSeconds(at),
		AllowAmend: false,
		Code: message.CodeContent{
			Encoding:   enc,
			Entrypoint: o.Entrypoint,
			Ref:        storeMsg.ItemHash,
			UseLatest:  false,
		},
		Runtime: message.RuntimeContent{Ref: runtimeRef, UseLatest: false, Comment: runtimeComment},
		On:      message.Triggers{HTTP: true, Persistent: &persistent},
		Environment: message.Environment{
			Reproducible: false,
			Internet:     o.Internet,
			AlephAPI:     true,
			SharedCache:  false,
		},
		Resources: message.Resources{VCPUs: o.VCPUs, Memory: o.MemoryMiB, Seconds: o.TimeoutSeconds},
		Variables: o.Variables,
		Volumes:   o.Volumes,
		Metadata:  map[string]any{"name": filepath.Base(filepath.Clean(o.Path))},
	}
	pm, err := message.InlineMessage(message.TypeProgram, content, s.address, at)
	if err != nil {
		return nil, err
	}
	pm.Chain = "ETH"
	pm.Channel = "local"
	if err := s.PutMessage(pm); err != nil {
		return nil, err
	}
	progress("stored STORE message %s and PROGRAM message %s", storeMsg.ItemHash, pm.ItemHash)
	s.log.Info("store: program uploaded", "hash", pm.ItemHash, "code", codeHash, "encoding", enc, "path", o.Path)
	return &UploadResult{
		ProgramHash: pm.ItemHash,
		CodeRef:     storeMsg.ItemHash,
		CodeHash:    codeHash,
		CodeSize:    size,
		Encoding:    enc,
		RuntimeRef:  runtimeRef,
		Message:     pm,
	}, nil
}

// PackFile packs path with encoding into the store and returns the content
// hash and size of the resulting file. The fake-data mode uses it to pack a
// program directory on the fly.
func (s *Store) PackFile(ctx context.Context, path string, enc message.Encoding) (hash string, size int64, err error) {
	return s.packAndAdd(ctx, path, enc)
}

func (s *Store) packAndAdd(ctx context.Context, path string, enc message.Encoding) (string, int64, error) {
	dir := filepath.Join(s.dir, "files")
	switch enc {
	case message.EncodingSquashfs:
		tmp, err := os.CreateTemp(dir, tmpPrefix+"sqfs-*")
		if err != nil {
			return "", 0, fmt.Errorf("store: %w", err)
		}
		tmp.Close()
		defer os.Remove(tmp.Name())
		if err := pack.Squashfs(ctx, path, tmp.Name()); err != nil {
			return "", 0, err
		}
		return s.addFilePath(ctx, tmp.Name())
	case message.EncodingZip, message.EncodingPlain:
		tmp, err := os.CreateTemp(dir, tmpPrefix+"pack-*")
		if err != nil {
			return "", 0, fmt.Errorf("store: %w", err)
		}
		h := sha256.New()
		cw := &countWriter{w: io.MultiWriter(tmp, h)}
		if enc == message.EncodingZip {
			err = pack.Zip(ctx, path, cw)
		} else {
			err = pack.Plain(ctx, path, cw)
		}
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
			return "", 0, err
		}
		hash := hex.EncodeToString(h.Sum(nil))
		if err := s.commitTemp(tmp, hash); err != nil {
			return "", 0, err
		}
		return hash, cw.n, nil
	default:
		return "", 0, invalidf("unknown encoding %q", enc)
	}
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

func unwrapPathError(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}
