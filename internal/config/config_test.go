package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func writeDotenv(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), ".env")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDefaults(t *testing.T) {
	s, o, err := Load(nil, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	if s.SupervisorPort != 4020 || s.SupervisorHost != "127.0.0.1" || s.ReuseTimeout != time.Hour ||
		s.InitTimeout != 20*time.Second || !s.UseJailer || s.Hypervisor != HypervisorAuto ||
		s.IPv4AddressPool != netip.MustParsePrefix("172.16.0.0/12") || s.MaxProgramArchiveSize != 10_000_000 {
		t.Errorf("unexpected defaults: %+v", s)
	}
	// aleph-vm's defaults (conf.py CONNECTIVITY_*).
	if s.ConnectivityIPv4URL != "https://1.1.1.1/" || s.ConnectivityIPv6URL != "https://[2606:4700:4700::1111]/" ||
		s.ConnectivityDNSHostname != "example.org" || len(s.ConnectivityHTTPURLs) != 3 {
		t.Errorf("connectivity defaults: %+v", s)
	}
	if s.ExecutionDatabase != "/var/lib/aleph/vm/executions.sqlite3" {
		t.Errorf("ExecutionDatabase = %q", s.ExecutionDatabase)
	}
	if s.PersistentVolumesDir != "/var/lib/aleph/vm/volumes/persistent" {
		t.Errorf("PersistentVolumesDir = %q", s.PersistentVolumesDir)
	}
	if filepath.Base(s.AgentPath) != "vm-agent" {
		t.Errorf("AgentPath = %q", s.AgentPath)
	}
	if o.Verbosity != 0 || o.LogLevel().String() != "WARN" {
		t.Errorf("unexpected options: %+v", o)
	}
}

func TestPrecedence(t *testing.T) {
	dotenv := writeDotenv(t, "ALEPH_VM_SUPERVISOR_PORT=4021\n# comment\nALEPH_VM_DOMAIN_NAME=\"from-dotenv\"\n")
	tests := []struct {
		name    string
		args    []string
		environ []string
		dotenv  string
		want    int
	}{
		{"default", nil, nil, "", 4020},
		{"missing dotenv is ignored", nil, nil, filepath.Join(t.TempDir(), "none"), 4020},
		{"dotenv over default", nil, nil, dotenv, 4021},
		{"env over dotenv", nil, []string{"ALEPH_VM_SUPERVISOR_PORT=4022"}, dotenv, 4022},
		{"flag over env", []string{"--port", "4023"}, []string{"ALEPH_VM_SUPERVISOR_PORT=4022"}, dotenv, 4023},
		{"flag over dotenv", []string{"--port=4024"}, nil, dotenv, 4024},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, _, err := Load(tt.args, tt.environ, tt.dotenv)
			if err != nil {
				t.Fatal(err)
			}
			if s.SupervisorPort != tt.want {
				t.Errorf("port = %d, want %d", s.SupervisorPort, tt.want)
			}
		})
	}
}

func TestDotenvDoesNotTouchProcessEnvironment(t *testing.T) {
	dotenv := writeDotenv(t, "ALEPH_VM_TEST_ONLY_LEAK=1\nALEPH_VM_DOMAIN_NAME=x.example\n")
	s, o, err := Load(nil, nil, dotenv)
	if err != nil {
		t.Fatal(err)
	}
	if s.DomainName != "x.example" {
		t.Errorf("DomainName = %q", s.DomainName)
	}
	if _, ok := os.LookupEnv("ALEPH_VM_TEST_ONLY_LEAK"); ok {
		t.Error(".env leaked into the process environment")
	}
	if len(o.Unknown) != 1 || o.Unknown[0] != "ALEPH_VM_TEST_ONLY_LEAK" {
		t.Errorf("Unknown = %v", o.Unknown)
	}
}

