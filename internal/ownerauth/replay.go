package ownerauth

import (
	"crypto/sha256"
	"encoding/binary"
	"sync"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// DefaultMaxReplays bounds the operations remembered at once (a few MiB).
const DefaultMaxReplays = 50000

// Replays remembers the operations already used until they leave their
// window, so that each signed operation is honoured once. An operation is
// named by what was signed, the wallet-approved key and the operation's
// payload, never by the signature bytes: an ECDSA signature has a second
// valid form (s and n-s), which would make a second use look new.
//
// It is bounded: when full of operations still in their window, new ones
// are refused (503) until some expire, rather than forgetting one that
// could then be replayed. Safe for concurrent use; a nil *Replays
// remembers nothing.
type Replays struct {
	mu   sync.Mutex
	max  int
	seen map[[sha256.Size]byte]time.Time // operation → end of its window
	last time.Time                       // last purge
}

// purgeEvery spaces the sweeps of expired operations: each costs a pass
// over the set.
const purgeEvery = time.Second

// NewReplays returns an empty set of at most limit operations (<= 0:
// DefaultMaxReplays).
func NewReplays(limit int) *Replays {
	if limit <= 0 {
		limit = DefaultMaxReplays
	}
	return &Replays{max: limit, seen: map[[sha256.Size]byte]time.Time{}}
}

// Len is the number of operations remembered.
func (r *Replays) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.seen)
}

// use records the operation op of key until expires; a second use before
// then is a 401.
func (r *Replays) use(key, op []byte, expires, now time.Time) error {
	if r == nil {
		return nil
	}
	h := sha256.New()
	var n [8]byte
	binary.BigEndian.PutUint64(n[:], uint64(len(key)))
	h.Write(n[:])
	h.Write(key)
	h.Write(op)
	var id [sha256.Size]byte
	h.Sum(id[:0])

	r.mu.Lock()
	defer r.mu.Unlock()
	if end, ok := r.seen[id]; ok && now.Before(end) {
		return unauthorized("Operation already used")
	}
	if now.Sub(r.last) >= purgeEvery {
		r.purge(now)
	}
	if len(r.seen) >= r.max {
		return errkind.New(errkind.NoCapacity, "Too many recent operations, try again later")
	}
	r.seen[id] = expires
	return nil
}

// purge drops the operations out of their window; r.mu is held.
func (r *Replays) purge(now time.Time) {
	r.last = now
	for id, end := range r.seen {
		if !now.Before(end) {
			delete(r.seen, id)
		}
	}
}
