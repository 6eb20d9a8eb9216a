package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"

	"github.com/spf13/pflag"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend/firecracker"
	"github.com/aleph-vm-go/vm-supervisor/internal/config"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
)

// cmdProgramInspect prints the resolved plan for a program without
// starting anything: the message, its resolved refs, its limits and, for
// firecracker, the exact configuration file and command line.
func cmdProgramInspect(ctx context.Context, s *config.Settings, args []string, stdout, stderr io.Writer) int {
	fl := pflag.NewFlagSet("program inspect", pflag.ContinueOnError)
	fl.SetOutput(stderr)
	hypervisor := fl.String("hypervisor", string(s.Hypervisor), "backend to plan for: auto|firecracker|qemu|gvisor")
	if err := fl.Parse(args); err != nil {
		return 2
	}
	if fl.NArg() != 1 {
		fmt.Fprintln(stderr, "usage: vm-supervisor program inspect HASH [--hypervisor NAME]")
		return 2
	}
	hash, err := message.ParseRef(fl.Arg(0))
	if err != nil {
		fmt.Fprintln(stderr, "vm-supervisor:", err)
		return 2
	}
	name := *hypervisor
	if name == string(config.HypervisorAuto) {
		name = hostReport(s).Backend
	}
	st, err := openStore(s)
	if err != nil {
		fmt.Fprintln(stderr, "vm-supervisor:", err)
		return 1
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	source, err := newSource(s, st, newDelegations(s, log), log)
	if err != nil {
		fmt.Fprintln(stderr, "vm-supervisor:", err)
		return 1
	}
	prog, err := source.Program(ctx, hash)
	if err != nil {
		fmt.Fprintln(stderr, "vm-supervisor:", err)
		return 1
	}
	c := prog.Content
	spec := pool.SpecFor(prog, s.PersistentVolumesDir)
	spec.ExecutionID = "inspect-" + hash[:12]
	spec.StateDir = filepath.Join(s.ExecutionRoot, "executions", spec.ExecutionID)

	fmt.Fprintf(stdout, "program      %s\n", hash)
	fmt.Fprintf(stdout, "owner        %s\n", c.Address)
	fmt.Fprintf(stdout, "entrypoint   %s (code %s)\n", c.Code.Entrypoint, c.Code.Encoding)
	fmt.Fprintf(stdout, "code         ref %s → file %s\n             %s\n", prog.Code.Ref, prog.Code.Hash, prog.Code.Path)
	fmt.Fprintf(stdout, "runtime      ref %s → file %s\n             %s\n", prog.Runtime.Ref, prog.Runtime.Hash, prog.Runtime.Path)
	if prog.Data != nil {
		fmt.Fprintf(stdout, "data         ref %s → %s\n", prog.Data.Ref, prog.Data.Path)
	}
	for _, v := range spec.Volumes {
		fmt.Fprintf(stdout, "volume       %s %s %s\n", v.Kind, v.Mount, v.Path)
	}
	fmt.Fprintf(stdout, "limits       %d vCPU, %d MiB memory, %d s per request, internet %v\n",
		spec.VCPUs, spec.MemoryMiB, c.Resources.Seconds, c.Environment.Internet)
	fmt.Fprintf(stdout, "backend      %s\n", name)

	switch name {
	case "firecracker":
		plan, err := firecracker.Inspect(ctx, firecrackerOptions(s, log), spec)
		if err != nil {
			fmt.Fprintln(stderr, "vm-supervisor: planning for firecracker:", err)
			return 1
		}
		for _, w := range plan.Warnings {
			fmt.Fprintln(stderr, "warning:", w)
		}
		fmt.Fprintf(stdout, "\ncommand line:\n  %s\n", strings.Join(plan.Command, " "))
		fmt.Fprintf(stdout, "\nconfiguration (%s):\n%s\n", plan.ConfigFile, strings.TrimRight(string(plan.ConfigJSON), "\n"))
	case "":
		fmt.Fprintln(stderr, "vm-supervisor: no backend can run on this host (see `vm-supervisor check`)")
		return 1
	}
	return 0
}