func TestDerivedPaths(t *testing.T) {
	tests := []struct {
		name             string
		args, environ    []string
		wantDB, wantVols string
	}{
		{"follow execution root", nil, []string{"ALEPH_VM_EXECUTION_ROOT=/srv/x"}, "/srv/x/executions.sqlite3", "/srv/x/volumes/persistent"},
		{"flag execution root", []string{"--execution-root", "/srv/y"}, nil, "/srv/y/executions.sqlite3", "/srv/y/volumes/persistent"},
		{"explicit wins", nil, []string{"ALEPH_VM_EXECUTION_ROOT=/srv/x", "ALEPH_VM_EXECUTION_DATABASE=/db.sqlite", "ALEPH_VM_PERSISTENT_VOLUMES_DIR=/vols"}, "/db.sqlite", "/vols"},
		{"empty means derive", nil, []string{"ALEPH_VM_EXECUTION_ROOT=/srv/z", "ALEPH_VM_EXECUTION_DATABASE="}, "/srv/z/executions.sqlite3", "/srv/z/volumes/persistent"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, _, err := Load(tt.args, tt.environ, "")
			if err != nil {
				t.Fatal(err)
			}
			if s.ExecutionDatabase != tt.wantDB || s.PersistentVolumesDir != tt.wantVols {
				t.Errorf("got %q, %q", s.ExecutionDatabase, s.PersistentVolumesDir)
			}
		})
	}
}

func TestFlags(t *testing.T) {
	prog := t.TempDir()
	tests := []struct {
		name  string
		args  []string
		check func(t *testing.T, s *Settings, o *Options)
	}{
		{"-vv is debug", []string{"-vv"}, func(t *testing.T, s *Settings, o *Options) {
			if o.Verbosity != 2 || o.LogLevel().String() != "DEBUG" {
				t.Errorf("verbosity %d", o.Verbosity)
			}
		}},
		{"-v -v counts", []string{"-v", "--verbose"}, func(t *testing.T, s *Settings, o *Options) {
			if o.Verbosity != 2 {
				t.Errorf("verbosity %d", o.Verbosity)
			}
		}},
		{"-v is info", []string{"-v"}, func(t *testing.T, s *Settings, o *Options) {
			if o.LogLevel().String() != "INFO" {
				t.Errorf("level %v", o.LogLevel())
			}
		}},
		{"no-jailer", []string{"--no-jailer"}, func(t *testing.T, s *Settings, o *Options) {
			if s.UseJailer {
				t.Errorf("UseJailer %v", s.UseJailer)
			}
		}},
		{"jailer overrides env", []string{"--jailer"}, func(t *testing.T, s *Settings, o *Options) {
			if !s.UseJailer {
				t.Errorf("UseJailer %v", s.UseJailer)
			}
		}},
		{"system logs and no network", []string{"--system-logs", "--no-network"}, func(t *testing.T, s *Settings, o *Options) {
			if !s.PrintSystemLogs || s.AllowVMNetworking {
				t.Errorf("PrintSystemLogs %v AllowVMNetworking %v", s.PrintSystemLogs, s.AllowVMNetworking)
			}
		}},
		{"print and do not run", []string{"-p", "-n"}, func(t *testing.T, s *Settings, o *Options) {
			if !o.PrintSettings || !o.DoNotRun {
				t.Errorf("%+v", o)
			}
		}},
		{"print-config alias", []string{"--print-config", "--do-not-run"}, func(t *testing.T, s *Settings, o *Options) {
			if !o.PrintSettings || !o.DoNotRun {
				t.Errorf("%+v", o)
			}
		}},
		{"profile and benchmark", []string{"--profile", "--benchmark", "7"}, func(t *testing.T, s *Settings, o *Options) {
			if !o.Profile || o.Benchmark != 7 {
				t.Errorf("%+v", o)
			}
		}},
		{"fake data program", []string{"-f", prog}, func(t *testing.T, s *Settings, o *Options) {
			if s.FakeDataProgram != prog {
				t.Errorf("FakeDataProgram %q, want %q", s.FakeDataProgram, prog)
			}
		}},
		{"setting flags", []string{"--host", "0.0.0.0", "--hypervisor", "gvisor", "--domain-name", "vm.example",
			"--cache-root", "/c", "--execution-root", "/e", "--api-server", "http://127.0.0.1:9"},
			func(t *testing.T, s *Settings, o *Options) {
				if s.SupervisorHost != "0.0.0.0" || s.Hypervisor != HypervisorGVisor || s.DomainName != "vm.example" ||
					s.CacheRoot != "/c" || s.ExecutionRoot != "/e" || s.APIServer != "http://127.0.0.1:9" {
					t.Errorf("%+v", s)
				}
			}},
		{"sub-command words are left", []string{"-v", "program", "upload", "dir", "main:app", "--memory", "256"},
			func(t *testing.T, s *Settings, o *Options) {
				if strings.Join(o.Args, " ") != "program upload dir main:app --memory 256" {
					t.Errorf("Args = %q", o.Args)
				}
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, o, err := Load(tt.args, []string{"ALEPH_VM_USE_JAILER=false"}, "")
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, s, o)
		})
	}
}

