package httpapi

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// statusFor is the one place where error kinds become HTTP status codes.
func statusFor(err error) int {
	var maxBytes *http.MaxBytesError
	switch {
	case errors.As(err, &maxBytes):
		return http.StatusRequestEntityTooLarge
	case errors.Is(err, errBodyTooSlow):
		return http.StatusRequestTimeout
	case errors.Is(err, context.DeadlineExceeded) && errkind.Of(err) == errkind.Unknown:
		return http.StatusGatewayTimeout
	}
	switch errkind.Of(err) {
	case errkind.InvalidInput, errkind.Unsupported, errkind.ResourceMissing:
		return http.StatusBadRequest
	case errkind.NotFound:
		return http.StatusNotFound
	case errkind.Unauthorized:
		return http.StatusUnauthorized
	case errkind.Forbidden:
		return http.StatusForbidden
	case errkind.Conflict:
		return http.StatusConflict
	case errkind.TooLarge:
		return http.StatusRequestEntityTooLarge
	case errkind.Unavailable, errkind.NoBackend, errkind.NoCapacity:
		return http.StatusServiceUnavailable
	case errkind.Timeout:
		return http.StatusGatewayTimeout
	case errkind.BadGateway, errkind.Upstream:
		return http.StatusBadGateway
	}
	return http.StatusInternalServerError
}

// writeError answers with a JSON {"error": ...} body. Internal errors are
// logged in full but shown to the client without detail.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	code := statusFor(err)
	msg := err.Error()
	if code == http.StatusInternalServerError {
		s.log.Error("internal error", "method", r.Method, "path", r.URL.Path, "err", err)
		msg = "internal error"
	} else {
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
