// Package config holds the supervisor's settings. Names, defaults and
// meaning follow aleph-vm (prefix ALEPH_VM_), so an existing aleph-vm
// configuration (.env file or environment) keeps working unchanged.
package config

import (
	"fmt"
	"io"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// EnvPrefix is the prefix of every setting's environment variable.
const EnvPrefix = "ALEPH_VM_"

// Hypervisor names an isolation backend, or "auto" to pick one at start.
type Hypervisor string

const (
	HypervisorAuto        Hypervisor = "auto"
	HypervisorFirecracker Hypervisor = "firecracker"
	HypervisorQemu        Hypervisor = "qemu"
	HypervisorGVisor      Hypervisor = "gvisor"
)

// Hypervisors lists the accepted values of ALEPH_VM_HYPERVISOR.
var Hypervisors = []Hypervisor{HypervisorAuto, HypervisorFirecracker, HypervisorQemu, HypervisorGVisor}

// DNS resolution modes of aleph-vm: where the host's nameservers are read
// when DNS_NAMESERVERS is empty.
const (
	DNSDetect      = "detect"
	DNSResolvConf  = "resolv.conf"
	DNSResolvectl  = "resolvectl"
	redactedString = "<redacted>"
)

// Settings is the supervisor's configuration. Field comments name the
// environment variable (without ALEPH_VM_) when it is not obvious.
type Settings struct {
	SupervisorHost string
	SupervisorPort int
	DomainName     string
	// ReuseTimeout is how long an idle execution is kept warm.
	ReuseTimeout time.Duration
	// WatchForMessages / WatchForUpdates: follow the Aleph websocket for
	// event-triggered programs and for amends of running ones.
	WatchForMessages bool
	WatchForUpdates  bool

	APIServer   string
	IPFSGateway string // IPFS_GATEWAY

	Hypervisor      Hypervisor
	UseJailer       bool
	FirecrackerPath string
	JailerPath      string
	LinuxPath       string
	InitrdPath      string // INITRD_PATH: initramfs with the agent as /init
	RunscPath       string
	RuntimePlatform string // RUNSC_PLATFORM: runsc --platform value
	QemuPath        string
	AgentPath       string
	InitTimeout     time.Duration
	// Prewarm keeps a spare sandbox for the default runtime (PREWARM).
	Prewarm bool

	CacheRoot            string
	ExecutionRoot        string
	ExecutionDatabase    string // default EXECUTION_ROOT/executions.sqlite3
	PersistentVolumesDir string // default EXECUTION_ROOT/volumes/persistent

	MaxProgramArchiveSize int64
	MaxDataArchiveSize    int64
	MaxRuntimeSize        int64
	MaxRequestBodySize    int64
	CodeCacheMaxMiB       int64 // CODE_CACHE_MAX_MIB: extracted code kept on disk

	AllowVMNetworking       bool
	NetworkInterface        string
	DNSResolution           string
	DNSNameservers          []string
	IPv4AddressPool         netip.Prefix
	IPv4NetworkPrefixLength int
	EgressAllow             []netip.Prefix

	PrintSystemLogs     bool
	FakeDataProgram     string
	CheckFastAPIVMID    string // CHECK_FASTAPI_VM_ID; empty = bundled example
	AllocationTokenHash string // secret
	RedisURL            string // password part is secret
}

// defaultAgentPath finds vm-agent beside the running binary, where `make
// build` puts both.
func defaultAgentPath() string {
	exe, err := os.Executable()
	if err != nil {
		return "vm-agent"
	}
	return filepath.Join(filepath.Dir(exe), "vm-agent")
}

// defaultRunscPath prefers the runsc `make build` compiles beside the
// running binary (a current gVisor, pinned in go.mod) over one on PATH.
func defaultRunscPath() string {
	if exe, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(exe), "runsc")
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			return p
		}
	}
	return "runsc"
}

