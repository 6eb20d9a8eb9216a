package codeprep

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// Defaults for CacheOptions fields left at zero.
const (
	DefaultCacheMaxBytes = 4 << 30
	DefaultFailureTTL    = 60 * time.Second
	// maxFailures bounds the remembered refusals.
	maxFailures = 4096
)

var cacheKeyPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.+-]*$`)

// CacheOptions configure a Cache.
type CacheOptions struct {
	// MaxBytes bounds the disk usage of the cached trees; least recently
	// used trees not in use are removed beyond it. DefaultCacheMaxBytes
	// when zero.
	MaxBytes int64
	// Limits bound each extraction.
	Limits Limits
	// FailureTTL is how long a refused code is remembered: requests for it
	// get the same error without a new extraction. DefaultFailureTTL when
	// zero; negative turns it off.
	FailureTTL time.Duration
	Logger     *slog.Logger
}

// Cache holds extracted code trees under one directory, one per code hash
// (and encoding, and for plain code the file name). It is safe for
// concurrent use; one process owns the directory.
type Cache struct {
	dir  string
	opts CacheOptions
	log  *slog.Logger

	mu       sync.Mutex
	trees    map[string]*cachedTree
	total    int64 // disk usage of trees
	failures map[string]failure
	// preparing serialises preparations of one key, so concurrent cold
	// starts of one program extract once.
	preparing map[string]*keyLock
}

type keyLock struct {
	held    chan struct{} // a lock that a waiter can give up on
	waiters int           // guarded by Cache.mu
}

type cachedTree struct {
	size  int64
	users int
	used  time.Time
}

type failure struct {
	err   error
	until time.Time
}

// OpenCache opens (creating it if needed) the cache in dir: leftovers of
// interrupted extractions are removed and the trees already there are
// taken into account, then evicted down to MaxBytes.
func OpenCache(dir string, opts CacheOptions) (*Cache, error) {
	if opts.MaxBytes <= 0 {
		opts.MaxBytes = DefaultCacheMaxBytes
	}
	if opts.FailureTTL == 0 {
		opts.FailureTTL = DefaultFailureTTL
	}
	opts.Limits = opts.Limits.withDefaults()
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("code cache: %w", err)
	}
	c := &Cache{
		dir: dir, opts: opts, log: opts.Logger.With("cache", "code"),
		trees: map[string]*cachedTree{}, failures: map[string]failure{}, preparing: map[string]*keyLock{},
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("code cache: %w", err)
	}
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		if strings.HasPrefix(e.Name(), ".") || !e.IsDir() {
			if err := os.RemoveAll(p); err != nil {
				c.log.Warn("removing a leftover", "path", p, "err", err)
			}
			continue
		}
		size := diskUsage(p)
		used := time.Time{}
		if fi, err := e.Info(); err == nil {
			used = fi.ModTime()
		}
		c.trees[e.Name()] = &cachedTree{size: size, used: used}
		c.total += size
	}
	c.mu.Lock()
	c.evictLocked()
	c.mu.Unlock()
	return c, nil
}

// Dir is the cache's directory.
func (c *Cache) Dir() string { return c.dir }

// InUse is the number of cached trees some execution holds a lease on.
func (c *Cache) InUse() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, t := range c.trees {
		if t.users > 0 {
			n++
		}
	}
	return n
}

// Size is the disk usage of the cached trees.
func (c *Cache) Size() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.total
}

// Lease is the use of one cached tree: it is not evicted until Release.
type Lease struct {
	Path string
	c    *Cache
	key  string
	once sync.Once
}

// Release ends the use. It is safe to call more than once.
func (l *Lease) Release() {
	if l == nil {
		return
	}
	l.once.Do(func() {
		l.c.mu.Lock()
		defer l.c.mu.Unlock()
		if t := l.c.trees[l.key]; t != nil {
			t.users--
			t.used = time.Now()
		}
		l.c.evictLocked()
	})
}

// Acquire returns the tree holding src's code, extracting it first when
// it is not cached yet. A code refused within FailureTTL is refused again
// with the same error, without a new extraction.
func (c *Cache) Acquire(ctx context.Context, src Source) (*Lease, error) {
	key, err := cacheKey(src)
	if err != nil {
		return nil, err
	}
	if l, ok, err := c.lookup(key); ok {
		return l, err
	}

	c.mu.Lock()
	kl := c.preparing[key]
	if kl == nil {
		kl = &keyLock{held: make(chan struct{}, 1)}
		c.preparing[key] = kl
	}
	kl.waiters++
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		if kl.waiters--; kl.waiters == 0 {
			delete(c.preparing, key)
		}
		c.mu.Unlock()
	}()
	select {
	case kl.held <- struct{}{}:
		defer func() { <-kl.held }()
	case <-ctx.Done():
		return nil, fmt.Errorf("code: waiting for another extraction of %s: %w", key, ctx.Err())
	}
	// Another caller may have finished meanwhile.
	if l, ok, err := c.lookup(key); ok {
		return l, err
	}

	start := time.Now()
	size, err := c.extract(ctx, key, src)
	if err != nil {
		if refusal(err) {
			c.remember(key, err)
			c.log.Info("code refused", "key", key, "err", err, "took", time.Since(start).Round(time.Millisecond))
		}
		return nil, err
	}
	c.log.Debug("code extracted", "key", key, "bytes", size, "took", time.Since(start).Round(time.Millisecond))
	c.mu.Lock()
	defer c.mu.Unlock()
	c.trees[key] = &cachedTree{size: size, users: 1, used: time.Now()}
	c.total += size
	c.evictLocked()
	return &Lease{Path: filepath.Join(c.dir, key), c: c, key: key}, nil
}

// lookup answers from the cache: a tree (leased), a remembered refusal,
// or ok=false.
func (c *Cache) lookup(key string) (*Lease, bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if t := c.trees[key]; t != nil {
		t.users++
		t.used = time.Now()
		return &Lease{Path: filepath.Join(c.dir, key), c: c, key: key}, true, nil
	}
	if f, ok := c.failures[key]; ok {
		if time.Now().Before(f.until) {
			return nil, true, f.err
		}
		delete(c.failures, key)
	}
	return nil, false, nil
}

// refusal tells errors that come from the code itself, which another
// attempt would meet again, from passing ones.
func refusal(err error) bool {
	return errkind.Is(err, errkind.InvalidInput) || errkind.Is(err, errkind.TooLarge)
}

func (c *Cache) remember(key string, err error) {
	if c.opts.FailureTTL < 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	if len(c.failures) >= maxFailures {
		for k, f := range c.failures {
			if now.After(f.until) {
				delete(c.failures, k)
			}
		}
		for k := range c.failures { // still full: drop any
			if len(c.failures) < maxFailures {
				break
			}
			delete(c.failures, k)
		}
	}
	c.failures[key] = failure{err: err, until: now.Add(c.opts.FailureTTL)}
}

// extract makes the tree in a private temporary directory and publishes
// it by rename once complete.
func (c *Cache) extract(ctx context.Context, key string, src Source) (int64, error) {
	tmp, err := os.MkdirTemp(c.dir, ".tmp-"+key+"-")
	if err != nil {
		return 0, fmt.Errorf("code cache: %w", err)
	}
	published := false
	defer func() {
		if published {
			os.Remove(tmp) // empty
			return
		}
		// A refused tree may hold many entries: the answer need not wait
		// for their removal.
		go func() {
			if err := os.RemoveAll(tmp); err != nil {
				c.log.Warn("removing a refused extraction", "path", tmp, "err", err)
			}
		}()
	}()
	// The tree lives one level below the (0700) temp dir: unsquashfs
	// creates its destination itself, and nobody else can reach the tree
	// before it is normalised.
	tree := filepath.Join(tmp, "tree")
	size, err := extract(ctx, tree, src, c.opts.Limits)
	if err != nil {
		return 0, err
	}
	dst := filepath.Join(c.dir, key)
	if err := os.Rename(tree, dst); err != nil {
		return 0, fmt.Errorf("code cache: publish %s: %w", key, err)
	}
	published = true
	return size, nil
}

// evictLocked removes least recently used trees nobody uses until the
// cache fits MaxBytes.
func (c *Cache) evictLocked() {
	if c.total <= c.opts.MaxBytes {
		return
	}
	type cand struct {
		key string
		t   *cachedTree
	}
	var cands []cand
	for k, t := range c.trees {
		if t.users == 0 {
			cands = append(cands, cand{k, t})
		}
	}
	sort.Slice(cands, func(i, j int) bool { return cands[i].t.used.Before(cands[j].t.used) })
	for _, cd := range cands {
		if c.total <= c.opts.MaxBytes {
			break
		}
		p := filepath.Join(c.dir, cd.key)
		// Renamed at once (under the lock, so no Acquire can lease it),
		// removed in the background.
		gone, err := os.MkdirTemp(c.dir, ".evict-")
		if err == nil {
			err = os.Rename(p, filepath.Join(gone, "tree"))
		}
		if err != nil {
			c.log.Warn("evicting code tree", "key", cd.key, "err", err)
			if gone != "" {
				os.Remove(gone)
			}
			continue
		}
		delete(c.trees, cd.key)
		c.total -= cd.t.size
		c.log.Debug("evicted code tree", "key", cd.key, "bytes", cd.t.size)
		go func() {
			if err := os.RemoveAll(gone); err != nil {
				c.log.Warn("removing evicted code tree", "path", gone, "err", err)
			}
		}()
	}
	if c.total > c.opts.MaxBytes {
		c.log.Warn("code cache above its size: every tree is in use", "bytes", c.total, "max", c.opts.MaxBytes)
	}
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

// diskUsage is the allocated size of the tree at dir (best effort).
func diskUsage(dir string) int64 {
	var n int64
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if fi, err := d.Info(); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				n += st.Blocks * 512
			}
		}
		return nil
	})
	return n
}
