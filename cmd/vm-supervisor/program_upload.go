package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

	"github.com/spf13/pflag"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

// cmdProgramUpload implements `vm-supervisor program upload PATH
// ENTRYPOINT [flags]` with aleph-client's flags. Progress goes to stderr;
// stdout gets the URL to call and then the bare item hash on the last
// line, so scripts can take `tail -n1`. Exit codes: 0 success, 2 bad
// input, 1 anything else.
func cmdProgramUpload(ctx context.Context, st *store.Store, args []string, stdout, stderr io.Writer, baseURL string) int {
	fs := pflag.NewFlagSet("program upload", pflag.ContinueOnError)
	fs.SortFlags = false
	// Parse errors are reported by us, as one line.
	fs.SetOutput(io.Discard)
	memory := fs.Int("memory", store.DefaultUploadMemoryMiB, "memory of the VM in MiB")
	vcpus := fs.Int("vcpus", store.DefaultUploadVCPUs, "number of virtual CPUs")
	timeout := fs.Int("timeout-seconds", store.DefaultUploadTimeoutSeconds, "per-request timeout in seconds (resources.seconds)")
	internet := fs.Bool("internet", false, "give the program internet access")
	persistent := fs.Bool("persistent", false, "keep the program running instead of starting it on demand")
	encoding := fs.String("encoding", "", "code encoding: zip, squashfs or plain (default: zip for a directory, plain for a file)")
	runtime := fs.String("runtime", "", "item hash of the runtime's STORE message (default: the default runtime, see `make runtime`)")
	envs := fs.StringArray("env", nil, "environment variable KEY=VALUE for the program (repeatable)")
	immutableVols := fs.StringArray("immutable-volume", nil, "read-only volume mount=PATH,path=DIR|ref=HASH (repeatable)")
	persistentVols := fs.StringArray("persistent-volume", nil, "volume kept across runs mount=PATH,name=NAME,size_mib=N (repeatable)")
	ephemeralVols := fs.StringArray("ephemeral-volume", nil, "empty scratch volume mount=PATH,size_mib=N (repeatable)")
	dataDir := fs.String("data", "", "directory packed as the program's data archive (zip, read-only)")
	dataMount := fs.String("data-mount", store.DefaultDataMount, "where the data archive appears in the program")
	fs.Usage = func() {
		fmt.Fprintf(stdout, "Usage: vm-supervisor program upload PATH ENTRYPOINT [flags]\n\n"+
			"Packs PATH (a directory, or one .py file) into the local store and prints\n"+
			"the URL of the program, then its item hash alone on the last line.\n"+
			"ENTRYPOINT is module:attribute for an ASGI app (e.g. main:app) or the\n"+
			"relative path of an executable.\n\nFlags:\n%s%s", fs.FlagUsages(), volumeFlagHelp)
	}

	bad := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "program upload: "+format+"\n", a...)
		return 2
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		return bad("%v (see --help)", err)
	}
	pos := fs.Args()
	switch {
	case len(pos) == 0:
		return bad("missing PATH and ENTRYPOINT (e.g. program upload ./myapp main:app)")
	case len(pos) == 1:
		return bad("missing ENTRYPOINT after %s (e.g. main:app)", pos[0])
	case len(pos) > 2:
		return bad("unexpected arguments %q after PATH ENTRYPOINT", pos[2:])
	}
	for name, v := range map[string]int{"memory": *memory, "vcpus": *vcpus, "timeout-seconds": *timeout} {
		if v <= 0 {
			return bad("--%s must be a positive number, got %d", name, v)
		}
	}
	vars, err := envFlags(*envs)
	if err != nil {
		return bad("%v", err)
	}
	volumes, err := parseVolumeFlags(*immutableVols, *persistentVols, *ephemeralVols)
	if err != nil {
		return bad("%v", err)
	}
	var data *store.UploadData
	if *dataDir != "" {
		data = &store.UploadData{Path: *dataDir, Mount: *dataMount}
	} else if fs.Changed("data-mount") {
		return bad("--data-mount needs --data DIR")
	}

	opts := store.UploadOptions{
		Path:           pos[0],
		Entrypoint:     pos[1],
		Encoding:       message.Encoding(*encoding),
		MemoryMiB:      *memory,
		VCPUs:          *vcpus,
		TimeoutSeconds: *timeout,
		Internet:       *internet,
		Persistent:     *persistent,
		RuntimeRef:     *runtime,
		Variables:      vars,
		Volumes:        volumes,
		Data:           data,
		Progress: func(format string, a ...any) {
			fmt.Fprintf(stderr, format+"\n", a...)
		},
	}
	if len(vars) > 0 {
		fmt.Fprintf(stderr, "variables: %s\n", strings.Join(slices.Sorted(maps.Keys(vars)), ", "))
	}
	res, err := st.UploadProgram(ctx, opts)
	if err != nil {
		fmt.Fprintf(stderr, "program upload: %v\n", err)
		if errkind.Is(err, errkind.InvalidInput) {
			return 2
		}
		return 1
	}
	fmt.Fprintf(stderr, "program %s uploaded (%s code, %d bytes, runtime %s)\n", res.ProgramHash, res.Encoding, res.CodeSize, res.RuntimeRef)
	fmt.Fprintf(stdout, "URL: %s/vm/%s/\n", strings.TrimRight(baseURL, "/"), res.ProgramHash)
	fmt.Fprintln(stdout, res.ProgramHash)
	return 0
}

// envFlags reads the repeated --env KEY=VALUE flags (nil when there are
// none); a repeated KEY keeps its last value.
func envFlags(kvs []string) (map[string]string, error) {
	var vars map[string]string
	for _, kv := range kvs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("invalid --env %q: expected KEY=VALUE", kv)
		}
		if vars == nil {
			vars = map[string]string{}
		}
		vars[k] = v
	}
	return vars, nil
}
