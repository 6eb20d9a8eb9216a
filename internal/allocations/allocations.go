// Package allocations keeps the programs a scheduler allocates to this
// node running: POST /control/allocations gives the desired set, each
// program in it gets a keeper that starts it without waiting for a
// request and restarts it with backoff when it ends, programs dropped
// from the set are stopped, and the set is saved under EXECUTION_ROOT so
// that it runs again after the supervisor restarts.
package allocations

import (
	"context"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
)

// Pool is what allocations need of the pool (*pool.Pool).
type Pool interface {
	// Keep starts the program if it does not run and keeps it running
	// (no idle stop, no eviction); it returns the running execution.
	Keep(ctx context.Context, hash string) (*pool.Execution, error)
	// Unkeep ends Keep and stops the running execution, reporting
	// whether one was running.
	Unkeep(ctx context.Context, hash string) bool
}

// Backoff paces restarts of a program that keeps ending or failing to
// start: Min after the first failure, doubling up to Max, and back to
// Min once an execution stayed up for StableAfter.
type Backoff struct {
	Min, Max, StableAfter time.Duration
}

// DefaultBackoff is 1 s doubling to 5 min, reset after 30 s up, as the
// pool's spares back off.
var DefaultBackoff = Backoff{Min: time.Second, Max: 5 * time.Minute, StableAfter: 30 * time.Second}

func (b Backoff) next(d time.Duration) time.Duration {
	if d < b.Min {
		return b.Min
	}
	return min(2*d, b.Max)
}

// Options configure a Manager.
type Options struct {
	Pool Pool
	// StatePath is the file the allocation is saved in (StateFile under
	// EXECUTION_ROOT); empty: nothing survives a restart.
	StatePath string
	Backoff   Backoff // zero: DefaultBackoff
	Logger    *slog.Logger
}

// Manager reconciles the node with the allocation. Safe for concurrent
// use; updates are applied one at a time.
type Manager struct {
	opts Options
	log  *slog.Logger

	update  sync.Mutex // one allocation update at a time, as upstream's lock
	mu      sync.Mutex
	desired Allocation
	keepers map[string]*keeper
	closed  bool
}

// Result is the answer to an update, in upstream's shape.
type Result struct {
	Success    bool              `json:"success"`
	Successful []string          `json:"successful"`
	Failing    []string          `json:"failing"`
	Stopped    []string          `json:"stopped"`
	Errors     map[string]string `json:"errors"`
}

// New returns a manager with nothing allocated; Restore brings back the
// saved allocation.
func New(opts Options) *Manager {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Backoff == (Backoff{}) {
		opts.Backoff = DefaultBackoff
	}
	return &Manager{
		opts:    opts,
		log:     opts.Logger,
		desired: Allocation{PersistentVMs: []string{}, Instances: []string{}},
		keepers: map[string]*keeper{},
	}
}

// Restore reads the saved allocation and starts keeping its programs,
// without waiting for them to start.
func (m *Manager) Restore() error {
	if m.opts.StatePath == "" {
		return nil
	}
	a, err := load(m.opts.StatePath)
	if err != nil {
		return err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.desired = a
	for _, h := range a.hashes() {
		m.startKeeperLocked(h)
	}
	if n := len(m.keepers); n > 0 {
		m.log.Info("restoring the saved allocation", "programs", n)
	}
	return nil
}

// Update makes a the node's allocation: programs no longer in it are
// stopped, the others are started one after another (as upstream does,
// to bound the load) and kept running. It returns when every new
// program started or failed to; ctx bounds that wait only.
func (m *Manager) Update(ctx context.Context, a Allocation) (Result, error) {
	m.update.Lock()
	defer m.update.Unlock()
	a = Allocation{PersistentVMs: sortedSet(a.PersistentVMs), Instances: sortedSet(a.Instances)}
	want := a.hashes()
	if m.opts.StatePath != "" {
		if err := save(m.opts.StatePath, a); err != nil {
			return Result{}, err
		}
	}
	res := Result{Successful: []string{}, Failing: []string{}, Stopped: []string{}, Errors: map[string]string{}}

	m.mu.Lock()
	m.desired = a
	var gone []*keeper
	for h, k := range m.keepers {
		if !slices.Contains(want, h) {
			delete(m.keepers, h)
			gone = append(gone, k)
		}
	}
	m.mu.Unlock()
	for _, k := range gone {
		if m.release(ctx, k) {
			res.Stopped = append(res.Stopped, k.hash)
		}
	}
	slices.Sort(res.Stopped)

	for _, h := range want {
		m.mu.Lock()
		k := m.keepers[h]
		if k == nil {
			k = m.startKeeperLocked(h)
		}
		m.mu.Unlock()
		if err := k.started(ctx); err != nil {
			res.Failing = append(res.Failing, h)
			res.Errors[h] = err.Error()
			continue
		}
		res.Successful = append(res.Successful, h)
	}
	res.Success = len(res.Failing) == 0
	return res, nil
}

// release stops keeping k's program and stops its execution; it reports
// whether one was running.
func (m *Manager) release(ctx context.Context, k *keeper) bool {
	k.cancel()
	<-k.done
	stopped := m.opts.Pool.Unkeep(ctx, k.hash)
	m.log.Info("program no longer allocated", "program", k.hash, "was_running", stopped)
	return stopped
}

// Current is the allocation in force.
func (m *Manager) Current() Allocation {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.desired
}

// Close stops the keepers (not the executions: the pool's shutdown does)
// and leaves the saved allocation for the next start.
func (m *Manager) Close() {
	m.mu.Lock()
	m.closed = true
	ks := make([]*keeper, 0, len(m.keepers))
	for _, k := range m.keepers {
		ks = append(ks, k)
	}
	m.mu.Unlock()
	for _, k := range ks {
		k.cancel()
		<-k.done
	}
}

func (m *Manager) startKeeperLocked(hash string) *keeper {
	ctx, cancel := context.WithCancel(context.Background())
	k := &keeper{hash: hash, cancel: cancel, done: make(chan struct{}), first: make(chan struct{})}
	m.keepers[hash] = k
	if m.closed {
		cancel()
		k.lastErr = context.Canceled
		close(k.first)
		close(k.done)
		return k
	}
	go k.run(ctx, m.opts.Pool, m.opts.Backoff, m.log.With("program", hash))
	return k
}
