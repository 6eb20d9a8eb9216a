package pool

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/network"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
)

// A spare is a sandbox started before any request for one shape (runtime,
// memory, vCPUs, internet or not), with its guest channel open and (under
// gVisor) the interpreter already importing uvicorn and FastAPI. A cold
// request whose program has that shape takes it and only loads its code,
// which removes the sandbox and interpreter start from the request path.
type spare struct {
	id       string
	stateDir string
	shape    spareShape
	runtime  sources.File
	inst     backend.Instance
	// client's session runs from the moment the sandbox is up, so the
	// agent's keepalives are answered while the spare waits.
	client   *guest.Client
	net      *network.Network // ready before any request, for internet programs
	output   *lineLogger
	created  time.Time
	taken    chan struct{} // closed when handed out or discarded
	takeOnce sync.Once
}

// claim marks the spare as no longer idle; only the first caller wins, so
// a spare is never both adopted and discarded by its watcher.
func (sp *spare) claim() bool {
	won := false
	sp.takeOnce.Do(func() { close(sp.taken); won = true })
	return won
}

// spareShape is everything fixed when a sandbox starts: a program can
// only take a spare started with its runtime, its resources, and a
// network if it asks for the internet.
type spareShape struct {
	runtime   string // content hash of the runtime image
	memoryMiB int
	vcpus     int
	internet  bool
}

// shapeOf gives the shape of the spare prog could run in, or false when
// no spare fits it: data and volumes are attached when a sandbox starts.
func shapeOf(prog *sources.Program) (spareShape, bool) {
	if prog.Runtime.Hash == "" || prog.Data != nil || len(prog.Volumes) > 0 {
		return spareShape{}, false
	}
	vcpus, mem := resources(prog.Content)
	return spareShape{runtime: prog.Runtime.Hash, memoryMiB: mem, vcpus: vcpus,
		internet: prog.Content.Environment.Internet}, true
}

// SpareRuntime names the runtime most programs use (the local store's
// default): its default shapes always have a spare, demand or not.
type SpareRuntime func(ctx context.Context) (sources.File, error)

// takeSpare hands out an idle spare of prog's shape, if any, lent until
// the caller uses it (spareUsed) or gives it back (returnSpare); without
// one, the cold start counts toward the shape's demand at once.
func (p *Pool) takeSpare(prog *sources.Program) *spare {
	if !p.sparesOn() {
		return nil
	}
	shape, ok := shapeOf(prog)
	if !ok || (shape.internet && p.opts.Networks == nil) {
		return nil
	}
	var sp *spare
	p.mu.Lock()
	st := p.shapeLocked(shape, prog.Runtime)
	// The oldest first: the longest warm, its imports surely done.
	for len(st.idle) > 0 && sp == nil {
		first := st.idle[0]
		st.idle = st.idle[1:]
		if first.claim() { // else its watcher saw it die and is discarding it
			sp = first
			st.lent++
		}
	}
	if sp == nil { // a cold start without a spare: demand now
		st.demandAdd(time.Now(), p.opts.SpareDemandHalfLife)
	}
	p.mu.Unlock()
	if sp == nil {
		p.reconcileSpares()
	}
	return sp
}

// spareUsed ends the lending of sp, which the cold start used (or lost):
// its demand counts, and a replacement may start.
func (p *Pool) spareUsed(sp *spare) {
	p.mu.Lock()
	if st := p.shapes[sp.shape]; st != nil {
		st.lent = max(st.lent-1, 0)
		st.demandAdd(time.Now(), p.opts.SpareDemandHalfLife)
	}
	p.mu.Unlock()
	p.reconcileSpares()
}

// watchSpare replaces an idle spare the moment it dies (sandbox exit or
// guest session lost), instead of letting the next request find it dead.
func (p *Pool) watchSpare(sp *spare) {
	var why string
	healthy := time.After(spareHealthyAfter)
	for why == "" {
		select {
		case <-healthy:
			p.spareOutcome(sp.shape, false) // it stays up: starts work again
		case <-sp.taken:
			return
		case <-sp.inst.Done():
			why = "the sandbox exited while idle"
			if err := sp.inst.Err(); err != nil {
				why += ": " + err.Error()
			}
		case <-sp.client.Closed():
			why = "its guest session ended while idle"
		}
	}
	if !sp.claim() {
		return // handed out at the same moment: the taker sees the death
	}
	// Before the spare leaves the pool: a cold request that finds no
	// spare refills at once, and must find the backoff already in place.
	p.spareDied(sp)
	p.mu.Lock()
	if st := p.shapes[sp.shape]; st != nil {
		st.remove(sp)
	}
	p.mu.Unlock()
	p.log.Warn("spare sandbox died; replacing it", "execution", sp.id, "internet", sp.shape.internet, "shape", sp.shape.String(),
		"idle_for", time.Since(sp.created).Round(time.Millisecond), "why", why)
	p.discardSpare(sp, why)
	p.reconcileSpares()
}

// alive tells whether the spare's sandbox and guest session are still up.
func (sp *spare) alive() bool {
	select {
	case <-sp.inst.Done():
		return false
	case <-sp.client.Closed():
		return false
	default:
		return true
	}
}

