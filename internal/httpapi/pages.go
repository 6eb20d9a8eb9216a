package httpapi

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/pep440"
	"github.com/aleph-vm-go/vm-supervisor/internal/records"
	"github.com/aleph-vm-go/vm-supervisor/internal/sysinfo"
)

// page registers a GET page under /about or /status with aleph-vm's CORS
// behaviour: aiohttp_cors with allow_credentials, expose_headers="*" and
// allow_headers="*" for any origin (orchestrator/supervisor.py:169-178).
// Operator pages stay safe from other sites because the session cookie is
// SameSite=Strict: a cross-site fetch never carries it.
func (s *Server) page(path string, h http.HandlerFunc) {
	s.mux.HandleFunc("GET "+path, func(w http.ResponseWriter, r *http.Request) {
		if origin := r.Header.Get("Origin"); origin != "" {
			w = &corsWriter{ResponseWriter: w, origin: origin}
		}
		h(w, r)
	})
	s.mux.HandleFunc("OPTIONS "+path, s.preflight)
}

// preflight answers a CORS preflight as aiohttp_cors's _preflight_handler
// does: 403 with its texts when Origin or the method is missing or the
// method is not the route's, else 200 echoing origin, method and headers.
func (s *Server) preflight(w http.ResponseWriter, r *http.Request) {
	// aiohttp's web.get also routes HEAD.
	s.preflightFor(http.MethodGet, http.MethodHead)(w, r)
}

// preflightFor is preflight for a route of the given methods.
func (s *Server) preflightFor(methods ...string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		s.answerPreflight(w, r, methods)
	}
}

func (s *Server) answerPreflight(w http.ResponseWriter, r *http.Request, methods []string) {
	origin := r.Header.Get("Origin")
	method := r.Header.Get("Access-Control-Request-Method")
	forbid := func(text string) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusForbidden)
		_, _ = w.Write([]byte(text))
	}
	switch {
	case origin == "":
		forbid("CORS preflight request failed: origin header is not specified in the request")
		return
	case method == "":
		forbid("CORS preflight request failed: 'Access-Control-Request-Method' header is not specified")
		return
	case !slices.Contains(methods, method):
		forbid(fmt.Sprintf("CORS preflight request failed: request method '%s' is not allowed for '%s' origin", method, origin))
		return
	}
	h := w.Header()
	h.Set("Access-Control-Allow-Origin", origin)
	h.Set("Access-Control-Allow-Credentials", "true")
	h.Set("Access-Control-Allow-Methods", method)
	var asked []string
	for _, name := range strings.Split(r.Header.Get("Access-Control-Request-Headers"), ",") {
		if name = strings.ToUpper(strings.Trim(name, " \t")); name != "" && !slices.Contains(asked, name) {
			asked = append(asked, name)
		}
	}
	if len(asked) > 0 {
		h.Set("Access-Control-Allow-Headers", strings.Join(asked, ","))
	}
	w.WriteHeader(http.StatusOK)
}

// corsWriter adds the CORS headers of a non-preflight answer once the
// handler has set its own, exposing every header but the CORS-safelisted
// ones, as expose_headers="*" does.
type corsWriter struct {
	http.ResponseWriter
	origin string
	done   bool
}

var simpleResponseHeaders = []string{"Cache-Control", "Content-Language", "Content-Type", "Expires", "Last-Modified", "Pragma"}

func (c *corsWriter) WriteHeader(code int) {
	if !c.done {
		c.done = true
		h := c.Header()
		var exposed []string
		for name := range h {
			if !slices.Contains(simpleResponseHeaders, name) {
				exposed = append(exposed, name)
			}
		}
		slices.Sort(exposed)
		h.Set("Access-Control-Expose-Headers", strings.Join(exposed, ","))
		h.Set("Access-Control-Allow-Origin", c.origin)
		h.Set("Access-Control-Allow-Credentials", "true")
	}
	c.ResponseWriter.WriteHeader(code)
}

func (c *corsWriter) Write(b []byte) (int, error) {
	if !c.done {
		c.WriteHeader(http.StatusOK)
	}
	return c.ResponseWriter.Write(b)
}