func TestEnvironmentValues(t *testing.T) {
	s, _, err := Load(nil, []string{
		"ALEPH_VM_REUSE_TIMEOUT=1.5",
		"ALEPH_VM_INIT_TIMEOUT=2m",
		"ALEPH_VM_MAX_DATA_ARCHIVE_SIZE=20_000_000",
		"ALEPH_VM_DNS_NAMESERVERS=[\"9.9.9.9\", \"2620:fe::fe\"]",
		"ALEPH_VM_IPV4_ADDRESS_POOL=10.0.0.0/8",
		"ALEPH_VM_IPV4_NETWORK_PREFIX_LENGTH=28",
		"ALEPH_VM_ALLOW_VM_NETWORKING=no",
		"ALEPH_VM_HYPERVISOR=QEMU",
		"ALEPH_VM_PAYMENT_RECEIVER_ADDRESS=0x5D7A6D4fB1C6E4d0a8A1C3c2bC9dB3a2F0e1D2c3",
		`ALEPH_VM_CONNECTIVITY_HTTP_URLS=["http://127.0.0.1:1/a", "https://localhost/b"]`,
		"ALEPH_VM_CONNECTIVITY_DNS_HOSTNAME=localhost",
		"UNRELATED=1",
		"ALEPH_VM_NOT_A_SETTING=1",
	}, "")
	if err != nil {
		t.Fatal(err)
	}
	if s.ReuseTimeout != 1500*time.Millisecond || s.InitTimeout != 2*time.Minute || s.MaxDataArchiveSize != 20_000_000 ||
		strings.Join(s.DNSNameservers, ",") != "9.9.9.9,2620:fe::fe" || s.IPv4AddressPool.String() != "10.0.0.0/8" ||
		s.IPv4NetworkPrefixLength != 28 || s.AllowVMNetworking || s.Hypervisor != HypervisorQemu ||
		s.PaymentReceiverAddress != "0x5D7A6D4fB1C6E4d0a8A1C3c2bC9dB3a2F0e1D2c3" ||
		strings.Join(s.ConnectivityHTTPURLs, " ") != "http://127.0.0.1:1/a https://localhost/b" || s.ConnectivityDNSHostname != "localhost" {
		t.Errorf("%+v", s)
	}
}

