package backend

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestStopOnceRunsOnceForEveryCaller(t *testing.T) {
	var s StopOnce
	var runs atomic.Int32
	want := errors.New("teardown result")
	stop := func(context.Context) error {
		runs.Add(1)
		time.Sleep(50 * time.Millisecond)
		return want
	}
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.Do(context.Background(), stop); err != want {
				t.Errorf("caller got %v", err)
			}
		}()
	}
	wg.Wait()
	if err := s.Do(context.Background(), stop); err != want || runs.Load() != 1 {
		t.Errorf("later call: %v, %d runs", err, runs.Load())
	}
}

func TestStopOnceOutlivesAnImpatientCaller(t *testing.T) {
	var s StopOnce
	finished := make(chan struct{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	err := s.Do(ctx, func(ctx context.Context) error {
		time.Sleep(100 * time.Millisecond)
		if ctx.Err() != nil {
			t.Error("teardown saw the caller's cancellation")
		}
		close(finished)
		return nil
	})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("impatient caller got %v", err)
	}
	select {
	case <-finished:
	case <-time.After(2 * time.Second):
		t.Fatal("teardown did not finish after its caller left")
	}
	if err := s.Do(context.Background(), nil); err != nil {
		t.Errorf("result after teardown: %v", err)
	}
}
