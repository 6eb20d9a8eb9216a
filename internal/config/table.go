package config

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey"
)

// descriptor ties one ALEPH_VM_* name to a Settings field: how to parse it
// and how to show it. One table drives loading, printing and /about/config
// so that a setting cannot be readable yet invisible, or the reverse.
type descriptor struct {
	name string // without EnvPrefix
	help string
	// optional settings accept an empty value (meaning "none" or "derive").
	optional bool
	set      func(s *Settings, v string) error
	// get returns a JSON-friendly value: durations as seconds.
	get func(s *Settings) any
	// redact, when set, replaces get for anything shown to people.
	redact func(s *Settings) any
}

func (d descriptor) printable(s *Settings) any {
	if d.redact != nil {
		return d.redact(s)
	}
	return d.get(s)
}

var errEmpty = errors.New("must not be empty")

func str(name, help string, f func(*Settings) *string, check ...func(string) error) descriptor {
	return descriptor{
		name: name, help: help,
		set: func(s *Settings, v string) error {
			for _, c := range check {
				if err := c(v); err != nil {
					return err
				}
			}
			*f(s) = v
			return nil
		},
		get: func(s *Settings) any { return *f(s) },
	}
}

func optional(d descriptor) descriptor {
	d.optional = true
	return d
}

func boolean(name, help string, f func(*Settings) *bool) descriptor {
	return descriptor{
		name: name, help: help,
		set: func(s *Settings, v string) error {
			b, err := parseBool(v)
			if err != nil {
				return err
			}
			*f(s) = b
			return nil
		},
		get: func(s *Settings) any { return *f(s) },
	}
}

func integer(name, help string, lo, hi int64, f func(*Settings) *int64) descriptor {
	return descriptor{
		name: name, help: help,
		set: func(s *Settings, v string) error {
			n, err := parseInt(v, lo, hi)
			if err != nil {
				return err
			}
			*f(s) = n
			return nil
		},
		get: func(s *Settings) any { return *f(s) },
	}
}

func smallInt(name, help string, lo, hi int64, f func(*Settings) *int) descriptor {
	return descriptor{
		name: name, help: help,
		set: func(s *Settings, v string) error {
			n, err := parseInt(v, lo, hi)
			if err != nil {
				return err
			}
			*f(s) = int(n)
			return nil
		},
		get: func(s *Settings) any { return *f(s) },
	}
}

func seconds(name, help string, allowZero bool, f func(*Settings) *time.Duration) descriptor {
	return descriptor{
		name: name, help: help,
		set: func(s *Settings, v string) error {
			d, err := parseSeconds(v, allowZero)
			if err != nil {
				return err
			}
			*f(s) = d
			return nil
		},
		get: func(s *Settings) any { return f(s).Seconds() },
	}
}

