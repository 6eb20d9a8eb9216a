package pool

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/volimage"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/mountinfo"
	"github.com/aleph-vm-go/vm-supervisor/internal/network"
	"github.com/aleph-vm-go/vm-supervisor/internal/proglog"
	"github.com/aleph-vm-go/vm-supervisor/internal/records"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
	"github.com/aleph-vm-go/vm-supervisor/internal/syncrt"
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
	transport *syncrt.Transport
	stateDir  string
	net       *network.Network // nil: loopback only
	// eventToken marks the requests that carry an Aleph message to the
	// program (event.go): only the host knows it.
	eventToken string
	fromSpare  bool // adopted a pre-warmed spare (set by boot)

	defined, prepared, started time.Time

	recordMu    sync.Mutex
	recordFinal bool          // the row has its stop time: no more saves
	stoppingAt  time.Time     // set by finish, for the final row
	usage       backend.Usage // read by finish before the sandbox stops

	mu       sync.Mutex
	state    state
	inFlight int
	lastUsed time.Time // when the last request ended
	cause    error     // why it ended by itself; set by finish
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
		eventToken: newEventToken(),
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
	e.lastUsed = time.Now()
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
		e.idle = nil
	}
	if e.pool.isKept(e.hash) {
		return
	}
	e.idle = time.AfterFunc(e.pool.opts.ReuseTimeout, func() {
		e.log.Info("stopping idle execution", "reuse_timeout", e.pool.opts.ReuseTimeout)
		e.stopGracefully(context.Background())
	})
}

// boot starts the program in sp, or in a sandbox of its own when sp is nil
// or cannot be used.
func (e *Execution) boot(ctx context.Context, sp *spare) error {
	ctx, cancel := context.WithTimeout(ctx, e.pool.opts.InitTimeout)
	defer cancel()
	err := e.bootSteps(ctx, sp)
	if err != nil && ctx.Err() == context.DeadlineExceeded {
		return errkind.Wrap(errkind.BadGateway, fmt.Errorf(
			"program %s did not start within INIT_TIMEOUT (%s): %w", e.hash, e.pool.opts.InitTimeout, err))
	}
	return err
}

