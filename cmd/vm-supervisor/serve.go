package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"syscall"
	"time"

	"github.com/shirou/gopsutil/v4/mem"

	"github.com/aleph-vm-go/vm-supervisor/internal/allocations"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/volimage"
	"github.com/aleph-vm-go/vm-supervisor/internal/config"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/guestapi"
	"github.com/aleph-vm-go/vm-supervisor/internal/httpapi"
	"github.com/aleph-vm-go/vm-supervisor/internal/metrics"
	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/proglog"
	"github.com/aleph-vm-go/vm-supervisor/internal/records"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
)

// setVolumeLimits weighs volume images against the disk that holds them,
// every backend's alike (volimage).
func setVolumeLimits(s *config.Settings) {
	volimage.SetLimits(volimage.Limits{
		MaxSizeMiB: s.MaxVolumeSizeMiB,
		ReserveMiB: s.HostDiskReservedMiB,
		Globs:      volimage.PromiseGlobs(s.PersistentVolumesDir, s.ExecutionRoot),
	})
}

// guestAPIFor makes each execution's guest API handler.
func guestAPIFor(s *config.Settings, cache *guestapi.Cache, signer *nodekey.Key, publications *guestapi.Publications, log *slog.Logger) func(*sources.Program) http.Handler {
	return func(prog *sources.Program) http.Handler {
		return guestapi.New(guestapi.Options{
			Program:      guestapi.Program{Hash: prog.Hash},
			Cache:        cache,
			APIServer:    s.APIServer,
			Signer:       signer,
			Logger:       log,
			Publications: publications,
			Connections: guestapi.ConnLimits{
				Max:               int(s.GuestAPIMaxConnections),
				ReadHeaderTimeout: s.GuestAPIReadHeaderTimeout,
				IdleTimeout:       s.GuestAPIIdleTimeout,
			},
		})
	}
}

// serve runs the HTTP service until ctx ends, then stops every sandbox.
func serve(ctx context.Context, s *config.Settings, opts *config.Options, log *slog.Logger, stdout io.Writer) error {
	if err := ensureDirs(s, log); err != nil {
		return err
	}
	var agentProfileDir string
	if opts.Profile {
		stopProfile, err := startProfile(s.ExecutionRoot)
		if err != nil {
			return err
		}
		defer stopProfile()
		agentProfileDir = filepath.Join(s.ExecutionRoot, "agent-profiles")
	}
	st, err := openStore(s)
	if err != nil {
		return err
	}
	// One reading of owners' delegations for the control API, use_latest
	// and the reactor.
	deleg := newDelegations(s, log)
	source, react, err := newWatchedSource(s, st, deleg, log)
	if err != nil {
		return err
	}
	db, err := records.Open(ctx, s.ExecutionDatabase)
	if err != nil {
		return fmt.Errorf("opening execution records: %w", err)
	}
	defer db.Close()

	be, beErr := selectBackend(s, agentProfileDir, log)
	if beErr != nil {
		log.Warn("no isolation backend available: programs will answer 503", "err", beErr)
	} else {
		log.Info("isolation backend", "name", be.Name())
	}
	setVolumeLimits(s)
	recoverEarlierRun(ctx, s, be, db, log)
	capacity, err := nodeCapacity(s)
	if err != nil {
		return err
	}
	log.Info("admission", "memory_mib", capacity.MemoryMiB, "vcpus", capacity.VCPUs, "max_executions", s.MaxExecutions,
		"max_execution_share", capacity.MaxShare, "max_volume_size_mib", s.MaxVolumeSizeMiB, "host_disk_reserved_mib", s.HostDiskReservedMiB)
	if c, ok := be.(backend.Closer); ok {
		defer func() {
			if err := c.Close(); err != nil {
				log.Warn("closing the backend", "err", err)
			}
		}()
	}
	poolNetworks, closeNetworks, netErr := openNetworks(ctx, s, be, log)
	defer closeNetworks()
	var spareRuntime pool.SpareRuntime
	// Only some backends' sandboxes can receive their code after starting.
	if _, ok := be.(backend.SpareMaker); s.Prewarm && s.SparesMemoryMiB > 0 && ok {
		spareRuntime = defaultRuntimeFile(st)
	}
	signer, err := loadNodeKey(s, log)
	if err != nil {
		return err
	}
	guestCache, closeGuestCache, err := openGuestCache(ctx, s, log)
	if err != nil {
		return err
	}
	defer closeGuestCache()
	// Shared by every execution: the node's budget is one.
	publications := guestapi.NewPublications(int(s.GuestAPIPublicationsPerMinute), int(s.GuestAPINodePublicationsPerMinute))
	m := metrics.New()
	p := pool.New(poolOptions(s, poolDeps{
		metrics: m, source: source, backend: be, backendErr: beErr, records: db, capacity: capacity,
		spareRuntime: spareRuntime, networks: poolNetworks, networkErr: netErr,
		guestAPI: guestAPIFor(s, guestCache, signer, publications, log),
	}, log))
	defer startWatching(ctx, s, react, p, m, log)()

	token, err := writeLoginToken(s.ExecutionRoot)
	if err != nil {
		return err
	}
	// Never the token itself, at any level: logs travel further than
	// EXECUTION_ROOT.
	log.Info("operator login: open /about/login?token=<the token in this file>",
		"token_file", filepath.Join(s.ExecutionRoot, "login_token"))

	// One instance: it uploads the bundled example once and remembers it.
	selfTest := selfTestProgram(s, st)
	allocs := startAllocations(s, p, log)
	defer allocs.Close() // the saved allocation stays for the next start
	apiOpts := apiOptions(s, p, qemuWithKVM(be), db, allocs, token, selfTest, m, log)
	apiOpts.Delegations = deleg
	api := httpapi.New(apiOpts)

	if opts.Benchmark > 0 {
		err := runBenchmark(ctx, api, selfTest, opts.Benchmark, stdout)
		shutdownPool(p, log)
		return err
	}
	return listenAndServe(ctx, s, api, p, log, stdout)
}

