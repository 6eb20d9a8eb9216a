package pool

import (
	"context"
	"math"
	"runtime"
	"sort"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
)

// How many spares each shape gets. Every cold start a spare could serve
// adds one to its shape's demand, which halves every SpareDemandHalfLife;
// a shape wants ceil(demand - minDemand) spares (at most
// maxSparesPerShape), so a shape seen once keeps one spare for a few
// half-lives, and a burst of n cold starts keeps n ready for the next
// burst. The k-th spare of a shape is worth demand/k; the budget
// (SpareMemoryMiB, and what executions leave of the node's memory) goes
// to the most valuable spares first, so the least useful shape loses its
// spares first when memory runs short.
const (
	// DefaultSpareMemoryMiB bounds the memory of all spares together
	// unless Options say otherwise.
	DefaultSpareMemoryMiB = 1024
	// DefaultSpareDemandHalfLife is how fast a shape's demand is forgotten.
	DefaultSpareDemandHalfLife = 3 * time.Minute
	maxSparesPerShape          = 8
	// minDemand: below it a shape has no spare (about 3.3 half-lives
	// after a single cold start) and is forgotten.
	minDemand = 0.1
	// floorValue is what the default shapes' one spare is worth without
	// demand: half a recent cold start.
	floorValue = 0.5
)

// shapeState is the pool's account of one shape. p.mu guards it.
type shapeState struct {
	shape spareShape
	rt    sources.File // where the runtime is, from the latest program seen
	// demand is the decayed count of cold starts, as of at.
	demand float64
	at     time.Time
	floor  int // spares kept without demand (the default shapes: 1)

	idle   []*spare
	making int // being started
	// lent: handed to a cold start that has not used it yet. Counted
	// until then, so that a spare given back (code refused, no room)
	// does not leave a needless replacement behind.
	lent       int
	dropping   int // taken out, their sandbox not yet stopped
	backoff    spareBackoff
	retryArmed bool // a reconcile waits for the backoff to end
}

func (st *shapeState) decay(now time.Time, halfLife time.Duration) {
	if !st.at.IsZero() && now.After(st.at) {
		st.demand *= math.Exp2(-now.Sub(st.at).Seconds() / halfLife.Seconds())
	}
	st.at = now
}

func (st *shapeState) demandAdd(now time.Time, halfLife time.Duration) {
	st.decay(now, halfLife)
	st.demand++
}

// depth is how many spares the shape wants now.
func (st *shapeState) depth(now time.Time, halfLife time.Duration) int {
	st.decay(now, halfLife)
	d := 0
	if st.demand > minDemand {
		d = int(math.Ceil(st.demand - minDemand))
	}
	return min(max(d, st.floor), maxSparesPerShape)
}

// value is what the shape's k-th spare (from 1) is worth.
func (st *shapeState) value(k int, now time.Time, halfLife time.Duration) float64 {
	st.decay(now, halfLife)
	v := st.demand / float64(k)
	if k <= st.floor {
		v = max(v, floorValue)
	}
	return v
}

// held is the memory the shape's spares hold or are about to.
func (st *shapeState) held() int {
	return (len(st.idle) + st.making + st.dropping + st.lent) * st.shape.memoryMiB
}

func (p *Pool) sparesOn() bool {
	return p.opts.SpareRuntime != nil && p.opts.Backend != nil
}

// shapeLocked returns the account of shape, made on first use. p.mu must
// be held.
func (p *Pool) shapeLocked(shape spareShape, rt sources.File) *shapeState {
	st := p.shapes[shape]
	if st == nil {
		st = &shapeState{shape: shape}
		p.shapes[shape] = st
	}
	if rt.Path != "" {
		st.rt = rt
	}
	return st
}

// lentMemoryLocked is the memory of spares lent to cold starts, which
// admission counts as theirs. p.mu must be held.
func (p *Pool) lentMemoryLocked() int {
	return p.sumShapesLocked(func(st *shapeState) int { return st.lent * st.shape.memoryMiB })
}

// spareMemoryLocked is the memory all spares hold. p.mu must be held.
func (p *Pool) spareMemoryLocked() int { return p.sumShapesLocked((*shapeState).held) }

