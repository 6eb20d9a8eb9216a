// Package pool owns executions: one running sandbox per program hash,
// created on the first request, shared by concurrent requests, kept warm
// for REUSE_TIMEOUT after the last one, and recorded when it stops.
package pool

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/metrics"
	"github.com/aleph-vm-go/vm-supervisor/internal/network"
	"github.com/aleph-vm-go/vm-supervisor/internal/proglog"
	"github.com/aleph-vm-go/vm-supervisor/internal/records"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
)

// ProgramSource resolves a program hash to everything needed to run it.
type ProgramSource interface {
	Program(ctx context.Context, hash string) (*sources.Program, error)
}

// RecordWriter stores one row per execution, saved when it starts and
// again when it ends (*records.DB).
type RecordWriter interface {
	Save(ctx context.Context, r records.Record) error
}

// Options configure a Pool.
type Options struct {
	Source  ProgramSource
	Backend backend.Backend // nil: every start fails with errkind.NoBackend
	// BackendError explains why Backend is nil.
	BackendError error
	Records      RecordWriter // optional
	ReuseTimeout time.Duration
	InitTimeout  time.Duration
	// ExecutionRoot holds one private state directory per execution.
	ExecutionRoot string
	// PersistentDir holds persistent volumes (PERSISTENT_VOLUMES_DIR).
	PersistentDir string
	// GuestAPI returns the handler of the API a program reaches from inside
	// its sandbox (ALEPH_API_UNIX_SOCKET); nil leaves calls unanswered.
	GuestAPI func(prog *sources.Program) http.Handler
	// AlephEnv is added to every program's environment (ALEPH_API_HOST...).
	AlephEnv map[string]string
	// SpareRuntime, when set, turns spares on: pre-warmed sandboxes for
	// every shape of program in recent demand, and always one for that
	// runtime with default resources (sparesplan.go).
	SpareRuntime SpareRuntime
	// SpareMemoryMiB bounds the memory of all spares together; it is also
	// reserved from Capacity, and given back whenever a program needs it
	// (0: DefaultSpareMemoryMiB).
	SpareMemoryMiB int
	// SpareDemandHalfLife is how fast the demand of a shape is forgotten
	// (0: DefaultSpareDemandHalfLife).
	SpareDemandHalfLife time.Duration
	// SpareStartsAtOnce bounds spares being started together (0: one per
	// core, at most 4). A spare counts until its agent says that its
	// interpreter is warm (guest.StreamWarm), at most SpareWarmLimit:
	// a sandbox that is up but still importing keeps a core busy.
	SpareStartsAtOnce int
	// SpareWarmLimit is how long a spare whose agent never says it is
	// warm counts as starting (0: DefaultSpareWarmLimit).
	SpareWarmLimit time.Duration
	// Networks gives programs with environment.internet a network of
	// their own; nil means they run with loopback only.
	Networks Networks
	// NetworkError explains why Networks is nil although networking is
	// enabled: programs asking for the internet are then refused with it.
	NetworkError error
	// MaxExecutions bounds concurrently running sandboxes; 0 = unbounded.
	MaxExecutions int
	// Capacity bounds the memory and vCPUs reserved by executions.
	Capacity Capacity
	// CapacityWait is how long a start waits for room on a full node
	// before it is refused (0: DefaultCapacityWait).
	CapacityWait time.Duration
	// MaxRequestTimeout caps a program's resources.seconds (0: no cap).
	MaxRequestTimeout time.Duration
	// MaxResponseHeaderBytes bounds the head of a program's answer (0:
	// syncrt.DefaultMaxResponseHeaderBytes).
	MaxResponseHeaderBytes int64
	// ProgramLogs bounds what programs may write to the supervisor's log.
	ProgramLogs LogLimits
	// Logs keeps each program's output for its owner (nil: not kept).
	Logs *proglog.Registry
	// Metrics receives cold starts and spare hits, and reads the pool's
	// state when scraped; nil records nothing.
	Metrics *metrics.Metrics
	Logger  *slog.Logger
}

// Networks hands out and takes back execution networks
// (*network.Manager).
type Networks interface {
	Allocate(ctx context.Context, execution string, link network.Link) (*network.Network, error)
	Release(n *network.Network) error
}

