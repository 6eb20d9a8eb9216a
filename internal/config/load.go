package config

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sort"
	"strconv"
	"strings"

	"github.com/joho/godotenv"
	"github.com/spf13/pflag"
)

// ErrHelp is returned by Load when --help was asked for; the caller prints
// Usage and exits 0.
var ErrHelp = errors.New("help requested")

// Options are command-line-only choices that are not settings.
type Options struct {
	// Verbosity counts -v: 0 warn, 1 info, 2 or more debug.
	Verbosity     int
	PrintSettings bool
	DoNotRun      bool
	Profile       bool
	Benchmark     int
	Help          bool
	// Args are the words left after the flags (a sub-command and its own
	// flags): parsing stops at the first non-flag word.
	Args []string
	// Unknown lists ALEPH_VM_* names from .env or the environment that are
	// no setting of ours, so a typo can be logged instead of ignored.
	Unknown []string
}

// LogLevel maps Verbosity to a slog level.
func (o *Options) LogLevel() slog.Level {
	switch {
	case o.Verbosity >= 2:
		return slog.LevelDebug
	case o.Verbosity == 1:
		return slog.LevelInfo
	default:
		return slog.LevelWarn
	}
}

// SettingError reports a bad value. Its message is one line that names the
// setting, the value and, unless it came from the environment, its source.
type SettingError struct {
	Name   string // without EnvPrefix
	Value  string
	Source string // "" for the environment, else e.g. "--port" or the .env path
	Reason string
}

func (e *SettingError) Error() string {
	from := ""
	if e.Source != "" {
		from = " (from " + e.Source + ")"
	}
	return fmt.Sprintf("invalid %s%s = %q%s: %s", EnvPrefix, e.Name, e.Value, from, oneLine(e.Reason))
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// settingFlags are the flags that set a setting directly; their value is
// parsed exactly as the variable's, so errors read the same.
var settingFlags = []struct{ flag, setting, typ, usage string }{
	{"host", "SUPERVISOR_HOST", "address", "address to listen on"},
	{"port", "SUPERVISOR_PORT", "int", "port to listen on"},
	{"domain-name", "DOMAIN_NAME", "name", "host name of the status page"},
	{"hypervisor", "HYPERVISOR", "name", "isolation backend: auto, firecracker, qemu or gvisor"},
	{"api-server", "API_SERVER", "url", "Aleph API server"},
	{"cache-root", "CACHE_ROOT", "dir", "download cache directory"},
	{"execution-root", "EXECUTION_ROOT", "dir", "directory of executions and the local store"},
	{"execution-database", "EXECUTION_DATABASE", "file", "SQLite file of execution records"},
}

// rawFlag keeps a setting flag's text for the setting's own parser, while
// showing a meaningful type in the usage text.
type rawFlag struct{ value, typ string }

func (r *rawFlag) String() string     { return r.value }
func (r *rawFlag) Set(v string) error { r.value = v; return nil }
func (r *rawFlag) Type() string       { return r.typ }

// flagValues holds the flags that only spell a setting (they are copied
// into the settings, not kept in Options).
type flagValues struct {
	opts            *Options
	jailer          bool
	noJailer        bool
	systemLogs      bool
	noNetwork       bool
	fakeDataProgram string
	settingsV       map[string]*rawFlag
}

func newFlagSet(fv *flagValues) *pflag.FlagSet {
	fs := pflag.NewFlagSet("vm-supervisor", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.SortFlags = false
	// Sub-commands (program upload ...) have flags of their own.
	fs.SetInterspersed(false)
	o := fv.opts
	fs.CountVarP(&o.Verbosity, "verbose", "v", "more logs: -v info, -vv debug (default: warnings)")
	fs.BoolVar(&fv.systemLogs, "system-logs", false, "show guest console output (ALEPH_VM_PRINT_SYSTEM_LOGS)")
	fs.BoolVar(&fv.noNetwork, "no-network", false, "give sandboxes no network (ALEPH_VM_ALLOW_VM_NETWORKING=false)")
	fs.BoolVar(&fv.jailer, "jailer", false, "run firecracker under its jailer (ALEPH_VM_USE_JAILER=true)")
	fs.BoolVar(&fv.noJailer, "no-jailer", false, "run firecracker without its jailer (ALEPH_VM_USE_JAILER=false)")
	fs.BoolVarP(&o.PrintSettings, "print-settings", "p", false, "print every setting (secrets redacted)")
	fs.BoolVar(&o.PrintSettings, "print-config", false, "alias of --print-settings")
	fs.BoolVarP(&o.DoNotRun, "do-not-run", "n", false, "exit after printing settings instead of serving")
	fs.BoolVar(&o.Profile, "profile", false, "CPU-profile the supervisor (EXECUTION_ROOT/cpu.pprof) and every gVisor agent (EXECUTION_ROOT/agent-profiles) until it stops")
	fs.IntVar(&o.Benchmark, "benchmark", 0, "run the fake-data program N times and report timings")
	fs.StringVarP(&fv.fakeDataProgram, "fake-data-program", "f", "", "serve this program directory for every request (ALEPH_VM_FAKE_DATA_PROGRAM)")
	fv.settingsV = make(map[string]*rawFlag, len(settingFlags))
	for _, sf := range settingFlags {
		rf := &rawFlag{typ: sf.typ}
		fv.settingsV[sf.flag] = rf
		fs.Var(rf, sf.flag, sf.usage+" ("+EnvPrefix+sf.setting+")")
	}
	fs.BoolVarP(&o.Help, "help", "h", false, "show this help")
	return fs
}

// Usage writes the flag list, one flag a line with the setting it sets,
// for the caller to frame with its synopsis.
func Usage(w io.Writer) {
	fs := newFlagSet(&flagValues{opts: &Options{}})
	fmt.Fprint(w, fs.FlagUsagesWrapped(100))
}

type rawValue struct {
	value  string
	source string
}

// Load builds the settings from defaults, the .env file at dotenvPath (if
// it exists; "" skips it), the ALEPH_VM_* entries of environ (KEY=VALUE
// strings, as os.Environ returns) and the command-line args (without the
// program name), each overriding the previous.
func Load(args []string, environ []string, dotenvPath string) (*Settings, *Options, error) {
	fs, fv, err := parseArgs(args)
	opts := fv.opts
	if err != nil {
		return nil, opts, err
	}
	raw, unknown, err := gatherRaw(dotenvPath, environ)
	if err != nil {
		return nil, opts, err
	}
	addFlagSettings(raw, fs, fv)
	s, err := apply(raw)
	if err != nil {
		return nil, opts, err
	}
	for k := range unknown {
		opts.Unknown = append(opts.Unknown, k)
	}
	sort.Strings(opts.Unknown)
	return s, opts, nil
}

// parseArgs parses the command line; fv.opts holds the flag-only values
// even on error (Help in particular).
func parseArgs(args []string) (*pflag.FlagSet, *flagValues, error) {
	fv := &flagValues{opts: &Options{}}
	opts := fv.opts
	fs := newFlagSet(fv)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			opts.Help = true
			return fs, fv, ErrHelp
		}
		return fs, fv, fmt.Errorf("%s (see --help)", oneLine(err.Error()))
	}
	opts.Args = fs.Args()
	if opts.Help {
		return fs, fv, ErrHelp
	}
	if opts.Benchmark < 0 {
		return fs, fv, fmt.Errorf("invalid --benchmark = %d: must not be negative", opts.Benchmark)
	}
	if fv.jailer && fv.noJailer {
		return fs, fv, errors.New("--jailer and --no-jailer cannot be used together")
	}
	return fs, fv, nil
}