func (e *Execution) bootSteps(ctx context.Context, sp *spare) error {
	if sp != nil {
		err := e.adoptSpare(ctx, sp)
		if err == nil && !sp.alive() {
			// It died as it was taken, before its watcher could replace it:
			// the program has not reached it yet, so a fresh start is safe.
			err = errors.New("the spare sandbox died as it was taken")
			e.pool.spareDied(sp)
		}
		if !codeRefused(err) {
			e.pool.spareUsed(sp) // used, or lost: either way it is replaced
		}
		if err == nil {
			err = e.connect(ctx, sp.client)
			if err == nil {
				// A spare that runs a program is proof that starts work.
				e.pool.spareOutcome(sp.shape, false)
				e.fromSpare = true
				e.pool.opts.Metrics.SpareHit()
			}
			return err
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
		e.id = uuid.NewString()
		e.log = e.pool.log.With("program", e.hash, "execution", e.id)
	}
	if e.pool.opts.SpareRuntime != nil {
		e.pool.opts.Metrics.SpareMiss()
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
		return e.startFailure(fmt.Errorf("connecting to the guest: %w", err))
	}
	client, err := guest.Dial(ch, e.log)
	if err != nil {
		return e.startFailure(fmt.Errorf("connecting to the guest: %w", err))
	}
	return e.connect(ctx, client)
}

// startFailure names the cause of a failed start: when the sandbox itself
// died (runsc refused the spec, the VM did not boot, the memory limit),
// its exit is what the client needs to read, not "guest channel closed".
func (e *Execution) startFailure(err error) error {
	if errkind.Is(err, errkind.ProgramFailed) {
		return err // the program's own account says it all
	}
	if e.instance != nil {
		select {
		case <-e.instance.Done():
			if ierr := e.instance.Err(); ierr != nil {
				err = fmt.Errorf("%w: %w", ierr, err)
			}
		case <-time.After(2 * time.Second):
		}
	}
	if errkind.Of(err) == errkind.Unknown {
		err = errkind.Wrap(errkind.BadGateway, err)
	}
	return err
}

// adoptSpare turns a pre-warmed sandbox into this execution: it takes the
// spare's identity and gives it the program's code.
func (e *Execution) adoptSpare(ctx context.Context, sp *spare) error {
	e.id, e.stateDir, e.instance, e.net = sp.id, sp.stateDir, sp.inst, sp.net
	e.log = e.pool.log.With("program", e.hash, "execution", e.id)
	sp.output.setLogger(e.log)
	sp.output.setSink(e.programLog())
	e.prepared = time.Now()
	if err := sp.inst.(backend.CodeLoader).LoadCode(ctx, e.spec()); err != nil {
		return err
	}
	e.log.Info("using a pre-warmed sandbox", "warm_for", e.prepared.Sub(sp.created).Round(time.Millisecond))
	return nil
}

// codeRefused tells errors of LoadCode caused by the program's code
// itself (see backend.CodeLoader), after which the sandbox is unchanged.
func codeRefused(err error) bool {
	return errkind.Is(err, errkind.InvalidInput) || errkind.Is(err, errkind.TooLarge) ||
		errkind.Is(err, errkind.ResourceMissing)
}

// connect hands the program to the agent and waits until it serves.
func (e *Execution) connect(ctx context.Context, client *guest.Client) error {
	inst := e.instance
	cfg := e.guestConfig()
	// VM backends know which guest devices hold the code and volumes.
	if gc, ok := inst.(backend.GuestConfigurer); ok {
		gc.ConfigureGuest(&cfg)
	}
	// From here on the execution has a row, so a crash of the supervisor
	// while the program boots or serves still leaves its trace.
	e.saveRecord(ctx, false)
	if err := client.Start(ctx, cfg); err != nil {
		client.Close()
		return e.startFailure(err)
	}
	e.client = client
	if e.pool.opts.GuestAPI != nil {
		client.ServeGuestAPI(e.pool.opts.GuestAPI(e.prog))
	}
	dial, path := httpDialer(inst, cfg, client)
	const keepIdle = 60 * time.Second // below uvicorn's 75 s keep-alive: the host closes first
	maxHeader := e.pool.opts.MaxResponseHeaderBytes
	if maxHeader <= 0 {
		maxHeader = syncrt.DefaultMaxResponseHeaderBytes
	}
	e.transport = &syncrt.Transport{
		Dial: dial,
		Fallback: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return dial(ctx)
			},
			MaxIdleConnsPerHost:    32,
			IdleConnTimeout:        keepIdle,
			DisableCompression:     true,
			MaxResponseHeaderBytes: maxHeader,
		},
		MaxIdle:                32,
		IdleTimeout:            keepIdle,
		MaxResponseHeaderBytes: maxHeader,
	}
	e.mu.Lock()
	e.started = time.Now()
	e.state = stateRunning
	e.mu.Unlock()
	e.log.Info("program ready", "boot", e.started.Sub(e.prepared).Round(time.Millisecond), "http", path)
	return nil
}

// httpDialer is the one place that decides how requests reach the
// program: an ASGI program whose sandbox the host can reach directly
// (backend.DirectDialer) is dialled there, bypassing the agent and the
// guest channel; executables and other backends go through the channel,
// where the agent bridges each stream to the program.
func httpDialer(inst backend.Instance, cfg guest.Config, client *guest.Client) (dial func(context.Context) (net.Conn, error), path string) {
	if d, ok := inst.(backend.DirectDialer); ok && cfg.Interface == guest.InterfaceASGI {
		return d.DialHTTP, "direct"
	}
	return client.DialHTTP, "guest channel"
}

