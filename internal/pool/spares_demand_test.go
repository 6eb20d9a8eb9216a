package pool_test

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool/pooltest"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

// idleSpares counts the idle spares of memoryMiB the backend holds: alive
// sandboxes started without code and not yet given any.
func idleSpares(b *pooltest.Backend, memoryMiB int) int {
	n := 0
	for _, s := range b.Alive() {
		if s.Spec.DeferCode && s.Spec.MemoryMiB == memoryMiB && s.Code() == nil {
			n++
		}
	}
	return n
}

// poolSpares is the pool's own count of idle spares of memoryMiB.
func poolSpares(p *pool.Pool, memoryMiB int) int {
	n := 0
	for _, s := range p.Spares() {
		if s.MemoryMiB == memoryMiB {
			n += s.Idle
		}
	}
	return n
}

// servedBySpare tells whether hash's running execution is a spare that
// took its code.
func servedBySpare(t *testing.T, f *fixture, hash string) bool {
	t.Helper()
	for _, in := range f.p.List() {
		if in.ProgramHash == hash {
			s := f.b.Sandbox(in.UUID)
			return s != nil && s.Spec.DeferCode
		}
	}
	t.Fatalf("%s is not running", hash)
	return false
}

// A shape is learnt from one cold start: the first program of it starts
// its own sandbox, the next one finds a spare of its shape waiting.
func TestSpareShapeLearntFromDemand(t *testing.T) {
	b := &pooltest.Backend{}
	f := newSpareFixture(t, b)
	opts := store.UploadOptions{MemoryMiB: 256, VCPUs: 2}
	first := f.st.Program(t, "first", opts)
	serveOnce(t, f.p, first)
	if servedBySpare(t, f, first) {
		t.Fatal("a shape never seen had a spare")
	}
	eventually(t, "a spare of the learnt shape", 5*time.Second, func() bool { return idleSpares(b, 256) == 1 })
	var spare *pooltest.Sandbox
	for _, s := range b.Alive() {
		if s.Spec.DeferCode && s.Spec.MemoryMiB == 256 {
			spare = s
		}
	}
	if spare.Spec.VCPUs != 2 || spare.Spec.Internet {
		t.Errorf("spare of the learnt shape: %+v", spare.Spec)
	}
	second := f.st.Program(t, "second", opts)
	serveOnce(t, f.p, second)
	if spare.Config().ProgramHash != second {
		t.Error("the second program of the shape did not run in its spare")
	}
	// The default shape kept its own spare meanwhile.
	if n := idleSpares(b, 128); n != 1 {
		t.Errorf("%d spares of the default shape, want 1", n)
	}
}

// A burst of cold starts of one shape leaves as many spares for the next
// burst; with no more demand they go, down to the default shape's one.
func TestSpareDepthFollowsDemand(t *testing.T) {
	b := &pooltest.Backend{}
	st := pooltest.NewStore(t)
	f := newFixtureOn(t, b, st, func(o *pool.Options) {
		o.SpareRuntime = st.SpareRuntime
		o.SpareMemoryMiB = 4096
		o.SpareDemandHalfLife = 2 * time.Second
	})
	waitSpares(t, b, 1)
	for i := range 5 {
		serveOnce(t, f.p, f.st.Program(t, fmt.Sprint("burst-", i), store.UploadOptions{MemoryMiB: 256}))
	}
	eventually(t, "spares for the next burst", 3*time.Second, func() bool { return idleSpares(b, 256) >= 4 })
	if n := poolSpares(f.p, 256); n < 4 {
		t.Errorf("the pool counts %d spares of the shape, the backend at least 4", n)
	}
	eventually(t, "the burst's spares gone after idling", 30*time.Second, func() bool { return idleSpares(b, 256) == 0 })
	if n := idleSpares(b, 128); n != 1 {
		t.Errorf("%d spares of the default shape after the decay, want 1", n)
	}
}