// table lists every setting in print order: network service, Aleph
// sources, sandboxes, storage, limits, VM networking, diagnostics.
var table = []descriptor{
	str("SUPERVISOR_HOST", "address the HTTP service listens on", func(s *Settings) *string { return &s.SupervisorHost }),
	smallInt("SUPERVISOR_PORT", "port the HTTP service listens on", 1, 65535, func(s *Settings) *int { return &s.SupervisorPort }),
	str("DOMAIN_NAME", "host name of the status page; other hosts route to programs", func(s *Settings) *string { return &s.DomainName }),
	seconds("REUSE_TIMEOUT", "seconds an idle execution stays warm", true, func(s *Settings) *time.Duration { return &s.ReuseTimeout }),
	boolean("WATCH_FOR_MESSAGES", "run programs whose on.message filters match new Aleph messages",
		func(s *Settings) *bool { return &s.WatchForMessages }),
	boolean("WATCH_FOR_UPDATES", "stop warm programs when a use_latest ref of theirs is amended",
		func(s *Settings) *bool { return &s.WatchForUpdates }),
	seconds("CACHE_TTL_SECURITY_AGGREGATE", "seconds an owner's delegations (its security aggregate) are reused before the API is asked again", false,
		func(s *Settings) *time.Duration { return &s.CacheTTLSecurityAggregate }),
	seconds("PAYMENT_MONITOR_INTERVAL", "seconds between reads of each running program's message status on the API; forgotten, rejected or removed 3 times in a row stops it; 0 = off", true,
		func(s *Settings) *time.Duration { return &s.PaymentMonitorInterval }),
	smallInt("MESSAGE_QUEUE_SIZE", "on.message deliveries waiting for one program at most; more are dropped and counted", 1, 1<<20,
		func(s *Settings) *int { return &s.MessageQueueSize }),
	smallInt("MESSAGE_DELIVERIES", "on.message deliveries under way for one program at most", 1, 1<<16,
		func(s *Settings) *int { return &s.MessageDeliveries }),
	smallInt("MESSAGE_DELIVERIES_TOTAL", "on.message deliveries under way on the node at most", 1, 1<<16,
		func(s *Settings) *int { return &s.MessageDeliveriesTotal }),

	str("API_SERVER", "Aleph API server", func(s *Settings) *string { return &s.APIServer }, checkHTTPURL),
	str("IPFS_GATEWAY", "IPFS gateway for IPFS-stored files", func(s *Settings) *string { return &s.IPFSGateway }, checkHTTPURL),
	str("CONNECTIVITY_IPV4_URL", "/status/check/host: URL reached over IPv4 (raw IP: no DNS needed)",
		func(s *Settings) *string { return &s.ConnectivityIPv4URL }, checkHTTPURL),
	str("CONNECTIVITY_IPV6_URL", "/status/check/host: URL reached over IPv6 (raw IP: no DNS needed)",
		func(s *Settings) *string { return &s.ConnectivityIPv6URL }, checkHTTPURL),
	str("CONNECTIVITY_DNS_HOSTNAME", "/status/check/host: name whose A and AAAA records are looked up",
		func(s *Settings) *string { return &s.ConnectivityDNSHostname }, checkHostname),
	{
		name: "CONNECTIVITY_HTTP_URLS", help: "/status/check/host: URLs tried in order for DNS + HTTP (comma-separated or JSON list)",
		set: func(s *Settings, v string) error {
			urls, err := parseURLList(v)
			if err != nil {
				return err
			}
			s.ConnectivityHTTPURLs = urls
			return nil
		},
		get: func(s *Settings) any { return slices.Clone(s.ConnectivityHTTPURLs) },
	},

	{
		name: "HYPERVISOR", help: "isolation backend: auto, firecracker, qemu or gvisor",
		set: func(s *Settings, v string) error {
			h := Hypervisor(strings.ToLower(v))
			if !slices.Contains(Hypervisors, h) {
				return fmt.Errorf("must be one of %s", joinHypervisors())
			}
			s.Hypervisor = h
			return nil
		},
		get: func(s *Settings) any { return string(s.Hypervisor) },
	},
	boolean("USE_JAILER", "run firecracker under its jailer", func(s *Settings) *bool { return &s.UseJailer }),
	boolean("PREWARM", "keep pre-warmed sandboxes ready: one for the default runtime, more for shapes in recent demand (gvisor, qemu)", func(s *Settings) *bool { return &s.Prewarm }),
	smallInt("SPARES_MEMORY_MIB", "memory (MiB) all pre-warmed sandboxes may reserve together; given back to programs that need it", 0, 1<<30,
		func(s *Settings) *int { return &s.SparesMemoryMiB }),
	str("FIRECRACKER_PATH", "firecracker binary", func(s *Settings) *string { return &s.FirecrackerPath }),
	str("JAILER_PATH", "jailer binary", func(s *Settings) *string { return &s.JailerPath }),
	str("LINUX_PATH", "guest kernel (uncompressed vmlinux)", func(s *Settings) *string { return &s.LinuxPath }),
	optional(str("INITRD_PATH", "guest initramfs with vm-agent as /init (make kernel)", func(s *Settings) *string { return &s.InitrdPath })),
	str("RUNSC_PATH", "gVisor runsc binary", func(s *Settings) *string { return &s.RunscPath }),
	str("RUNSC_PLATFORM", "runsc --platform: ptrace, systrap or kvm", func(s *Settings) *string { return &s.RuntimePlatform },
		oneOf("ptrace", "systrap", "kvm")),
	str("QEMU_PATH", "qemu-system binary", func(s *Settings) *string { return &s.QemuPath }),
	str("AGENT_PATH", "vm-agent binary placed in every sandbox", func(s *Settings) *string { return &s.AgentPath }),
	seconds("INIT_TIMEOUT", "seconds a sandbox may take to become ready", false, func(s *Settings) *time.Duration { return &s.InitTimeout }),

	str("CACHE_ROOT", "download cache directory", func(s *Settings) *string { return &s.CacheRoot }),
	str("EXECUTION_ROOT", "directory of executions, local store and login token", func(s *Settings) *string { return &s.ExecutionRoot }),
	optional(str("EXECUTION_DATABASE", "SQLite file of execution records (default EXECUTION_ROOT/executions.sqlite3)",
		func(s *Settings) *string { return &s.ExecutionDatabase })),
	optional(str("PERSISTENT_VOLUMES_DIR", "persistent volume images, <program hash>/<volume name>.ext4, shared by every backend (default EXECUTION_ROOT/volumes/persistent)",
		func(s *Settings) *string { return &s.PersistentVolumesDir })),

	integer("MAX_PROGRAM_ARCHIVE_SIZE", "largest code archive, in bytes", 1, math.MaxInt64, func(s *Settings) *int64 { return &s.MaxProgramArchiveSize }),
	integer("MAX_DATA_ARCHIVE_SIZE", "largest data archive, in bytes", 1, math.MaxInt64, func(s *Settings) *int64 { return &s.MaxDataArchiveSize }),
	integer("MAX_RUNTIME_SIZE", "largest runtime image, in bytes", 1, math.MaxInt64, func(s *Settings) *int64 { return &s.MaxRuntimeSize }),
	integer("CODE_CACHE_MAX_MIB", "disk space for extracted program code (gvisor), in MiB; least recently used code beyond it is removed",
		64, math.MaxInt32, func(s *Settings) *int64 { return &s.CodeCacheMaxMiB }),
	integer("SNAPSHOT_CACHE_MAX_MIB", "disk space for checkpoints of warm sandboxes (gvisor, about 30 MiB per runtime and resource shape), restored instead of starting afresh; 0 disables them",
		0, math.MaxInt32, func(s *Settings) *int64 { return &s.SnapshotCacheMaxMiB }),
	integer("MAX_REQUEST_BODY_SIZE", "largest HTTP request body forwarded to a program, in bytes", 1, math.MaxInt64,
		func(s *Settings) *int64 { return &s.MaxRequestBodySize }),
	smallInt("MAX_EXECUTIONS", "most executions at once; 0 = as many as memory and vCPUs allow", 0, 1<<20,
		func(s *Settings) *int { return &s.MaxExecutions }),
	smallInt("HOST_MEMORY_RESERVED_MIB", "physical memory (MiB) never committed to executions, kept for the host", 0, 1<<30,
		func(s *Settings) *int { return &s.HostMemoryReservedMiB }),
	{
		name: "VCPU_OVERCOMMIT_FACTOR", help: "vCPUs committed per physical core at most",
		set: func(s *Settings, v string) error {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil || f <= 0 || f > 1000 || math.IsNaN(f) {
				return errors.New("must be a number above 0 (e.g. 4)")
			}
			s.VCPUOvercommitFactor = f
			return nil
		},
		get: func(s *Settings) any { return s.VCPUOvercommitFactor },
	},
	{
		name: "MAX_EXECUTION_SHARE", help: "part (0-1] of the node's memory and vCPUs one execution may reserve; programs run for an allocation may exceed it; 1 = no cap",
		set: func(s *Settings, v string) error {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil || f <= 0 || f > 1 || math.IsNaN(f) {
				return errors.New("must be a number above 0 and at most 1 (e.g. 0.25)")
			}
			s.MaxExecutionShare = f
			return nil
		},
		get: func(s *Settings) any { return s.MaxExecutionShare },
	},
	smallInt("MAX_VOLUME_SIZE_MIB", "largest size_mib of one volume (persistent or ephemeral) this node accepts; 0 = no cap", 0, 1<<30,
		func(s *Settings) *int { return &s.MaxVolumeSizeMiB }),
	integer("HOST_DISK_RESERVED_MIB", "free disk (MiB) never promised to volume images, kept for the host", 0, 1<<40,
		func(s *Settings) *int64 { return &s.HostDiskReservedMiB }),
	smallInt("MAX_PROGRAM_SECONDS", "longest request a program may take, whatever its resources.seconds says", 1, 1<<30,
		func(s *Settings) *int { return &s.MaxProgramSeconds }),
	smallInt("PROGRAM_LOG_RATE", "bytes per second of a program's output copied to the supervisor's log (burst 16x)", 1, 1<<30,
		func(s *Settings) *int { return &s.ProgramLogBytesPerSec }),
	integer("PROGRAM_LOG_MAX_BYTES", "bytes of a program's output logged per execution at most", 1, math.MaxInt64,
		func(s *Settings) *int64 { return &s.ProgramLogMaxBytes }),

	integer("GUEST_CACHE_MAX_VALUE_SIZE", "largest value a program may put in the guest cache, in bytes (aleph-vm: under 1 MiB)", 1, 64<<20,
		func(s *Settings) *int64 { return &s.GuestCacheMaxValueSize }),
	integer("GUEST_CACHE_MAX_KEYS", "keys each program may keep in the guest cache", 1, math.MaxInt64,
		func(s *Settings) *int64 { return &s.GuestCacheMaxKeys }),
	integer("GUEST_CACHE_MAX_BYTES", "bytes of values each program may keep in the guest cache", 1, math.MaxInt64,
		func(s *Settings) *int64 { return &s.GuestCacheMaxBytes }),
	integer("GUEST_CACHE_MAX_TOTAL_BYTES", "bytes of values all programs may keep in the embedded guest cache (not Redis)", 1, math.MaxInt64,
		func(s *Settings) *int64 { return &s.GuestCacheMaxTotalBytes }),
	integer("GUEST_API_MAX_CONNECTIONS", "guest API connections each execution may hold open at once; beyond it an idle one is closed, or the new one if none is idle", 1, 1<<20,
		func(s *Settings) *int64 { return &s.GuestAPIMaxConnections }),
	seconds("GUEST_API_READ_HEADER_TIMEOUT", "seconds a program has to send a guest API request's headers", false,
		func(s *Settings) *time.Duration { return &s.GuestAPIReadHeaderTimeout }),
	seconds("GUEST_API_IDLE_TIMEOUT", "seconds an idle guest API connection is kept open between requests", false,
		func(s *Settings) *time.Duration { return &s.GuestAPIIdleTimeout }),
	integer("GUEST_API_PUBLICATIONS_PER_MINUTE", "node-signed publications (/sign, pubsub) each program may make per minute, in bursts of as many; beyond it 429", 1, 1<<20,
		func(s *Settings) *int64 { return &s.GuestAPIPublicationsPerMinute }),
	integer("GUEST_API_NODE_PUBLICATIONS_PER_MINUTE", "node-signed publications (/sign, pubsub) all programs together may make per minute, in bursts of as many; beyond it 429", 1, 1<<20,
		func(s *Settings) *int64 { return &s.GuestAPINodePublicationsPerMinute }),
	seconds("DRAIN_TIMEOUT", "seconds a stopping supervisor (SIGTERM) lets requests in flight finish while new ones get 503; keep systemd's TimeoutStopSec above it", true,
		func(s *Settings) *time.Duration { return &s.DrainTimeout }),
	seconds("HTTP_READ_HEADER_TIMEOUT", "seconds a client has to send a request's headers (slowloris); 0 = no limit", true,
		func(s *Settings) *time.Duration { return &s.HTTPReadHeaderTimeout }),
	seconds("HTTP_IDLE_TIMEOUT", "seconds an idle keep-alive connection stays open; 0 = no limit", true,
		func(s *Settings) *time.Duration { return &s.HTTPIdleTimeout }),
	seconds("HTTP_BODY_TIMEOUT", "seconds a request body may take before HTTP_BODY_MIN_RATE applies; 0 = no limit", true,
		func(s *Settings) *time.Duration { return &s.HTTPBodyTimeout }),
	integer("HTTP_BODY_MIN_RATE", "bytes per second a request body must average beyond HTTP_BODY_TIMEOUT", 1, math.MaxInt64,
		func(s *Settings) *int64 { return &s.HTTPBodyMinRate }),
	seconds("HTTP_WRITE_TIMEOUT", "seconds one write of a response may wait for a client that does not read; 0 = no limit", true,
		func(s *Settings) *time.Duration { return &s.HTTPWriteTimeout }),
	smallInt("HTTP_MAX_HEADER_BYTES", "largest request line and headers, in bytes (431 beyond)", 1024, 16<<20,
		func(s *Settings) *int { return &s.HTTPMaxHeaderBytes }),
	integer("PROGRAM_MAX_RESPONSE_HEADER_BYTES", "largest status line and headers of a program's answer, in bytes (502 beyond)", 1024, 16<<20,
		func(s *Settings) *int64 { return &s.ProgramMaxResponseHeaderBytes }),
	smallInt("HTTP_MAX_CONNECTIONS", "open client connections, all clients together; at the cap the longest idle one is closed for a newcomer, and when all are busy more wait to be accepted", 1, 1<<20,
		func(s *Settings) *int { return &s.HTTPMaxConnections }),
	smallInt("HTTP_MAX_CONNECTIONS_PER_CLIENT", "open connections from one client (an IPv4 address or IPv6 /64; once half of HTTP_MAX_CONNECTIONS are open, an IPv4 /24 or IPv6 /48), more are closed at once; 0 = no limit", 0, 1<<20,
		func(s *Settings) *int { return &s.HTTPMaxConnectionsPerClient }),
	optional(descriptor{
		name: "HTTP_UNLIMITED_CLIENTS",
		help: "addresses exempt from HTTP_MAX_CONNECTIONS_PER_CLIENT (comma-separated CIDRs), such as a local reverse proxy; only they may take the last min(16, HTTP_MAX_CONNECTIONS/8) connections",
		set: func(s *Settings, v string) error {
			out := []netip.Prefix{}
			for _, it := range strings.FieldsFunc(v, func(r rune) bool { return r == ',' || r == ' ' }) {
				p, err := netip.ParsePrefix(it)
				if err != nil {
					a, aerr := netip.ParseAddr(it)
					if aerr != nil {
						return fmt.Errorf("%q is not an IP address or CIDR such as 127.0.0.0/8", it)
					}
					p = netip.PrefixFrom(a, a.BitLen())
				}
				out = append(out, p.Masked())
			}
			s.HTTPUnlimitedClients = out
			return nil
		},
		get: func(s *Settings) any {
			out := make([]string, len(s.HTTPUnlimitedClients))
			for i, p := range s.HTTPUnlimitedClients {
				out[i] = p.String()
			}
			return out
		},
	}),

	boolean("ALLOW_VM_NETWORKING", "give sandboxes network access", func(s *Settings) *bool { return &s.AllowVMNetworking }),
	optional(str("NETWORK_INTERFACE", "host interface that carries programs' outbound traffic; empty = the default route's",
		func(s *Settings) *string { return &s.NetworkInterface })),
	str("DNS_RESOLUTION", "where host nameservers are read: detect, resolv.conf or resolvectl", func(s *Settings) *string { return &s.DNSResolution },
		oneOf(DNSDetect, DNSResolvConf, DNSResolvectl)),
	optional(descriptor{
		name: "DNS_NAMESERVERS", help: "nameservers given to sandboxes (comma-separated or JSON list); empty = the host's",
		set: func(s *Settings, v string) error {
			ns, err := parseAddrList(v)
			if err != nil {
				return err
			}
			s.DNSNameservers = ns
			return nil
		},
		get: func(s *Settings) any { return slices.Clone(s.DNSNameservers) },
	}),
	{
		name: "IPV4_ADDRESS_POOL", help: "IPv4 range carved into one network per sandbox",
		set: func(s *Settings, v string) error {
			p, err := netip.ParsePrefix(v)
			if err != nil {
				return errors.New("must be an IPv4 CIDR such as 172.16.0.0/12")
			}
			if !p.Addr().Is4() {
				return errors.New("must be an IPv4 CIDR such as 172.16.0.0/12")
			}
			s.IPv4AddressPool = p.Masked()
			return nil
		},
		get: func(s *Settings) any { return s.IPv4AddressPool.String() },
	},
	smallInt("IPV4_NETWORK_PREFIX_LENGTH", "prefix length of each sandbox's network", 1, 30,
		func(s *Settings) *int { return &s.IPv4NetworkPrefixLength }),
	optional(descriptor{
		name: "EGRESS_ALLOW",
		help: "private IPv4 ranges programs may reach (comma-separated CIDRs); by default RFC 1918 and 100.64.0.0/10 are closed",
		set: func(s *Settings, v string) error {
			var out []netip.Prefix
			for _, it := range strings.FieldsFunc(v, func(r rune) bool { return r == ',' || r == ' ' }) {
				p, err := netip.ParsePrefix(it)
				if err != nil || !p.Addr().Is4() {
					return fmt.Errorf("%q is not an IPv4 CIDR such as 10.1.2.0/24", it)
				}
				out = append(out, p.Masked())
			}
			s.EgressAllow = out
			return nil
		},
		get: func(s *Settings) any {
			out := make([]string, len(s.EgressAllow))
			for i, p := range s.EgressAllow {
				out[i] = p.String()
			}
			return out
		},
	}),

	boolean("PRINT_SYSTEM_LOGS", "show guest console output in the logs", func(s *Settings) *bool { return &s.PrintSystemLogs }),
	optional(str("FAKE_DATA_PROGRAM", "serve this program directory for every request", func(s *Settings) *string { return &s.FakeDataProgram })),
	optional(str("CHECK_FASTAPI_VM_ID", "program hash used by /status/check/fastapi; empty = bundled example",
		func(s *Settings) *string { return &s.CheckFastAPIVMID }, checkToken)),
	optional(str("PAYMENT_RECEIVER_ADDRESS", "address of the account receiving payments, published in /status/config; empty = none",
		func(s *Settings) *string { return &s.PaymentReceiverAddress }, checkAddress)),
	optional(descriptor{
		name: "ALLOCATION_TOKEN_HASH", help: "DEPRECATED: sha256 hex of the legacy X-Auth-Signature token of /control/allocations; empty = refuse it",
		set: func(s *Settings, v string) error {
			v = strings.ToLower(v)
			if v == "" {
				s.AllocationTokenHash = ""
				return nil
			}
			if b, err := hex.DecodeString(v); err != nil || len(b) != 32 {
				return errors.New("must be a sha256 digest in hex (64 characters)")
			}
			s.AllocationTokenHash = v
			return nil
		},
		get:    func(s *Settings) any { return s.AllocationTokenHash },
		redact: func(*Settings) any { return redactedString },
	}),
	optional(signerList("AUTHORIZED_ALLOCATION_SIGNERS",
		"EIP-55 addresses whose Aleph-EIP191-V1 signatures /control/allocations accepts (JSON list or comma-separated); empty = the settings aggregate's, else DEFAULT_ALLOCATION_SIGNERS",
		func(s *Settings) *[]string { return &s.AuthorizedAllocationSigners })),
	optional(signerList("DEFAULT_ALLOCATION_SIGNERS",
		"allocation signers trusted when AUTHORIZED_ALLOCATION_SIGNERS is empty and the settings aggregate names none",
		func(s *Settings) *[]string { return &s.DefaultAllocationSigners })),
	str("SETTINGS_AGGREGATE_ADDRESS", "address whose \"settings\" aggregate names the authorized allocation signers",
		func(s *Settings) *string { return &s.SettingsAggregateAddress }, checkHexAddress),
	seconds("ALLOCATION_SIGNATURE_MAX_AGE_SECONDS", "seconds a signed allocation request's iat may be from now, either way", false,
		func(s *Settings) *time.Duration { return &s.AllocationSignatureMaxAge }),
	optional(descriptor{
		name: "REDIS_URL", help: "Redis for the guest cache API (redis://, rediss:// or unix://); empty = embedded",
		set: func(s *Settings, v string) error {
			if v != "" {
				u, err := url.Parse(v)
				if err != nil || !slices.Contains([]string{"redis", "rediss", "unix"}, u.Scheme) {
					return errors.New("must be a redis://, rediss:// or unix:// URL")
				}
			}
			s.RedisURL = v
			return nil
		},
		get:    func(s *Settings) any { return s.RedisURL },
		redact: func(s *Settings) any { return redactURL(s.RedisURL) },
	}),
}

