// Package sources resolves a program hash into everything needed to run
// it: the PROGRAM message, and local paths of its code, runtime, data and
// immutable volumes. Messages and files come from the local store first,
// then from the Aleph API (files through the download cache, size-limited
// and hash-checked).
package sources

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/delegation"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/alephapi"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/cache"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

// Default size limits, those of aleph-vm for program and data archives.
const (
	DefaultMaxProgramSize = 10 << 20  // MAX_PROGRAM_ARCHIVE_SIZE
	DefaultMaxDataSize    = 10 << 20  // MAX_DATA_ARCHIVE_SIZE
	DefaultMaxRuntimeSize = 4 << 30   // runtimes are root filesystems
	DefaultMaxVolumeSize  = 16 << 30  // immutable volumes (e.g. Python venvs)
	maxMessageSize        = 256 << 10 // a message envelope
)

// Limits caps the size of downloaded files, in bytes (<= 0: no limit).
// Files already in the local store are trusted and not limited.
type Limits struct {
	Program int64
	Data    int64
	Runtime int64
	Volume  int64
}

// DefaultLimits returns the default limits.
func DefaultLimits() Limits {
	return Limits{Program: DefaultMaxProgramSize, Data: DefaultMaxDataSize, Runtime: DefaultMaxRuntimeSize, Volume: DefaultMaxVolumeSize}
}

// File is one resolved file of a program.
type File struct {
	Ref      string           // item hash of the STORE message (after use_latest)
	Hash     string           // content hash of the file (STORE content.item_hash)
	Path     string           // local path, in the store or the cache
	Encoding message.Encoding // plain | zip | squashfs
	// Owner is the address whose amends of the ref win under use_latest
	// (the ref's STORE content.address, else the program's owner); empty
	// for a ref not followed.
	Owner string
}

// ResolvedVolume is one entry of the program's volumes; File is set for
// immutable volumes only.
type ResolvedVolume struct {
	Volume message.Volume
	Kind   message.VolumeKind
	File   *File
}

// Program is a program ready to start.
type Program struct {
	Hash    string // item hash asked for
	Message *message.Message
	Content *message.ProgramContent
	Code    File
	Runtime File
	Data    *File
	Volumes []ResolvedVolume
}

// Resolver resolves program hashes. It is safe for concurrent use.
type Resolver struct {
	store  *store.Store
	api    *alephapi.Client // nil: offline
	cache  *cache.Cache     // nil: offline
	limits Limits
	log    *slog.Logger
	fake   *fakeData
	// deleg decides whose amends count for a use_latest ref: the ref's
	// owner, or a delegate of it (nil: the owner only).
	deleg *delegation.Checker

	// notFound remembers hashes the API did not know, so that repeated
	// requests for an unknown hash cost no API call for a while.
	notFoundMu sync.Mutex
	notFound   map[string]missing

	forgottenMu sync.Mutex
	forgotten   map[string]bool // FORGET messages seen (forget.go)
}

type missing struct {
	err   error
	until time.Time
}

// NotFoundTTL is how long a hash the Aleph API did not know is answered
// NotFound without asking again.
const NotFoundTTL = 60 * time.Second

// maxNotFound bounds the remembered unknown hashes.
const maxNotFound = 4096

// Option configures a Resolver.
type Option func(*Resolver)

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(r *Resolver) { r.log = l } }

// WithDelegations has use_latest take the newest amend by the ref's
// owner or a delegate d allows, as the reactor (sharing d) stops a
// program for exactly those amends.
func WithDelegations(d *delegation.Checker) Option { return func(r *Resolver) { r.deleg = d } }

// New returns a resolver over the local store st, the Aleph API api and
// the download cache c. api and c may be nil to run offline (local store
// only).
func New(st *store.Store, api *alephapi.Client, c *cache.Cache, limits Limits, opts ...Option) *Resolver {
	r := &Resolver{store: st, api: api, cache: c, limits: limits, log: slog.Default(), notFound: map[string]missing{}}
	for _, o := range opts {
		o(r)
	}
	if r.api == nil || r.cache == nil {
		r.api, r.cache = nil, nil
	}
	return r
}

// Offline reports whether the resolver only uses the local store.
func (r *Resolver) Offline() bool { return r.api == nil }

// Message returns the message with item hash hash: from the local store,
// else from the Aleph API.
//
// Messages fetched from the API are kept in the download cache
// (CACHE_ROOT/message/<hash>.json) as aleph-vm does: they are immutable by
// their hash, so a cold start after a restart does not depend on the API
// being up when the code is cached too. They are not put into the local
// store, which holds only what the operator added (uploads, runtimes), so
// that it stays a clear record of local programs. Malformed hashes are
// InvalidInput; unknown ones NotFound; an unreachable API Unavailable.
func (r *Resolver) Message(ctx context.Context, hash string) (*message.Message, error) {
	if r.fake != nil {
		return r.fake.message(ctx, hash)
	}
	return r.message(ctx, hash)
}

