package pool

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
)

// Capacity is what the node may commit to executions at once. Each
// execution reserves its program's memory and vCPUs from the moment its
// start is admitted until it stopped; a start that would go over is
// refused with errkind.NoCapacity after idle executions were evicted,
// least recently used first. Zero fields are unbounded.
type Capacity struct {
	MemoryMiB int // physical memory less the host's reserve
	VCPUs     int // cores times the overcommit factor
	// MaxShare is the part of MemoryMiB and of VCPUs one execution may
	// reserve (MAX_EXECUTION_SHARE), unless its program is kept (run for
	// an allocation); 0 or 1 and above: no cap. A program above it is
	// refused at once, never admitted by evicting others: one request
	// to a node-sized program would otherwise stop every idle program
	// and hold the whole node for as long as it runs.
	MaxShare float64
	// MaxVolumeMiB caps the size_mib of one volume (MAX_VOLUME_SIZE_MIB);
	// 0: no cap.
	MaxVolumeMiB int
}

// shareLimits is what one execution that is not kept may reserve: never
// less than a default program (1 vCPU, its memory), so a small node still
// runs those.
func (c Capacity) shareLimits() (vcpus, memoryMiB int, ok bool) {
	if c.MaxShare <= 0 || c.MaxShare >= 1 {
		return 0, 0, false
	}
	if c.VCPUs > 0 {
		vcpus = max(message.DefaultVCPUs, int(float64(c.VCPUs)*c.MaxShare))
	}
	if c.MemoryMiB > 0 {
		memoryMiB = max(message.DefaultMemory, int(float64(c.MemoryMiB)*c.MaxShare))
	}
	return vcpus, memoryMiB, true
}

// DefaultCapacityWait is how long a start waits for room before it is
// refused, unless Options say otherwise.
const DefaultCapacityWait = 5 * time.Second

// insufficientCapacity is what clients read when the node is full, as
// aleph-vm words its 503 "Insufficient capacity".
const insufficientCapacity = "This CRN cannot host the requested workload at this time."

// executionsCommittedLocked sums the reservations of every execution not
// yet fully stopped. p.mu must be held.
func (p *Pool) executionsCommittedLocked() (memoryMiB, vcpus, count int) {
	for e := range p.all {
		v, m := resources(e.prog.Content)
		memoryMiB += m
		vcpus += v
		count++
	}
	return memoryMiB, vcpus, count
}

// committedLocked is executionsCommittedLocked with the memory of spares,
// which are sandboxes too (idle ones use no CPU and are not executions);
// a spare lent to a start is that start's.
// p.mu must be held.
func (p *Pool) committedLocked() (memoryMiB, vcpus, count int) {
	memoryMiB, vcpus, count = p.executionsCommittedLocked()
	return memoryMiB + p.spareMemoryLocked() - p.lentMemoryLocked(), vcpus, count
}

// shortfallLocked says why prog cannot be admitted now, or "" if it can.
func (p *Pool) shortfallLocked(prog *sources.Program) string {
	cm, cv, n := p.committedLocked()
	return p.shortOf(prog, cm, cv, n)
}

// shortOf says why prog does not fit beside what is committed.
func (p *Pool) shortOf(prog *sources.Program, cm, cv, n int) string {
	vcpus, mem := resources(prog.Content)
	c := p.opts.Capacity
	switch {
	case p.opts.MaxExecutions > 0 && n+1 > p.opts.MaxExecutions:
		return fmt.Sprintf("executions: %d running, limit %d", n, p.opts.MaxExecutions)
	case c.MemoryMiB > 0 && cm+mem > c.MemoryMiB:
		return fmt.Sprintf("memory: required %d MiB, committed %d MiB, capacity %d MiB", mem, cm, c.MemoryMiB)
	case c.VCPUs > 0 && cv+vcpus > c.VCPUs:
		return fmt.Sprintf("vCPUs: required %d, committed %d, capacity %d", vcpus, cv, c.VCPUs)
	}
	return ""
}

// evictionHelpsLocked tells whether stopping every idle execution that
// may be evicted, and every spare, would make room for prog. When it
// would not (the node is full of busy executions), evicting idle ones
// only costs them their warm state: each would come back as a cold
// start on a node still full, and be refused in turn.
// p.mu must be held.
func (p *Pool) evictionHelpsLocked(prog *sources.Program) bool {
	cm, cv, n := p.committedLocked()
	cm -= p.spareMemoryLocked() - p.lentMemoryLocked()
	for _, e := range p.running {
		if p.isKept(e.hash) {
			continue
		}
		if _, ok := e.idleSince(); ok {
			v, m := resources(e.prog.Content)
			cm, cv, n = cm-m, cv-v, n-1
		}
	}
	return p.shortOf(prog, cm, cv, n) == ""
}

