package allocations_test

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/allocations"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool/pooltest"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

// These tests run the manager on the real pool over in-process sandboxes
// (pooltest): no root, no runsc.

var quiet = slog.New(slog.DiscardHandler)

// fast is a backoff short enough for tests and long enough to measure.
var fast = allocations.Backoff{Min: 100 * time.Millisecond, Max: 400 * time.Millisecond, StableAfter: time.Hour}

type node struct {
	b     *pooltest.Backend
	p     *pool.Pool
	m     *allocations.Manager
	state string
}

// newNode starts a pool and a manager saving to state; tune adjusts the
// pool's options.
func newNode(t *testing.T, st *pooltest.Store, state string, tune func(*pool.Options)) *node {
	t.Helper()
	n := &node{b: &pooltest.Backend{}, state: state}
	opts := pool.Options{
		Source: st.Resolver, Backend: n.b, ReuseTimeout: time.Minute, InitTimeout: 5 * time.Second,
		ExecutionRoot: t.TempDir(), CapacityWait: 200 * time.Millisecond, Logger: quiet,
	}
	if tune != nil {
		tune(&opts)
	}
	n.p = pool.New(opts)
	n.m = allocations.New(allocations.Options{Pool: n.p, StatePath: state, Backoff: fast, Logger: quiet})
	t.Cleanup(func() { n.stop(t) })
	return n
}

func (n *node) stop(t *testing.T) {
	n.m.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := n.p.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if alive := n.b.Alive(); len(alive) > 0 {
		t.Errorf("%d sandboxes still running after Shutdown", len(alive))
	}
}

func (n *node) update(t *testing.T, a allocations.Allocation) allocations.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := n.m.Update(ctx, a)
	if err != nil {
		t.Fatalf("Update: %v", err)
	}
	return res
}

// running returns the hashes of the pool's executions and whether each
// is kept.
func (n *node) running() map[string]bool {
	out := map[string]bool{}
	for _, i := range n.p.List() {
		out[i.ProgramHash] = i.Persistent
	}
	return out
}

func eventually(t *testing.T, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", within, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func program(t *testing.T, st *pooltest.Store, name string) string {
	return st.Program(t, name, store.UploadOptions{Persistent: true})
}

// An allocation starts its programs without a request and reports them;
// a later one without a program stops it and says so in "stopped".
func TestAllocationStartsAndStops(t *testing.T) {
	st := pooltest.NewStore(t)
	n := newNode(t, st, filepath.Join(t.TempDir(), allocations.StateFile), nil)
	ha, hb := program(t, st, "a"), program(t, st, "b")

	res := n.update(t, allocations.Allocation{PersistentVMs: []string{hb, ha}})
	want := []string{ha, hb}
	slices.Sort(want)
	if !res.Success || !slices.Equal(res.Successful, want) || len(res.Failing) != 0 || len(res.Stopped) != 0 || len(res.Errors) != 0 {
		t.Fatalf("first allocation: %+v", res)
	}
	if r := n.running(); len(r) != 2 || !r[ha] || !r[hb] {
		t.Fatalf("running after the allocation: %v (want both, kept)", r)
	}
	for _, s := range n.b.Sandboxes() {
		if s.Requests() != 0 {
			t.Errorf("sandbox %s received %d requests; none were sent", s.Spec.ExecutionID, s.Requests())
		}
	}

	// The same allocation again changes nothing.
	res = n.update(t, allocations.Allocation{PersistentVMs: []string{ha, hb}})
	if !res.Success || len(res.Stopped) != 0 || n.b.Started() != 2 {
		t.Fatalf("repeated allocation: %+v, %d sandboxes started", res, n.b.Started())
	}

	res = n.update(t, allocations.Allocation{PersistentVMs: []string{ha}})
	if !slices.Equal(res.Stopped, []string{hb}) || !slices.Equal(res.Successful, []string{ha}) {
		t.Fatalf("allocation without b: %+v", res)
	}
	if r := n.running(); len(r) != 1 || !r[ha] {
		t.Fatalf("running after b was removed: %v", r)
	}
	if s := n.b.Sandboxes()[1]; n.b.Sandboxes()[0].Exited() == s.Exited() {
		t.Error("want exactly one of the two sandboxes stopped")
	}

	res = n.update(t, allocations.Allocation{})
	if !slices.Equal(res.Stopped, []string{ha}) || !res.Success || len(res.Successful) != 0 {
		t.Fatalf("empty allocation: %+v", res)
	}
	if len(n.b.Alive()) != 0 || len(n.running()) != 0 {
		t.Fatalf("sandboxes alive after an empty allocation: %d", len(n.b.Alive()))
	}
}

