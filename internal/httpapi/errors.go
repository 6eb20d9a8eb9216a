package httpapi

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"unicode/utf16"
	"unicode/utf8"

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
		// The log keeps the full error; the client learns what failed,
		// not where on the host (volume images, mounts, e2fsck's output).
		msg = redactHostPaths(msg, s.hostRoots)
	}
	writeJSON(w, code, map[string]string{"error": msg})
}

// systemRoots are the host's directories whose paths never belong in an
// answer, whatever the settings.
var systemRoots = []string{"/var", "/tmp", "/run", "/dev", "/proc", "/sys", "/home", "/root", "/srv", "/mnt"}

// hostPathShown stands in an error body for a path on the host.
const hostPathShown = "<host path>"

// redactHostPaths replaces in msg every absolute path under one of roots
// (a path starts at the beginning of msg or after a space, quote, bracket,
// '=' or ':' and ends at the next of them or a comma).
func redactHostPaths(msg string, roots []string) string {
	if !strings.Contains(msg, "/") {
		return msg
	}
	var b strings.Builder
	for i := 0; i < len(msg); {
		if msg[i] == '/' && (i == 0 || pathDelimiter(msg[i-1])) {
			end := i
			for end < len(msg) && !pathDelimiter(msg[end]) && msg[end] != ',' && msg[end] != ';' {
				end++
			}
			if underAny(msg[i:end], roots) {
				b.WriteString(hostPathShown)
				i = end
				continue
			}
		}
		b.WriteByte(msg[i])
		i++
	}
	return b.String()
}

func pathDelimiter(c byte) bool {
	switch c {
	case ' ', '\t', '\n', '\r', '"', '\'', '`', '(', ')', '[', ']', '{', '}', '<', '>', '=', ':':
		return true
	}
	return false
}

func underAny(p string, roots []string) bool {
	for _, r := range roots {
		if r == "" || r == "/" {
			continue
		}
		if p == r || strings.HasPrefix(p, r+"/") {
			return true
		}
	}
	return false
}

// writeJSON answers v as aiohttp's web.json_response does, which is what
// aleph-vm's clients read: Content-Type "application/json;
// charset=utf-8" and Python's json.dumps bytes (pythonJSON).
func writeJSON(w http.ResponseWriter, code int, v any) {
	b, err := pythonJSON(v)
	if err != nil {
		code, b = http.StatusInternalServerError, []byte(`{"error": "internal error"}`)
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(code)
	_, _ = w.Write(b)
}

// writePydanticJSON answers v as aleph-vm's views that send a pydantic
// model's model_dump_json() (web.json_response(text=...)): compact, UTF-8
// as it is, with json_response's Content-Type.
func writePydanticJSON(w http.ResponseWriter, code int, v any) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		writeJSON(w, http.StatusInternalServerError, map[string]string{"error": "internal error"})
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(code)
	_, _ = w.Write(bytes.TrimRight(buf.Bytes(), "\n"))
}

// pythonJSON encodes v as Python's json.dumps(v) with its defaults: ", "
// and ": " between items, every non-ASCII character escaped as \uXXXX
// (UTF-16, ensure_ascii), '<', '>' and '&' as they are, no newline at
// the end.
func pythonJSON(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	compact := bytes.TrimRight(buf.Bytes(), "\n")
	out := make([]byte, 0, len(compact)+len(compact)/8)
	inString, escaped := false, false
	for i := 0; i < len(compact); {
		c := compact[i]
		if c >= utf8.RuneSelf {
			r, size := utf8.DecodeRune(compact[i:])
			for _, u := range utf16.Encode([]rune{r}) {
				out = fmt.Appendf(out, "\\u%04x", u)
			}
			i += size
			continue
		}
		out = append(out, c)
		i++
		switch {
		case inString && escaped:
			escaped = false
		case inString && c == '\\':
			escaped = true
		case c == '"':
			inString = !inString
		case !inString && (c == ',' || c == ':'):
			out = append(out, ' ')
		}
	}
	return out, nil
}