// openNetworks sets up program networking. Without it programs asking for
// the internet are refused (netErr says why), the rest run.
func openNetworks(ctx context.Context, s *config.Settings, be backend.Backend, log *slog.Logger) (networks pool.Networks, closeNetworks func(), netErr error) {
	manager, netErr := newNetworks(ctx, s, be, log)
	if netErr != nil {
		log.Error("program networking unavailable: programs asking for the internet will be refused", "err", netErr)
	}
	if manager == nil {
		return nil, func() {}, netErr // a nil *Manager must not become a non-nil interface
	}
	return manager, func() {
		if err := manager.Close(); err != nil {
			log.Warn("removing the network firewall", "err", err)
		}
	}, netErr
}

// poolDeps are what serve opened for the pool.
type poolDeps struct {
	metrics      *metrics.Metrics
	source       pool.ProgramSource
	backend      backend.Backend
	backendErr   error
	records      *records.DB
	capacity     pool.Capacity
	spareRuntime pool.SpareRuntime
	networks     pool.Networks
	networkErr   error
	guestAPI     func(*sources.Program) http.Handler
}

// poolOptions are the pool's settings.
func poolOptions(s *config.Settings, d poolDeps, log *slog.Logger) pool.Options {
	return pool.Options{
		GuestAPI:          d.guestAPI,
		Source:            d.source,
		Backend:           d.backend,
		BackendError:      d.backendErr,
		Records:           d.records,
		ReuseTimeout:      s.ReuseTimeout,
		InitTimeout:       startTimeout(s, d.backend, log),
		ExecutionRoot:     s.ExecutionRoot,
		MaxExecutions:     s.MaxExecutions,
		Capacity:          d.capacity,
		MaxRequestTimeout: time.Duration(s.MaxProgramSeconds) * time.Second,
		// The head of a program's answer (the body streams through).
		MaxResponseHeaderBytes: s.ProgramMaxResponseHeaderBytes,
		ProgramLogs: pool.LogLimits{
			BytesPerSecond: s.ProgramLogBytesPerSec,
			BurstBytes:     16 * s.ProgramLogBytesPerSec,
			MaxBytes:       s.ProgramLogMaxBytes,
		},
		// Each program's output for its owner (/control/machine/{ref}/logs).
		Logs:           proglog.NewRegistry(proglog.Limits{}),
		SpareRuntime:   d.spareRuntime,
		SpareMemoryMiB: s.SparesMemoryMiB,
		PersistentDir:  s.PersistentVolumesDir,
		AlephEnv:       alephEnv(s),
		Networks:       d.networks,
		NetworkError:   d.networkErr,
		Metrics:        d.metrics,
		Logger:         log,
	}
}