func TestValidationErrors(t *testing.T) {
	unreadable := filepath.Join(t.TempDir(), "missing-program")
	tests := []struct {
		name    string
		args    []string
		environ []string
		want    string // substring, beyond the setting name
		setting string
	}{
		{"port too high", nil, []string{"ALEPH_VM_SUPERVISOR_PORT=99999"}, `"99999": must be between 1 and 65535`, "SUPERVISOR_PORT"},
		{"port zero", nil, []string{"ALEPH_VM_SUPERVISOR_PORT=0"}, `"0"`, "SUPERVISOR_PORT"},
		{"port flag", []string{"--port", "70000"}, nil, `"70000" (from --port)`, "SUPERVISOR_PORT"},
		{"port not integer", nil, []string{"ALEPH_VM_SUPERVISOR_PORT=abc"}, "must be an integer", "SUPERVISOR_PORT"},
		{"malformed cidr", nil, []string{"ALEPH_VM_IPV4_ADDRESS_POOL=172.16.0.0/40"}, `"172.16.0.0/40"`, "IPV4_ADDRESS_POOL"},
		{"ipv6 pool", nil, []string{"ALEPH_VM_IPV4_ADDRESS_POOL=fd00::/8"}, "IPv4", "IPV4_ADDRESS_POOL"},
		{"prefix shorter than pool", nil, []string{"ALEPH_VM_IPV4_NETWORK_PREFIX_LENGTH=8"}, `"8"`, "IPV4_NETWORK_PREFIX_LENGTH"},
		{"unknown hypervisor", nil, []string{"ALEPH_VM_HYPERVISOR=xen"}, `"xen": must be one of auto, firecracker, qemu, gvisor`, "HYPERVISOR"},
		{"hypervisor flag", []string{"--hypervisor=kvm"}, nil, "(from --hypervisor)", "HYPERVISOR"},
		{"negative size", nil, []string{"ALEPH_VM_MAX_PROGRAM_ARCHIVE_SIZE=-1"}, `"-1": must be at least 1`, "MAX_PROGRAM_ARCHIVE_SIZE"},
		{"size not integer", nil, []string{"ALEPH_VM_MAX_RUNTIME_SIZE=2GB"}, "must be an integer", "MAX_RUNTIME_SIZE"},
		{"bad boolean", nil, []string{"ALEPH_VM_USE_JAILER=maybe"}, `"maybe": must be a boolean`, "USE_JAILER"},
		{"negative timeout", nil, []string{"ALEPH_VM_REUSE_TIMEOUT=-5"}, "must not be negative", "REUSE_TIMEOUT"},
		{"zero init timeout", nil, []string{"ALEPH_VM_INIT_TIMEOUT=0"}, "greater than zero", "INIT_TIMEOUT"},
		{"bad duration", nil, []string{"ALEPH_VM_INIT_TIMEOUT=soon"}, `"soon"`, "INIT_TIMEOUT"},
		{"bad api url", nil, []string{"ALEPH_VM_API_SERVER=ftp://x"}, "http", "API_SERVER"},
		{"bad dns resolution", nil, []string{"ALEPH_VM_DNS_RESOLUTION=hosts"}, "resolv.conf", "DNS_RESOLUTION"},
		{"bad nameserver", nil, []string{"ALEPH_VM_DNS_NAMESERVERS=1.1.1.1,nope"}, "nope", "DNS_NAMESERVERS"},
		{"bad token hash", nil, []string{"ALEPH_VM_ALLOCATION_TOKEN_HASH=abc"}, "sha256", "ALLOCATION_TOKEN_HASH"},
		{"bad payment receiver", nil, []string{"ALEPH_VM_PAYMENT_RECEIVER_ADDRESS=0x12 34"}, "account address", "PAYMENT_RECEIVER_ADDRESS"},
		{"bad connectivity urls", nil, []string{"ALEPH_VM_CONNECTIVITY_HTTP_URLS=ftp://x"}, "http", "CONNECTIVITY_HTTP_URLS"},
		{"empty connectivity urls", nil, []string{"ALEPH_VM_CONNECTIVITY_HTTP_URLS=[]"}, "at least one", "CONNECTIVITY_HTTP_URLS"},
		{"bad dns hostname", nil, []string{"ALEPH_VM_CONNECTIVITY_DNS_HOSTNAME=a/b"}, "host name", "CONNECTIVITY_DNS_HOSTNAME"},
		{"signer not checksummed", nil, []string{"ALEPH_VM_AUTHORIZED_ALLOCATION_SIGNERS=0xdac17f958d2ee523a2206206994597c13d831ec7"},
			"checksummed (EIP-55)", "AUTHORIZED_ALLOCATION_SIGNERS"},
		{"signer not an address", nil, []string{`ALEPH_VM_AUTHORIZED_ALLOCATION_SIGNERS=["not-an-address"]`}, `"not-an-address"`, "AUTHORIZED_ALLOCATION_SIGNERS"},
		{"default signer not checksummed", nil, []string{"ALEPH_VM_DEFAULT_ALLOCATION_SIGNERS=0xdac17f958d2ee523a2206206994597c13d831ec7"},
			"EIP-55", "DEFAULT_ALLOCATION_SIGNERS"},
		{"bad aggregate address", nil, []string{"ALEPH_VM_SETTINGS_AGGREGATE_ADDRESS=0x12"}, "40 hex digits", "SETTINGS_AGGREGATE_ADDRESS"},
		{"zero signature age", nil, []string{"ALEPH_VM_ALLOCATION_SIGNATURE_MAX_AGE_SECONDS=0"}, "greater than zero", "ALLOCATION_SIGNATURE_MAX_AGE_SECONDS"},
		{"bad redis url", nil, []string{"ALEPH_VM_REDIS_URL=http://x"}, "redis://", "REDIS_URL"},
		{"empty required", nil, []string{"ALEPH_VM_CACHE_ROOT="}, "must not be empty", "CACHE_ROOT"},
		{"unreadable fake data", []string{"-f", unreadable}, nil, "unreadable", "FAKE_DATA_PROGRAM"},
		{"bad runsc platform", nil, []string{"ALEPH_VM_RUNSC_PLATFORM=magic"}, "ptrace", "RUNSC_PLATFORM"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := Load(tt.args, tt.environ, "")
			if err == nil {
				t.Fatal("no error")
			}
			msg := err.Error()
			if strings.Contains(msg, "\n") {
				t.Errorf("error spans lines: %q", msg)
			}
			if !strings.HasPrefix(msg, "invalid ALEPH_VM_"+tt.setting+" = ") {
				t.Errorf("error %q does not name ALEPH_VM_%s", msg, tt.setting)
			}
			if !strings.Contains(msg, tt.want) {
				t.Errorf("error %q lacks %q", msg, tt.want)
			}
			var se *SettingError
			if !errors.As(err, &se) || se.Name != tt.setting {
				t.Errorf("not a SettingError for %s: %#v", tt.setting, err)
			}
		})
	}
}

