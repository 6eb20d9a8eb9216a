// Package httpapi is the supervisor's HTTP face: the /vm/{ref} and
// Host-based program routes, the operator pages under /about and /status,
// and the mapping of errors to status codes (errors.go).
package httpapi

import (
	"context"
	"crypto/subtle"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/delegation"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/metrics"
	"github.com/aleph-vm-go/vm-supervisor/internal/ownerauth"
	"github.com/aleph-vm-go/vm-supervisor/internal/pep440"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/records"
	"github.com/aleph-vm-go/vm-supervisor/internal/sysinfo"
)

// TXTResolver looks up DNS TXT records; injectable so tests never touch
// real DNS.
type TXTResolver interface {
	LookupTXT(ctx context.Context, name string) ([]string, error)
}

// RecordLister reads execution records.
type RecordLister interface {
	List(ctx context.Context, limit int) ([]records.Record, error)
}

// Executions is what the server needs of the pool (*pool.Pool).
type Executions interface {
	// Acquire returns a running execution of the program, starting one if
	// needed; the caller releases it when its request is done.
	Acquire(ctx context.Context, hash string) (*pool.Execution, error)
	BackendName() string
	List() []pool.Info
}

// Options wire the server to the rest of the supervisor.
type Options struct {
	Version    string
	DomainName string
	Pool       Executions
	Records    RecordLister
	// Config returns the redacted settings for /about/config.
	Config func() any
	// PublicConfig returns /status/config: aleph-vm's public settings.
	PublicConfig func() any
	// LoginToken opens an operator session at /about/login?token=.
	LoginToken string
	// Resolver for `_aleph-id.<host>` TXT lookups; nil disables them.
	Resolver TXTResolver
	// MaxRequestBodySize bounds bodies forwarded to programs.
	MaxRequestBodySize int64
	// SelfTestProgram returns the hash of the program /status/check/fastapi
	// exercises (CHECK_FASTAPI_VM_ID, or the bundled example).
	SelfTestProgram func(ctx context.Context) (string, error)
	// DiskPath is the filesystem reported by /about/usage/system.
	DiskPath string
	// HostPaths are directories of this node (EXECUTION_ROOT, CACHE_ROOT,
	// ...) whose paths are kept out of error bodies, with /var, /tmp, /run
	// and the like; the log keeps them.
	HostPaths []string
	// HostCheck are the targets of /status/check/host; nil: every check
	// fails.
	HostCheck *HostCheck
	// Allocations applies POST /control/allocations; nil refuses them.
	Allocations Allocations
	// AllocationTokenHash is the sha256 (hex) of the scheduler's legacy
	// X-Auth-Signature token (deprecated upstream); empty refuses it.
	AllocationTokenHash string
	// AllocationSigners returns the addresses whose Aleph-EIP191-V1
	// signatures /control/allocations accepts (allocations.Signers); nil
	// accepts none.
	AllocationSigners func(ctx context.Context) []string
	// AllocationSignatureMaxAge is how far a signed request's iat may be
	// from now (ALLOCATION_SIGNATURE_MAX_AGE_SECONDS; 300 s when zero).
	AllocationSignatureMaxAge time.Duration
	// Limits bound what clients can hold (NewHTTPServer, Listener).
	Limits Limits
	// Control serves the owner's /control/machine/{ref}/... routes; nil
	// leaves them out.
	Control Control
	// Delegations tells which wallets the owners delegated control to
	// (their security aggregates); nil: only owners operate.
	Delegations *delegation.Checker
	// Metrics records request latencies and errors and is served at
	// /metrics on the node's own host; nil: no metrics.
	Metrics *metrics.Metrics
	Logger  *slog.Logger
}

// Server implements http.Handler.
type Server struct {
	opts     Options
	log      *slog.Logger
	mux      *http.ServeMux
	sessions *sessions
	auth     ownerauth.Verifier
	// allocAuth checks the scheduler's signed requests; its replay set
	// is its own, so that owners' operations cannot fill it.
	allocAuth ownerauth.AllocationVerifier
	drain     drain
	// hostRoots: Options.HostPaths and systemRoots, cleaned.
	hostRoots []string
	// txt caches Host routing by TXT record; nil without a Resolver.
	txt *txtRoutes
	// conns is the listener's connection limiter (Listener), told of
	// connection states by the http.Server (NewHTTPServer).
	conns atomic.Pointer[connLimiter]
}

