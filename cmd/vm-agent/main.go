// Command vm-agent runs inside every sandbox: it serves the guest channel
// (internal/guest) and starts the program it is told to run.
//
// Under gVisor it is the container's process with the channel on its
// stdin/stdout (--channel stdio); its logs and the program's output go to
// stderr. It never offers a way to run arbitrary commands: the host can only
// start the one program of the Config and stop it.
//
// In micro-VMs (QEMU microvm, Firecracker) it is PID 1 from an initramfs
// (vm.go): it prepares the root file system from the VM's drives, then
// serves the channel on a virtio-serial port (serial:NAME|PATH) or vsock
// (vsock:PORT), and powers the VM off when the program is done.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// options are the agent's flags; the defaults are the sandbox layout of
// internal/guest, and tests point them elsewhere.
type options struct {
	channel   string
	codeDir   string
	socketDir string
	// programSocket is where ASGI programs listen; empty: in socketDir.
	// Under gVisor it is in a host directory, so the host can reach the
	// program without the agent.
	programSocket string
	// compatAPISocket also serves the guest API (empty: not at all).
	compatAPISocket string
	python          string
	stopTimeout     time.Duration
	logLevel        string
	preload         bool
	hold            bool
	// init selects the micro-VM mode; also chosen when the agent runs as
	// /init with PID 1 (under gVisor it is PID 1 too, but not /init).
	init bool
	// cpuProfile, when set, is where the agent writes a CPU profile of its
	// whole life (opt-in, for profiling the relay).
	cpuProfile string
}

func main() {
	var o options
	flag.StringVar(&o.channel, "channel", "stdio", "guest channel: stdio | vsock:PORT | serial:PATH")
	flag.StringVar(&o.codeDir, "code-dir", guest.CodeDir, "directory holding the program's code")
	flag.StringVar(&o.socketDir, "socket-dir", filepath.Dir(guest.ProgramSocket), "directory of the program and guest API unix sockets")
	flag.StringVar(&o.programSocket, "program-socket", "", "unix socket ASGI programs listen on (default: asgi.sock in --socket-dir)")
	flag.StringVar(&o.compatAPISocket, "compat-api-socket", guest.CompatGuestAPISocket, "second guest API socket, at aleph-vm's path (empty: none)")
	flag.StringVar(&o.python, "python", "/usr/bin/python3", "Python interpreter of the runtime")
	flag.DurationVar(&o.stopTimeout, "stop-timeout", 5*time.Second, "how long the program may take to stop before it is killed")
	flag.StringVar(&o.logLevel, "log-level", "info", "debug | info | warn | error")
	flag.BoolVar(&o.preload, "preload", false, "start Python and import uvicorn/FastAPI before the Config arrives (stdio channel)")
	flag.BoolVar(&o.hold, "hold", false, "with --preload on stdio: once warm, say \"held\" on stdout and wait for a line on stdin before serving, so the host can checkpoint a sandbox that has no session yet")
	flag.BoolVar(&o.init, "init", false, "run as the init of a micro-VM (implied when started as /init with PID 1)")
	flag.StringVar(&o.cpuProfile, "cpu-profile", "", "write a CPU profile of the agent to this file (profiling only)")
	flag.Parse()

	// The agent only copies bytes between the channel and the program. Under
	// gVisor's ptrace platform every thread handoff is a trapped futex
	// syscall, and a multi-threaded Go scheduler made each proxied request
	// cost milliseconds; one P keeps the copying on one thread.
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(1)
	}

	if o.init || (os.Getpid() == 1 && filepath.Base(os.Args[0]) == "init") {
		// Never returns: the VM powers off when the agent is done.
		runVM(o, explicitFlags())
	}

	var level slog.Level
	if err := level.UnmarshalText([]byte(o.logLevel)); err != nil {
		fmt.Fprintln(os.Stderr, "vm-agent: bad --log-level:", err)
		os.Exit(2)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("component", "vm-agent")

	// SIGTERM (the sandbox being stopped from outside) is handled like a
	// stop command: the program gets its lifespan shutdown.
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	// A host that closed its end of the channel must show up as a write
	// error (and a clean stop), not as a SIGPIPE that kills the agent and
	// leaves the program running.
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)

	stopProfile := startCPUProfile(o.cpuProfile, log)
	code, err := run(ctx, o, log)
	stopProfile()
	if err != nil {
		log.Error("agent failed", "err", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

func run(ctx context.Context, o options, log *slog.Logger) (int, error) {
	a := newAgent(o, log)
	if o.hold {
		if o.channel != "stdio" || !o.preload {
			return 2, errors.New("--hold needs --preload and the stdio channel")
		}
		if err := a.holdWarm(); err != nil {
			return 1, err
		}
	}
	ch, err := openChannel(ctx, o.channel, log)
	if err != nil {
		return 2, err
	}
	return a.serve(ctx, ch)
}

// startCPUProfile profiles the agent into path until the returned function
// is called; a profile that cannot start is logged, not fatal.
func startCPUProfile(path string, log *slog.Logger) func() {
	if path == "" {
		return func() {}
	}
	f, err := os.Create(path)
	if err != nil {
		log.Warn("no CPU profile", "err", err)
		return func() {}
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		log.Warn("no CPU profile", "err", err)
		f.Close()
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}
}

// explicitFlags names the flags given on the command line, which win over
// settings from the kernel command line.
func explicitFlags() map[string]bool {
	set := map[string]bool{}
	flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
	return set
}

// openChannel opens the byte stream to the host. For VM channels it waits,
// bounded by ctx, until the device exists and the host is there.
func openChannel(ctx context.Context, spec string, log *slog.Logger) (io.ReadWriteCloser, error) {
	kind, arg, _ := strings.Cut(spec, ":")
	switch kind {
	case "stdio":
		return newStdio()
	case "serial":
		return openSerial(ctx, arg, log)
	case "vsock":
		return listenVsock(ctx, arg, log)
	default:
		return nil, fmt.Errorf("unknown channel %q", spec)
	}
}

// stdio is the channel under gVisor: runsc passes the sandbox's stdin and
// stdout through unchanged. Nothing else in the agent may write to stdout.
type stdio struct{ in, out *os.File }

// newStdio reopens fds 0 and 1 in non-blocking mode: Go then reads them
// through its poller, so closing the channel interrupts a pending read
// (a blocking read of os.Stdin would hold the session open forever).
func newStdio() (stdio, error) {
	for _, fd := range []int{0, 1} {
		if err := syscall.SetNonblock(fd, true); err != nil {
			return stdio{}, fmt.Errorf("stdio channel: %w", err)
		}
	}
	return stdio{in: os.NewFile(0, "stdin"), out: os.NewFile(1, "stdout")}, nil
}

func (s stdio) Read(p []byte) (int, error)  { return s.in.Read(p) }
func (s stdio) Write(p []byte) (int, error) { return s.out.Write(p) }
func (s stdio) Close() error {
	return errors.Join(s.in.Close(), s.out.Close())
}