func TestExactPortMessage(t *testing.T) {
	_, _, err := Load(nil, []string{"ALEPH_VM_SUPERVISOR_PORT=99999"}, "")
	want := `invalid ALEPH_VM_SUPERVISOR_PORT = "99999": must be between 1 and 65535`
	if err == nil || err.Error() != want {
		t.Errorf("got %v, want %s", err, want)
	}
}

func TestDotenvErrorNamesFile(t *testing.T) {
	p := writeDotenv(t, "ALEPH_VM_SUPERVISOR_PORT=-3\n")
	_, _, err := Load(nil, nil, p)
	if err == nil || !strings.Contains(err.Error(), "ALEPH_VM_SUPERVISOR_PORT") || !strings.Contains(err.Error(), p) {
		t.Errorf("got %v", err)
	}
}

func TestFlagErrors(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"unknown flag", []string{"--frobnicate"}, "frobnicate"},
		{"benchmark not integer", []string{"--benchmark", "x"}, "benchmark"},
		{"benchmark negative", []string{"--benchmark", "-2"}, "benchmark"},
		{"both jailer flags", []string{"--jailer", "--no-jailer"}, "--no-jailer"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := Load(tt.args, nil, "")
			if err == nil || !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
				t.Errorf("got %v", err)
			}
		})
	}
}

func TestHelp(t *testing.T) {
	for _, arg := range []string{"--help", "-h"} {
		_, o, err := Load([]string{arg}, nil, "")
		if !errors.Is(err, ErrHelp) || !o.Help {
			t.Errorf("%s: err %v", arg, err)
		}
	}
	var b bytes.Buffer
	Usage(&b)
	for _, f := range []string{"--verbose", "-v", "--system-logs", "--no-network", "--jailer", "--no-jailer",
		"--print-settings", "-p", "--print-config", "--do-not-run", "-n", "--profile", "--benchmark",
		"--fake-data-program", "-f", "--help", "--host", "--port", "--hypervisor", "--domain-name",
		"--cache-root", "--execution-root", "--api-server"} {
		if !strings.Contains(b.String(), f) {
			t.Errorf("usage lacks %s:\n%s", f, b.String())
		}
	}
}

