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

// Values of ALEPH_VM_HYPERVISOR.
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
	// CacheTTLSecurityAggregate is how long an owner's delegations (its
	// security aggregate) are reused by the control API, use_latest and
	// the reactor (upstream's CACHE_TTL_SECURITY_AGGREGATE).
	CacheTTLSecurityAggregate time.Duration
	// PaymentMonitorInterval is how often the API's status of each
	// running program's message is read (upstream's payment monitor); a
	// forgotten, rejected or removed status three times in a row stops
	// and forgets the program. 0 turns the polling off.
	PaymentMonitorInterval time.Duration
	// MessageQueueSize bounds the on.message deliveries waiting for one
	// program; MessageDeliveries bounds those under way for one program,
	// MessageDeliveriesTotal those under way on the node. Deliveries past
	// a full queue are dropped and counted.
	MessageQueueSize       int
	MessageDeliveries      int
	MessageDeliveriesTotal int

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
	// SparesMemoryMiB bounds the memory of all pre-warmed sandboxes
	// together (SPARES_MEMORY_MIB); it counts against admission too.
	SparesMemoryMiB int

	CacheRoot            string
	ExecutionRoot        string
	ExecutionDatabase    string // default EXECUTION_ROOT/executions.sqlite3
	PersistentVolumesDir string // default EXECUTION_ROOT/volumes/persistent

	MaxProgramArchiveSize int64
	MaxDataArchiveSize    int64
	MaxRuntimeSize        int64
	MaxRequestBodySize    int64
	CodeCacheMaxMiB       int64 // CODE_CACHE_MAX_MIB: extracted code kept on disk
	SnapshotCacheMaxMiB   int64 // SNAPSHOT_CACHE_MAX_MIB: checkpoints of warm sandboxes; 0 = none

	// Admission: what the node commits to executions at once.
	MaxExecutions         int     // 0 = bounded by memory and vCPUs only
	HostMemoryReservedMiB int     // HOST_MEMORY_RESERVED_MIB: kept for the host
	VCPUOvercommitFactor  float64 // VCPU_OVERCOMMIT_FACTOR: vCPUs per core
	// MAX_EXECUTION_SHARE: part of the node's memory and vCPUs one
	// execution may reserve (allocated programs excepted); 1 = no cap.
	MaxExecutionShare float64
	// Disk: volumes are weighed against the disk that holds them.
	MaxVolumeSizeMiB      int   // MAX_VOLUME_SIZE_MIB: largest size_mib of one volume; 0 = no cap
	HostDiskReservedMiB   int64 // HOST_DISK_RESERVED_MIB: free disk never promised to volumes
	MaxProgramSeconds     int   // MAX_PROGRAM_SECONDS: cap on resources.seconds
	ProgramLogBytesPerSec int   // PROGRAM_LOG_RATE: bytes/s of program output logged
	ProgramLogMaxBytes    int64 // PROGRAM_LOG_MAX_BYTES: per execution
	// DrainTimeout bounds how long a stopping supervisor waits for the
	// requests in flight (new ones get 503 meanwhile).
	DrainTimeout time.Duration
	// HTTP service limits against hostile clients (HTTP_*); a timeout of
	// zero disables its bound.
	HTTPReadHeaderTimeout time.Duration // accept (or end of the previous request) to end of headers
	HTTPIdleTimeout       time.Duration // keep-alive connection with no request in flight
	HTTPBodyTimeout       time.Duration // grace for a request body before HTTP_BODY_MIN_RATE applies
	HTTPBodyMinRate       int64         // bytes/s a request body must average beyond the grace
	HTTPWriteTimeout      time.Duration // one write of a response to a client that does not read
	HTTPMaxHeaderBytes    int           // request line and headers
	HTTPMaxConnections    int           // open client connections, all clients together
	// HTTPMaxConnectionsPerClient: open connections from one client (an
	// IPv4 address or IPv6 /64; under pressure an IPv4 /24 or IPv6 /48)
	// outside HTTPUnlimitedClients (a local reverse proxy); 0 = no limit.
	HTTPMaxConnectionsPerClient int
	HTTPUnlimitedClients        []netip.Prefix
	// ProgramMaxResponseHeaderBytes bounds the status line and headers of
	// a program's answer the supervisor reads (502 beyond).
	ProgramMaxResponseHeaderBytes int64

	AllowVMNetworking       bool
	NetworkInterface        string
	DNSResolution           string
	DNSNameservers          []string
	IPv4AddressPool         netip.Prefix
	IPv4NetworkPrefixLength int
	EgressAllow             []netip.Prefix

	PrintSystemLogs  bool
	FakeDataProgram  string
	CheckFastAPIVMID string // CHECK_FASTAPI_VM_ID; empty = bundled example
	// The targets of /status/check/host (aleph-vm's CONNECTIVITY_*): a
	// raw-IP HTTPS URL per family, a name to resolve, and URLs tried in
	// order for DNS + HTTP end to end.
	ConnectivityIPv4URL     string
	ConnectivityIPv6URL     string
	ConnectivityDNSHostname string
	ConnectivityHTTPURLs    []string
	// PaymentReceiverAddress is the account receiving payments, published
	// in /status/config as aleph-vm does; empty by default (aleph-vm's
	// default, OWNER_ADDRESS, is empty too).
	PaymentReceiverAddress string
	AllocationTokenHash    string // secret; empty turns the legacy X-Auth-Signature path off

	// Scheduler requests signed Aleph-EIP191-V1 (aleph-vm's
	// allocation_auth.py): the local signer override, the built-in
	// fallback, the settings aggregate's owner and the iat window.
	AuthorizedAllocationSigners []string
	DefaultAllocationSigners    []string
	SettingsAggregateAddress    string
	AllocationSignatureMaxAge   time.Duration
	RedisURL                    string // password part is secret

	// The guest API cache (GUEST_CACHE_*): the largest value, each
	// program's caps, and the embedded store's cap on all values.
	GuestCacheMaxValueSize  int64
	GuestCacheMaxKeys       int64
	GuestCacheMaxBytes      int64
	GuestCacheMaxTotalBytes int64

	// The guest API's connections (GUEST_API_*): streams each execution
	// may hold open at once, how long one may take to send a request's
	// headers and stay idle between requests.
	GuestAPIMaxConnections    int64
	GuestAPIReadHeaderTimeout time.Duration
	GuestAPIIdleTimeout       time.Duration
	// Node-signed publications (/sign and pubsub through the guest API):
	// how many per minute each program and the whole node may make.
	GuestAPIPublicationsPerMinute     int64
	GuestAPINodePublicationsPerMinute int64
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
		SupervisorHost:            "127.0.0.1",
		SupervisorPort:            4020,
		DomainName:                "localhost",
		ReuseTimeout:              3600 * time.Second,
		WatchForMessages:          true,
		WatchForUpdates:           true,
		CacheTTLSecurityAggregate: 120 * time.Second,
		PaymentMonitorInterval:    60 * time.Second,
		MessageQueueSize:          64,
		MessageDeliveries:         4,
		MessageDeliveriesTotal:    16,
		APIServer:                 "https://official.aleph.cloud",
		IPFSGateway:               "https://ipfs.aleph.im/ipfs/",
		ConnectivityIPv4URL:       "https://1.1.1.1/",
		ConnectivityIPv6URL:       "https://[2606:4700:4700::1111]/",
		ConnectivityDNSHostname:   "example.org",
		ConnectivityHTTPURLs: []string{"http://detectportal.firefox.com/success.txt",
			"https://connectivity-check.ubuntu.com/", "https://www.gstatic.com/generate_204"},
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
		SparesMemoryMiB:         1024,
		CacheRoot:               "/var/cache/aleph/vm",
		ExecutionRoot:           "/var/lib/aleph/vm",
		MaxProgramArchiveSize:   10_000_000,
		MaxDataArchiveSize:      10_000_000,
		MaxRuntimeSize:          2 << 30,
		MaxRequestBodySize:      10 << 20,
		HostMemoryReservedMiB:   2048,
		VCPUOvercommitFactor:    4,
		MaxExecutionShare:       0.25,
		MaxVolumeSizeMiB:        4096,
		HostDiskReservedMiB:     2048,
		MaxProgramSeconds:       600,
		ProgramLogBytesPerSec:   16 << 10,
		ProgramLogMaxBytes:      8 << 20,
		CodeCacheMaxMiB:         4096,
		SnapshotCacheMaxMiB:     1024,
		AllowVMNetworking:       true,
		NetworkInterface:        "",
		DNSResolution:           DNSDetect,
		IPv4AddressPool:         netip.MustParsePrefix("172.16.0.0/12"),
		IPv4NetworkPrefixLength: 24,
		AllocationTokenHash:     "151ba92f2eb90bce67e912af2f7a5c17d8654b3d29895b042107ea312a7eebda",
		// aleph-vm's official scheduler, trusted with no configuration.
		DefaultAllocationSigners:  []string{"0x2937f62e5F81A88e921f883f8fE56ceCf4A4A44A"},
		SettingsAggregateAddress:  "0xFba561a84A537fCaa567bb7A2257e7142701ae2A",
		AllocationSignatureMaxAge: 300 * time.Second,
		// aleph-vm's aiohttp refuses bodies of 1 MiB or more.
		GuestCacheMaxValueSize:  1<<20 - 1,
		GuestCacheMaxKeys:       1000,
		GuestCacheMaxBytes:      64 << 20,
		GuestCacheMaxTotalBytes: 1 << 30,

		GuestAPIMaxConnections:            64,
		GuestAPIReadHeaderTimeout:         10 * time.Second,
		GuestAPIIdleTimeout:               60 * time.Second,
		GuestAPIPublicationsPerMinute:     10,
		GuestAPINodePublicationsPerMinute: 60,

		// aleph-vm's unit gives its supervisor TimeoutStopSec=30s.
		DrainTimeout: 30 * time.Second,
		// Ours: nginx's and Apache's defaults where they have one.
		HTTPReadHeaderTimeout: 10 * time.Second,
		HTTPIdleTimeout:       75 * time.Second,
		HTTPBodyTimeout:       20 * time.Second,
		HTTPBodyMinRate:       500,
		HTTPWriteTimeout:      60 * time.Second,
		HTTPMaxHeaderBytes:    64 << 10,
		HTTPMaxConnections:    4096,
		// The default SUPERVISOR_HOST is loopback, behind a reverse proxy
		// that carries every client: limit clients there, not here.
		HTTPMaxConnectionsPerClient: 256,
		HTTPUnlimitedClients:        []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")},
		// As much as a client's request headers may take
		// (HTTP_MAX_HEADER_BYTES); aleph-vm's aiohttp refuses any header
		// line beyond 8 KiB.
		ProgramMaxResponseHeaderBytes: 64 << 10,
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