// spareDied counts a spare that died soon after it was made as a failed
// start, so that a sandbox that cannot stay up is not restarted in a
// tight loop.
func (p *Pool) spareDied(sp *spare) {
	p.spareOutcome(sp.shape, time.Since(sp.created) < spareHealthyAfter)
}

// Spare start backoff: after a failed start the next attempt waits
// sparesBackoffFirst, doubling with each consecutive failure up to
// sparesBackoffMax; a spare that stays up spareHealthyAfter resets it.
const (
	sparesBackoffFirst = time.Second
	sparesBackoffMax   = 5 * time.Minute
	spareHealthyAfter  = 30 * time.Second
)

// spareBackoff is the per-shape failure streak.
type spareBackoff struct {
	failures  int
	notBefore time.Time
}

// spareOutcome records how a spare start went, for the backoff.
func (p *Pool) spareOutcome(shape spareShape, failed bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := p.shapes[shape]
	if st == nil {
		return
	}
	if !failed {
		st.backoff = spareBackoff{}
		return
	}
	st.backoff.failures++
	delay := sparesBackoffFirst << min(st.backoff.failures-1, 16)
	st.backoff.notBefore = time.Now().Add(min(delay, sparesBackoffMax))
}

// returnSpare puts back a spare that was taken but not changed (its
// program's code was refused, or the node had no room for the program).
// No cold start took place, so it counts as no demand: refused code sent
// again and again must not crowd out other shapes.
func (p *Pool) returnSpare(sp *spare) {
	sp.output.setLogger(p.log.With("execution", sp.id, "spare", true))
	p.mu.Lock()
	st := p.shapes[sp.shape]
	if st != nil && st.lent > 0 {
		st.lent--
	}
	if st != nil && !p.draining && sp.alive() {
		// A fresh claim and watcher: the spare is idle again. A new
		// struct, since the old watcher may still read the old one.
		back := &spare{id: sp.id, stateDir: sp.stateDir, shape: sp.shape, runtime: sp.runtime,
			inst: sp.inst, client: sp.client, net: sp.net, output: sp.output, created: sp.created,
			taken: make(chan struct{})}
		st.idle = append([]*spare{back}, st.idle...) // still the oldest
		p.mu.Unlock()
		go p.watchSpare(back)
		p.reconcileSpares() // one too many now, if a replacement was made
		return
	}
	p.mu.Unlock()
	p.discardSpare(sp, "it could not be put back")
	p.reconcileSpares()
}

// DefaultSpareWarmLimit bounds how long a spare whose agent never says it
// is warm holds its start slot.
const DefaultSpareWarmLimit = 20 * time.Second

// releaseStartWhenWarm gives back sp's start slot once its interpreter's
// imports are done, whether it waits idle or was already taken (a taken
// spare still imports), or once it is gone. Until then another spare
// start would only slow this one and any cold start waiting for it: on
// two cores three spares importing at once made a cold start that took
// one of them wait 1.8 s instead of 0.1 s.
func (p *Pool) releaseStartWhenWarm(sp *spare) {
	limit := time.NewTimer(p.opts.SpareWarmLimit)
	defer limit.Stop()
	by := "agent"
	select {
	case <-sp.client.Warm():
	case <-sp.client.Closed():
		by = "end of its session"
	case <-sp.inst.Done():
		by = "end of its sandbox"
	case <-limit.C:
		by = "time limit"
	}
	p.log.Debug("spare warm", "execution", sp.id, "after", time.Since(sp.created).Round(time.Millisecond), "by", by)
	p.mu.Lock()
	p.makingTotal--
	p.mu.Unlock()
	p.reconcileSpares()
}

// startSpare makes one spare of shape in the background; the caller has
// counted it in st.making and p.spares.
func (p *Pool) startSpare(shape spareShape, rt sources.File) {
	go func() {
		defer p.spares.Done()
		sp, err := p.makeSpare(shape, rt)
		if err != nil {
			p.spareOutcome(shape, true)
		}
		p.mu.Lock()
		st := p.shapes[shape]
		st.making--
		if err == nil {
			// Takeable at once, but its start slot is held while it warms.
			go p.releaseStartWhenWarm(sp)
		} else {
			p.makingTotal--
		}
		if err == nil && !p.draining {
			st.idle = append(st.idle, sp)
			go p.watchSpare(sp)
			sp = nil
		}
		b := st.backoff
		p.mu.Unlock()
		if err != nil {
			p.log.Warn("could not make a spare sandbox", "internet", shape.internet, "shape", shape.String(), "err", err,
				"failures", b.failures, "next_attempt_in", time.Until(b.notBefore).Round(time.Second))
		}
		if sp != nil { // made while shutting down
			p.discardSpare(sp, "the supervisor is shutting down")
		}
		p.reconcileSpares()
	}()
}

