package guestapi

import (
	"context"
	"log/slog"
	"regexp"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// DefaultExpiry is how long a cached value lives, as in aleph-vm
// (CACHE_EXPIRES_AFTER: 7 days from the last write).
const DefaultExpiry = 7 * 24 * time.Hour

// Store keeps the guest cache. Namespaces are program hashes; keys are
// checked by the handler (ValidKey) before they reach a store. Set refuses
// with an errkind.TooLarge error when the namespace's caps would be
// exceeded and errkind.NoCapacity when the whole store is full; a store
// that cannot be reached answers errkind.Unavailable.
type Store interface {
	// Get returns a live value; ok is false for absent or expired keys.
	Get(ctx context.Context, ns, key string) (value []byte, ok bool, err error)
	// Set stores value for Limits.Expiry, replacing any earlier value.
	Set(ctx context.Context, ns, key string, value []byte) error
	// Delete removes a key and says how many were removed (0 or 1).
	Delete(ctx context.Context, ns, key string) (int, error)
	// Keys lists the live keys of ns matching a glob pattern already
	// checked by ValidPattern (`*`, `?` and literal characters), sorted.
	Keys(ctx context.Context, ns, pattern string) ([]string, error)
	// Sweep removes expired entries now.
	Sweep(ctx context.Context) error
	// Describe says which store this is, for logs and /about/config,
	// without secrets.
	Describe() string
	Close() error
}

// Limits bound what programs may keep in the cache.
type Limits struct {
	// Expiry is how long a value lives after it was written.
	Expiry time.Duration
	// MaxKeys and MaxBytes cap each program's namespace (live keys and
	// the sum of their value sizes); 0 means no cap.
	MaxKeys  int64
	MaxBytes int64
	// MaxTotalBytes caps the sum of every namespace's values (embedded
	// store only: a shared Redis is bounded by its own maxmemory).
	MaxTotalBytes int64
}

// DefaultLimits are the caps used when settings give none.
func DefaultLimits() Limits {
	return Limits{
		Expiry:        DefaultExpiry,
		MaxKeys:       1000,
		MaxBytes:      64 << 20,
		MaxTotalBytes: 1 << 30,
	}
}

func (l Limits) withDefaults() Limits {
	if l.Expiry <= 0 {
		l.Expiry = DefaultExpiry
	}
	return l
}

// maxKeyLength bounds a key (aleph-vm has no such bound but aiohttp refuses
// request lines over 8190 bytes, which bounds it there).
const maxKeyLength = 1024

// aleph-vm checks keys with Python's `^\w+$`, whose \w is Unicode-aware:
// letters, digits (any script) and the underscore. Python's `$` would also
// accept one trailing newline; that quirk is not kept.
var (
	keyRE     = regexp.MustCompile(`^[\p{L}\p{N}_]+$`)
	patternRE = regexp.MustCompile(`^[\p{L}\p{N}_?*^\-]+$`)
)

// ValidKey reports whether key is one that aleph-vm accepts.
func ValidKey(key string) bool {
	return len(key) <= maxKeyLength && keyRE.MatchString(key)
}

// ValidPattern reports whether a ?pattern= of GET /cache/ is one that
// aleph-vm accepts (`^[\w?*^\-]+$`): no brackets nor escapes, so `*` and
// `?` are the only special characters under both Redis and SQLite GLOB.
func ValidPattern(p string) bool {
	return len(p) <= maxKeyLength && patternRE.MatchString(p)
}

// RunSweeper removes expired entries at once (the supervisor may have
// been down for days) and then every interval, until ctx ends.
func RunSweeper(ctx context.Context, s Store, interval time.Duration, log *slog.Logger) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if err := s.Sweep(ctx); err != nil && ctx.Err() == nil {
			log.Warn("sweeping the guest cache", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func quotaError(format string, args ...any) error {
	return errkind.New(errkind.TooLarge, format, args...)
}