func TestPrintAndRedaction(t *testing.T) {
	s, _, err := Load(nil, []string{
		"ALEPH_VM_REDIS_URL=redis://user:hunter2@cache.example:6379/0",
		"ALEPH_VM_ALLOCATION_TOKEN_HASH=" + strings.Repeat("ab", 32),
	}, "")
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if err := s.Print(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(lines) != len(table) {
		t.Errorf("%d lines for %d settings", len(lines), len(table))
	}
	for _, want := range []string{
		"ALEPH_VM_SUPERVISOR_PORT = 4020\n",
		"ALEPH_VM_REUSE_TIMEOUT = 3600\n",
		"ALEPH_VM_IPV4_ADDRESS_POOL = 172.16.0.0/12\n",
		"ALEPH_VM_ALLOCATION_TOKEN_HASH = <redacted>\n",
		"ALEPH_VM_REDIS_URL = redis://user:<redacted>@cache.example:6379/0\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("print lacks %q", want)
		}
	}
	if strings.Contains(out, "hunter2") || strings.Contains(out, strings.Repeat("ab", 32)) {
		t.Error("secret printed")
	}
	for _, l := range lines {
		if !strings.HasPrefix(l, "ALEPH_VM_") || !strings.Contains(l, " = ") {
			t.Errorf("bad line %q", l)
		}
	}

	js, err := json.Marshal(s.Redacted())
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(js), "hunter2") || strings.Contains(string(js), strings.Repeat("ab", 32)) {
		t.Errorf("secret in JSON: %s", js)
	}
	m := s.Redacted()
	if m["SUPERVISOR_PORT"] != 4020 || m["ALLOCATION_TOKEN_HASH"] != "<redacted>" || m["REUSE_TIMEOUT"] != 3600.0 {
		t.Errorf("Redacted: %v", m)
	}
	// The real secret stays usable by the program.
	if s.RedisURL != "redis://user:hunter2@cache.example:6379/0" {
		t.Errorf("RedisURL changed: %q", s.RedisURL)
	}
}

func TestPrintIsLoadable(t *testing.T) {
	s, _, err := Load(nil, []string{"ALEPH_VM_DNS_NAMESERVERS=1.1.1.1,8.8.8.8", "ALEPH_VM_REUSE_TIMEOUT=90"}, "")
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if err := s.Print(&b); err != nil {
		t.Fatal(err)
	}
	var env []string
	for _, l := range strings.Split(strings.TrimSpace(b.String()), "\n") {
		k, v, _ := strings.Cut(l, " = ")
		if strings.Contains(v, "<redacted>") {
			continue
		}
		env = append(env, k+"="+v)
	}
	s2, _, err := Load(nil, env, "")
	if err != nil {
		t.Fatal(err)
	}
	if s2.ReuseTimeout != 90*time.Second || strings.Join(s2.DNSNameservers, ",") != "1.1.1.1,8.8.8.8" || s2.SupervisorPort != s.SupervisorPort {
		t.Errorf("round trip changed settings: %+v", s2)
	}
}