// GuestCachePath is the embedded guest cache's file, used without
// REDIS_URL.
func (s *Settings) GuestCachePath() string {
	return filepath.Join(s.ExecutionRoot, "guest-cache.sqlite3")
}

// GuestCacheStore says where the guest cache lives, without secrets.
func (s *Settings) GuestCacheStore() string {
	if s.RedisURL != "" {
		return "redis " + redactURL(s.RedisURL)
	}
	return "embedded " + s.GuestCachePath()
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

// EnsureDirs creates the directories the supervisor writes to, before
// anything is written in them; every sub-command that writes calls it
// first. The execution root holds the login token, the node key, the
// execution records, the guest cache, volumes and the local store (the
// code and data of programs uploaded here), so it is private, and so are
// the parts of the cache that hold programs' code (extracted archives)
// or sandboxes' memory (snapshots, VM code images). The rest of the cache only holds
// public, hash-checked downloads.
//
// A private directory that exists with a looser mode (an older version
// made the execution root 0755) is tightened to 0700, and each one
// tightened is returned so the caller can say so: a warning alone would
// leave the programs' data readable until someone acts on it. A directory
// with the sticky bit (a shared one such as /tmp, given as a root by
// mistake) or the filesystem root is left alone: that is an error.
func (s *Settings) EnsureDirs() (tightened []string, err error) {
	dirs := []struct {
		path    string
		private bool
	}{
		{s.ExecutionRoot, true},
		{filepath.Join(s.ExecutionRoot, StoreDirName), true},
		{s.PersistentVolumesDir, true},
		{filepath.Dir(s.ExecutionDatabase), true},
		{s.CacheRoot, false},
		{filepath.Join(s.CacheRoot, CodeCacheDirName), true},
		{filepath.Join(s.CacheRoot, SnapshotDirName), true},
		{filepath.Join(s.CacheRoot, VMImageDirName), true},
	}
	for _, d := range dirs {
		if !d.private {
			if err := os.MkdirAll(d.path, 0o755); err != nil {
				return tightened, fmt.Errorf("create directory: %w", err)
			}
			continue
		}
		t, err := PrivateDir(d.path)
		if err != nil {
			return tightened, err
		}
		if t {
			tightened = append(tightened, d.path)
		}
	}
	return tightened, nil
}

// Where the supervisor keeps what EnsureDirs makes private: the local
// store under the execution root; extracted code (gVisor), snapshot
// images (gVisor) and code images (VMs) under the cache root.
const (
	StoreDirName     = "store"
	CodeCacheDirName = "code"
	SnapshotDirName  = "snapshots"
	VMImageDirName   = "vm-images"
)

// PrivateDir creates dir (and missing parents) with mode 0700, or makes an
// existing dir 0700 if group or others had any access to it, and says
// whether it did the latter. It refuses to tighten a directory with the
// sticky bit, or "/": those are shared by design.
func PrivateDir(dir string) (tightened bool, err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return false, fmt.Errorf("create directory: %w", err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return false, fmt.Errorf("create directory: %w", err)
	}
	if fi.Mode().Perm()&0o077 == 0 {
		return false, nil
	}
	if fi.Mode()&os.ModeSticky != 0 || filepath.Clean(dir) == "/" {
		return false, fmt.Errorf("directory %s is shared (mode %v): give the supervisor a directory of its own", dir, fi.Mode())
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return false, fmt.Errorf("make directory private: %w", err)
	}
	return true, nil
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