// Pool is safe for concurrent use.
type Pool struct {
	opts Options
	log  *slog.Logger

	mu       sync.Mutex
	running  map[string]*Execution // by program hash, only usable executions
	starting map[string]*startCall
	all      map[*Execution]struct{} // every execution not yet fully stopped
	draining bool
	stopped  sync.WaitGroup
	cpuDone  float64 // CPU seconds of the sandboxes of finished executions

	shapes      map[spareShape]*shapeState
	makingTotal int // spares being started or still warming up, all shapes
	// waitingMiB is the memory of starts waiting for room: spares give
	// it up first.
	waitingMiB int
	spares     sync.WaitGroup
	quit       chan struct{} // closed at Shutdown: the spares' timer ends
	quitOnce   sync.Once

	// kept holds the hashes the node keeps running (Keep). Its own lock:
	// executions read it while holding their mutex, and p.mu is taken
	// before execution mutexes elsewhere.
	keptMu sync.Mutex
	kept   map[string]bool
}

// startCall lets concurrent cold requests for one hash share one start.
type startCall struct {
	done chan struct{}
	exec *Execution
	err  error
}

// New returns an empty pool.
func New(opts Options) *Pool {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.CapacityWait <= 0 {
		opts.CapacityWait = DefaultCapacityWait
	}
	if opts.InitTimeout <= 0 {
		opts.InitTimeout = 20 * time.Second
	}
	if opts.SpareMemoryMiB <= 0 {
		opts.SpareMemoryMiB = DefaultSpareMemoryMiB
	}
	if opts.SpareDemandHalfLife <= 0 {
		opts.SpareDemandHalfLife = DefaultSpareDemandHalfLife
	}
	if opts.SpareStartsAtOnce <= 0 {
		opts.SpareStartsAtOnce = defaultSpareStarts()
	}
	if opts.SpareWarmLimit <= 0 {
		opts.SpareWarmLimit = DefaultSpareWarmLimit
	}
	p := &Pool{
		opts:     opts,
		log:      opts.Logger,
		running:  map[string]*Execution{},
		starting: map[string]*startCall{},
		all:      map[*Execution]struct{}{},
		kept:     map[string]bool{},

		shapes: map[spareShape]*shapeState{},
		quit:   make(chan struct{}),
	}
	if p.sparesOn() {
		p.spares.Add(1)
		go p.runSpares()
	}
	opts.Metrics.ObservePool(p.metricsSnapshot)
	return p
}

// BackendName names the backend in use, or "none".
func (p *Pool) BackendName() string {
	if p.opts.Backend == nil {
		return "none"
	}
	return p.opts.Backend.Name()
}

// Acquire returns a running execution of the program, starting one if
// needed, and marks one request in flight on it. The caller must call
// Release on the returned execution when the request is finished.
func (p *Pool) Acquire(ctx context.Context, hash string) (*Execution, error) {
	for {
		p.mu.Lock()
		if p.draining {
			p.mu.Unlock()
			return nil, errkind.New(errkind.ShuttingDown, "supervisor is shutting down")
		}
		if e := p.running[hash]; e != nil && e.acquire() {
			p.mu.Unlock()
			return e, nil
		}
		call := p.starting[hash]
		if call == nil {
			call = &startCall{done: make(chan struct{})}
			p.starting[hash] = call
			go p.start(hash, call)
		}
		p.mu.Unlock()

		select {
		case <-call.done:
		case <-ctx.Done():
			return nil, fmt.Errorf("waiting for program %s to start: %w", hash, ctx.Err())
		}
		if call.err != nil {
			return nil, call.err
		}
		if call.exec.acquire() {
			return call.exec, nil
		}
		// The fresh execution died before we could use it; try once more
		// through the loop, which starts another one.
	}
}