// recoverEarlierRun removes what a crashed earlier run left: its
// sandboxes (which would hold mounts and memory forever), execution
// directories, loop devices, and the open records of its executions.
func recoverEarlierRun(ctx context.Context, s *config.Settings, be backend.Backend, db *records.DB, log *slog.Logger) {
	reap := func() {
		if r, ok := be.(backend.Reaper); ok {
			if err := r.Reap(ctx); err != nil {
				log.Warn("reaping sandboxes left by a previous run", "err", err)
			}
		}
	}
	reap()
	if err := pool.SweepExecutions(ctx, s.ExecutionRoot, log); err != nil {
		log.Warn("removing what an earlier run left", "err", err)
	}
	// A sandbox whose start was under way at the crash is not listed yet
	// by the first pass; the sweep killed its runtime process, and what
	// that process registered meanwhile is reaped now.
	reap()
	pool.SweepLoopDevices(log, s.ExecutionRoot, s.PersistentVolumesDir)
	if err := pool.SweepVolumeImages(ctx, s.PersistentVolumesDir, log); err != nil {
		log.Warn("removing half-made volume images", "err", err)
	}
	if n, err := db.CloseUnfinished(ctx, time.Now()); err != nil {
		log.Warn("closing the records of an earlier run", "err", err)
	} else if n > 0 {
		log.Warn("recorded the end of executions the earlier run left", "executions", n)
	}
}

// apiOptions are the HTTP service's settings.
func apiOptions(s *config.Settings, p *pool.Pool, qemuKVM bool, db *records.DB, allocs *allocations.Manager, token string, selfTest func(context.Context) (string, error), m *metrics.Metrics, log *slog.Logger) httpapi.Options {
	return httpapi.Options{
		Version:            version,
		DomainName:         s.DomainName,
		Pool:               p,
		Control:            p,
		Records:            db,
		Config:             func() any { return configPage(s) },
		PublicConfig:       func() any { return publicConfig(s, qemuKVM) },
		LoginToken:         token,
		Resolver:           net.DefaultResolver,
		MaxRequestBodySize: s.MaxRequestBodySize,
		SelfTestProgram:    selfTest,
		HostCheck: &httpapi.HostCheck{IPv4URL: s.ConnectivityIPv4URL, IPv6URL: s.ConnectivityIPv6URL,
			DNSHostname: s.ConnectivityDNSHostname, HTTPURLs: s.ConnectivityHTTPURLs},
		DiskPath: s.ExecutionRoot,
		// Kept out of error bodies (the log has them).
		HostPaths: []string{s.ExecutionRoot, s.CacheRoot, s.PersistentVolumesDir,
			filepath.Dir(s.ExecutionDatabase), filepath.Dir(s.RunscPath), filepath.Dir(s.AgentPath)},
		// The scheduler's POST /control/allocations.
		Allocations:               allocs,
		AllocationTokenHash:       s.AllocationTokenHash,
		AllocationSigners:         allocationSigners(s, log).Authorized,
		AllocationSignatureMaxAge: s.AllocationSignatureMaxAge,
		Limits: httpapi.Limits{
			ReadHeaderTimeout:       s.HTTPReadHeaderTimeout,
			IdleTimeout:             s.HTTPIdleTimeout,
			BodyTimeout:             s.HTTPBodyTimeout,
			BodyMinRate:             s.HTTPBodyMinRate,
			WriteTimeout:            s.HTTPWriteTimeout,
			MaxHeaderBytes:          s.HTTPMaxHeaderBytes,
			MaxConnections:          s.HTTPMaxConnections,
			MaxConnectionsPerClient: s.HTTPMaxConnectionsPerClient,
			UnlimitedClients:        s.HTTPUnlimitedClients,
		},
		Metrics: m,
		Logger:  log,
	}
}

// listenAndServe serves until ctx ends or the listener fails, then stops
// the service and every sandbox.
func listenAndServe(ctx context.Context, s *config.Settings, api *httpapi.Server, p *pool.Pool, log *slog.Logger, stdout io.Writer) error {
	ln, err := net.Listen("tcp", s.Addr())
	if err != nil {
		shutdownPool(p, log)
		return fmt.Errorf("listening on %s: %w", s.Addr(), err)
	}
	raiseFileLimit(uint64(s.HTTPMaxConnections), log)
	srv := api.NewHTTPServer(context.WithoutCancel(ctx))
	fmt.Fprintf(stdout, "vm-supervisor %s listening on http://%s/ (backend: %s)\n", version, ln.Addr(), p.BackendName())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(api.Listener(ln)) }()

	select {
	case err = <-errc:
	case <-ctx.Done():
		log.Info("shutting down")
	}
	// In-flight requests finish within DRAIN_TIMEOUT, new ones get 503;
	// then the sandboxes stop.
	api.Shutdown(srv, s.DrainTimeout)
	shutdownPool(p, log)
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

