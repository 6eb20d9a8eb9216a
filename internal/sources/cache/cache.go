// Package cache is the download cache under CACHE_ROOT: content-addressed
// files, written to a temporary file in the same directory, checked, synced
// and renamed into place, so that no reader ever sees a partial file.
//
// Layout: ROOT/<kind>/<hash>, e.g. ROOT/code/7eb2…, ROOT/runtime/5f31….
// Temporary files are ROOT/<kind>/.tmp-<hash>-<random> and are removed by
// Open after a crash.
package cache

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	stdhash "hash"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"

	"github.com/aleph-vm-go/vm-supervisor/internal/ctxio"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

const tmpPrefix = ".tmp-"

// FetchFunc opens the remote content. The cache closes the reader.
type FetchFunc func(ctx context.Context) (io.ReadCloser, error)

// CheckFunc inspects a fully written temporary file before it is renamed
// into the cache; a non-nil error discards it.
type CheckFunc func(tmpPath string) error

// Cache is safe for concurrent use.
type Cache struct {
	root string
	log  *slog.Logger

	mu      sync.Mutex
	flights map[string]*flight
}

// flight is one download shared by every concurrent Get of the same key.
// It runs on its own context, detached from the callers', and is cancelled
// only when every caller waiting for it has gone away: one caller giving up
// never disturbs the others.
type flight struct {
	done    chan struct{}
	path    string
	err     error
	waiters int
	cancel  context.CancelFunc
}

// Option configures a Cache.
type Option func(*Cache)

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(c *Cache) { c.log = l } }

