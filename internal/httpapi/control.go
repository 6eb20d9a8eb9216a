package httpapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/ownerauth"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/proglog"
)

// Control is what the owner's control API needs of the pool (*pool.Pool).
type Control interface {
	Running(hash string) *pool.Execution
	Stop(ctx context.Context, hash string) error
	Reboot(ctx context.Context, hash string) error
	Expire(hash string, d time.Duration) error
	Erase(ctx context.Context, hash string) error
	Logs(hash string) *proglog.Buffer
	// ProgramOwner resolves the owner of a program that is not running.
	ProgramOwner(ctx context.Context, hash string) (string, error)
}

// maxExpire is upstream's bound on an expiry delay (exclusive).
const maxExpire = 10 * 24 * time.Hour

// controlRoutes registers aleph-vm's /control/machine/{ref}/... routes
// (orchestrator/supervisor.py, views/operator.py), all CORS-enabled as
// upstream's cors_allow_all makes them.
func (s *Server) controlRoutes() {
	if s.opts.Control == nil {
		return
	}
	// Each signed operation is honoured once (upstream has no nonce).
	s.auth = ownerauth.Verifier{Domain: s.opts.DomainName, Replays: ownerauth.NewReplays(0)}
	for _, action := range []string{"stop", "reboot", "expire", "erase"} {
		path := "/control/machine/{ref}/" + action
		s.mux.HandleFunc("POST "+path, withCORS(s.ownerAction(action)))
		s.mux.HandleFunc("OPTIONS "+path, s.preflightFor(http.MethodPost))
	}
	s.mux.HandleFunc("POST /control/machine/{ref}/update", withCORS(s.handleUpdate))
	s.mux.HandleFunc("OPTIONS /control/machine/{ref}/update", s.preflightFor(http.MethodPost))
	s.mux.HandleFunc("GET /control/machine/{ref}/logs", withCORS(s.handleOwnerLogs))
	s.mux.HandleFunc("OPTIONS /control/machine/{ref}/logs", s.preflight)
	s.mux.HandleFunc("GET /control/machine/{ref}/stream_logs", s.handleStreamLogs)
}

func withCORS(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if origin := r.Header.Get("Origin"); origin != "" {
			w = &corsWriter{ResponseWriter: w, origin: origin}
		}
		h(w, r)
	}
}

// writeText answers as aiohttp's web.Response(body=...) and its HTTP
// exceptions do in operator.py.
func writeText(w http.ResponseWriter, code int, body string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(code)
	_, _ = w.Write([]byte(body))
}

// controlRef authenticates the request, then reads its ref; upstream's
// decorator authenticates before the view looks at the path.
func (s *Server) controlRef(w http.ResponseWriter, r *http.Request) (wallet, hash string, ok bool) {
	wallet, err := s.auth.Request(r)
	if err != nil {
		s.writeError(w, r, err)
		return "", "", false
	}
	ref := r.PathValue("ref")
	hash, err = message.ParseRef(ref)
	if err != nil {
		writeText(w, http.StatusBadRequest, fmt.Sprintf("Invalid ref: '%s'", ref))
		return "", "", false
	}
	return wallet, hash, true
}

// handleUpdate is aleph-vm's operate_update (views/__init__.py): a
// notice, with no authentication, that an execution's configuration
// (port forwarding) changed and is to be fetched again. Programs here have
// no such configuration, so there is nothing to fetch: a running
// execution answers 200 {}, as upstream's does once it has refetched.
// Errors go through upstream's error_middleware: JSON {"error": ...}.
func (s *Server) handleUpdate(w http.ResponseWriter, r *http.Request) {
	ref := r.PathValue("ref")
	hash, err := message.ParseRef(ref)
	if err != nil {
		s.writeError(w, r, errkind.New(errkind.InvalidInput, "Invalid ref: '%s'", ref))
		return
	}
	if s.opts.Control.Running(hash) == nil {
		s.writeError(w, r, errkind.New(errkind.NotFound, "404: VM not found"))
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{})
}

func (s *Server) ownerAction(action string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		wallet, hash, ok := s.controlRef(w, r)
		if !ok {
			return
		}
		var timeout float64
		if action == "expire" {
			var err error
			if timeout, err = expireTimeout(r); err != nil {
				writeText(w, http.StatusBadRequest, "Invalid timeout duration")
				return
			}
		}
		e := s.opts.Control.Running(hash)
		if e == nil {
			writeText(w, http.StatusNotFound, "No virtual machine with ref "+hash)
			return
		}
		if !s.mayOperate(r.Context(), wallet, e.Owner(), hash) {
			s.log.Info("owner action refused", "action", action, "program", hash, "wallet", wallet)
			writeText(w, http.StatusForbidden, "Unauthorized sender")
			return
		}
		s.log.Info("owner action", "action", action, "program", hash, "wallet", wallet)
		body, err := s.runAction(r.Context(), action, hash, timeout)
		if err != nil {
			if errkind.Is(err, errkind.NotFound) {
				// It stopped meanwhile: what upstream says of a stopped VM.
				writeText(w, http.StatusOK, "Already stopped, nothing to do")
				return
			}
			s.writeError(w, r, err)
			return
		}
		writeText(w, http.StatusOK, body)
	}
}

