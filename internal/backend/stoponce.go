package backend

import (
	"context"
	"sync"
)

// StopOnce gives every backend's Instance.Stop the same contract: the
// first call runs the teardown, detached from the caller's cancellation so
// that a caller who gives up never leaves half a sandbox behind; every call
// (concurrent or later) waits for that one teardown, or for its own ctx.
// The zero value is ready to use.
type StopOnce struct {
	once sync.Once
	done chan struct{}
	err  error
}

// Do runs stop the first time and returns its result to every caller.
func (s *StopOnce) Do(ctx context.Context, stop func(context.Context) error) error {
	s.once.Do(func() {
		s.done = make(chan struct{})
		go func() {
			s.err = stop(context.WithoutCancel(ctx))
			close(s.done)
		}()
	})
	select {
	case <-s.done:
		return s.err
	case <-ctx.Done():
		return ctx.Err()
	}
}
