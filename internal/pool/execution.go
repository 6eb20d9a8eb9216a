package pool

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/network"
	"github.com/aleph-vm-go/vm-supervisor/internal/records"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
)

type state int

const (
	stateBooting state = iota
	stateRunning
	stateStopping
	stateStopped
)

// Execution is one sandbox running one program.
type Execution struct {
	pool *Pool
	hash string
	id   string
	prog *sources.Program
	log  *slog.Logger

	instance  backend.Instance
	client    *guest.Client
	transport *http.Transport
	stateDir  string
	net       *network.Network // nil: loopback only

	defined, prepared, started time.Time

	mu       sync.Mutex
	state    state
	inFlight int
	idle     *time.Timer
	drained  chan struct{} // closed when inFlight drops to 0 while stopping

	stopping   chan struct{} // closed when finish begins
	finishOnce sync.Once
	finishDone chan struct{}
}

func newExecution(p *Pool, prog *sources.Program) *Execution {
	id := uuid.NewString()
	return &Execution{
		pool:       p,
		hash:       prog.Hash,
		id:         id,
		prog:       prog,
		log:        p.log.With("program", prog.Hash, "execution", id),
		defined:    time.Now(),
		stopping:   make(chan struct{}),
		finishDone: make(chan struct{}),
	}
}

// Hash is the program's item hash.
func (e *Execution) Hash() string { return e.hash }

// Program is the resolved program this execution runs.
func (e *Execution) Program() *sources.Program { return e.prog }

// Transport sends HTTP requests to the program over the guest channel.
func (e *Execution) Transport() http.RoundTripper { return e.transport }

// Release ends one request started with Pool.Acquire.
func (e *Execution) Release() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.inFlight--
	if e.inFlight > 0 {
		return
	}
	switch e.state {
	case stateRunning:
		e.armIdleTimerLocked()
	case stateStopping:
		if e.drained != nil {
			close(e.drained)
			e.drained = nil
		}
	}
}

func (e *Execution) acquire() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.state != stateRunning {
		return false
	}
	e.inFlight++
	if e.idle != nil {
		e.idle.Stop()
		e.idle = nil
	}
	return true
}

func (e *Execution) armIdleTimer() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.inFlight == 0 && e.state == stateRunning {
		e.armIdleTimerLocked()
	}
}

func (e *Execution) armIdleTimerLocked() {
	if e.idle != nil {
		e.idle.Stop()
	}
	e.idle = time.AfterFunc(e.pool.opts.ReuseTimeout, func() {
		e.log.Info("stopping idle execution", "reuse_timeout", e.pool.opts.ReuseTimeout)
		e.stopGracefully(context.Background())
	})
}

// boot starts the sandbox and the program inside it.
func (e *Execution) boot(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, e.pool.opts.InitTimeout)
	defer cancel()
	err := e.bootSteps(ctx)
	if err != nil && ctx.Err() == context.DeadlineExceeded {
		return errkind.Wrap(errkind.BadGateway, fmt.Errorf(
			"program %s did not start within INIT_TIMEOUT (%s): %w", e.hash, e.pool.opts.InitTimeout, err))
	}
	return err
}

func (e *Execution) bootSteps(ctx context.Context) error {
	if sp := e.pool.takeSpare(e.prog); sp != nil {
		ch, err := e.adoptSpare(ctx, sp)
		if err == nil {
			e.pool.refillSpare(sp.shape)
			return e.connect(ctx, ch)
		}
		e.instance, e.stateDir, e.net = nil, "", nil
		if codeRefused(err) {
			// The code was refused before anything reached the spare, and
			// a fresh sandbox would meet the same refusal: keep the spare.
			e.pool.returnSpare(sp)
			return err
		}
		e.log.Warn("could not use the spare sandbox; starting a fresh one", "err", err)
		e.pool.discardSpare(sp, err.Error())
		e.pool.refillSpare(sp.shape)
	}
	dir, err := e.pool.stateDir(e.id)
	if err != nil {
		return err
	}
	e.stateDir = dir
	if e.net, err = e.pool.network(ctx, e.id, e.prog.Content.Environment.Internet); err != nil {
		return err
	}
	spec := e.spec()
	for _, v := range spec.Volumes {
		if v.Kind == message.VolumePersistent && v.Path != "" {
			if err := os.MkdirAll(v.Path, 0o700); err != nil {
				return fmt.Errorf("persistent volume %s: %w", v.Mount, err)
			}
		}
	}
	e.prepared = time.Now()
	e.log.Info("starting sandbox", "backend", e.pool.opts.Backend.Name())

	inst, err := e.pool.opts.Backend.Start(ctx, spec)
	if err != nil {
		// A kind the backend gave (e.g. an unsafe code archive: 400) says
		// more than "the sandbox failed".
		err = fmt.Errorf("starting sandbox: %w", err)
		if errkind.Of(err) == errkind.Unknown {
			err = errkind.Wrap(errkind.BadGateway, err)
		}
		return err
	}
	e.instance = inst
	ch, err := inst.Channel(ctx)
	if err != nil {
		return errkind.Wrap(errkind.BadGateway, fmt.Errorf("connecting to the guest: %w", err))
	}
	return e.connect(ctx, ch)
}