// droppingMemoryLocked is the memory of spares being stopped. p.mu must
// be held.
func (p *Pool) droppingMemoryLocked() int {
	return p.sumShapesLocked(func(st *shapeState) int { return st.dropping * st.shape.memoryMiB })
}

// sumShapesLocked adds f over every shape. p.mu must be held.
func (p *Pool) sumShapesLocked(f func(*shapeState) int) int {
	n := 0
	for _, st := range p.shapes {
		n += f(st)
	}
	return n
}

// spareBudgetLocked is the memory spares may hold now: the setting, less
// what executions and starts waiting for room need of the node's memory.
func (p *Pool) spareBudgetLocked() int {
	b := p.opts.SpareMemoryMiB
	if c := p.opts.Capacity.MemoryMiB; c > 0 {
		execs, _, _ := p.executionsCommittedLocked()
		b = min(b, c-execs-p.waitingMiB)
	}
	return b
}

// planSparesLocked says how many spares each shape should have: the most
// valuable spares that fit the budget. p.mu must be held.
func (p *Pool) planSparesLocked(now time.Time) map[*shapeState]int {
	type candidate struct {
		st    *shapeState
		k     int
		value float64
	}
	hl := p.opts.SpareDemandHalfLife
	var cands []candidate
	for _, st := range p.shapes {
		if st.shape.internet && p.opts.Networks == nil {
			continue
		}
		for k := 1; k <= st.depth(now, hl); k++ {
			cands = append(cands, candidate{st, k, st.value(k, now, hl)})
		}
	}
	sort.Slice(cands, func(i, j int) bool {
		a, b := cands[i], cands[j]
		if a.value != b.value {
			return a.value > b.value
		}
		if a.k != b.k {
			return a.k < b.k
		}
		return a.st.shape.String() < b.st.shape.String()
	})
	budget := p.spareBudgetLocked()
	want := map[*shapeState]int{}
	used := 0
	for _, c := range cands {
		mem := c.st.shape.memoryMiB
		if want[c.st] != c.k-1 || used+mem > budget {
			continue // a cheaper shape may still fit
		}
		used += mem
		want[c.st] = c.k
	}
	return want
}

// reconcileSpares brings every shape to its planned number of spares:
// surplus idle spares are stopped (newest first), missing ones started,
// at most SpareStartsAtOnce at a time and never beyond the budget. It is
// called on every change (a cold start, a spare made, taken or lost) and
// on a timer, as demand decays.
func (p *Pool) reconcileSpares() {
	if !p.sparesOn() {
		return
	}
	now := time.Now()
	p.mu.Lock()
	if p.draining {
		p.mu.Unlock()
		return
	}
	want := p.planSparesLocked(now)
	// Idle spares beyond the plan go; those being made are dropped when
	// ready, unless the budget needs their room at once.
	var drop []*spare
	for _, st := range p.shapes {
		for len(st.idle) > 0 && len(st.idle)+st.lent > want[st] {
			sp := st.idle[len(st.idle)-1] // the newest: the oldest are taken first
			st.idle = st.idle[:len(st.idle)-1]
			if sp.claim() { // else it is dying and its watcher discards it
				st.dropping++
				drop = append(drop, sp)
			}
		}
	}
	for p.spareMemoryLocked()-p.droppingMemoryLocked() > p.spareBudgetLocked() {
		sp := p.dropSpareLocked()
		if sp == nil {
			break
		}
		drop = append(drop, sp)
	}
	starts := p.sparesToStartLocked(want, now)
	for key, st := range p.shapes {
		if want[st] == 0 && st.floor == 0 && st.held() == 0 && st.demand < minDemand && st.backoff.failures == 0 {
			delete(p.shapes, key)
		}
	}
	// Counted under the lock: Shutdown waits for them once draining.
	p.spares.Add(len(drop))
	p.mu.Unlock()
	for _, sp := range drop {
		go func() {
			defer p.spares.Done()
			p.dropSpare(sp, "past its shape's demand or over the spares' memory budget")
			p.reconcileSpares()
		}()
	}
	for _, s := range starts {
		p.startSpare(s.shape, s.rt)
	}
}

// spareStart is one spare to start: its shape and where its runtime is,
// as they were when it was counted.
type spareStart struct {
	shape spareShape
	rt    sources.File
}