func TestRedactURL(t *testing.T) {
	tests := []struct{ in, want string }{
		{"", ""},
		{"redis://localhost:6379", "redis://localhost:6379"},
		{"redis://:pw@localhost:6379/1", "redis://:<redacted>@localhost:6379/1"},
		{"rediss://u:p%40ss@h/0?x=1", "rediss://u:<redacted>@h/0?x=1"},
		{"unix:///run/redis.sock", "unix:///run/redis.sock"},
	}
	for _, tt := range tests {
		if got := redactURL(tt.in); got != tt.want {
			t.Errorf("redactURL(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestEnsureDirs(t *testing.T) {
	root := t.TempDir()
	s, _, err := Load([]string{"--cache-root", filepath.Join(root, "cache"), "--execution-root", filepath.Join(root, "exec")}, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	if tightened, err := s.EnsureDirs(); err != nil || len(tightened) != 0 {
		t.Fatalf("fresh roots: tightened %v, err %v", tightened, err)
	}
	want := map[string]os.FileMode{
		s.CacheRoot: 0o755, s.ExecutionRoot: 0o700, s.PersistentVolumesDir: 0o700,
		filepath.Join(s.ExecutionRoot, "store"): 0o700,
		filepath.Join(s.CacheRoot, "code"):      0o700,
		filepath.Join(s.CacheRoot, "snapshots"): 0o700,
		filepath.Join(s.CacheRoot, "vm-images"): 0o700,
		filepath.Dir(s.ExecutionDatabase):       0o700,
	}
	check := func() {
		t.Helper()
		for p, mode := range want {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if !fi.IsDir() || fi.Mode().Perm() != mode {
				t.Errorf("%s: mode %v, want %v", p, fi.Mode(), mode)
			}
		}
	}
	check()

	// Roots an older version left open are tightened, and said to be.
	loose := []string{s.ExecutionRoot, filepath.Join(s.ExecutionRoot, "store"), filepath.Join(s.CacheRoot, "snapshots")}
	for _, p := range loose {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	tightened, err := s.EnsureDirs()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(tightened, ",") != strings.Join(loose, ",") {
		t.Errorf("tightened %v, want %v", tightened, loose)
	}
	check()
}

// A shared directory given as a private root is refused, not chmodded.
func TestPrivateDirRefusesSharedDirectories(t *testing.T) {
	shared := filepath.Join(t.TempDir(), "shared")
	if err := os.Mkdir(shared, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(shared, 0o777|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	if _, err := PrivateDir(shared); err == nil {
		t.Error("a sticky directory was accepted as a private one")
	}
	if fi, _ := os.Stat(shared); fi.Mode().Perm() != 0o777 {
		t.Errorf("the shared directory's mode changed to %v", fi.Mode())
	}
}

func TestAddr(t *testing.T) {
	s := Default()
	if s.Addr() != "127.0.0.1:4020" {
		t.Error(s.Addr())
	}
	s.SupervisorHost = "::1"
	if s.Addr() != "[::1]:4020" {
		t.Error(s.Addr())
	}
}

// aleph-vm's allocation-auth settings: its names and defaults
// (test_authorized_signers_default_empty, test_signature_max_age_default,
// test_default_allocation_signers_includes_scheduler), its checksummed
// addresses accepted as a JSON list (pydantic's form), and the legacy
// token hash that may be emptied to turn the token off.
func TestAllocationSignerSettings(t *testing.T) {
	s, _, err := Load(nil, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(s.AuthorizedAllocationSigners) != 0 || s.AllocationSignatureMaxAge != 300*time.Second ||
		!slices.Equal(s.DefaultAllocationSigners, []string{"0x2937f62e5F81A88e921f883f8fE56ceCf4A4A44A"}) ||
		s.SettingsAggregateAddress != "0xFba561a84A537fCaa567bb7A2257e7142701ae2A" || s.AllocationTokenHash == "" {
		t.Errorf("defaults: %q %v %q %q", s.AuthorizedAllocationSigners, s.AllocationSignatureMaxAge, s.DefaultAllocationSigners, s.SettingsAggregateAddress)
	}
	s, _, err = Load(nil, []string{
		`ALEPH_VM_AUTHORIZED_ALLOCATION_SIGNERS=["0xdAC17F958D2ee523a2206206994597C13D831ec7"]`,
		"ALEPH_VM_ALLOCATION_TOKEN_HASH=",
		"ALEPH_VM_ALLOCATION_SIGNATURE_MAX_AGE_SECONDS=60",
	}, "")
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(s.AuthorizedAllocationSigners, []string{"0xdAC17F958D2ee523a2206206994597C13D831ec7"}) ||
		s.AllocationTokenHash != "" || s.AllocationSignatureMaxAge != time.Minute {
		t.Errorf("set: %q %q %v", s.AuthorizedAllocationSigners, s.AllocationTokenHash, s.AllocationSignatureMaxAge)
	}
}