func (c *corsWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }

// handleVersion is aleph-vm's status_check_version: 200 with a text when
// this version is the reference or newer, else JSON {"error": ...}, as
// aleph-vm's error_middleware turns its HTTP exceptions into: 400
// without a valid ?reference=, 403 when older, each with packaging's
// wording (views/__init__.py, supervisor.py error_middleware).
func (s *Server) handleVersion(w http.ResponseWriter, r *http.Request) {
	refStr := r.URL.Query().Get("reference")
	if refStr == "" {
		s.writeError(w, r, errkind.New(errkind.InvalidInput, "Query field '?reference=` must be specified"))
		return
	}
	ref, err := pep440.Parse(refStr)
	if err != nil {
		s.writeError(w, r, errkind.New(errkind.InvalidInput, "%s", err.Error()))
		return
	}
	current, err := pep440.Parse(s.opts.Version)
	if err != nil {
		s.writeError(w, r, errkind.New(errkind.Unavailable, "%s", err.Error()))
		return
	}
	if current.Compare(ref) >= 0 {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusOK)
		_, _ = fmt.Fprintf(w, "Up-to-date: version %s >= %s", current, ref)
		return
	}
	s.writeError(w, r, errkind.New(errkind.Forbidden, "Outdated: version %s < %s", current, ref))
}

// recordColumns are aleph-vm's `executions` columns in its table's order
// (orchestrator/metrics.py ExecutionRecord.to_dict), which is the order of
// its answer's keys.
var recordColumns = []string{"uuid", "vm_hash", "vm_id", "time_defined", "time_prepared", "time_started",
	"time_stopping", "cpu_time_user", "cpu_time_system", "io_read_count", "io_write_count", "io_read_bytes",
	"io_write_bytes", "vcpus", "memory", "network_tap", "message", "original_message", "persistent", "gpus",
	"mapped_ports"}

