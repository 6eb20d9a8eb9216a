// Package proglog keeps each program's recent console output in memory,
// bounded, for its owner: read at once (GET /control/machine/{ref}/logs)
// or followed live (the stream_logs websocket). aleph-vm keeps the same
// lines in journald, one identifier per program hash, so a program's log
// spans its executions; here too one buffer serves a hash across them.
//
// Writers never wait for readers: a follower that falls behind the ring
// learns how many lines it missed and carries on from the oldest kept.
package proglog

import (
	"context"
	"sync"
	"time"
)

// Streams of an entry, upstream's words: the guest console (the program's
// own stdout and stderr, and the agent's log) is "stdout", as Firecracker's
// console reaches journald; what the host says about the sandbox is
// "stderr".
const (
	Stdout = "stdout"
	Stderr = "stderr"
)

// Defaults for Limits fields left at zero.
const (
	DefaultMaxBytes    = 256 << 10
	DefaultMaxLines    = 2000
	DefaultMaxPrograms = 128
)

// Limits bound the memory the logs may hold.
type Limits struct {
	MaxBytes    int // per program
	MaxLines    int // per program
	MaxPrograms int // programs kept; the least recently written goes first
}

func (l Limits) withDefaults() Limits {
	if l.MaxBytes <= 0 {
		l.MaxBytes = DefaultMaxBytes
	}
	if l.MaxLines <= 0 {
		l.MaxLines = DefaultMaxLines
	}
	if l.MaxPrograms <= 0 {
		l.MaxPrograms = DefaultMaxPrograms
	}
	return l
}

// Entry is one line.
type Entry struct {
	Seq     uint64 // 1 for a buffer's first line, then one more per line
	Time    time.Time
	Stream  string
	Message string
}

// Buffer is one program's ring of lines. Safe for concurrent use.
type Buffer struct {
	mu       sync.Mutex
	limits   Limits
	entries  []Entry
	bytes    int
	next     uint64
	lastUsed time.Time
	waiters  map[chan struct{}]struct{}
}

func newBuffer(l Limits) *Buffer {
	return &Buffer{limits: l, next: 1, waiters: map[chan struct{}]struct{}{}}
}

// Append adds a line and wakes followers.
func (b *Buffer) Append(stream, msg string) {
	if len(msg) > b.limits.MaxBytes {
		msg = msg[:b.limits.MaxBytes]
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	now := time.Now()
	b.entries = append(b.entries, Entry{Seq: b.next, Time: now, Stream: stream, Message: msg})
	b.next++
	b.bytes += len(msg)
	b.lastUsed = now
	drop := 0
	for len(b.entries)-drop > b.limits.MaxLines || b.bytes > b.limits.MaxBytes {
		b.bytes -= len(b.entries[drop].Message)
		drop++
	}
	if drop > 0 {
		// append reallocates from the live part only, so the array
		// behind a long-running ring stays near its bounds.
		b.entries = b.entries[drop:]
	}
	for w := range b.waiters {
		select {
		case w <- struct{}{}:
		default:
		}
	}
}

// Entries returns the kept lines, oldest first.
func (b *Buffer) Entries() []Entry {
	e, _ := b.Since(0)
	return e
}

// Since returns the kept lines with Seq ≥ seq, and how many lines from
// seq on are no longer kept.
func (b *Buffer) Since(seq uint64) (entries []Entry, lost uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if seq == 0 {
		seq = 1
	}
	first := b.next
	if len(b.entries) > 0 {
		first = b.entries[0].Seq
	}
	if seq < first {
		lost = first - seq
		seq = first
	}
	i := int(seq - first)
	if i >= len(b.entries) {
		return nil, lost
	}
	return append([]Entry(nil), b.entries[i:]...), lost
}

// Follow calls fn with every kept line, then with each new one as it
// comes, until ctx ends or fn fails. Lines lost because fn was slower than
// the program are reported to missed (when not nil) before the next one.
func (b *Buffer) Follow(ctx context.Context, fn func(Entry) error, missed func(n uint64) error) error {
	wake := make(chan struct{}, 1)
	b.mu.Lock()
	b.waiters[wake] = struct{}{}
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		delete(b.waiters, wake)
		b.mu.Unlock()
	}()
	var cursor uint64 = 1
	for {
		entries, lost := b.Since(cursor)
		if lost > 0 && missed != nil {
			if err := missed(lost); err != nil {
				return err
			}
		}
		cursor += lost
		for _, e := range entries {
			if err := fn(e); err != nil {
				return err
			}
			cursor = e.Seq + 1
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-wake:
		}
	}
}

// Registry holds the buffers of the programs that ran, within Limits.
type Registry struct {
	mu      sync.Mutex
	limits  Limits
	buffers map[string]*Buffer
}

// NewRegistry returns an empty registry.
func NewRegistry(l Limits) *Registry {
	return &Registry{limits: l.withDefaults(), buffers: map[string]*Buffer{}}
}

// For returns the buffer of a program, creating it (and forgetting the
// least recently written program's when full).
func (r *Registry) For(hash string) *Buffer {
	r.mu.Lock()
	defer r.mu.Unlock()
	if b := r.buffers[hash]; b != nil {
		return b
	}
	if len(r.buffers) >= r.limits.MaxPrograms {
		r.evictOldest()
	}
	b := newBuffer(r.limits)
	b.lastUsed = time.Now()
	r.buffers[hash] = b
	return b
}

// Get returns the buffer of a program, or nil when it has none.
func (r *Registry) Get(hash string) *Buffer {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.buffers[hash]
}

func (r *Registry) evictOldest() {
	var oldest string
	var at time.Time
	for h, b := range r.buffers {
		b.mu.Lock()
		used := b.lastUsed
		b.mu.Unlock()
		if oldest == "" || used.Before(at) {
			oldest, at = h, used
		}
	}
	delete(r.buffers, oldest)
}