// adoptSpare turns a pre-warmed sandbox into this execution: it takes the
// spare's identity and gives it the program's code.
func (e *Execution) adoptSpare(ctx context.Context, sp *spare) (io.ReadWriteCloser, error) {
	e.id, e.stateDir, e.instance, e.net = sp.id, sp.stateDir, sp.inst, sp.net
	e.log = e.pool.log.With("program", e.hash, "execution", e.id)
	sp.output.setLogger(e.log)
	e.prepared = time.Now()
	if err := sp.inst.(backend.CodeLoader).LoadCode(ctx, e.spec()); err != nil {
		return nil, err
	}
	e.log.Info("using a pre-warmed sandbox", "warm_for", e.prepared.Sub(sp.created).Round(time.Millisecond))
	return sp.ch, nil
}

// codeRefused tells errors of LoadCode caused by the program's code
// itself (see backend.CodeLoader), after which the sandbox is unchanged.
func codeRefused(err error) bool {
	return errkind.Is(err, errkind.InvalidInput) || errkind.Is(err, errkind.TooLarge) ||
		errkind.Is(err, errkind.ResourceMissing)
}

// connect hands the program to the agent and waits until it serves.
func (e *Execution) connect(ctx context.Context, ch io.ReadWriteCloser) error {
	inst := e.instance
	cfg := e.guestConfig()
	// VM backends know which guest devices hold the code and volumes.
	if gc, ok := inst.(interface{ ConfigureGuest(*guest.Config) }); ok {
		gc.ConfigureGuest(&cfg)
	}
	client, err := guest.Connect(ctx, ch, cfg, e.log)
	if err != nil {
		return errkind.Wrap(errkind.BadGateway, fmt.Errorf("program failed to start: %w", err))
	}
	e.client = client
	if e.pool.opts.GuestAPI != nil {
		client.ServeGuestAPI(e.pool.opts.GuestAPI(e.prog))
	}
	e.transport = &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return client.DialHTTP(ctx)
		},
		MaxIdleConnsPerHost: 32,
		IdleConnTimeout:     60 * time.Second, // below uvicorn's 75 s keep-alive: the host closes first
		DisableCompression:  true,
	}
	e.started = time.Now()
	e.mu.Lock()
	e.state = stateRunning
	e.mu.Unlock()
	e.log.Info("program ready", "boot", e.started.Sub(e.prepared).Round(time.Millisecond))
	return nil
}

func (e *Execution) spec() backend.Spec {
	spec := SpecFor(e.prog, e.pool.opts.PersistentDir)
	spec.ExecutionID = e.id
	spec.StateDir = e.stateDir
	spec.ProgramOutput = newLineLogger(e.log)
	spec.Logger = e.log
	if e.net != nil {
		spec.Network = &e.net.Network
	}
	return spec
}

// resources are the program's vCPUs and memory (MiB), defaults applied.
func resources(c *message.ProgramContent) (vcpus, memoryMiB int) {
	vcpus, memoryMiB = c.Resources.VCPUs, c.Resources.Memory
	if vcpus == 0 {
		vcpus = message.DefaultVCPUs
	}
	if memoryMiB == 0 {
		memoryMiB = message.DefaultMemory
	}
	return vcpus, memoryMiB
}