// Open creates the cache root if needed and removes temporary files that a
// crash left behind in its kind directories.
func Open(root string, opts ...Option) (*Cache, error) {
	c := &Cache{root: root, log: slog.Default(), flights: map[string]*flight{}}
	for _, o := range opts {
		o(c)
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	kinds, err := os.ReadDir(root)
	if err != nil {
		return nil, fmt.Errorf("cache: %w", err)
	}
	for _, k := range kinds {
		if !k.IsDir() {
			continue
		}
		entries, err := os.ReadDir(filepath.Join(root, k.Name()))
		if err != nil {
			continue
		}
		for _, e := range entries {
			if strings.HasPrefix(e.Name(), tmpPrefix) {
				p := filepath.Join(root, k.Name(), e.Name())
				if err := os.Remove(p); err == nil {
					c.log.Debug("cache: removed leftover temporary file", "path", p)
				}
			}
		}
	}
	return c, nil
}

// Root returns the cache root directory.
func (c *Cache) Root() string { return c.root }

var safeName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$`)

// IsSHA256 reports whether s is a lowercase 64-hex sha256 digest, the only
// form of hash whose file content the cache can verify.
func IsSHA256(s string) bool {
	if len(s) != 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		ch := s[i]
		if !('0' <= ch && ch <= '9' || 'a' <= ch && ch <= 'f') {
			return false
		}
	}
	return true
}

// Path returns where the file kind/hash lives (or would live) in the cache.
func (c *Cache) Path(kind, hash string) (string, error) {
	if !safeName.MatchString(kind) {
		return "", errkind.New(errkind.InvalidInput, "cache: invalid kind %q", kind)
	}
	if !safeName.MatchString(hash) {
		return "", errkind.New(errkind.InvalidInput, "cache: invalid hash %q", hash)
	}
	return filepath.Join(c.root, kind, hash), nil
}

// Get returns the local path of kind/hash, downloading it with fetch when it
// is not cached yet. limit caps the size in bytes (<= 0: no limit); going
// over it aborts the download mid-stream with a TooLarge error. When hash is
// a sha256 hex digest the content must hash to it, else an InvalidInput
// error is returned and nothing is cached. IPFS CIDs are not verified here:
// checking one needs the IPFS chunking and DAG encoding that produced it,
// which the gateway already applies, so we trust the gateway for those.
func (c *Cache) Get(ctx context.Context, kind, hash string, limit int64, fetch FetchFunc) (string, error) {
	return c.get(ctx, kind, hash, limit, fetch, nil, IsSHA256(hash))
}

// GetChecked is Get with a caller-supplied check instead of the sha256
// verification, for cached items whose name is not the hash of their bytes
// (e.g. message envelopes, named by their item hash).
func (c *Cache) GetChecked(ctx context.Context, kind, key string, limit int64, fetch FetchFunc, check CheckFunc) (string, error) {
	return c.get(ctx, kind, key, limit, fetch, check, false)
}

func (c *Cache) get(ctx context.Context, kind, hash string, limit int64, fetch FetchFunc, check CheckFunc, verifySHA bool) (string, error) {
	path, err := c.Path(kind, hash)
	if err != nil {
		return "", err
	}
	if fi, err := os.Stat(path); err == nil {
		if limit > 0 && fi.Size() > limit {
			return "", errkind.New(errkind.TooLarge, "cached %s %s is %d bytes, above the limit of %d", kind, hash, fi.Size(), limit)
		}
		return path, nil
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}

	key := kind + "/" + hash
	c.mu.Lock()
	f, ok := c.flights[key]
	if !ok {
		dctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		f = &flight{done: make(chan struct{}), cancel: cancel}
		c.flights[key] = f
		go c.run(dctx, key, f, path, kind, hash, limit, fetch, check, verifySHA)
	}
	f.waiters++
	c.mu.Unlock()

	select {
	case <-f.done:
		return f.path, f.err
	case <-ctx.Done():
		c.mu.Lock()
		f.waiters--
		if f.waiters == 0 {
			// Nobody wants it any more: stop the download. A later Get
			// starts afresh rather than joining a cancelled flight.
			f.cancel()
			if c.flights[key] == f {
				delete(c.flights, key)
			}
		}
		c.mu.Unlock()
		return "", ctx.Err()
	}
}

func (c *Cache) run(ctx context.Context, key string, f *flight, path, kind, hash string, limit int64, fetch FetchFunc, check CheckFunc, verifySHA bool) {
	defer f.cancel()
	f.path, f.err = c.download(ctx, path, kind, hash, limit, fetch, check, verifySHA)
	if f.err != nil {
		f.path = ""
	}
	c.mu.Lock()
	if c.flights[key] == f {
		delete(c.flights, key)
	}
	c.mu.Unlock()
	close(f.done)
}

func (c *Cache) download(ctx context.Context, path, kind, hash string, limit int64, fetch FetchFunc, check CheckFunc, verifySHA bool) (_ string, err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("cache: %w", err)
	}
	log := c.log.With("kind", kind, "hash", hash)
	log.Debug("cache: downloading")

	body, err := fetch(ctx)
	if err != nil {
		return "", err
	}
	defer body.Close()

	tmp, err := os.CreateTemp(dir, tmpPrefix+hash+"-*")
	if err != nil {
		return "", fmt.Errorf("cache: %w", err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()

	var h stdhash.Hash
	var w io.Writer = tmp
	if verifySHA {
		h = sha256.New()
		w = io.MultiWriter(tmp, h)
	}
	var src io.Reader = body
	if limit > 0 {
		src = io.LimitReader(body, limit+1)
	}
	n, err := io.Copy(w, ctxio.Reader(ctx, src))
	if err != nil {
		return "", fmt.Errorf("downloading %s %s: %w", kind, hash, err)
	}
	if limit > 0 && n > limit {
		return "", errkind.New(errkind.TooLarge, "%s %s is larger than the limit of %d bytes", kind, hash, limit)
	}
	if verifySHA {
		if got := hex.EncodeToString(h.Sum(nil)); got != hash {
			return "", errkind.New(errkind.InvalidInput, "%s %s: content hash mismatch (downloaded content has sha256 %s)", kind, hash, got)
		}
	}
	if err := tmp.Sync(); err != nil {
		return "", fmt.Errorf("cache: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return "", fmt.Errorf("cache: %w", err)
	}
	if check != nil {
		if err := check(tmp.Name()); err != nil {
			return "", err
		}
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return "", fmt.Errorf("cache: %w", err)
	}
	syncDir(dir)
	log.Info("cache: stored", "bytes", n, "path", path)
	return path, nil
}

// Remove deletes kind/hash from the cache (no error when absent).
func (c *Cache) Remove(kind, hash string) error {
	path, err := c.Path(kind, hash)
	if err != nil {
		return err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
}