func lookup(name string) (descriptor, bool) {
	for _, d := range table {
		if d.name == name {
			return d, true
		}
	}
	return descriptor{}, false
}

// validate checks what no single setting can: relations between them and
// the file system.
func (s *Settings) validate() *SettingError {
	if s.IPv4NetworkPrefixLength <= s.IPv4AddressPool.Bits() {
		return &SettingError{
			Name:   "IPV4_NETWORK_PREFIX_LENGTH",
			Value:  strconv.Itoa(s.IPv4NetworkPrefixLength),
			Reason: fmt.Sprintf("must be longer than the prefix of %sIPV4_ADDRESS_POOL (%s)", EnvPrefix, s.IPv4AddressPool),
		}
	}
	if s.FakeDataProgram != "" {
		abs, err := filepath.Abs(s.FakeDataProgram)
		if err == nil {
			var f *os.File
			f, err = os.Open(abs)
			if err == nil {
				err = f.Close()
			}
		}
		if err != nil {
			return &SettingError{Name: "FAKE_DATA_PROGRAM", Value: s.FakeDataProgram, Reason: "unreadable: " + unwrapPathErr(err)}
		}
		// Absolute, so that the program is found whatever the working
		// directory of later code.
		s.FakeDataProgram = abs
	}
	return nil
}