func (p *Pool) makeSpare(shape spareShape, rt sources.File) (sp *spare, err error) {
	if _, ok := p.opts.Backend.(backend.SpareMaker); !ok {
		return nil, errors.New("backend " + p.opts.Backend.Name() + " cannot load code into a running sandbox")
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.opts.InitTimeout)
	defer cancel()
	id := uuid.NewString()
	dir, err := p.stateDir(id)
	if err != nil {
		return nil, err
	}
	log := p.log.With("execution", id, "spare", true)
	sp = &spare{id: id, stateDir: dir, shape: shape, runtime: rt, output: newLineLogger(log, p.opts.ProgramLogs),
		taken: make(chan struct{})}
	// Not sp itself: `return nil, err` has set it to nil by then.
	made := sp
	defer func() {
		if err != nil {
			p.discardSpare(made, err.Error())
		}
	}()
	if sp.net, err = p.network(ctx, id, shape.internet); err != nil {
		return nil, err
	}
	spec := backend.Spec{
		ExecutionID:   id,
		RuntimePath:   rt.Path,
		RuntimeHash:   rt.Hash,
		DeferCode:     true,
		Snapshot:      true,
		VCPUs:         shape.vcpus,
		MemoryMiB:     shape.memoryMiB,
		Internet:      shape.internet,
		StateDir:      dir,
		ProgramOutput: sp.output,
		Logger:        log,
	}
	if sp.net != nil {
		spec.Network = &sp.net.Network
	}
	if sp.inst, err = p.opts.Backend.Start(ctx, spec); err != nil {
		return nil, err
	}
	ch, err := sp.inst.Channel(ctx)
	if err != nil {
		return nil, err
	}
	if sp.client, err = guest.Dial(ch, log); err != nil {
		return nil, err
	}
	sp.created = time.Now()
	log.Debug("spare sandbox ready", "internet", shape.internet, "shape", shape.String())
	return sp, nil
}

// discardSpare frees whatever of the spare exists.
func (p *Pool) discardSpare(sp *spare, why string) {
	p.log.Debug("discarding spare sandbox", "execution", sp.id, "why", why)
	sp.claim()
	if sp.client != nil {
		sp.client.Close()
	}
	if sp.inst != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if err := sp.inst.Stop(ctx); err != nil {
			p.log.Warn("stopping spare sandbox", "err", err)
		}
		cancel()
	}
	p.releaseNetwork(sp.net, p.log)
	_ = os.RemoveAll(sp.stateDir)
}

// stopSpares ends the idle spares and waits for those being made.
func (p *Pool) stopSpares() {
	p.quitOnce.Do(func() { close(p.quit) })
	p.mu.Lock()
	var idle []*spare
	for _, st := range p.shapes {
		idle = append(idle, st.idle...)
		st.idle = nil
	}
	p.mu.Unlock()
	for _, sp := range idle {
		p.discardSpare(sp, "the supervisor is shutting down")
	}
	p.spares.Wait()
}

// dropSpareLocked takes the least useful idle spare out of the pool, to
// make room for a program; the caller discards it. p.mu must be held.
func (p *Pool) dropSpareLocked() *spare {
	now := time.Now()
	var worst *shapeState
	var worstValue float64
	for _, st := range p.shapes {
		if len(st.idle) == 0 {
			continue
		}
		v := st.value(len(st.idle), now, p.opts.SpareDemandHalfLife)
		if worst == nil || v < worstValue {
			worst, worstValue = st, v
		}
	}
	if worst == nil {
		return nil
	}
	sp := worst.idle[len(worst.idle)-1]
	worst.idle = worst.idle[:len(worst.idle)-1]
	if !sp.claim() {
		return nil // dying: its watcher discards it
	}
	worst.dropping++
	return sp
}

// dropSpare discards a spare taken by dropSpareLocked; its memory stays
// counted until its sandbox is gone.
func (p *Pool) dropSpare(sp *spare, why string) {
	p.discardSpare(sp, why)
	p.mu.Lock()
	if st := p.shapes[sp.shape]; st != nil {
		st.dropping--
	}
	p.mu.Unlock()
}

// remove takes sp out of the idle list, if it is there.
func (st *shapeState) remove(sp *spare) {
	for i, s := range st.idle {
		if s == sp {
			st.idle = append(st.idle[:i], st.idle[i+1:]...)
			return
		}
	}
}

// String names a shape in logs.
func (s spareShape) String() string {
	net := "no-internet"
	if s.internet {
		net = "internet"
	}
	short := s.runtime
	if len(short) > 12 {
		short = short[:12]
	}
	return fmt.Sprintf("%s/%dMiB/%dvcpu/%s", short, s.memoryMiB, s.vcpus, net)
}

// defaultShapes are the shapes of the default runtime with default
// resources: both are common (the SDKs default to the internet, tests and
// simple functions go without), so they keep a spare without demand.
func (p *Pool) defaultShapes(rt sources.File) []spareShape {
	shapes := []spareShape{{runtime: rt.Hash, memoryMiB: message.DefaultMemory, vcpus: message.DefaultVCPUs}}
	if p.opts.Networks != nil {
		shapes = append(shapes, spareShape{runtime: rt.Hash, memoryMiB: message.DefaultMemory,
			vcpus: message.DefaultVCPUs, internet: true})
	}
	return shapes
}
