package pool

import (
	"context"
	"errors"
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

// A spare is a sandbox started before any request, for the default runtime
// and default resources, with its guest channel open and (under gVisor)
// the interpreter already importing uvicorn and FastAPI. A cold request
// whose program matches takes it and only loads its code, which removes
// the sandbox and interpreter start from the request path.
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

// spareShape is what a spare was made for besides the default runtime and
// resources: a network is attached when the sandbox starts, so programs
// with and without the internet need spares of their own. The pool keeps
// one spare of each (the internet one only when networking works).
type spareShape struct {
	internet bool
}

func shapeOf(prog *sources.Program) spareShape {
	return spareShape{internet: prog.Content.Environment.Internet}
}

// SpareRuntime names the runtime spares are made for: the one most
// programs use (the local store's default).
type SpareRuntime func(ctx context.Context) (sources.File, error)

// spareFits tells whether a program can run in a spare: same runtime,
// default resources, nothing to attach at start.
func spareFits(prog *sources.Program, sp *spare) bool {
	vcpus, mem := resources(prog.Content)
	return prog.Runtime.Hash == sp.runtime.Hash && prog.Runtime.Hash != "" &&
		vcpus == message.DefaultVCPUs && mem == message.DefaultMemory &&
		prog.Data == nil && len(prog.Volumes) == 0
}

// takeSpare hands out the spare of the program's shape if the program fits
// it. The caller then either uses it and calls refillSpare, or gives it
// back with returnSpare.
func (p *Pool) takeSpare(prog *sources.Program) *spare {
	shape := shapeOf(prog)
	p.mu.Lock()
	sp := p.spare[shape]
	if sp == nil {
		p.mu.Unlock()
		p.refillSpare(shape) // never made, or the last attempt failed
		return nil
	}
	if !spareFits(prog, sp) {
		p.mu.Unlock()
		return nil
	}
	delete(p.spare, shape)
	p.mu.Unlock()
	if !sp.claim() { // its watcher saw it die and is discarding it
		return nil
	}
	return sp
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
	// Before the spare leaves the map: a cold request that finds no spare
	// refills at once, and must find the backoff already in place.
	p.spareDied(sp)
	p.mu.Lock()
	if p.spare[sp.shape] == sp {
		delete(p.spare, sp.shape)
	}
	p.mu.Unlock()
	p.log.Warn("spare sandbox died; replacing it", "execution", sp.id, "internet", sp.shape.internet,
		"idle_for", time.Since(sp.created).Round(time.Millisecond), "why", why)
	p.discardSpare(sp, why)
	p.refillSpare(sp.shape)
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
	b := p.spareBackoff[shape]
	if !failed {
		b.failures, b.notBefore = 0, time.Time{}
		p.spareBackoff[shape] = b
		return
	}
	b.failures++
	delay := sparesBackoffFirst << min(b.failures-1, 16)
	b.notBefore = time.Now().Add(min(delay, sparesBackoffMax))
	p.spareBackoff[shape] = b
}

// returnSpare puts back a spare that was taken but not changed (its
// program's code was refused), unless another took its place meanwhile.
func (p *Pool) returnSpare(sp *spare) {
	sp.output.setLogger(p.log.With("execution", sp.id, "spare", true))
	p.mu.Lock()
	if !p.draining && p.spare[sp.shape] == nil && !p.makingSpare[sp.shape] {
		select {
		case <-sp.inst.Done():
		default:
			// A fresh claim and watcher: the spare is idle again. A new
			// struct, since the old watcher may still read the old one.
			back := &spare{id: sp.id, stateDir: sp.stateDir, shape: sp.shape, runtime: sp.runtime,
				inst: sp.inst, client: sp.client, net: sp.net, output: sp.output, created: sp.created,
				taken: make(chan struct{})}
			p.spare[sp.shape] = back
			p.mu.Unlock()
			go p.watchSpare(back)
			return
		}
	}
	p.mu.Unlock()
	p.discardSpare(sp, "it could not be put back")
	p.refillSpare(sp.shape)
}

// refillSpare starts making a spare of shape unless one exists, is being
// made, is backing off after failures, or spares are off. Spares with the
// internet are made only when the pool can give networks.
func (p *Pool) refillSpare(shape spareShape) {
	if p.opts.SpareRuntime == nil || p.opts.Backend == nil {
		return
	}
	if shape.internet && p.opts.Networks == nil {
		return
	}
	p.mu.Lock()
	if p.draining || p.spare[shape] != nil || p.makingSpare[shape] {
		p.mu.Unlock()
		return
	}
	wait := time.Until(p.spareBackoff[shape].notBefore)
	p.makingSpare[shape] = true
	p.spares.Add(1)
	p.mu.Unlock()
	go func() {
		defer p.spares.Done()
		if wait > 0 {
			select {
			case <-time.After(wait):
			case <-p.quit:
				p.mu.Lock()
				delete(p.makingSpare, shape)
				p.mu.Unlock()
				return
			}
		}
		sp, err := p.makeSpare(shape)
		if err != nil {
			p.spareOutcome(shape, true)
		}
		p.mu.Lock()
		delete(p.makingSpare, shape)
		if err == nil && !p.draining {
			p.spare[shape] = sp
			go p.watchSpare(sp)
			sp = nil
		}
		b := p.spareBackoff[shape]
		p.mu.Unlock()
		if err != nil {
			p.log.Warn("could not make a spare sandbox", "internet", shape.internet, "err", err,
				"failures", b.failures, "next_attempt_in", time.Until(b.notBefore).Round(time.Second))
			return
		}
		if sp != nil { // made while shutting down
			p.discardSpare(sp, "the supervisor is shutting down")
		}
	}()
}

func (p *Pool) makeSpare(shape spareShape) (sp *spare, err error) {
	if _, ok := p.opts.Backend.(backend.SpareMaker); !ok {
		return nil, errors.New("backend " + p.opts.Backend.Name() + " cannot load code into a running sandbox")
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.opts.InitTimeout)
	defer cancel()
	rt, err := p.opts.SpareRuntime(ctx)
	if err != nil {
		return nil, err
	}
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
		VCPUs:         message.DefaultVCPUs,
		MemoryMiB:     message.DefaultMemory,
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
	log.Debug("spare sandbox ready", "internet", shape.internet)
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
	os.RemoveAll(sp.stateDir)
}

// stopSpares ends the idle spares and waits for those being made.
func (p *Pool) stopSpares() {
	p.quitOnce.Do(func() { close(p.quit) })
	p.mu.Lock()
	idle := make([]*spare, 0, len(p.spare))
	for shape, sp := range p.spare {
		idle = append(idle, sp)
		delete(p.spare, shape)
	}
	p.mu.Unlock()
	for _, sp := range idle {
		p.discardSpare(sp, "the supervisor is shutting down")
	}
	p.spares.Wait()
}