// New builds the route table.
func New(opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.MaxRequestBodySize <= 0 {
		opts.MaxRequestBodySize = 10 << 20
	}
	// The Server header and /status/check/version speak PEP 440, as
	// aleph-vm's clients compare versions with packaging.version.
	opts.Version = pep440.Normalize(opts.Version)
	s := &Server{opts: opts, log: opts.Logger, mux: http.NewServeMux(), sessions: newSessions()}
	for _, p := range append(append([]string{}, systemRoots...), opts.HostPaths...) {
		if p != "" {
			s.hostRoots = append(s.hostRoots, filepath.Clean(p))
		}
	}
	if opts.Resolver != nil {
		s.txt = newTXTRoutes(opts.Resolver.LookupTXT)
	}
	if opts.DiskPath != "" {
		s.hostRoots = append(s.hostRoots, filepath.Clean(opts.DiskPath))
	}
	s.mux.HandleFunc("/vm/{ref}", s.handleVM)
	s.mux.HandleFunc("/vm/{ref}/{rest...}", s.handleVM)
	s.mux.HandleFunc("/about/logout", s.handleLogout)
	s.mux.Handle("GET /about/executions", s.operatorOnly(s.handleExecutions))
	// aleph-vm's CORS-enabled pages (orchestrator/supervisor.py:181-218).
	s.page("/about/login", s.handleLogin)
	s.page("/about/config", s.operatorOnly(s.handleConfig).ServeHTTP)
	s.page("/about/executions/details", s.operatorOnly(s.handleExecutionDetails).ServeHTTP)
	s.page("/about/executions/list", s.handleExecutionList)
	s.page("/about/executions/records", s.handleRecords)
	s.page("/about/usage/system", s.handleUsage)
	s.page("/about/certificates", s.handleCertificates)
	s.page("/about/capability", s.handleCapability)
	s.page("/v2/about/executions/list", s.handleExecutionListV2)
	s.page("/status/check/version", s.handleVersion)
	s.page("/status/check/fastapi", s.handleCheckFastAPI)
	s.page("/status/check/fastapi/legacy", s.handleCheckFastAPILegacy)
	s.page("/status/check/fastapi/detail", s.handleCheckFastAPIDetail)
	s.page("/status/config", s.handlePublicConfig)
	s.page("/status/check/host", s.handleCheckHost)
	s.allocAuth = ownerauth.AllocationVerifier{
		Signers: opts.AllocationSigners,
		MaxAge:  opts.AllocationSignatureMaxAge,
		Replays: ownerauth.NewReplays(0),
	}
	s.mux.HandleFunc("POST /control/allocations", s.handleAllocations)
	s.controlRoutes()
	s.mux.HandleFunc("/", s.handleByHost)
	return s
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Server", "aleph-vm/"+s.opts.Version)
	if !s.isProgramRequest(r) {
		s.mux.ServeHTTP(w, r)
		return
	}
	if !s.drain.begin() {
		s.refuseDraining(w, r)
		return
	}
	defer s.drain.end()
	s.mux.ServeHTTP(w, r)
}

// handleVM serves /vm/{ref}{path}.
func (s *Server) handleVM(w http.ResponseWriter, r *http.Request) {
	hash, err := message.ParseRef(r.PathValue("ref"))
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	// Keep the client's escaping of the suffix intact.
	prefix := "/vm/" + r.PathValue("ref")
	escaped := r.URL.EscapedPath()
	suffix := strings.TrimPrefix(escaped, prefix)
	if !strings.HasPrefix(suffix, "/") {
		suffix = "/" + suffix
	}
	s.forward(w, r, hash, suffix)
}

// handleByHost routes any other path by the Host header: the operator's
// own domain shows the status page, a host whose first label is the base32
// form of a hash (or that has an `_aleph-id` TXT record) reaches a program.
func (s *Server) handleByHost(w http.ResponseWriter, r *http.Request) {
	if isUnknownNodePage(r) {
		// aleph-vm's http_not_found routes (supervisor.py), through its
		// error_middleware: on any host.
		s.writeError(w, r, errNodePageNotFound)
		return
	}
	host := hostOnly(r.Host)
	if s.isOwnHost(host) {
		switch {
		case r.URL.Path == "/":
			s.handleIndex(w, r)
			return
		case r.URL.Path == "/metrics" && s.opts.Metrics != nil:
			// Only on the node's own host: programs' hosts keep their
			// own /metrics.
			s.handleMetrics(w, r)
			return
		}
		s.writeError(w, r, errkind.New(errkind.NotFound, "no route for %s", r.URL.Path))
		return
	}
	hash, err := s.hashFromHost(r.Context(), host)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	s.forward(w, r, hash, r.URL.EscapedPath())
}

// errNodePageNotFound is aleph-vm's answer to an unknown /about, /control
// or /status path: aiohttp's HTTPNotFound text as JSON.
var errNodePageNotFound = errkind.New(errkind.NotFound, "404: Not Found")

// isUnknownNodePage tells whether r is a GET (or HEAD) of a path under
// /about/, /control/ or /status/ that no route took: aleph-vm answers
// those 404 on any host instead of passing them to a program.
func isUnknownNodePage(r *http.Request) bool {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return false
	}
	for _, prefix := range []string{"/about/", "/control/", "/status/"} {
		if strings.HasPrefix(r.URL.Path, prefix) {
			return true
		}
	}
	return false
}

func (s *Server) isOwnHost(host string) bool {
	if host == "" || host == "localhost" || strings.EqualFold(host, s.opts.DomainName) {
		return true
	}
	return net.ParseIP(host) != nil
}