// Default returns aleph-vm's defaults, plus ours for the settings it lacks.
func Default() *Settings {
	s := &Settings{
		SupervisorHost:          "127.0.0.1",
		SupervisorPort:          4020,
		DomainName:              "localhost",
		ReuseTimeout:            3600 * time.Second,
		WatchForMessages:        true,
		WatchForUpdates:         true,
		APIServer:               "https://official.aleph.cloud",
		IPFSGateway:             "https://ipfs.aleph.im/ipfs/",
		Hypervisor:              HypervisorAuto,
		UseJailer:               true,
		FirecrackerPath:         "/opt/firecracker/firecracker",
		JailerPath:              "/opt/firecracker/jailer",
		LinuxPath:               "/opt/firecracker/vmlinux.bin",
		RunscPath:               defaultRunscPath(),
		RuntimePlatform:         "systrap",
		QemuPath:                "qemu-system-x86_64",
		AgentPath:               defaultAgentPath(),
		InitTimeout:             20 * time.Second,
		Prewarm:                 true,
		CacheRoot:               "/var/cache/aleph/vm",
		ExecutionRoot:           "/var/lib/aleph/vm",
		MaxProgramArchiveSize:   10_000_000,
		MaxDataArchiveSize:      10_000_000,
		MaxRuntimeSize:          2 << 30,
		MaxRequestBodySize:      10 << 20,
		CodeCacheMaxMiB:         4096,
		AllowVMNetworking:       true,
		NetworkInterface:        "",
		DNSResolution:           DNSDetect,
		IPv4AddressPool:         netip.MustParsePrefix("172.16.0.0/12"),
		IPv4NetworkPrefixLength: 24,
		AllocationTokenHash:     "151ba92f2eb90bce67e912af2f7a5c17d8654b3d29895b042107ea312a7eebda",
	}
	s.deriveFromExecutionRoot(nil)
	return s
}

// deriveFromExecutionRoot fills the paths that default to a place under
// EXECUTION_ROOT, unless they were given explicitly; it runs after every
// source is applied so that a later EXECUTION_ROOT still moves them.
func (s *Settings) deriveFromExecutionRoot(given map[string]bool) {
	if !given["EXECUTION_DATABASE"] || s.ExecutionDatabase == "" {
		s.ExecutionDatabase = filepath.Join(s.ExecutionRoot, "executions.sqlite3")
	}
	if !given["PERSISTENT_VOLUMES_DIR"] || s.PersistentVolumesDir == "" {
		s.PersistentVolumesDir = filepath.Join(s.ExecutionRoot, "volumes", "persistent")
	}
}

// Addr is the host:port the HTTP service listens on.
func (s *Settings) Addr() string {
	return netJoinHostPort(s.SupervisorHost, s.SupervisorPort)
}

func netJoinHostPort(host string, port int) string {
	if strings.Contains(host, ":") && !strings.HasPrefix(host, "[") {
		return "[" + host + "]:" + strconv.Itoa(port)
	}
	return host + ":" + strconv.Itoa(port)
}

// Print writes every setting as `ALEPH_VM_NAME = value`, one per line, in
// the order of the settings table (grouped by topic, stable across runs).
// Secrets are replaced by <redacted>. Values are printed in the form the
// loader accepts, so the output can serve as a .env file once secrets are
// filled in.
func (s *Settings) Print(w io.Writer) error {
	for _, d := range table {
		if _, err := fmt.Fprintf(w, "%s%s = %s\n", EnvPrefix, d.name, formatValue(d.printable(s))); err != nil {
			return fmt.Errorf("print settings: %w", err)
		}
	}
	return nil
}

// Redacted returns every setting keyed by its aleph-vm name without the
// prefix (as aleph-vm's /about/config does), with secrets redacted.
// Durations are seconds, the address pool a CIDR string.
func (s *Settings) Redacted() map[string]any {
	m := make(map[string]any, len(table))
	for _, d := range table {
		m[d.name] = d.printable(s)
	}
	return m
}

// EnsureDirs creates the directories the supervisor writes to. The
// execution root and volumes hold login tokens and user data, so they are
// private; the cache only holds public, hash-checked content.
func (s *Settings) EnsureDirs() error {
	dirs := []struct {
		path string
		mode os.FileMode
	}{
		{s.CacheRoot, 0o755},
		{s.ExecutionRoot, 0o700},
		{s.PersistentVolumesDir, 0o700},
		{filepath.Dir(s.ExecutionDatabase), 0o700},
	}
	for _, d := range dirs {
		if err := os.MkdirAll(d.path, d.mode); err != nil {
			return fmt.Errorf("create directory: %w", err)
		}
	}
	return nil
}

func formatValue(v any) string {
	switch v := v.(type) {
	case float64:
		return strconv.FormatFloat(v, 'f', -1, 64)
	case []string:
		return strings.Join(v, ",")
	default:
		return fmt.Sprint(v)
	}
}

// redactURL hides the password of a URL such as redis://user:pw@host/0
// and keeps the rest, which is useful when debugging a connection.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		// Validation rejects unparsable URLs; never echo one that slipped by.
		return redactedString
	}
	if u.User == nil {
		return raw
	}
	if _, ok := u.User.Password(); !ok {
		return raw
	}
	user := u.User.Username()
	u.User = nil
	rest := strings.TrimPrefix(u.String(), u.Scheme+"://")
	return u.Scheme + "://" + url.User(user).String() + ":" + redactedString + "@" + rest
}