func (e *Execution) spec() backend.Spec {
	spec := SpecFor(e.prog, e.pool.opts.PersistentDir)
	spec.ExecutionID = e.id
	spec.StateDir = e.stateDir
	out := newLineLogger(e.log, e.pool.opts.ProgramLogs)
	out.sink = e.programLog()
	spec.ProgramOutput = out
	spec.Logger = e.log
	// Spare-shaped programs may start from a snapshot of a warm sandbox
	// when the backend keeps one; the backend tells which fit.
	spec.Snapshot = true
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
		spec.DataPath, spec.DataHash, spec.DataEncoding = d.Path, d.Hash, d.Encoding
		spec.DataMount = dataMount(c)
	}
	for n, v := range prog.Volumes {
		bv := backend.Volume{Mount: v.Volume.Mount, Kind: v.Kind, SizeMiB: v.Volume.SizeMiB}
		if v.Kind == message.VolumePersistent && bv.Mount == "" {
			bv.Mount = message.PersistentVolumeMount(n, v.Volume.Name) // as aleph-vm
		}
		switch v.Kind {
		case message.VolumeImmutable:
			bv.ReadOnly = true
			if v.File != nil {
				bv.Path, bv.Hash, bv.Encoding = v.File.Path, v.File.Hash, v.File.Encoding
			}
		case message.VolumePersistent:
			// One ext4 image per program and volume name, kept across
			// runs and shared by every backend (volimage). The backend
			// creates it at its size the first time.
			if persistentDir != "" {
				if p, err := volimage.PersistentPath(persistentDir, prog.Hash, n, v.Volume.Name, v.Volume.Mount); err == nil {
					bv.Path = p
					bv.LegacyPaths = volimage.LegacyPaths(persistentDir, prog.Hash, n, v.Volume.Name, v.Volume.Mount)
				}
			}
			// The parent ref, resolved and hash-checked like any STORE
			// file: a new volume starts as a copy of it.
			if v.File != nil && v.Volume.Parent != nil {
				bv.ParentPath = v.File.Path
			}
		}
		spec.Volumes = append(spec.Volumes, bv)
	}
	return spec
}

func (e *Execution) guestConfig() guest.Config {
	c := e.prog.Content
	iface := programInterface(c.Code)
	env := map[string]string{}
	for k, v := range e.pool.opts.AlephEnv {
		env[k] = v
	}
	// aleph-vm's runtime sets it to the VM's host name, the base32 label of
	// its item hash (init1.py:102-103, 528-533); a hash without one (a
	// CID) keeps its own spelling.
	hostname := e.id[:8]
	env["ALEPH_ADDRESS_TO_USE"] = e.hash
	if label := message.Base32Label(e.hash); label != "" {
		env["ALEPH_ADDRESS_TO_USE"] = label
		hostname = label
	}
	env[EventTokenVar] = e.eventToken
	cfg := guest.Config{
		ProgramHash: e.hash,
		Interface:   iface,
		Entrypoint:  c.Code.Entrypoint,
		Encoding:    string(c.Code.Encoding),
		Variables:   c.Variables,
		AlephEnv:    env,
		Hostname:    hostname,
		// The agent's own wait for the program to listen ends with the
		// host's: without it, the agent gave up at its 60 s default while
		// a loaded node's INIT_TIMEOUT allowed more.
		StartTimeoutMS: e.pool.opts.InitTimeout.Milliseconds(),
	}
	if e.prog.Data != nil {
		// The agent copies the data writable there (VM backends add
		// the device holding it).
		cfg.Data = &guest.DataCopy{Mount: dataMount(c)}
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

// dataMount is where the data archive goes: data.mount, else /data, where
// aleph-vm always unzips it.
func dataMount(c *message.ProgramContent) string {
	if c.Data != nil && c.Data.Mount != "" {
		return c.Data.Mount
	}
	return "/data"
}

// programInterface is the message's code.interface when it gives one
// ("binary" is aleph-message's word for an executable), else what the
// entrypoint looks like: only Python ASGI entrypoints have a colon.
func programInterface(code message.CodeContent) string {
	switch code.Interface {
	case "asgi":
		return guest.InterfaceASGI
	case "binary":
		return guest.InterfaceExecutable
	}
	if strings.Contains(code.Entrypoint, ":") {
		return guest.InterfaceASGI
	}
	return guest.InterfaceExecutable
}

// RequestTimeout is the program's per-request budget (resources.seconds).
func (e *Execution) RequestTimeout() time.Duration {
	s := e.prog.Content.Resources.Seconds
	if s <= 0 {
		s = message.DefaultSeconds
	}
	d := time.Duration(s) * time.Second
	if limit := e.pool.opts.MaxRequestTimeout; limit > 0 && d > limit {
		d = limit
	}
	return d
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
		e.cause = cause
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
		if e.instance != nil {
			e.usage = e.instance.Usage()
			sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			if err := e.instance.Stop(sctx); err != nil {
				e.log.Error("stopping sandbox", "err", err)
			}
			cancel()
		}
		// After the sandbox: its link must not vanish under a live guest.
		e.pool.releaseNetwork(e.net, e.log)
		if e.stateDir != "" {
			removeStateDir(e.stateDir, e.log)
		}
		e.stoppingAt = stopping
		e.saveRecord(ctx, true)
		if cause != nil {
			if l := e.programLog(); l != nil {
				l.Append(proglog.Stderr, "execution ended: "+cause.Error())
			}
			e.log.Info("execution ended", "cause", cause)
		} else {
			e.log.Info("execution stopped")
		}
		e.pool.finished(e)
	})
	<-e.finishDone
}

