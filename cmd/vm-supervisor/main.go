// Command vm-supervisor runs Aleph programs in sandboxes and serves them
// over HTTP. Sub-commands: `program upload`, `runtime add`; with none it
// serves.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/aleph-vm-go/vm-supervisor/internal/config"
	buildversion "github.com/aleph-vm-go/vm-supervisor/internal/version"
)

// version is this build's version (internal/version: the VERSION file and
// the commit).
var version = buildversion.String()

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	settings, opts, err := config.Load(args, os.Environ(), ".env")
	if errors.Is(err, config.ErrHelp) {
		usage(stdout)
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "vm-supervisor:", err)
		return 2
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: opts.LogLevel()}))
	slog.SetDefault(log)
	for _, name := range opts.Unknown {
		log.Warn("ignoring unknown setting", "name", name)
	}
	if opts.PrintSettings {
		if err := settings.Print(stdout); err != nil {
			fmt.Fprintln(stderr, "vm-supervisor:", err)
			return 1
		}
	}
	if opts.DoNotRun {
		return 0
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if len(opts.Args) > 0 {
		return runSubcommand(ctx, settings, opts.Args, stdout, stderr)
	}
	if err := serve(ctx, settings, opts, log, stdout); err != nil {
		fmt.Fprintln(stderr, "vm-supervisor:", err)
		return 1
	}
	return 0
}

func usage(w io.Writer) {
	fmt.Fprint(w, `Usage: vm-supervisor [flags]                    serve programs over HTTP
       vm-supervisor [flags] program upload PATH ENTRYPOINT [upload flags]
       vm-supervisor [flags] program inspect HASH [--hypervisor NAME]
       vm-supervisor [flags] runtime add SQUASHFS [--default] [--comment TEXT]
       vm-supervisor [flags] check              what this host can run, and what is missing

Settings come from ALEPH_VM_* variables, a .env file in the working
directory, and these flags (flags win over variables, variables over .env).

Flags:
`)
	config.Usage(w)
}

// ensureDirs makes the supervisor's directories, private where programs'
// data lives, before anything writes in them (see config.EnsureDirs).
func ensureDirs(s *config.Settings, log *slog.Logger) error {
	tightened, err := s.EnsureDirs()
	for _, dir := range tightened {
		log.Warn("made a directory private (0700): it holds programs' data or secrets and was open to other users", "dir", dir)
	}
	return err
}

func runSubcommand(ctx context.Context, s *config.Settings, args []string, stdout, stderr io.Writer) int {
	// Every sub-command but check writes to the roots: they are made
	// (private) first.
	dirs := func() bool {
		if err := ensureDirs(s, slog.Default()); err != nil {
			fmt.Fprintln(stderr, "vm-supervisor:", err)
			return false
		}
		return true
	}
	switch {
	case len(args) >= 2 && args[0] == "program" && args[1] == "upload":
		if !dirs() {
			return 1
		}
		st, err := openStore(s)
		if err != nil {
			fmt.Fprintln(stderr, "vm-supervisor:", err)
			return 1
		}
		return cmdProgramUpload(ctx, st, args[2:], stdout, stderr, "http://"+s.Addr())
	case len(args) >= 2 && args[0] == "program" && args[1] == "inspect":
		if !dirs() {
			return 1
		}
		return cmdProgramInspect(ctx, s, args[2:], stdout, stderr)
	case len(args) >= 2 && args[0] == "runtime" && args[1] == "add":
		if !dirs() {
			return 1
		}
		return cmdRuntimeAdd(ctx, s, args[2:], stdout, stderr)
	case len(args) == 1 && args[0] == "check":
		return cmdCheck(s, stdout)
	}
	fmt.Fprintf(stderr, "vm-supervisor: unknown command %q (see --help)\n", args)
	return 2
}