// start runs detached from any request so that a client disconnecting does
// not abort a start that other requests are waiting for.
func (p *Pool) start(hash string, call *startCall) {
	ctx, cancel := context.WithTimeout(context.Background(), p.opts.InitTimeout+2*time.Minute)
	defer cancel()
	begun := time.Now()
	exec, err := p.launch(ctx, hash)
	if err == nil {
		p.opts.Metrics.ColdStart(exec.fromSpare, time.Since(begun))
	}

	p.mu.Lock()
	delete(p.starting, hash)
	if err == nil {
		p.running[hash] = exec
	}
	p.mu.Unlock()

	call.exec, call.err = exec, err
	close(call.done)
	if err == nil {
		go p.watch(exec)
		exec.armIdleTimer()
		// After the waiting requests were let through: the row gains
		// its start time off the request path.
		exec.saveRecord(ctx, false)
	}
}

func (p *Pool) launch(ctx context.Context, hash string) (*Execution, error) {
	// Resolve first: an unknown hash is a 404 even on a host that cannot
	// run anything.
	prog, err := p.opts.Source.Program(ctx, hash)
	if err != nil {
		return nil, err
	}
	if p.opts.Backend == nil {
		err := p.opts.BackendError
		if err == nil {
			err = errors.New("no isolation backend is configured")
		}
		return nil, errkind.Wrap(errkind.NoBackend, fmt.Errorf("no backend available: %w", err))
	}
	exec := newExecution(p, prog)
	// Taken before admission: its memory moves from the spares to the
	// execution instead of being counted twice.
	sp := p.takeSpare(prog)
	if err := p.admit(ctx, exec); err != nil {
		if sp != nil {
			p.returnSpare(sp)
		}
		return nil, err
	}
	if err := exec.boot(ctx, sp); err != nil {
		exec.finish(context.Background(), err)
		return nil, err
	}
	return exec, nil
}

// watch stops an execution whose sandbox or guest channel died on its own.
func (p *Pool) watch(e *Execution) {
	select {
	case <-e.instance.Done():
		cause := e.programsAccount(fmt.Errorf("sandbox exited: %w", e.instance.Err()))
		e.log.Warn("sandbox exited", "cause", cause)
		e.finish(context.Background(), cause)
	case <-e.client.Done():
		// The channel usually closes because the sandbox is going down:
		// its exit (the memory limit, a crash) is the cause to report.
		cause := errors.New("guest channel closed")
		select {
		case <-e.instance.Done():
			if err := e.instance.Err(); err != nil {
				cause = err
			}
		case <-time.After(time.Second):
		}
		cause = e.programsAccount(cause)
		e.log.Warn("guest channel closed", "cause", cause)
		e.finish(context.Background(), cause)
	case <-e.stopping:
	}
}

// programsAccount prefers the agent's word on a program that ended by
// itself (its exit status and last output lines) to the sandbox's, which
// only says the sandbox went down with it. The agent's last status may
// still be on its way when the sandbox's exit is seen.
func (e *Execution) programsAccount(sandboxCause error) error {
	select {
	case <-e.client.Done():
	case <-time.After(time.Second):
	}
	if perr := e.client.Err(); perr != nil {
		return fmt.Errorf("program exited by itself: %w", perr)
	}
	return sandboxCause
}

// forget removes an execution so that the next request starts a new one.
func (p *Pool) forget(e *Execution) {
	p.mu.Lock()
	if p.running[e.hash] == e {
		delete(p.running, e.hash)
	}
	p.mu.Unlock()
}

func (p *Pool) finished(e *Execution) {
	var cpu float64
	if e.instance != nil {
		// Stopped: the final figures, at least any sample scraped before.
		u := e.instance.Usage()
		cpu = (u.CPUTimeUser + u.CPUTimeSystem).Seconds()
	}
	p.mu.Lock()
	delete(p.all, e)
	p.cpuDone += cpu
	p.mu.Unlock()
	p.stopped.Done()
}