// removeStateDir removes an execution's directory. A mount the backend
// failed to undo (a persistent volume's file system, say) is detached
// first, and the directory is kept if one remains: removing recursively
// through it would delete the volume's contents.
func removeStateDir(dir string, log *slog.Logger) {
	if left, err := mountinfo.Under(dir); err == nil && len(left) > 0 {
		log.Warn("mounts left in the execution directory; detaching them", "mounts", left)
		_ = mountinfo.DetachUnder(dir)
		if left, err := mountinfo.Under(dir); err != nil || len(left) > 0 {
			log.Error("execution directory kept: mounts remain", "mounts", left, "err", err)
			return
		}
	}
	if err := os.RemoveAll(dir); err != nil {
		log.Warn("removing execution directory", "err", err)
	}
}

// saveRecord writes the execution's row: at start (final false) with the
// times known so far, and at the end (final true) with the stop time and
// usage. Once the final row is written, earlier-phase saves are skipped so
// a late one cannot reopen it.
func (e *Execution) saveRecord(ctx context.Context, final bool) {
	if e.pool.opts.Records == nil || e.instance == nil {
		return
	}
	e.recordMu.Lock()
	defer e.recordMu.Unlock()
	if e.recordFinal {
		return
	}
	vcpus, memory := resources(e.prog.Content)
	e.mu.Lock()
	r := records.Record{
		UUID:         e.id,
		VMHash:       e.hash,
		TimeDefined:  e.defined,
		TimePrepared: e.prepared,
		TimeStarted:  e.started,
		VCPUs:        vcpus,
		Memory:       memory,
	}
	e.mu.Unlock()
	if final {
		u := e.usage
		r.TimeStopping = e.stoppingAt
		r.CPUTimeUser, r.CPUTimeSystem = u.CPUTimeUser.Seconds(), u.CPUTimeSystem.Seconds()
		r.IOReadCount, r.IOWriteCount = int64(u.IOReadCount), int64(u.IOWriteCount)
		r.IOReadBytes, r.IOWriteBytes = int64(u.IOReadBytes), int64(u.IOWriteBytes)
		e.recordFinal = true
	}
	if e.net != nil {
		r.NetworkTap, r.IPv4 = e.net.Link, e.net.Address.String()
	}
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := e.pool.opts.Records.Save(rctx, r); err != nil {
		e.log.Error("writing execution record", "err", err)
	}
}

func (e *Execution) info() Info {
	vcpus, memory := resources(e.prog.Content)
	vmType := "microvm"
	if p := e.prog.Content.On.Persistent; p != nil && *p {
		vmType = "persistent_program"
	}
	kept := e.pool.isKept(e.hash)
	e.mu.Lock()
	defer e.mu.Unlock()
	return Info{
		UUID: e.id, ProgramHash: e.hash, Backend: e.pool.BackendName(),
		Defined: e.defined, Prepared: e.prepared, Started: e.started,
		InFlight: e.inFlight, VCPUs: vcpus, MemoryMiB: memory,
		IPv4: e.ipv4(), Persistent: kept, VMType: vmType,
	}
}

// Ended is closed once the execution is fully torn down (its sandbox,
// network and directory gone), whatever ended it.
func (e *Execution) Ended() <-chan struct{} { return e.finishDone }

func (e *Execution) ipv4() string {
	if e.net == nil {
		return ""
	}
	return e.net.Address.String()
}

// Cause is why the execution ended by itself (sandbox exit, memory limit,
// lost channel); nil while it runs or after a requested stop.
func (e *Execution) Cause() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.cause
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