// Spares never hold more memory than their budget together; the least
// useful shape gives way, here the default shape with no demand at all.
func TestSparesStayWithinBudget(t *testing.T) {
	b := &pooltest.Backend{StartDelay: 20 * time.Millisecond}
	st := pooltest.NewStore(t)
	const budget = 512
	f := newFixtureOn(t, b, st, func(o *pool.Options) {
		o.SpareRuntime = st.SpareRuntime
		o.SpareMemoryMiB = budget
	})
	waitSpares(t, b, 1)

	var over []string
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the pool's account, sampled all along
		defer wg.Done()
		for {
			held := 0
			for _, s := range f.p.Spares() {
				held += (s.Idle + s.Starting) * s.MemoryMiB
			}
			if held > budget {
				over = append(over, fmt.Sprint(f.p.Spares()))
			}
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	for i := range 3 {
		serveOnce(t, f.p, f.st.Program(t, fmt.Sprint("big-", i), store.UploadOptions{MemoryMiB: 256}))
	}
	// Worth 3, 1.5 and 1 for the big shape against 0.5 for the default
	// one: two big spares fill the budget.
	eventually(t, "two spares of the busy shape, none of the idle one", 5*time.Second, func() bool {
		return idleSpares(b, 256) == 2 && idleSpares(b, 128) == 0
	})
	time.Sleep(200 * time.Millisecond) // nothing more may start
	close(stop)
	wg.Wait()
	if len(over) > 0 {
		t.Errorf("spares held more than the %d MiB budget %d times, first: %s", budget, len(over), over[0])
	}
	if held := idleSpares(b, 256)*256 + idleSpares(b, 128)*128; held > budget {
		t.Errorf("the backend runs %d MiB of spares, budget %d", held, budget)
	}
}

// Back-to-back cold starts of different programs each find a spare ready,
// although one spare takes longer to make than a cold start through a
// spare: the shape's demand keeps several ready.
func TestBackToBackColdStartsUseSpares(t *testing.T) {
	b := &pooltest.Backend{StartDelay: 300 * time.Millisecond}
	f := newSpareFixture(t, b)
	for i := range 5 { // earlier demand of the shape
		serveOnce(t, f.p, f.st.Program(t, fmt.Sprint("earlier-", i), store.UploadOptions{}))
	}
	eventually(t, "five spares ready", 5*time.Second, func() bool { return idleSpares(b, 128) >= 5 })
	for i := range 5 {
		hash := f.st.Program(t, fmt.Sprint("next-", i), store.UploadOptions{})
		serveOnce(t, f.p, hash)
		if !servedBySpare(t, f, hash) {
			t.Errorf("back-to-back cold start %d had no spare", i+1)
		}
	}
}

// A spare that is up but still importing holds its start slot, so with
// one start at a time spares warm up one after the other; an agent that
// never says it is warm frees its slot after SpareWarmLimit.
func TestSparesWarmUpOneAtATime(t *testing.T) {
	const warming = 300 * time.Millisecond
	for _, c := range []struct {
		name             string
		warmAfter, limit time.Duration
	}{
		{"the agent says it is warm", warming, time.Minute},
		{"the agent never says", -1, warming},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := &pooltest.Backend{WarmAfter: c.warmAfter}
			st := pooltest.NewStore(t)
			f := newFixtureOn(t, b, st, func(o *pool.Options) {
				o.SpareRuntime = st.SpareRuntime
				o.SpareMemoryMiB = 4096
				o.SpareStartsAtOnce = 1
				o.SpareWarmLimit = c.limit
			})
			waitSpares(t, b, 1)
			for i := range 4 {
				serveOnce(t, f.p, f.st.Program(t, fmt.Sprint("burst-", i), store.UploadOptions{MemoryMiB: 256}))
			}
			eventually(t, "spares for the next burst", 10*time.Second, func() bool { return idleSpares(b, 256) >= 3 })
			var starts []time.Time
			for _, s := range b.Sandboxes() {
				if s.Spec.DeferCode && s.Spec.MemoryMiB == 256 {
					starts = append(starts, s.StartedAt)
				}
			}
			slices.SortFunc(starts, time.Time.Compare)
			for i := 1; i < len(starts); i++ {
				// A little slack for the timer that ends the warm-up.
				if gap := starts[i].Sub(starts[i-1]); gap < warming*8/10 {
					t.Errorf("spare %d started %s after the one before, which was still warming up (%s)", i+1, gap, warming)
				}
			}
			if c.warmAfter >= 0 {
				for _, s := range b.Alive() {
					if s.Spec.DeferCode && s.Code() == nil && time.Since(s.StartedAt) > 2*warming && !s.Warm() {
						t.Errorf("spare %s never said it was warm", s.Spec.ExecutionID)
					}
				}
			}
		})
	}
}
