package httpapi

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// statusFor maps errors to status codes: errkind.HTTPStatus, plus the
// slow-body refusal that only this server makes.
func statusFor(err error) int {
	if errors.Is(err, errBodyTooSlow) {
		return http.StatusRequestTimeout
	}
	return errkind.HTTPStatus(err)
}

// writeError answers with a JSON {"error": ...} body. Internal errors are
// logged in full but shown to the client without detail.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	code := statusFor(err)
	s.opts.Metrics.Error(errorKind(err))
	msg := err.Error()
	// A program that could not start answers its own traceback as text,
	// as aleph-vm does: that is how its author learns why.
	var start *guest.StartError
	if errors.As(err, &start) && errkind.Is(err, errkind.ProgramFailed) {
		s.log.Info("program failed to start", "method", r.Method, "path", r.URL.Path, "status", code, "err", err)
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.WriteHeader(code)
		_, _ = io.WriteString(w, start.Traceback)
		return
	}
	switch code {
	case http.StatusInternalServerError:
		s.log.Error("internal error", "method", r.Method, "path", r.URL.Path, "err", err)
		msg = "internal error"
	case http.StatusInsufficientStorage:
		// The details name host paths: for the operator's log only.
		s.log.Error("out of disk space", "method", r.Method, "path", r.URL.Path, "err", err)
		msg = "insufficient storage: no space left on device on this node"
	default:
		s.log.Info("request failed", "method", r.Method, "path", r.URL.Path, "status", code, "err", err)
	}
	writeJSON(w, code, map[string]string{"error": msg})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