func (r *Resolver) message(ctx context.Context, hash string) (*message.Message, error) {
	if err := message.ValidateItemHash(hash); err != nil {
		return nil, err
	}
	// The local store is the operator's: no FORGET on the network makes
	// its messages unknown.
	m, err := r.store.GetMessage(hash)
	if err == nil || !errkind.Is(err, errkind.NotFound) {
		return m, err
	}
	if err := r.forgottenErr(hash); err != nil {
		return nil, err
	}
	if r.api == nil {
		return nil, errkind.New(errkind.NotFound, "message %s not in the local store (offline: no Aleph API)", hash)
	}
	if err := r.knownMissing(hash); err != nil {
		return nil, err
	}
	var parsed *message.Message
	parse := func(path string) error {
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		parsed, err = message.ParseOptions{ExpectedHash: hash}.Parse(data)
		return err
	}
	path, err := r.cache.GetChecked(ctx, "message", hash, maxMessageSize, func(ctx context.Context) (io.ReadCloser, error) {
		m, err := r.api.GetMessage(ctx, hash)
		if err != nil {
			return nil, err
		}
		data, err := json.Marshal(m)
		if err != nil {
			return nil, err
		}
		return io.NopCloser(strings.NewReader(string(data))), nil
	}, parse)
	if err != nil {
		if errkind.Is(err, errkind.NotFound) {
			r.rememberMissing(hash, err)
		}
		return nil, err
	}
	if parsed == nil { // already cached: parse it now
		if err := parse(path); err != nil {
			return nil, fmt.Errorf("cached message %s: %w", hash, err)
		}
	}
	return parsed, nil
}

// Program resolves the PROGRAM message hash and every file it refers to.
// A message of another type is refused (INSTANCE: Unsupported). A ref that
// cannot be obtained is a ResourceMissing error naming the role and the
// ref, e.g. "code ref 7eb2…: STORE message not found", wrapping the cause
// (NotFound, Unavailable, TooLarge, InvalidInput for a hash mismatch).
func (r *Resolver) Program(ctx context.Context, hash string) (*Program, error) {
	if r.fake != nil {
		return r.fake.program(ctx, r, hash)
	}
	m, err := r.message(ctx, hash)
	if err != nil {
		return nil, err
	}
	return r.resolveProgram(ctx, hash, m)
}