func unwrapPathErr(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}

// parseBool accepts what pydantic accepts for booleans, so aleph-vm .env
// files keep their meaning.
func parseBool(v string) (bool, error) {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "1", "t", "true", "y", "yes", "on":
		return true, nil
	case "0", "f", "false", "n", "no", "off":
		return false, nil
	}
	return false, errors.New("must be a boolean (true/false, yes/no, on/off, 1/0)")
}

// parseInt reads a decimal integer; underscores are allowed as in Python,
// since aleph-vm configurations may write 10_000_000.
func parseInt(v string, lo, hi int64) (int64, error) {
	n, err := strconv.ParseInt(strings.ReplaceAll(strings.TrimSpace(v), "_", ""), 10, 64)
	if err != nil {
		return 0, errors.New("must be an integer")
	}
	if n < lo || n > hi {
		if hi == math.MaxInt64 {
			return 0, fmt.Errorf("must be at least %d", lo)
		}
		return 0, fmt.Errorf("must be between %d and %d", lo, hi)
	}
	return n, nil
}

// parseSeconds reads a number of seconds (aleph-vm's form, may be
// fractional) or a Go duration such as 90s or 1h.
func parseSeconds(v string, allowZero bool) (time.Duration, error) {
	v = strings.TrimSpace(v)
	var d time.Duration
	if f, err := strconv.ParseFloat(v, 64); err == nil {
		if math.IsNaN(f) || math.IsInf(f, 0) || math.Abs(f) > float64(math.MaxInt64)/float64(time.Second) {
			return 0, errors.New("must be a finite number of seconds")
		}
		d = time.Duration(f * float64(time.Second))
	} else if d, err = time.ParseDuration(v); err != nil {
		return 0, errors.New("must be a number of seconds or a duration such as 90s")
	}
	switch {
	case d < 0:
		return 0, errors.New("must not be negative")
	case d == 0 && !allowZero:
		return 0, errors.New("must be greater than zero")
	}
	return d, nil
}

