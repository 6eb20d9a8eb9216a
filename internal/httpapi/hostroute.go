package httpapi

import (
	"context"
	"strings"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"
	"golang.org/x/time/rate"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// Host routing by DNS: `_aleph-id.<host>` TXT records name the program of
// a custom domain. Every unknown Host header would otherwise cost a query
// to the operator's resolver and, with its default timeouts, up to ten
// seconds of a request; answers are therefore cached (found and not
// found alike), bounded in number and time, and lookups are bounded in
// duration and rate.
const (
	txtFoundTTL    = 5 * time.Minute
	txtNotFoundTTL = time.Minute
	txtTimeout     = 2 * time.Second
	txtMaxEntries  = 4096
	// txtRate lookups a second (with txtBurst at once) reach the resolver;
	// beyond, unknown hosts are answered 503 without a query.
	txtRate  = 50
	txtBurst = 100
	// maxDNSName is the longest name the DNS carries (RFC 1035).
	maxDNSName = 253
)

type txtEntry struct {
	hash    string // "" when the host names no program
	expires time.Time
}

// txtRoutes caches `_aleph-id` lookups.
type txtRoutes struct {
	lookup  func(ctx context.Context, name string) ([]string, error)
	now     func() time.Time
	limiter *rate.Limiter
	group   singleflight.Group

	mu      sync.Mutex
	entries map[string]txtEntry
}

func newTXTRoutes(lookup func(ctx context.Context, name string) ([]string, error)) *txtRoutes {
	return &txtRoutes{
		lookup: lookup, now: time.Now,
		limiter: rate.NewLimiter(txtRate, txtBurst),
		entries: map[string]txtEntry{},
	}
}

// hash returns the program hash the host's TXT record names, "" if none.
func (c *txtRoutes) hash(ctx context.Context, host string) (string, error) {
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	if len(host) > maxDNSName-len("_aleph-id.") || host == "" {
		return "", nil // no such name in the DNS: neither asked nor kept
	}
	c.mu.Lock()
	e, ok := c.entries[host]
	c.mu.Unlock()
	if ok && c.now().Before(e.expires) {
		return e.hash, nil
	}
	ch := c.group.DoChan(host, func() (any, error) {
		if !c.limiter.Allow() {
			return "", errkind.New(errkind.Unavailable, "too many lookups of unknown hosts; try again later")
		}
		// Not the request's context: the answer serves whoever asks next,
		// and one client leaving must not fail the others waiting on it.
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), txtTimeout)
		defer cancel()
		txts, err := c.lookup(lctx, "_aleph-id."+host)
		hash := ""
		if err == nil {
			for _, txt := range txts {
				if h, perr := message.ParseRef(strings.TrimSpace(txt)); perr == nil {
					hash = h
					break
				}
			}
		}
		// A failed lookup (no record, timeout, SERVFAIL) is remembered as
		// "no program" for the shorter time.
		ttl := txtNotFoundTTL
		if hash != "" {
			ttl = txtFoundTTL
		}
		c.store(host, txtEntry{hash: hash, expires: c.now().Add(ttl)})
		return hash, nil
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return "", r.Err
		}
		return r.Val.(string), nil
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

func (c *txtRoutes) store(host string, e txtEntry) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.entries[host]; !ok && len(c.entries) >= txtMaxEntries {
		now := c.now()
		for k, old := range c.entries {
			if !now.Before(old.expires) {
				delete(c.entries, k)
			}
		}
		// Still full: any one gives way (map order is random, so a flood
		// of new names cannot pin the entries it wants kept).
		for k := range c.entries {
			if len(c.entries) < txtMaxEntries {
				break
			}
			delete(c.entries, k)
		}
	}
	c.entries[host] = e
}