// gatherRaw collects the ALEPH_VM_* values of the .env file, then of
// environ (which overrides it), by setting name; unknown holds the
// ALEPH_VM_* keys that name no setting.
func gatherRaw(dotenvPath string, environ []string) (raw map[string]rawValue, unknown map[string]bool, err error) {
	raw = map[string]rawValue{}
	unknown = map[string]bool{}
	take := func(key, value, source string) {
		name, ok := strings.CutPrefix(key, EnvPrefix)
		if !ok {
			return
		}
		if _, known := lookup(name); !known {
			unknown[key] = true
			return
		}
		raw[name] = rawValue{value, source}
	}

	if dotenvPath != "" {
		file, err := readDotenv(dotenvPath)
		if err != nil {
			return nil, nil, err
		}
		for k, v := range file {
			take(k, v, dotenvPath)
		}
	}
	for _, kv := range environ {
		k, v, ok := strings.Cut(kv, "=")
		if ok {
			take(k, v, "")
		}
	}
	return raw, unknown, nil
}

// addFlagSettings lets the flags given on the command line override the
// values of raw.
func addFlagSettings(raw map[string]rawValue, fs *pflag.FlagSet, fv *flagValues) {
	for _, sf := range settingFlags {
		if fs.Changed(sf.flag) {
			raw[sf.setting] = rawValue{fv.settingsV[sf.flag].value, "--" + sf.flag}
		}
	}
	if fs.Changed("system-logs") && fv.systemLogs {
		raw["PRINT_SYSTEM_LOGS"] = rawValue{"true", "--system-logs"}
	}
	if fs.Changed("no-network") && fv.noNetwork {
		raw["ALLOW_VM_NETWORKING"] = rawValue{"false", "--no-network"}
	}
	switch {
	case fs.Changed("jailer"):
		raw["USE_JAILER"] = rawValue{strconv.FormatBool(fv.jailer), "--jailer"}
	case fs.Changed("no-jailer"):
		raw["USE_JAILER"] = rawValue{strconv.FormatBool(!fv.noJailer), "--no-jailer"}
	}
	if fs.Changed("fake-data-program") {
		raw["FAKE_DATA_PROGRAM"] = rawValue{fv.fakeDataProgram, "-f/--fake-data-program"}
	}
}

// apply sets the raw values over the defaults and validates the result;
// given tells which settings had a value.
func apply(raw map[string]rawValue) (*Settings, error) {
	s := Default()
	given := map[string]bool{}
	// Table order, not map order, so that the first error reported is the
	// same on every run.
	for _, d := range table {
		rv, ok := raw[d.name]
		if !ok {
			continue
		}
		given[d.name] = true
		v := strings.TrimSpace(rv.value)
		var err error
		if v == "" && !d.optional {
			err = errEmpty
		} else {
			err = d.set(s, v)
		}
		if err != nil {
			return nil, &SettingError{Name: d.name, Value: rv.value, Source: rv.source, Reason: err.Error()}
		}
	}
	s.deriveFromExecutionRoot(given)
	if serr := s.validate(); serr != nil {
		if rv, ok := raw[serr.Name]; ok {
			serr.Source = rv.source
		}
		return nil, serr
	}
	return s, nil
}

// readDotenv parses the file without touching the process environment. A
// missing file is normal (most hosts have none); an unreadable one is not.
func readDotenv(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read settings file: %w", err)
	}
	defer f.Close()
	m, err := godotenv.Parse(f)
	if err != nil {
		return nil, fmt.Errorf("parse settings file %s: %w", path, err)
	}
	return m, nil
}