func (s *Server) hashFromHost(ctx context.Context, host string) (string, error) {
	label, _, _ := strings.Cut(host, ".")
	if hash, ok := message.HashFromBase32Label(strings.ToLower(label)); ok {
		return hash, nil
	}
	if s.txt != nil {
		hash, err := s.txt.hash(ctx, host)
		if err != nil {
			return "", err
		}
		if hash != "" {
			return hash, nil
		}
	}
	return "", errkind.New(errkind.NotFound, "host %q does not name a program", host)
}

func hostOnly(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return strings.Trim(h, "[]")
	}
	return strings.Trim(hostport, "[]")
}

func (s *Server) operatorOnly(h http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.hasSession(r) {
			s.writeError(w, r, errkind.New(errkind.Unauthorized,
				"authentication required: open /about/login?token=<token from EXECUTION_ROOT/login_token>"))
			return
		}
		h(w, r)
	})
}

// hasSession reports whether the request carries a live session. A program
// on this host may have set a "token" cookie of its own with a wider path,
// so every cookie of that name is looked at.
func (s *Server) hasSession(r *http.Request) bool {
	for _, id := range operatorCookies(r.Header) {
		if s.sessions.valid(id) {
			return true
		}
	}
	return false
}

// handleLogin trades the login token for a session cookie and, as
// aleph-vm does, redirects to /about/config (views/__init__.py
// about_login). The token itself never leaves the request: neither the
// cookie nor any log holds it.
func (s *Server) handleLogin(w http.ResponseWriter, r *http.Request) {
	// The token is in this URL: keep it out of Referer headers and caches.
	w.Header().Set("Referrer-Policy", "no-referrer")
	w.Header().Set("Cache-Control", "no-store")
	token := r.URL.Query().Get("token")
	if token == "" || s.opts.LoginToken == "" || subtle.ConstantTimeCompare([]byte(token), []byte(s.opts.LoginToken)) != 1 {
		s.log.Info("request failed", "method", r.Method, "path", r.URL.Path, "status", http.StatusUnauthorized, "err", "invalid login token")
		writeJSON(w, http.StatusUnauthorized, map[string]bool{"success": false})
		return
	}
	http.SetCookie(w, sessionCookie(r, s.sessions.create()))
	w.Header().Set("Location", "/about/config")
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusFound)
	_, _ = w.Write([]byte("302: Found"))
}

// handleLogout ends the session of the cookie, if any, and clears it.
func (s *Server) handleLogout(w http.ResponseWriter, r *http.Request) {
	for _, id := range operatorCookies(r.Header) {
		s.sessions.remove(id)
	}
	http.SetCookie(w, sessionCookie(r, ""))
	writeJSON(w, http.StatusOK, map[string]string{"status": "logged out"})
}

func (s *Server) handleConfig(w http.ResponseWriter, r *http.Request) {
	if s.opts.Config == nil {
		writeJSON(w, http.StatusOK, map[string]any{})
		return
	}
	writeJSON(w, http.StatusOK, s.opts.Config())
}

func (s *Server) handleExecutions(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.opts.Pool.List())
}

// handleRecords answers, as aleph-vm does, a bare JSON array of records,
// newest first (orchestrator/metrics.py get_execution_records), in the
// bytes of its json.dumps (upstreamRecord).
func (s *Server) handleRecords(w http.ResponseWriter, r *http.Request) {
	recs := []records.Record{}
	if s.opts.Records != nil {
		var err error
		if recs, err = s.opts.Records.List(r.Context(), 1000); err != nil {
			s.writeError(w, r, err)
			return
		}
	}
	out := []byte{'['}
	for i, rec := range recs {
		b, err := upstreamRecord(rec)
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		if i > 0 {
			out = append(out, ", "...)
		}
		out = append(out, b...)
	}
	out = append(out, ']')
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(out)
}

// handleCertificates is aleph-vm's about_certificates on a node without
// confidential computing, which this node never has (resources.py;
// tests/supervisor/test_views.py test_about_certificates_missing_setting).
func (s *Server) handleCertificates(w http.ResponseWriter, r *http.Request) {
	s.writeError(w, r, errkind.New(errkind.Unavailable, "Confidential computing setting not enabled on that server"))
}

// handleCapability is aleph-vm's about_capability: the host's CPU and
// memory, pydantic's compact JSON (resources.py).
func (s *Server) handleCapability(w http.ResponseWriter, r *http.Request) {
	c, err := sysinfo.CollectCapability(r.Context())
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	writePydanticJSON(w, http.StatusOK, c)
}

func (s *Server) handleUsage(w http.ResponseWriter, r *http.Request) {
	u, err := sysinfo.Collect(r.Context(), s.opts.DiskPath)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	// aleph-vm: usage.model_dump_json(exclude_none=True) (resources.py).
	writePydanticJSON(w, http.StatusOK, u)
}