// sparesToStartLocked counts in, and returns, the spares to start now,
// most valuable shape first. p.mu must be held.
func (p *Pool) sparesToStartLocked(want map[*shapeState]int, now time.Time) []spareStart {
	short := make([]*shapeState, 0, len(want))
	for st, n := range want {
		if len(st.idle)+st.making+st.lent < n {
			short = append(short, st)
		}
	}
	hl := p.opts.SpareDemandHalfLife
	sort.Slice(short, func(i, j int) bool {
		a, b := short[i], short[j]
		va := a.value(len(a.idle)+a.making+a.lent+1, now, hl)
		vb := b.value(len(b.idle)+b.making+b.lent+1, now, hl)
		if va != vb {
			return va > vb
		}
		return a.shape.String() < b.shape.String()
	})
	budget := p.spareBudgetLocked()
	used := p.spareMemoryLocked()
	var starts []spareStart
	for _, st := range short {
		if wait := time.Until(st.backoff.notBefore); wait > 0 {
			p.retryAfterLocked(st, wait)
			continue
		}
		for len(st.idle)+st.making+st.lent < want[st] && p.makingTotal < p.opts.SpareStartsAtOnce &&
			used+st.shape.memoryMiB <= budget {
			st.making++
			p.makingTotal++
			used += st.shape.memoryMiB
			p.spares.Add(1)
			starts = append(starts, spareStart{st.shape, st.rt})
		}
	}
	return starts
}

// retryAfterLocked reconciles again when st's backoff ends.
func (p *Pool) retryAfterLocked(st *shapeState, wait time.Duration) {
	if st.retryArmed {
		return
	}
	st.retryArmed = true
	time.AfterFunc(wait, func() {
		p.mu.Lock()
		st.retryArmed = false
		p.mu.Unlock()
		p.reconcileSpares()
	})
}

// runSpares keeps the default shapes' spares and lets demand decay.
func (p *Pool) runSpares() {
	defer p.spares.Done()
	period := min(max(p.opts.SpareDemandHalfLife/8, 50*time.Millisecond), 15*time.Second)
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		p.refreshDefaultShapes()
		p.reconcileSpares()
		select {
		case <-p.quit:
			return
		case <-t.C:
		}
	}
}

// refreshDefaultShapes gives the default runtime's default shapes their
// floor of one spare, and takes it from those of a former default.
func (p *Pool) refreshDefaultShapes() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rt, err := p.opts.SpareRuntime(ctx)
	if err != nil {
		p.log.Debug("no default runtime for spares yet", "err", err)
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, st := range p.shapes {
		if st.shape.runtime != rt.Hash {
			st.floor = 0
		}
	}
	for _, shape := range p.defaultShapes(rt) {
		p.shapeLocked(shape, rt).floor = 1
	}
}

// defaultSpareStarts is how many spares start at once: a start is mostly
// CPU (runsc, then Python's imports), so about one per core, and a few at
// most so that requests keep theirs.
func defaultSpareStarts() int {
	return min(max(runtime.NumCPU(), 1), 4)
}

// SpareInfo describes the spares of one shape.
type SpareInfo struct {
	RuntimeHash string  `json:"runtime"`
	MemoryMiB   int     `json:"memory"`
	VCPUs       int     `json:"vcpus"`
	Internet    bool    `json:"internet"`
	Idle        int     `json:"idle"`     // ready to take
	Starting    int     `json:"starting"` // being made
	Stopping    int     `json:"stopping"` // dropped, not yet stopped
	Lent        int     `json:"lent"`     // taken by a cold start, not yet used
	Demand      float64 `json:"demand"`   // decayed count of recent cold starts
}

// Spares describes the spares of every shape the pool knows.
func (p *Pool) Spares() []SpareInfo {
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]SpareInfo, 0, len(p.shapes))
	for _, st := range p.shapes {
		st.decay(now, p.opts.SpareDemandHalfLife)
		s := st.shape
		out = append(out, SpareInfo{RuntimeHash: s.runtime, MemoryMiB: s.memoryMiB, VCPUs: s.vcpus,
			Internet: s.internet, Idle: len(st.idle), Starting: st.making, Stopping: st.dropping, Lent: st.lent,
			Demand: st.demand})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Demand > out[j].Demand })
	return out
}