func (s *Server) runAction(ctx context.Context, action, hash string, timeout float64) (string, error) {
	c := s.opts.Control
	switch action {
	case "stop":
		return "Stopped VM with ref " + hash, c.Stop(ctx, hash)
	case "reboot":
		return "Rebooted VM with ref " + hash, c.Reboot(ctx, hash)
	case "expire":
		d := time.Duration(timeout * float64(time.Second))
		return fmt.Sprintf("Expiring VM with ref %s in %s seconds", hash, pyFloat(timeout)), c.Expire(hash, d)
	case "erase":
		return "Erased VM with ref " + hash, c.Erase(ctx, hash)
	}
	return "", errkind.New(errkind.NotFound, "no action %s", action)
}

// expireTimeout reads the delay of an expire, in seconds, from the query,
// a form or a JSON body ("timeout"). Upstream reads it from a path
// parameter its route does not have, so its expire always answers 400;
// its own skipped test posts it as a form field.
func expireTimeout(r *http.Request) (float64, error) {
	raw := r.URL.Query().Get("timeout")
	if raw == "" && strings.HasPrefix(r.Header.Get("Content-Type"), "application/json") {
		var body struct {
			Timeout json.Number `json:"timeout"`
		}
		if err := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 4096)).Decode(&body); err == nil {
			raw = body.Timeout.String()
		}
	} else if raw == "" {
		r.Body = http.MaxBytesReader(nil, r.Body, 4096)
		raw = r.PostFormValue("timeout")
	}
	t, err := strconv.ParseFloat(strings.TrimSpace(raw), 64)
	if err != nil || math.IsNaN(t) || t <= 0 || t >= maxExpire.Seconds() {
		return 0, errors.New("invalid timeout duration")
	}
	return t, nil
}

// pyFloat prints f as Python's str(float) does for ordinary values.
func pyFloat(f float64) string {
	s := strconv.FormatFloat(f, 'f', -1, 64)
	if !strings.Contains(s, ".") {
		s += ".0"
	}
	return s
}

// mayOperate is upstream's is_sender_authorized: the wallet is the
// program's owner, or a delegate the owner lists in its security
// aggregate (delegation.MayOperate). An aggregate that cannot be read
// refuses, as upstream does.
func (s *Server) mayOperate(ctx context.Context, wallet, owner, hash string) bool {
	ok, err := s.opts.Delegations.MayOperate(ctx, wallet, owner)
	if err != nil {
		s.log.Warn("reading the owner's delegations", "program", hash, "owner", owner, "wallet", wallet, "err", err)
		return false
	}
	return ok
}

// programOwner finds the owner of a program that is running or whose
// logs are kept; found is false for a program this node knows nothing of.
func (s *Server) programOwner(ctx context.Context, hash string) (owner string, found bool, err error) {
	c := s.opts.Control
	if e := c.Running(hash); e != nil {
		return e.Owner(), true, nil
	}
	if c.Logs(hash) == nil {
		return "", false, nil
	}
	owner, err = c.ProgramOwner(ctx, hash)
	return owner, err == nil, err
}

// logEntry is one line of GET /logs, in the shape upstream gives journald
// entries.
type logEntry struct {
	Identifier string `json:"SYSLOG_IDENTIFIER"`
	Message    string `json:"MESSAGE"`
	File       string `json:"file"`
	Timestamp  string `json:"__REALTIME_TIMESTAMP"`
}

// handleOwnerLogs is operate_logs_json: every kept line of the program,
// running or not, as a JSON list.
func (s *Server) handleOwnerLogs(w http.ResponseWriter, r *http.Request) {
	wallet, hash, ok := s.controlRef(w, r)
	if !ok {
		return
	}
	owner, found, err := s.programOwner(r.Context(), hash)
	switch {
	case err != nil:
		s.writeError(w, r, err)
		return
	case !found:
		writeText(w, http.StatusNotFound, "No execution found for this VM")
		return
	case !s.mayOperate(r.Context(), wallet, owner, hash):
		writeText(w, http.StatusForbidden, "Unauthorized sender")
		return
	}
	out := []logEntry{}
	if b := s.opts.Control.Logs(hash); b != nil {
		for _, e := range b.Entries() {
			out = append(out, logEntry{
				Identifier: "vm-" + hash + "-" + e.Stream,
				Message:    e.Message,
				File:       e.Stream,
				Timestamp:  pyDatetime(e.Time),
			})
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusOK)
	_ = json.NewEncoder(w).Encode(out)
}

// pyDatetime prints t (in UTC) as Python's str(datetime) does.
func pyDatetime(t time.Time) string {
	t = t.UTC()
	if t.Nanosecond()/1000 == 0 {
		return t.Format("2006-01-02 15:04:05")
	}
	return t.Format("2006-01-02 15:04:05.000000")
}