// signerList is a list of EIP-55 Ethereum addresses, each checked as
// aleph-vm checks its AUTHORIZED_ALLOCATION_SIGNERS: a typo in a
// mixed-case address is refused at start rather than found when the
// scheduler is.
func signerList(name, help string, f func(*Settings) *[]string) descriptor {
	return descriptor{
		name: name, help: help,
		set: func(s *Settings, v string) error {
			v = strings.TrimSpace(v)
			var items []string
			if strings.HasPrefix(v, "[") {
				if err := json.Unmarshal([]byte(v), &items); err != nil {
					return errors.New("must be a JSON list of Ethereum addresses")
				}
			} else {
				items = strings.FieldsFunc(v, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' })
			}
			out := make([]string, 0, len(items))
			for _, it := range items {
				if !nodekey.IsChecksumAddress(it) {
					return fmt.Errorf("%q is not a checksummed (EIP-55) Ethereum address", it)
				}
				out = append(out, it)
			}
			*f(s) = out
			return nil
		},
		get: func(s *Settings) any { return slices.Clone(*f(s)) },
	}
}

// parseAddrList accepts a JSON list (pydantic's form for list settings) or
// a comma/space separated list of IP addresses.
func parseAddrList(v string) ([]string, error) {
	v = strings.TrimSpace(v)
	var items []string
	if strings.HasPrefix(v, "[") {
		if err := json.Unmarshal([]byte(v), &items); err != nil {
			return nil, errors.New("must be a JSON list of IP addresses")
		}
	} else {
		items = strings.FieldsFunc(v, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' })
	}
	out := make([]string, 0, len(items))
	for _, it := range items {
		a, err := netip.ParseAddr(strings.TrimSpace(it))
		if err != nil {
			return nil, fmt.Errorf("%q is not an IP address", it)
		}
		out = append(out, a.String())
	}
	if len(out) == 0 {
		return nil, nil
	}
	return out, nil
}

// parseURLList reads a non-empty list of http(s) URLs, as a JSON list or
// separated by commas or spaces.
func parseURLList(v string) ([]string, error) {
	v = strings.TrimSpace(v)
	var items []string
	if strings.HasPrefix(v, "[") {
		if err := json.Unmarshal([]byte(v), &items); err != nil {
			return nil, errors.New("must be a JSON list of URLs")
		}
	} else {
		items = strings.FieldsFunc(v, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' })
	}
	if len(items) == 0 {
		return nil, errors.New("must list at least one URL")
	}
	for _, it := range items {
		if err := checkHTTPURL(it); err != nil {
			return nil, fmt.Errorf("%q: %w", it, err)
		}
	}
	return items, nil
}

// checkHostname accepts a DNS name (letters, digits, '-', '.').
func checkHostname(v string) error {
	if v == "" || len(v) > 253 {
		return errors.New("must be a host name")
	}
	for _, r := range v {
		if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r == '-' || r == '.') {
			return errors.New("must be a host name")
		}
	}
	return nil
}

func checkHTTPURL(v string) error {
	u, err := url.Parse(v)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return errors.New("must be an http:// or https:// URL")
	}
	return nil
}

func oneOf(values ...string) func(string) error {
	return func(v string) error {
		if !slices.Contains(values, v) {
			return fmt.Errorf("must be one of %s", strings.Join(values, ", "))
		}
		return nil
	}
}

// checkToken rejects values that cannot be an item hash or CID; the full
// check belongs to the message package.
func checkToken(v string) error {
	for _, r := range v {
		if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') {
			return errors.New("must be an item hash")
		}
	}
	return nil
}

// checkAddress accepts an account address of any chain: letters and
// digits only, as chains' addresses are (0x… hex, base58).
func checkAddress(v string) error {
	if len(v) > 128 {
		return errors.New("must be an account address (at most 128 characters)")
	}
	for _, r := range v {
		if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') {
			return errors.New("must be an account address (letters and digits)")
		}
	}
	return nil
}

// checkHexAddress accepts an Ethereum address: "0x" and 40 hex digits.
func checkHexAddress(v string) error {
	raw, ok := strings.CutPrefix(v, "0x")
	if _, err := hex.DecodeString(raw); !ok || len(raw) != 40 || err != nil {
		return errors.New(`must be an Ethereum address ("0x" and 40 hex digits)`)
	}
	return nil
}

func joinHypervisors() string {
	names := make([]string, len(Hypervisors))
	for i, h := range Hypervisors {
		names[i] = string(h)
	}
	return strings.Join(names, ", ")
}