func (r *Resolver) resolveProgram(ctx context.Context, hash string, m *message.Message) (*Program, error) {
	content, err := m.Program()
	if err != nil {
		return nil, fmt.Errorf("message %s: %w", hash, err)
	}
	owner := content.Address
	if owner == "" {
		owner = m.Sender
	}
	p := &Program{Hash: hash, Message: m, Content: content}

	// Resolve the refs concurrently: a runtime and a code archive are
	// independent downloads.
	type job struct {
		role      string
		kind      string
		ref       string
		useLatest bool
		limit     int64
		enc       message.Encoding
		dst       **File
	}
	var codeP, runtimeP, dataP *File
	jobs := []job{
		{"code", "code", content.Code.Ref, content.Code.UseLatest, r.limits.Program, content.Code.Encoding, &codeP},
		{"runtime", "runtime", content.Runtime.Ref, content.Runtime.UseLatest, r.limits.Runtime, message.EncodingSquashfs, &runtimeP},
	}
	if content.Data != nil && content.Data.Ref != "" {
		jobs = append(jobs, job{"data", "data", content.Data.Ref, content.Data.UseLatest, r.limits.Data, content.Data.Encoding, &dataP})
	}
	volFiles := make([]*File, len(content.Volumes))
	for i, v := range content.Volumes {
		if v.Kind() == message.VolumeImmutable {
			jobs = append(jobs, job{fmt.Sprintf("volume %s", v.Mount), "volume", v.Ref, v.UseLatest, r.limits.Volume, message.EncodingSquashfs, &volFiles[i]})
		}
		// A persistent volume's parent: the ext4 image a new volume
		// starts as a copy of, hash-checked like any STORE file.
		if v.Kind() == message.VolumePersistent && v.Parent != nil && v.Parent.Ref != "" {
			jobs = append(jobs, job{fmt.Sprintf("volume %s parent", v.Mount), "volume", v.Parent.Ref, v.Parent.UseLatest, r.limits.Volume, message.EncodingPlain, &volFiles[i]})
		}
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errs := make([]error, len(jobs))
	var wg sync.WaitGroup
	for i, j := range jobs {
		wg.Go(func() {
			f, err := r.resolveFile(ctx, j.role, j.kind, j.ref, j.useLatest, owner, j.limit, j.enc)
			if err != nil {
				errs[i] = err
				cancel() // no point finishing the others
				return
			}
			*j.dst = f
		})
	}
	wg.Wait()
	// Report the first failure in job order (code first), skipping
	// cancellations caused by another job's failure.
	var firstErr error
	for _, err := range errs {
		if err == nil {
			continue
		}
		if firstErr == nil || (isCancel(firstErr) && !isCancel(err)) {
			firstErr = err
		}
	}
	if firstErr != nil {
		return nil, firstErr
	}
	p.Code = *codeP
	p.Runtime = *runtimeP
	p.Data = dataP
	for i, f := range volFiles {
		if f == nil || content.Volumes[i].Kind() != message.VolumeImmutable {
			continue
		}
		// An immutable volume declares no encoding: its first bytes tell.
		enc, err := VolumeEncoding(f.Path)
		if err != nil {
			return nil, fmt.Errorf("volume %s ref %s: %w", content.Volumes[i].Mount, f.Ref, err)
		}
		f.Encoding = enc
	}
	for i, v := range content.Volumes {
		p.Volumes = append(p.Volumes, ResolvedVolume{Volume: v, Kind: v.Kind(), File: volFiles[i]})
	}
	return p, nil
}

func isCancel(err error) bool {
	return errors.Is(err, context.Canceled)
}

// resolveFile resolves one ref: its STORE message (use_latest: the newest
// amend by owner or a delegate of it), then the file, from the store or through the cache.
func (r *Resolver) resolveFile(ctx context.Context, role, kind, ref string, useLatest bool, owner string, limit int64, enc message.Encoding) (*File, error) {
	fail := func(format string, args ...any) error {
		return errkind.Wrap(errkind.ResourceMissing, fmt.Errorf("%s ref %s: "+format, append([]any{role, ref}, args...)...))
	}
	sm, err := r.message(ctx, ref)
	if err != nil {
		if errkind.Is(err, errkind.NotFound) {
			return nil, fail("STORE message not found: %w", err)
		}
		return nil, fail("cannot get STORE message: %w", err)
	}
	orig := sm
	if useLatest && r.api != nil {
		sc0, err := sm.Store()
		amendOwner := owner
		if err == nil && sc0.Address != "" {
			amendOwner = sc0.Address
		}
		var accept func(*message.Message) (bool, error)
		if r.deleg != nil {
			accept = func(m *message.Message) (bool, error) { return r.deleg.MaySend(ctx, m, amendOwner) }
		}
		amend, err := r.api.LatestAmend(ctx, ref, amendOwner, accept)
		switch {
		case err == nil:
			r.log.Debug("sources: using latest amend", "role", role, "ref", ref, "amend", amend.ItemHash)
			sm = amend
		case errkind.Is(err, errkind.NotFound):
			// No amend: the original stands.
		default:
			return nil, fail("resolving use_latest: %w", err)
		}
	}
	sc, err := sm.Store()
	if err != nil {
		return nil, fail("%w", err)
	}
	f := &File{Ref: sm.ItemHash, Hash: sc.ItemHash, Encoding: enc}
	if useLatest {
		f.Owner = owner
		if sc0, err := orig.Store(); err == nil && sc0.Address != "" {
			f.Owner = sc0.Address
		}
	}
	if path, err := r.store.FilePath(sc.ItemHash); err == nil {
		f.Path = path
		return f, nil
	}
	if r.api == nil {
		return nil, fail("file %s not in the local store (offline: no Aleph API)", sc.ItemHash)
	}
	path, err := r.cache.Get(ctx, kind, sc.ItemHash, limit, func(ctx context.Context) (io.ReadCloser, error) {
		return r.api.Download(ctx, sc)
	})
	if err != nil {
		return nil, fail("%w", err)
	}
	f.Path = path
	return f, nil
}

// knownMissing returns the NotFound error of hash if the API did not know
// it within NotFoundTTL.
func (r *Resolver) knownMissing(hash string) error {
	r.notFoundMu.Lock()
	defer r.notFoundMu.Unlock()
	m, ok := r.notFound[hash]
	if !ok {
		return nil
	}
	if time.Now().After(m.until) {
		delete(r.notFound, hash)
		return nil
	}
	return m.err
}

func (r *Resolver) rememberMissing(hash string, err error) {
	r.notFoundMu.Lock()
	defer r.notFoundMu.Unlock()
	now := time.Now()
	if len(r.notFound) >= maxNotFound {
		for h, m := range r.notFound {
			if now.After(m.until) || len(r.notFound) >= maxNotFound {
				delete(r.notFound, h)
			}
		}
	}
	r.notFound[hash] = missing{err: err, until: now.Add(NotFoundTTL)}
}

// VolumeEncoding tells an immutable volume's format from its first bytes:
// aleph-vm's volumes are squashfs images, and a zip archive is accepted
// too (it is extracted like code). Anything else is InvalidInput, refused
// before a backend would hand it to a kernel's file system driver.
func VolumeEncoding(path string) (message.Encoding, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", errkind.Wrap(errkind.ResourceMissing, err)
	}
	defer f.Close()
	head := make([]byte, 4)
	if _, err := io.ReadFull(f, head); err != nil {
		return "", errkind.New(errkind.InvalidInput, "file is too short to be a squashfs image or a zip archive")
	}
	switch string(head) {
	case "hsqs": // squashfs superblock magic, little-endian
		return message.EncodingSquashfs, nil
	case "PK\x03\x04", "PK\x05\x06": // a zip's first local header, or an empty zip
		return message.EncodingZip, nil
	}
	return "", errkind.New(errkind.InvalidInput, "file is neither a squashfs image nor a zip archive")
}
