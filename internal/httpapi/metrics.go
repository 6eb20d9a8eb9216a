package httpapi

import (
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// handleMetrics serves Prometheus's /metrics on the node's own host. It
// is open, as aleph-vm's figures are (/about/usage/system,
// /about/executions/records, and the Prometheus exporter of its HAProxy
// on port 8404, all without credentials): the series carry node-wide sums
// and bounded labels, no program hashes, nothing secret, and scrapers do
// not hold operator sessions.
func (s *Server) handleMetrics(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		writeJSON(w, http.StatusMethodNotAllowed, map[string]string{"error": "method not allowed"})
		return
	}
	s.opts.Metrics.Handler().ServeHTTP(w, r)
}

// errorKind labels an answered error for the errors_total counter.
func errorKind(err error) string {
	var maxBytes *http.MaxBytesError
	switch {
	case errors.Is(err, errBodyTooSlow):
		return "body_too_slow"
	case errors.As(err, &maxBytes):
		return "too_large"
	}
	return strings.ReplaceAll(errkind.Of(err).String(), " ", "_")
}

// timeRequest returns a writer that remembers the status it answers
// and a function that records the request's latency with it. Websocket
// upgrades are not timed: their length is the session's.
func (s *Server) timeRequest(w http.ResponseWriter, r *http.Request) (http.ResponseWriter, func()) {
	if s.opts.Metrics == nil || isUpgrade(r) {
		return w, func() {}
	}
	sw := &statusWriter{ResponseWriter: w}
	start := time.Now()
	return sw, func() {
		status := sw.status
		if status == 0 {
			status = http.StatusOK // nothing written: net/http answers 200
		}
		s.opts.Metrics.Request(status, time.Since(start))
	}
}

// statusWriter remembers the status code answered. Unwrap lets
// http.ResponseController (ReverseProxy's flushes) reach the writer below.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 && code >= 200 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(p)
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