// A program that cannot start is reported failing with its error, the
// others succeed; the caller maps that to 207.
func TestAllocationWithFailures(t *testing.T) {
	st := pooltest.NewStore(t)
	n := newNode(t, st, "", nil)
	ha := program(t, st, "a")
	unknown := strings.Repeat("ab", 32)

	res := n.update(t, allocations.Allocation{PersistentVMs: []string{ha}, Instances: []string{unknown}})
	if res.Success || !slices.Equal(res.Successful, []string{ha}) || !slices.Equal(res.Failing, []string{unknown}) {
		t.Fatalf("result: %+v", res)
	}
	if res.Errors[unknown] == "" || res.Errors[ha] != "" {
		t.Errorf("errors: %v", res.Errors)
	}
}

// A kept program is restarted when its sandbox dies, after a delay that
// grows while it keeps dying; it is neither stopped when idle nor
// evicted for another program.
func TestKeptProgramRestartsWithBackoff(t *testing.T) {
	st := pooltest.NewStore(t)
	n := newNode(t, st, "", func(o *pool.Options) {
		o.ReuseTimeout = 50 * time.Millisecond
		o.MaxExecutions = 1
	})
	ha, other := program(t, st, "a"), program(t, st, "other")
	if res := n.update(t, allocations.Allocation{PersistentVMs: []string{ha}}); !res.Success {
		t.Fatalf("%+v", res)
	}

	time.Sleep(300 * time.Millisecond) // six idle timeouts
	if n.b.Started() != 1 || len(n.b.Alive()) != 1 {
		t.Fatalf("the kept execution was stopped when idle: %d started, %d alive", n.b.Started(), len(n.b.Alive()))
	}
	_, err := n.p.Acquire(context.Background(), other)
	if errkind.Of(err) != errkind.NoCapacity {
		t.Fatalf("another program on a node full of a kept one: %v, want NoCapacity (no eviction)", err)
	}

	// Each death is followed by a restart; the gaps grow: 100, 200, 400,
	// 400 ms (Max).
	var gaps []time.Duration
	for i := 0; i < 4; i++ {
		s := n.b.Sandboxes()[i]
		<-s.Ready()
		s.Crash(errors.New("killed by the test"))
		died := time.Now()
		eventually(t, "restart", 3*time.Second, func() bool {
			return n.b.Started() == i+2 && len(n.running()) == 1
		})
		gaps = append(gaps, n.b.Sandboxes()[i+1].StartedAt.Sub(died))
	}
	for i, want := range []time.Duration{100, 200, 400, 400} {
		want *= time.Millisecond
		if gaps[i] < want || gaps[i] > want+300*time.Millisecond {
			t.Errorf("restart %d after %s, want about %s (all: %v)", i+1, gaps[i], want, gaps)
		}
	}
	if r := n.running(); !r[ha] {
		t.Errorf("after the restarts: %v, want a kept", r)
	}
}

// The allocation is saved atomically and a new manager (a supervisor
// restart) runs it again without a new POST.
func TestAllocationSurvivesRestart(t *testing.T) {
	st := pooltest.NewStore(t)
	state := filepath.Join(t.TempDir(), allocations.StateFile)
	ha, hb := program(t, st, "a"), program(t, st, "b")

	first := newNode(t, st, state, nil)
	first.update(t, allocations.Allocation{PersistentVMs: []string{ha, hb}})
	first.update(t, allocations.Allocation{PersistentVMs: []string{ha}})
	first.stop(t)
	if left, _ := filepath.Glob(state + ".tmp-*"); len(left) > 0 {
		t.Errorf("temporary files left: %v", left)
	}

	second := newNode(t, st, state, nil)
	if err := second.m.Restore(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the saved program runs", 5*time.Second, func() bool { return second.running()[ha] })
	if r := second.running(); len(r) != 1 {
		t.Errorf("running after restore: %v, want a only", r)
	}
	if got := second.m.Current().PersistentVMs; !slices.Equal(got, []string{ha}) {
		t.Errorf("restored allocation %v", got)
	}

	// A corrupt file is an error, not an empty allocation.
	if err := os.WriteFile(state, []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	third := newNode(t, st, state, nil)
	if err := third.m.Restore(); err == nil {
		t.Error("Restore accepted a corrupt state file")
	}
}
