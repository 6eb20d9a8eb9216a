package guestapi

import (
	"path"
	"sort"
	"sync"
	"time"
)

// DefaultExpiry is how long a cached value lives, as in aleph-vm.
const DefaultExpiry = 7 * 24 * time.Hour

// Cache is the embedded default store of the guest API cache: in memory,
// shared by every execution but namespaced by program hash, with expiry.
// (A Redis-backed store for REDIS_URL is not in this build.)
type Cache struct {
	mu      sync.Mutex
	expiry  time.Duration
	now     func() time.Time
	entries map[string]entry
}

type entry struct {
	value   []byte
	expires time.Time
}

// NewCache returns an empty cache whose values expire after expiry.
func NewCache(expiry time.Duration) *Cache {
	if expiry <= 0 {
		expiry = DefaultExpiry
	}
	return &Cache{expiry: expiry, now: time.Now, entries: map[string]entry{}}
}

func nsKey(ns, key string) string { return ns + "/" + key }

// Get returns a live value.
func (c *Cache) Get(ns, key string) ([]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.entries[nsKey(ns, key)]
	if !ok || !c.now().Before(e.expires) {
		delete(c.entries, nsKey(ns, key))
		return nil, false
	}
	return e.value, true
}

// Set stores a copy of value.
func (c *Cache) Set(ns, key string, value []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.entries[nsKey(ns, key)] = entry{append([]byte(nil), value...), c.now().Add(c.expiry)}
}

// Delete removes a key; absent keys are fine.
func (c *Cache) Delete(ns, key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.entries, nsKey(ns, key))
}

// Keys lists the live keys of a namespace that match a glob pattern.
func (c *Cache) Keys(ns, pattern string) ([]string, error) {
	if _, err := path.Match(pattern, ""); err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	keys := []string{}
	prefix := ns + "/"
	for k, e := range c.entries {
		if len(k) <= len(prefix) || k[:len(prefix)] != prefix {
			continue
		}
		if !now.Before(e.expires) {
			delete(c.entries, k)
			continue
		}
		if ok, _ := path.Match(pattern, k[len(prefix):]); ok {
			keys = append(keys, k[len(prefix):])
		}
	}
	sort.Strings(keys)
	return keys, nil
}
