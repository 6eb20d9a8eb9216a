package main

import (
	"context"
	"fmt"
	"io"
	"path/filepath"

	"github.com/spf13/pflag"

	"github.com/aleph-vm-go/vm-supervisor/internal/config"
)

// cmdRuntimeAdd registers a runtime image in the local store.
func cmdRuntimeAdd(ctx context.Context, s *config.Settings, args []string, stdout, stderr io.Writer) int {
	fl := pflag.NewFlagSet("runtime add", pflag.ContinueOnError)
	fl.SetOutput(stderr)
	makeDefault := fl.Bool("default", false, "make it the runtime `program upload` uses by default")
	comment := fl.String("comment", "", "description stored with the runtime")
	if err := fl.Parse(args); err != nil {
		return 2
	}
	if fl.NArg() != 1 {
		fmt.Fprintln(stderr, "usage: vm-supervisor runtime add SQUASHFS [--default] [--comment TEXT]")
		return 2
	}
	path := fl.Arg(0)
	if *comment == "" {
		*comment = filepath.Base(filepath.Dir(path))
	}
	st, err := openStore(s)
	if err != nil {
		fmt.Fprintln(stderr, "vm-supervisor:", err)
		return 1
	}
	ref, err := st.AddRuntime(ctx, path, *comment, *makeDefault)
	if err != nil {
		fmt.Fprintln(stderr, "vm-supervisor: runtime add:", err)
		return 1
	}
	fmt.Fprintln(stdout, ref)
	return 0
}
