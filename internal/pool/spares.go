package pool

import (
	"context"
	"errors"
	"io"
	"os"
	"time"

	"github.com/google/uuid"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
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
	runtime  sources.File
	inst     backend.Instance
	ch       io.ReadWriteCloser
	output   *lineLogger
	created  time.Time
}

// SpareRuntime names the runtime spares are made for: the one most
// programs use (the local store's default).
type SpareRuntime func(ctx context.Context) (sources.File, error)

// spareMatches tells whether a program can run in a spare: same runtime,
// default resources, nothing to attach at start.
func (p *Pool) spareMatches(prog *sources.Program, sp *spare) bool {
	vcpus, mem := resources(prog.Content)
	return prog.Runtime.Hash == sp.runtime.Hash && prog.Runtime.Hash != "" &&
		vcpus == message.DefaultVCPUs && mem == message.DefaultMemory &&
		prog.Data == nil && len(prog.Volumes) == 0
}

// takeSpare hands out the spare if the program fits it, and starts making
// the next one.
func (p *Pool) takeSpare(prog *sources.Program) *spare {
	p.mu.Lock()
	sp := p.spare
	if sp == nil {
		p.mu.Unlock()
		p.refillSpare() // the last attempt may have failed (no runtime yet)
		return nil
	}
	if !p.spareMatches(prog, sp) {
		p.mu.Unlock()
		return nil
	}
	p.spare = nil
	p.mu.Unlock()
	select {
	case <-sp.inst.Done(): // died while waiting: not worth handing out
		p.discardSpare(sp, "it exited while idle")
		p.refillSpare()
		return nil
	default:
	}
	p.refillSpare()
	return sp
}

// refillSpare starts making a spare unless one exists, is being made, or
// spares are off.
func (p *Pool) refillSpare() {
	if p.opts.SpareRuntime == nil || p.opts.Backend == nil {
		return
	}
	p.mu.Lock()
	if p.draining || p.spare != nil || p.makingSpare {
		p.mu.Unlock()
		return
	}
	p.makingSpare = true
	p.spares.Add(1)
	p.mu.Unlock()
	go func() {
		defer p.spares.Done()
		sp, err := p.makeSpare()
		p.mu.Lock()
		p.makingSpare = false
		if err == nil && !p.draining {
			p.spare = sp
			sp = nil
		}
		p.mu.Unlock()
		if err != nil {
			p.log.Info("no spare sandbox", "err", err)
			return
		}
		if sp != nil { // made while shutting down
			p.discardSpare(sp, "the supervisor is shutting down")
		}
	}()
}

func (p *Pool) makeSpare() (*spare, error) {
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
	output := &lineLogger{log: log}
	inst, err := p.opts.Backend.Start(ctx, backend.Spec{
		ExecutionID:   id,
		RuntimePath:   rt.Path,
		RuntimeHash:   rt.Hash,
		DeferCode:     true,
		VCPUs:         message.DefaultVCPUs,
		MemoryMiB:     message.DefaultMemory,
		StateDir:      dir,
		ProgramOutput: output,
		Logger:        log,
	})
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	if _, ok := inst.(backend.CodeLoader); !ok {
		_ = inst.Stop(ctx)
		os.RemoveAll(dir)
		return nil, errors.New("backend " + p.opts.Backend.Name() + " cannot load code into a running sandbox")
	}
	ch, err := inst.Channel(ctx)
	if err != nil {
		_ = inst.Stop(ctx)
		os.RemoveAll(dir)
		return nil, err
	}
	log.Debug("spare sandbox ready")
	return &spare{id: id, stateDir: dir, runtime: rt, inst: inst, ch: ch, output: output, created: time.Now()}, nil
}

func (p *Pool) discardSpare(sp *spare, why string) {
	p.log.Debug("discarding spare sandbox", "execution", sp.id, "why", why)
	sp.ch.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := sp.inst.Stop(ctx); err != nil {
		p.log.Warn("stopping spare sandbox", "err", err)
	}
	os.RemoveAll(sp.stateDir)
}

// stopSpares ends the idle spare and waits for one being made.
func (p *Pool) stopSpares() {
	p.mu.Lock()
	sp := p.spare
	p.spare = nil
	p.mu.Unlock()
	if sp != nil {
		p.discardSpare(sp, "the supervisor is shutting down")
	}
	p.spares.Wait()
}