// neverFits tells a program that no amount of eviction can admit, or
// that may not take so much of the node.
func (p *Pool) neverFits(prog *sources.Program) string {
	vcpus, mem := resources(prog.Content)
	c := p.opts.Capacity
	if maxV, maxM, ok := c.shareLimits(); ok && !p.isKept(prog.Hash) {
		switch {
		case maxV > 0 && vcpus > maxV:
			return fmt.Sprintf("vCPUs: required %d, at most %d per program on this node (MAX_EXECUTION_SHARE %g of %d)", vcpus, maxV, c.MaxShare, c.VCPUs)
		case maxM > 0 && mem > maxM:
			return fmt.Sprintf("memory: required %d MiB, at most %d MiB per program on this node (MAX_EXECUTION_SHARE %g of %d MiB)", mem, maxM, c.MaxShare, c.MemoryMiB)
		}
	}
	switch {
	case c.MemoryMiB > 0 && mem > c.MemoryMiB:
		return fmt.Sprintf("memory: required %d MiB, capacity %d MiB", mem, c.MemoryMiB)
	case c.VCPUs > 0 && vcpus > c.VCPUs:
		return fmt.Sprintf("vCPUs: required %d, capacity %d", vcpus, c.VCPUs)
	}
	return ""
}

// admit reserves prog's resources for exec, stopping spares (least
// useful first) and then idle executions (least recently used first) when
// the node is full. It returns an errkind.NoCapacity error when even that
// is not enough.
func (p *Pool) admit(ctx context.Context, exec *Execution) error {
	if err := p.volumesRefused(exec.prog); err != nil {
		p.log.Warn("refusing program: volume too large", "program", exec.hash, "err", err)
		return err
	}
	if why := p.neverFits(exec.prog); why != "" {
		return p.refuse(exec, why)
	}
	_, mem := resources(exec.prog.Content)
	waiting := false
	defer func() {
		if waiting {
			p.mu.Lock()
			p.waitingMiB -= mem
			p.mu.Unlock()
		}
	}()
	// A node full of busy executions may have room a moment later (a
	// request ends, an execution idles out): wait a little before 503.
	deadline := time.Now().Add(p.opts.CapacityWait)
	for {
		p.mu.Lock()
		if p.draining {
			p.mu.Unlock()
			return errkind.New(errkind.ShuttingDown, "supervisor is shutting down")
		}
		why := p.shortfallLocked(exec.prog)
		if why == "" {
			p.all[exec] = struct{}{}
			p.stopped.Add(1)
			p.mu.Unlock()
			return nil
		}
		if !waiting { // spares being made now give way when they are ready
			waiting = true
			p.waitingMiB += mem
		}
		if sp := p.spareInTheWayLocked(mem); sp != nil {
			p.mu.Unlock()
			p.dropSpare(sp, "a program needs its memory")
			continue
		}
		var victim *Execution
		if p.evictionHelpsLocked(exec.prog) {
			victim = p.idlestLocked()
		}
		p.mu.Unlock()
		if victim != nil {
			victim.log.Info("evicting idle execution to make room", "for", exec.hash, "short_of", why)
			victim.stopGracefully(ctx)
			continue
		}
		if time.Now().After(deadline) {
			return p.refuse(exec, why)
		}
		select {
		case <-ctx.Done():
			return p.refuse(exec, why)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// volumesRefused refuses a program with a volume larger than this node
// allows, before anything is reserved or made for it.
func (p *Pool) volumesRefused(prog *sources.Program) error {
	limit := p.opts.Capacity.MaxVolumeMiB
	if limit <= 0 {
		return nil
	}
	for _, v := range prog.Volumes {
		if v.Volume.SizeMiB > limit {
			return errkind.New(errkind.InvalidInput,
				"volume %s: size_mib %d refused: this node allows at most %d MiB per volume (MAX_VOLUME_SIZE_MIB)",
				v.Volume.Mount, v.Volume.SizeMiB, limit)
		}
	}
	return nil
}

func (p *Pool) refuse(exec *Execution, why string) error {
	p.log.Warn("refusing program: insufficient capacity", "program", exec.hash, "short_of", why)
	return errkind.New(errkind.NoCapacity, "Insufficient capacity: %s (%s)", insufficientCapacity, why)
}

// spareInTheWayLocked takes out the least useful idle spare when memory
// is what the node is short of, for the caller to drop. p.mu must be held.
func (p *Pool) spareInTheWayLocked(mem int) *spare {
	cm, _, _ := p.committedLocked()
	if c := p.opts.Capacity.MemoryMiB; c <= 0 || cm+mem <= c {
		return nil
	}
	return p.dropSpareLocked()
}

// idlestLocked returns the running execution without requests in flight
// that was used least recently, or nil; kept executions are never
// chosen. p.mu must be held.
func (p *Pool) idlestLocked() *Execution {
	var idle []*Execution
	for _, e := range p.running {
		if p.isKept(e.hash) {
			continue // persistent: never evicted
		}
		if _, ok := e.idleSince(); ok {
			idle = append(idle, e)
		}
	}
	if len(idle) == 0 {
		return nil
	}
	sort.Slice(idle, func(i, j int) bool {
		a, _ := idle[i].idleSince()
		b, _ := idle[j].idleSince()
		return a.Before(b)
	})
	return idle[0]
}

// idleSince tells when the execution's last request ended, if it is
// running with none in flight.
func (e *Execution) idleSince() (time.Time, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.state != stateRunning || e.inFlight > 0 {
		return time.Time{}, false
	}
	if e.lastUsed.IsZero() {
		return e.started, true
	}
	return e.lastUsed, true
}
