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
	// Allocations applies POST /control/allocations; nil refuses them.
	Allocations Allocations
	// AllocationTokenHash is the sha256 (hex) of the scheduler's token.
	AllocationTokenHash string
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
	drain    drain
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
	opts.Version = pep440.FromGitDescribe(opts.Version)
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
	s.page("/status/check/version", s.handleVersion)
	s.page("/status/check/fastapi", s.handleCheckFastAPI)
	s.page("/status/check/fastapi/legacy", s.handleCheckFastAPILegacy)
	s.page("/status/check/fastapi/detail", s.handleCheckFastAPIDetail)
	s.page("/status/config", s.handlePublicConfig)
	s.mux.HandleFunc("POST /control/allocations", s.handleAllocations)
	s.controlRoutes()
	s.mux.HandleFunc("/", s.handleByHost)
	return s
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Server", "aleph-vm/"+s.opts.Version)
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
// newest first (orchestrator/metrics.py get_execution_records).
func (s *Server) handleRecords(w http.ResponseWriter, r *http.Request) {
	recs := []records.Record{}
	if s.opts.Records != nil {
		var err error
		if recs, err = s.opts.Records.List(r.Context(), 1000); err != nil {
			s.writeError(w, r, err)
			return
		}
	}
	out := make([]map[string]any, 0, len(recs))
	for _, rec := range recs {
		out = append(out, upstreamRecord(rec))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleUsage(w http.ResponseWriter, r *http.Request) {
	u, err := sysinfo.Collect(r.Context(), s.opts.DiskPath)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, u)
}
