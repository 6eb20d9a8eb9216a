package pool_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool/pooltest"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

func withSpares(st *pooltest.Store) func(*pool.Options) {
	return func(o *pool.Options) { o.SpareRuntime = st.SpareRuntime }
}

// newSpareFixture starts a pool with spares and waits for the first one.
func newSpareFixture(t *testing.T, b *pooltest.Backend) *fixture {
	t.Helper()
	st := pooltest.NewStore(t)
	f := newFixtureOn(t, b, st, withSpares(st))
	waitSpares(t, b, 1)
	return f
}

// waitSpares waits until n spares were started and the last is idle.
func waitSpares(t *testing.T, b *pooltest.Backend, n int) *pooltest.Sandbox {
	t.Helper()
	var last *pooltest.Sandbox
	eventually(t, "spare started", 5*time.Second, func() bool {
		count := 0
		for _, s := range b.Sandboxes() {
			if s.Spec.DeferCode {
				count++
				last = s
			}
		}
		return count >= n
	})
	return last
}

func TestSpareTakesColdStart(t *testing.T) {
	b := &pooltest.Backend{}
	f := newSpareFixture(t, b)
	spare := b.Sandboxes()[0]
	if !spare.Spec.DeferCode || spare.Spec.Internet {
		t.Fatalf("spare spec %+v", spare.Spec)
	}
	hash := f.st.Program(t, "fits", store.UploadOptions{})
	e, body := serveOnce(t, f.p, hash)
	if body != "ok" || spare.Config().ProgramHash != hash {
		t.Fatalf("the program did not run in the spare (config %+v)", spare.Config())
	}
	if code := spare.Code(); code == nil || code.CodeHash == "" || code.Entrypoint != "main:app" {
		t.Errorf("spare got code %+v", code)
	}
	if l := f.p.List(); len(l) != 1 || l[0].UUID != spare.Spec.ExecutionID {
		t.Errorf("List = %+v, want the spare's id", l)
	}
	// It is replaced.
	next := waitSpares(t, b, 2)
	// A program that does not fit (more memory) starts its own sandbox and
	// leaves the new spare alone.
	big := f.st.Program(t, "big", store.UploadOptions{MemoryMiB: 512})
	serveOnce(t, f.p, big)
	// The big program's shape is learnt: it gets a spare of its own.
	learnt := waitSpares(t, b, 3)
	if learnt.Spec.MemoryMiB != 512 {
		t.Errorf("the third spare has %d MiB, want the big program's 512", learnt.Spec.MemoryMiB)
	}
	if n := b.Started(); n != 4 {
		t.Errorf("%d sandboxes started, want 4 (spare, its replacement, big, big's spare)", n)
	}
	if next.Code() != nil || next.Exited() {
		t.Error("a program that does not fit took the spare")
	}
	_ = e
}

// Code the backend refuses is the program's fault: the caller gets the
// refusal and the untouched spare goes back for the next program.
func TestSpareKeptWhenCodeRefused(t *testing.T) {
	var bad string
	b := &pooltest.Backend{LoadCodeError: func(spec backend.Spec) error {
		if spec.ProgramHash == bad {
			return errkind.New(errkind.InvalidInput, "zip entry escapes the code directory")
		}
		return nil
	}}
	f := newSpareFixture(t, b)
	bad = f.st.Program(t, "bad", store.UploadOptions{})
	good := f.st.Program(t, "good", store.UploadOptions{})
	spare := b.Sandboxes()[0]

	_, err := f.p.Acquire(context.Background(), bad)
	if errkind.Of(err) != errkind.InvalidInput {
		t.Fatalf("refused code: %v, want InvalidInput", err)
	}
	if spare.Exited() {
		t.Fatal("the spare was discarded")
	}
	serveOnce(t, f.p, good)
	if spare.Config().ProgramHash != good {
		t.Error("the returned spare did not serve the next program")
	}
}

// A spare dying while idle is replaced, after a backoff that grows while
// spares keep dying young, and no request is given the dead one.
func TestSpareDiesWhileIdle(t *testing.T) {
	b := &pooltest.Backend{}
	f := newSpareFixture(t, b)
	hash := f.st.Program(t, "p", store.UploadOptions{})

	first := b.Sandboxes()[0]
	died := time.Now()
	first.Crash(errors.New("killed while idle"))
	// A request right after the death gets a working sandbox.
	e, _ := serveOnce(t, f.p, hash)
	if s := b.Sandbox(f.p.List()[0].UUID); s == first {
		t.Fatal("the dead spare was handed out")
	}
	second := waitSpares(t, b, 2)
	if wait := second.StartedAt.Sub(died); wait < 900*time.Millisecond {
		t.Errorf("replacement started %s after the death, want the 1 s backoff", wait)
	}
	e.Release()

	died = time.Now()
	second.Crash(errors.New("killed again"))
	third := waitSpares(t, b, 3)
	if wait := third.StartedAt.Sub(died); wait < 1900*time.Millisecond {
		t.Errorf("second replacement started %s after the death, want the doubled 2 s backoff", wait)
	}
}

// A spare that dies at the moment it is handed out (after its code was
// placed, before the Config reached it) costs a fresh start, not a 502.
func TestSpareDyingWhenTaken(t *testing.T) {
	b := &pooltest.Backend{}
	b.LoadCodeError = func(spec backend.Spec) error {
		b.Sandbox(spec.ExecutionID).Crash(errors.New("died as it was taken"))
		return nil
	}
	f := newSpareFixture(t, b)
	hash := f.st.Program(t, "p", store.UploadOptions{})
	spare := b.Sandboxes()[0]
	e, body := serveOnce(t, f.p, hash)
	if body != "ok" || b.Sandbox(f.p.List()[0].UUID) == spare {
		t.Errorf("served by the dead spare")
	}
	_ = e
}