// SpecFor turns a resolved program into what a backend needs to run it
// (without the per-execution parts: id, state directory, output). It is
// also what `program inspect` shows.
func SpecFor(prog *sources.Program, persistentDir string) backend.Spec {
	c := prog.Content
	spec := backend.Spec{
		ProgramHash:  prog.Hash,
		RuntimePath:  prog.Runtime.Path,
		RuntimeHash:  prog.Runtime.Hash,
		CodePath:     prog.Code.Path,
		CodeHash:     prog.Code.Hash,
		CodeEncoding: c.Code.Encoding,
		Entrypoint:   c.Code.Entrypoint,
		Internet:     c.Environment.Internet,
	}
	spec.VCPUs, spec.MemoryMiB = resources(c)
	if d := prog.Data; d != nil {
		spec.DataPath, spec.DataEncoding = d.Path, d.Encoding
		if c.Data != nil {
			spec.DataMount = c.Data.Mount
		}
	}
	for _, v := range prog.Volumes {
		bv := backend.Volume{Mount: v.Volume.Mount, Kind: v.Kind, SizeMiB: v.Volume.SizeMiB}
		switch v.Kind {
		case message.VolumeImmutable:
			bv.ReadOnly = true
			if v.File != nil {
				bv.Path, bv.Encoding = v.File.Path, v.File.Encoding
			}
		case message.VolumePersistent:
			// One directory per program and volume name, kept across runs.
			if persistentDir != "" && v.Volume.Name != "" {
				bv.Path = filepath.Join(persistentDir, prog.Hash, v.Volume.Name)
			}
		}
		spec.Volumes = append(spec.Volumes, bv)
	}
	return spec
}

func (e *Execution) guestConfig() guest.Config {
	c := e.prog.Content
	iface := guest.InterfaceExecutable
	if strings.Contains(c.Code.Entrypoint, ":") {
		iface = guest.InterfaceASGI
	}
	env := map[string]string{}
	for k, v := range e.pool.opts.AlephEnv {
		env[k] = v
	}
	env["ALEPH_ADDRESS_TO_USE"] = c.Address
	cfg := guest.Config{
		ProgramHash: e.hash,
		Interface:   iface,
		Entrypoint:  c.Code.Entrypoint,
		Encoding:    string(c.Code.Encoding),
		Variables:   c.Variables,
		AlephEnv:    env,
		Hostname:    e.id[:8],
	}
	if n := e.net; n != nil {
		cfg.IPv4 = n.Address.String()
		cfg.Gateway = n.Gateway.String()
		for _, ns := range n.DNS {
			cfg.DNS = append(cfg.DNS, ns.String())
		}
	}
	return cfg
}

// RequestTimeout is the program's per-request budget (resources.seconds).
func (e *Execution) RequestTimeout() time.Duration {
	s := e.prog.Content.Resources.Seconds
	if s <= 0 {
		s = message.DefaultSeconds
	}
	return time.Duration(s) * time.Second
}

// stopGracefully refuses new requests, waits for in-flight ones (until ctx
// ends), then stops the sandbox.
func (e *Execution) stopGracefully(ctx context.Context) {
	e.mu.Lock()
	if e.state == stateBooting || e.state == stateRunning {
		e.state = stateStopping
	}
	if e.idle != nil {
		e.idle.Stop()
		e.idle = nil
	}
	var wait chan struct{}
	if e.inFlight > 0 && e.state == stateStopping {
		if e.drained == nil {
			e.drained = make(chan struct{})
		}
		wait = e.drained
	}
	e.mu.Unlock()
	e.pool.forget(e)
	if wait != nil {
		select {
		case <-wait:
		case <-ctx.Done():
		case <-e.stopping:
		}
	}
	e.finish(ctx, nil)
}

