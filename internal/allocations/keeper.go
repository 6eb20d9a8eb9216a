package allocations

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// keeper keeps one allocated program running until its context ends.
type keeper struct {
	hash   string
	cancel context.CancelFunc
	done   chan struct{} // closed when run returns

	first   chan struct{} // closed after the first start attempt
	mu      sync.Mutex
	lastErr error // outcome of the latest start attempt
}

// started waits for the first start attempt and returns the outcome of
// the latest one (nil: the program started).
func (k *keeper) started(ctx context.Context) error {
	select {
	case <-k.first:
	case <-ctx.Done():
		return ctx.Err()
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.lastErr
}

func (k *keeper) attempted(err error, first *bool) {
	k.mu.Lock()
	k.lastErr = err
	k.mu.Unlock()
	if *first {
		*first = false
		close(k.first)
	}
}

// run starts the program, waits for its execution to end, and starts it
// again after a delay that grows while it keeps failing or ending early.
func (k *keeper) run(ctx context.Context, p Pool, b Backoff, log *slog.Logger) {
	defer close(k.done)
	first := true
	defer func() {
		if first {
			k.attempted(ctx.Err(), &first)
		}
	}()
	var delay time.Duration
	for {
		if delay > 0 {
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return
			}
		}
		e, err := p.Keep(ctx, k.hash)
		if ctx.Err() != nil {
			return
		}
		k.attempted(err, &first)
		if err != nil {
			delay = b.next(delay)
			log.Warn("allocated program failed to start; retrying", "err", err, "in", delay)
			continue
		}
		up := time.Now()
		select {
		case <-e.Ended():
		case <-ctx.Done():
			return
		}
		if ctx.Err() != nil {
			return
		}
		if time.Since(up) >= b.StableAfter {
			delay = b.Min
		} else {
			delay = b.next(delay)
		}
		level := slog.LevelWarn
		if e.Cause() == nil {
			level = slog.LevelInfo // stopped on request (or the node stops), not a crash
		}
		log.Log(ctx, level, "allocated program ended; restarting it", "cause", e.Cause(), "up_for", time.Since(up).Round(time.Millisecond), "in", delay)
	}
}