// upstreamRecord is one record as aleph-vm's json.dumps writes it: every
// column of its table in order, the ones this supervisor does not keep
// null, floats as Python writes them, then what only we keep (ipv4).
func upstreamRecord(rec records.Record) ([]byte, error) {
	b, err := json.Marshal(rec)
	if err != nil {
		return nil, err
	}
	fields := map[string]any{}
	if err := json.Unmarshal(b, &fields); err != nil {
		return nil, err
	}
	fields["cpu_time_user"] = sysinfo.Float(rec.CPUTimeUser)
	fields["cpu_time_system"] = sysinfo.Float(rec.CPUTimeSystem)
	keys := append([]string{}, recordColumns...)
	for k := range fields {
		if !slices.Contains(recordColumns, k) {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys[len(recordColumns):])
	out := []byte{'{'}
	for i, k := range keys {
		if i > 0 {
			out = append(out, ", "...)
		}
		kb, _ := pythonJSON(k)
		vb, err := pythonJSON(fields[k]) // nil when absent: null
		if err != nil {
			return nil, err
		}
		out = append(append(append(out, kb...), ": "...), vb...)
	}
	return append(out, '}'), nil
}

// networkOf is the network of an address/prefix ("172.16.4.2/30" →
// "172.16.4.0/30"), which is what aleph-vm lists as a VM's ip_network.
func networkOf(addr string) any {
	p, err := netip.ParsePrefix(addr)
	if err != nil {
		return nil
	}
	return p.Masked().String()
}

// handleExecutionList is aleph-vm's list_executions: running executions
// by item hash, with their networks and VM type. Programs are "microvm"
// or, with on.persistent, "persistent_program", whatever the isolation
// backend, as the type comes from the message (vm_type.py).
func (s *Server) handleExecutionList(w http.ResponseWriter, r *http.Request) {
	out := map[string]any{}
	for _, e := range s.opts.Pool.List() {
		out[e.ProgramHash] = map[string]any{
			"networking":                 map[string]any{"ipv4": networkOf(e.IPv4), "ipv6": nil},
			"vm_type":                    e.VMType,
			"awaiting_confidential_init": false,
		}
	}
	writeJSON(w, http.StatusOK, out)
}

// executionV2 is one execution of aleph-vm's list_executions_v2, its
// fields in upstream's order.
type executionV2 struct {
	Networking               any           `json:"networking"`
	Status                   executionTime `json:"status"`
	Running                  bool          `json:"running"`
	AwaitingConfidentialInit bool          `json:"awaiting_confidential_init"`
	VMType                   string        `json:"vm_type"`
}

// networkingV2 is list_executions_v2's networking of an execution with a
// network. host_ipv4 is the node's public address, which this node does
// not know (null); programs have no IPv6 and no mapped ports.
type networkingV2 struct {
	IPv4Network any            `json:"ipv4_network"`
	HostIPv4    any            `json:"host_ipv4"`
	IPv6Network any            `json:"ipv6_network"`
	IPv6IP      any            `json:"ipv6_ip"`
	IPv4IP      any            `json:"ipv4_ip"`
	MappedPorts map[string]any `json:"mapped_ports"`
}

// executionTime is aleph-vm's VmExecutionTimes: str() of aware UTC
// datetimes ("2024-05-01 10:00:00.123456+00:00"), null when not reached.
// The pool prepares an execution from its definition and starts it once
// prepared, so preparing_at and starting_at are those moments.
type executionTime struct {
	DefinedAt   *string `json:"defined_at"`
	PreparingAt *string `json:"preparing_at"`
	PreparedAt  *string `json:"prepared_at"`
	StartingAt  *string `json:"starting_at"`
	StartedAt   *string `json:"started_at"`
	StoppingAt  *string `json:"stopping_at"`
	StoppedAt   *string `json:"stopped_at"`
}

// pyAwareTime is Python's str() of an aware UTC datetime.
func pyAwareTime(t time.Time) *string {
	if t.IsZero() {
		return nil
	}
	u := t.UTC().Truncate(time.Microsecond)
	layout := "2006-01-02 15:04:05.000000+00:00"
	if u.Nanosecond() == 0 {
		layout = "2006-01-02 15:04:05+00:00"
	}
	s := u.Format(layout)
	return &s
}

// handleExecutionListV2 is aleph-vm's list_executions_v2 (views/__init__.py;
// tests/supervisor/test_views.py test_v2_executions_list): every execution
// with its networking, times and whether it runs.
func (s *Server) handleExecutionListV2(w http.ResponseWriter, r *http.Request) {
	out := map[string]executionV2{}
	for _, e := range s.opts.Pool.List() {
		var networking any = map[string]any{}
		if e.IPv4 != "" {
			var ip any
			if p, err := netip.ParsePrefix(e.IPv4); err == nil {
				ip = p.Addr().String()
			}
			networking = networkingV2{IPv4Network: networkOf(e.IPv4), IPv4IP: ip, MappedPorts: map[string]any{}}
		}
		out[e.ProgramHash] = executionV2{
			Networking: networking,
			Status: executionTime{
				DefinedAt: pyAwareTime(e.Defined), PreparingAt: pyAwareTime(e.Defined),
				PreparedAt: pyAwareTime(e.Prepared), StartingAt: pyAwareTime(e.Prepared),
				StartedAt: pyAwareTime(e.Started),
			},
			Running: !e.Started.IsZero(),
			VMType:  e.VMType,
		}
	}
	writeJSON(w, http.StatusOK, out)
}

// handleExecutionDetails is aleph-vm's about_executions: a one-element
// array holding the executions by item hash.
func (s *Server) handleExecutionDetails(w http.ResponseWriter, r *http.Request) {
	byHash := map[string]any{}
	for _, e := range s.opts.Pool.List() {
		byHash[e.ProgramHash] = e
	}
	writeJSON(w, http.StatusOK, []any{byHash})
}

// handlePublicConfig is aleph-vm's status_public_config: the settings a
// scheduler or monitor may read without logging in.
func (s *Server) handlePublicConfig(w http.ResponseWriter, r *http.Request) {
	if s.opts.PublicConfig == nil {
		s.writeError(w, r, errkind.New(errkind.NotFound, "no public configuration on this node"))
		return
	}
	writeJSON(w, http.StatusOK, s.opts.PublicConfig())
}