// finish tears the execution down exactly once and writes its record.
func (e *Execution) finish(ctx context.Context, cause error) {
	e.finishOnce.Do(func() {
		defer close(e.finishDone)
		e.mu.Lock()
		e.state = stateStopped
		if e.idle != nil {
			e.idle.Stop()
		}
		e.mu.Unlock()
		close(e.stopping)
		e.pool.forget(e)
		stopping := time.Now()

		ctx := context.WithoutCancel(ctx)
		if e.client != nil {
			if cause == nil {
				sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				if err := e.client.Stop(sctx); err != nil {
					e.log.Debug("guest stop", "err", err)
				}
				cancel()
			}
			e.client.Close()
		}
		if e.transport != nil {
			e.transport.CloseIdleConnections()
		}
		var usage backend.Usage
		if e.instance != nil {
			usage = e.instance.Usage()
			sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			if err := e.instance.Stop(sctx); err != nil {
				e.log.Error("stopping sandbox", "err", err)
			}
			cancel()
		}
		// After the sandbox: its link must not vanish under a live guest.
		e.pool.releaseNetwork(e.net, e.log)
		if e.stateDir != "" {
			if err := os.RemoveAll(e.stateDir); err != nil {
				e.log.Warn("removing execution directory", "err", err)
			}
		}
		e.writeRecord(ctx, stopping, usage)
		if cause != nil {
			e.log.Info("execution ended", "cause", cause)
		} else {
			e.log.Info("execution stopped")
		}
		e.pool.finished(e)
	})
	<-e.finishDone
}

func (e *Execution) writeRecord(ctx context.Context, stopping time.Time, u backend.Usage) {
	if e.pool.opts.Records == nil || e.instance == nil {
		return
	}
	vcpus, memory := resources(e.prog.Content)
	r := records.Record{
		UUID:          e.id,
		VMHash:        e.hash,
		TimeDefined:   e.defined,
		TimePrepared:  e.prepared,
		TimeStarted:   e.started,
		TimeStopping:  stopping,
		CPUTimeUser:   u.CPUTimeUser.Seconds(),
		CPUTimeSystem: u.CPUTimeSystem.Seconds(),
		IOReadCount:   int64(u.IOReadCount),
		IOWriteCount:  int64(u.IOWriteCount),
		IOReadBytes:   int64(u.IOReadBytes),
		IOWriteBytes:  int64(u.IOWriteBytes),
		VCPUs:         vcpus,
		Memory:        memory,
	}
	if e.net != nil {
		r.NetworkTap, r.IPv4 = e.net.Link, e.net.Address.String()
	}
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := e.pool.opts.Records.Insert(rctx, r); err != nil {
		e.log.Error("writing execution record", "err", err)
	}
}

func (e *Execution) info() Info {
	vcpus, memory := resources(e.prog.Content)
	e.mu.Lock()
	defer e.mu.Unlock()
	return Info{
		UUID: e.id, ProgramHash: e.hash, Backend: e.pool.BackendName(),
		Defined: e.defined, Prepared: e.prepared, Started: e.started,
		InFlight: e.inFlight, VCPUs: vcpus, MemoryMiB: memory,
		IPv4: e.ipv4(),
	}
}

func (e *Execution) ipv4() string {
	if e.net == nil {
		return ""
	}
	return e.net.Address.String()
}

// Died reports whether the execution ended (sandbox exit or stop); used to
// tell a crash (502) from a slow program.
func (e *Execution) Died() bool {
	select {
	case <-e.stopping:
		return true
	default:
		return false
	}
}

// WaitDied waits up to d for the execution to end and reports whether it
// did. A request that failed mid-way uses it so that a crashed sandbox is
// retired before the client's next request arrives.
func (e *Execution) WaitDied(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-e.stopping:
		return true
	case <-t.C:
		return false
	}
}

// lineLogger turns the guest's output into one log record per line,
// tagged with the program hash by the logger it wraps.
type lineLogger struct {
	mu  sync.Mutex
	log *slog.Logger
	buf bytes.Buffer
}

func newLineLogger(l *slog.Logger) io.Writer { return &lineLogger{log: l} }

// setLogger retags later lines, for a spare that became an execution.
func (w *lineLogger) setLogger(l *slog.Logger) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.log = l
}

func (w *lineLogger) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	for {
		line, err := w.buf.ReadBytes('\n')
		if errors.Is(err, io.EOF) {
			w.buf.Write(line) // keep the partial line for the next write
			break
		}
		w.log.Info("guest: " + strings.TrimRight(string(line), "\r\n"))
	}
	if w.buf.Len() > 64<<10 { // a program printing without newlines
		w.log.Info("guest: " + w.buf.String())
		w.buf.Reset()
	}
	return len(p), nil
}