// network gives an execution of a program with internet access its
// network, or nil for a program without.
func (p *Pool) network(ctx context.Context, id string, internet bool) (*network.Network, error) {
	if !internet {
		return nil, nil
	}
	if p.opts.Networks == nil {
		if p.opts.NetworkError != nil {
			return nil, errkind.Wrap(errkind.NoBackend, fmt.Errorf("the program needs the internet, which this node cannot give: %w", p.opts.NetworkError))
		}
		return nil, nil // networking turned off by the operator: loopback only
	}
	nw, ok := p.opts.Backend.(backend.Networker)
	if !ok || nw.NetworkLink() == backend.LinkNone {
		return nil, errkind.New(errkind.NoBackend, "the program needs the internet and backend %s cannot attach a network", p.opts.Backend.Name())
	}
	link := network.Link{Kind: nw.NetworkLink(), UID: os.Geteuid(), GID: os.Getegid()}
	if o, ok := p.opts.Backend.(backend.TapOwner); ok {
		link.UID, link.GID = o.TapOwner()
	}
	return p.opts.Networks.Allocate(ctx, id, link)
}

func (p *Pool) releaseNetwork(n *network.Network, log *slog.Logger) {
	if n == nil || p.opts.Networks == nil {
		return
	}
	if err := p.opts.Networks.Release(n); err != nil {
		log.Error("releasing the execution's network", "err", err)
	}
}

// Stop stops the running execution of hash, if any, after its in-flight
// requests finish.
func (p *Pool) Stop(ctx context.Context, hash string) error {
	p.mu.Lock()
	e := p.running[hash]
	p.mu.Unlock()
	if e == nil {
		return errkind.New(errkind.NotFound, "no running execution for %s", hash)
	}
	e.stopGracefully(ctx)
	return nil
}

// Shutdown refuses new requests, stops every execution (waiting for their
// in-flight requests until ctx ends) and returns when all are gone.
func (p *Pool) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	p.draining = true
	execs := make([]*Execution, 0, len(p.all))
	for e := range p.all {
		execs = append(execs, e)
	}
	p.mu.Unlock()

	p.stopSpares()
	var wg sync.WaitGroup
	for _, e := range execs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			e.stopGracefully(ctx)
		}()
	}
	wg.Wait()
	done := make(chan struct{})
	go func() { p.stopped.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Keep marks hash as a program the node keeps running (a persistent
// program of an allocation): its executions are neither stopped when idle
// nor evicted to make room. One is started now if none runs, without a
// request; requests reach the running one as usual. It returns the
// running execution.
func (p *Pool) Keep(ctx context.Context, hash string) (*Execution, error) {
	p.keptMu.Lock()
	p.kept[hash] = true
	p.keptMu.Unlock()
	e, err := p.Acquire(ctx, hash)
	if err != nil {
		return nil, err
	}
	e.Release() // kept: no idle timer is armed
	return e, nil
}

// Unkeep ends Keep for hash and stops its running execution, after its
// in-flight requests (until ctx ends). It reports whether one was running.
func (p *Pool) Unkeep(ctx context.Context, hash string) bool {
	p.keptMu.Lock()
	delete(p.kept, hash)
	p.keptMu.Unlock()
	return p.Stop(ctx, hash) == nil
}

func (p *Pool) isKept(hash string) bool {
	p.keptMu.Lock()
	defer p.keptMu.Unlock()
	return p.kept[hash]
}

// Info describes one execution for /about/executions.
type Info struct {
	UUID        string    `json:"uuid"`
	ProgramHash string    `json:"vm_hash"`
	Backend     string    `json:"backend"`
	Defined     time.Time `json:"time_defined"`
	Prepared    time.Time `json:"time_prepared"`
	Started     time.Time `json:"time_started"`
	InFlight    int       `json:"in_flight"`
	IPv4        string    `json:"ipv4"` // the program's address/prefix; empty without network
	VCPUs       int       `json:"vcpus"`
	MemoryMiB   int       `json:"memory"`
	// Persistent: kept running by an allocation (Keep).
	Persistent bool `json:"persistent"`
	// VMType is aleph-vm's type from the message: "persistent_program"
	// when on.persistent is set, else "microvm".
	VMType string `json:"vm_type"`
}

// List returns the running executions, oldest first.
func (p *Pool) List() []Info {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]Info, 0, len(p.running))
	for _, e := range p.running {
		out = append(out, e.info())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Defined.Before(out[j].Defined) })
	return out
}

func (p *Pool) stateDir(id string) (string, error) {
	dir := filepath.Join(p.opts.ExecutionRoot, "executions", id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("creating execution directory: %w", err)
	}
	return dir, nil
}