func shutdownPool(p *pool.Pool, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := p.Shutdown(ctx); err != nil {
		log.Error("stopping executions", "err", err)
	}
}

// alephEnv is what every program sees besides its own variables:
// aleph-vm's values (runtimes/aleph-debian-12-python/
// init1.py:94-97), the guest API on the socket upstream programs
// hard-code. ALEPH_ADDRESS_TO_USE is per program (pool.guestConfig).
func alephEnv(*config.Settings) map[string]string {
	return map[string]string{
		"ALEPH_API_HOST":                  "http://localhost",
		"ALEPH_API_UNIX_SOCKET":           guest.CompatGuestAPISocket,
		"ALEPH_REMOTE_CRYPTO_HOST":        "http://localhost",
		"ALEPH_REMOTE_CRYPTO_UNIX_SOCKET": guest.CompatGuestAPISocket,
	}
}

// loadNodeKey reads or makes the key the guest API signs with. Its
// address is logged so an operator can recognise the node; the secret
// never is.
func loadNodeKey(s *config.Settings, log *slog.Logger) (*nodekey.Key, error) {
	k, created, err := nodekey.LoadOrCreate(filepath.Join(s.ExecutionRoot, nodekey.FileName))
	if err != nil {
		return nil, err
	}
	log.Info("node signing key", "address", k.Address(), "created", created)
	return k, nil
}

// writeLoginToken makes a fresh operator token readable only by root, so
// that only whoever can read EXECUTION_ROOT can log in.
func writeLoginToken(root string) (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	token := hex.EncodeToString(b)
	path := filepath.Join(root, "login_token")
	_ = os.Remove(path)
	if err := os.WriteFile(path, []byte(token+"\n"), 0o400); err != nil {
		return "", fmt.Errorf("writing login token: %w", err)
	}
	return token, nil
}

// fdReserve is what the supervisor needs besides client connections:
// sandboxes' pipes and sockets, stores, the records database.
const fdReserve = 1024

// raiseFileLimit makes room in RLIMIT_NOFILE for connections client
// connections plus fdReserve, so that the connection cap, not the
// kernel, is what refuses clients. Go already lifts the soft limit to the
// hard one at start-up; root may lift the hard one too.
func raiseFileLimit(connections uint64, log *slog.Logger) {
	need := connections + fdReserve
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		log.Warn("reading the file descriptor limit", "err", err)
		return
	}
	if lim.Cur >= need {
		log.Info("file descriptor limit", "soft", lim.Cur, "hard", lim.Max, "needed", need)
		return
	}
	want := lim
	want.Cur = need
	want.Max = max(lim.Max, need)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err != nil {
		// Without privilege, at least up to the hard limit.
		want = syscall.Rlimit{Cur: min(need, lim.Max), Max: lim.Max}
		if err2 := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &want); err2 != nil {
			want = lim
		}
		log.Warn("file descriptor limit is below what HTTP_MAX_CONNECTIONS needs",
			"soft", want.Cur, "hard", want.Max, "needed", need, "err", err)
		return
	}
	log.Info("raised the file descriptor limit", "from", lim.Cur, "to", want.Cur, "hard", want.Max, "needed", need)
}

func startProfile(dir string) (func(), error) {
	path := filepath.Join(dir, "cpu.pprof")
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("--profile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("--profile: %w", err)
	}
	slog.Info("CPU profile", "path", path)
	return func() { pprof.StopCPUProfile(); f.Close() }, nil
}

// nodeCapacity is what executions may reserve on this host: physical
// memory less the host's reserve, and cores times the overcommit factor.
func nodeCapacity(s *config.Settings) (pool.Capacity, error) {
	vm, err := mem.VirtualMemory()
	if err != nil {
		return pool.Capacity{}, fmt.Errorf("reading the host's memory: %w", err)
	}
	memory := int(vm.Total>>20) - s.HostMemoryReservedMiB
	if memory < 1 {
		return pool.Capacity{}, fmt.Errorf("HOST_MEMORY_RESERVED_MIB=%d leaves nothing of the host's %d MiB for programs",
			s.HostMemoryReservedMiB, vm.Total>>20)
	}
	return pool.Capacity{
		MemoryMiB:    memory,
		VCPUs:        max(1, int(float64(runtime.NumCPU())*s.VCPUOvercommitFactor)),
		MaxShare:     s.MaxExecutionShare,
		MaxVolumeMiB: s.MaxVolumeSizeMiB,
	}, nil
}
