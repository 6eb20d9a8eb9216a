// Command vm-agent runs inside every sandbox: it serves the guest channel
// (internal/guest) and starts the program it is told to run.
//
// Under gVisor it is the container's process with the channel on its
// stdin/stdout (--channel stdio); its logs and the program's output go to
// stderr. It never offers a way to run arbitrary commands: the host can only
// start the one program of the Config and stop it.
//
// Only stdio works today; vsock:PORT and serial:PATH are the channels of the
// micro-VM backends, where the agent also runs as PID 1 from an initramfs.
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
	"strings"
	"syscall"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// options are the agent's flags; the defaults are the sandbox layout of
// internal/guest, and tests point them elsewhere.
type options struct {
	channel     string
	codeDir     string
	socketDir   string
	python      string
	stopTimeout time.Duration
	logLevel    string
}

func main() {
	var o options
	flag.StringVar(&o.channel, "channel", "stdio", "guest channel: stdio | vsock:PORT | serial:PATH")
	flag.StringVar(&o.codeDir, "code-dir", guest.CodeDir, "directory holding the program's code")
	flag.StringVar(&o.socketDir, "socket-dir", filepath.Dir(guest.ProgramSocket), "directory of the program and guest API unix sockets")
	flag.StringVar(&o.python, "python", "/usr/bin/python3", "Python interpreter of the runtime")
	flag.DurationVar(&o.stopTimeout, "stop-timeout", 5*time.Second, "how long the program may take to stop before it is killed")
	flag.StringVar(&o.logLevel, "log-level", "info", "debug | info | warn | error")
	flag.Parse()

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

	code, err := run(ctx, o, log)
	if err != nil {
		log.Error("agent failed", "err", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

func run(ctx context.Context, o options, log *slog.Logger) (int, error) {
	ch, err := openChannel(o.channel)
	if err != nil {
		return 2, err
	}
	a := newAgent(o, log)
	return a.serve(ctx, ch)
}

// openChannel opens the byte stream to the host.
func openChannel(spec string) (io.ReadWriteCloser, error) {
	kind, arg, _ := strings.Cut(spec, ":")
	switch kind {
	case "stdio":
		return newStdio()
	case "vsock", "serial":
		// The micro-VM backends add these, with the PID-1 setup they need.
		return nil, fmt.Errorf("channel %q (%s) is not supported yet", kind, arg)
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
