package httpapi

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
)

// forward sends the request to the program's sandbox, starting it if
// needed, and streams the answer back.
func (s *Server) forward(w http.ResponseWriter, r *http.Request, hash, path string) {
	w, record := s.timeRequest(w, r)
	defer record()
	if r.ContentLength > s.opts.MaxRequestBodySize {
		s.writeError(w, r, errkind.New(errkind.TooLarge,
			"request body of %d bytes exceeds the limit of %d bytes", r.ContentLength, s.opts.MaxRequestBodySize))
		return
	}
	exec, err := s.opts.Pool.Acquire(r.Context(), hash)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	defer exec.Release()

	timeout := exec.RequestTimeout()
	ctx := r.Context()
	// Websockets live as long as the client wants; plain requests get the
	// program's resources.seconds.
	if !isUpgrade(r) {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	if r.Body != nil {
		r.Body = http.MaxBytesReader(w, r.Body, s.opts.MaxRequestBodySize)
	}

	codeRef := exec.Program().Content.Code.Ref
	proxy := &httputil.ReverseProxy{
		Transport: exec.Transport(),
		// 0, not -1: ReverseProxy still flushes every write at once for
		// streams (no Content-Length, or text/event-stream), while a response
		// of known length goes out in one write instead of a flush per
		// chunk (a tenth of the supervisor's CPU per warm request).
		FlushInterval: 0,
		Rewrite: func(pr *httputil.ProxyRequest) {
			target := &url.URL{Scheme: "http", Host: "program"}
			pr.SetURL(target)
			pr.Out.URL.Path, pr.Out.URL.RawPath = unescapedAndRaw(path)
			pr.Out.URL.RawQuery = r.URL.RawQuery
			pr.Out.Host = r.Host
			pr.SetXForwarded()
			// Programs share the operator pages' origin: nothing of the
			// operator's credentials may reach them.
			scrubForProgram(pr.Out.Header, s.opts.LoginToken, s.sessions.valid)
		},
		ModifyResponse: func(resp *http.Response) error {
			dropOperatorSetCookie(resp.Header)
			resp.Header.Set("Aleph-Program-ItemHash", hash)
			resp.Header.Set("Aleph-Program-Code-Ref", codeRef)
			return nil
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			s.writeError(w, r, s.classifyProxyError(r.Context(), exec, timeout, err))
		},
	}
	proxy.ServeHTTP(w, r.WithContext(ctx))
}

// classifyProxyError tells "too slow" (504) from "crashed" (502) from
// "body too large" (413) from "client too slow" (408).
func (s *Server) classifyProxyError(ctx context.Context, exec *pool.Execution, timeout time.Duration, err error) error {
	// A body cut for arriving too slowly cancels the request: the proxy
	// may see that cancellation rather than the body's error.
	if slow := bodyTooSlow(ctx); slow != nil {
		return slow
	}
	var maxBytes *http.MaxBytesError
	switch {
	case errors.As(err, &maxBytes):
		return errkind.New(errkind.TooLarge, "request body exceeds the limit of %d bytes", maxBytes.Limit)
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return errkind.New(errkind.Timeout, "program %s did not answer within %s", exec.Hash(), timeout)
	case errors.Is(ctx.Err(), context.Canceled):
		return errkind.New(errkind.BadGateway, "client went away")
	}
	// A program that exits mid-request takes its sandbox down with it; wait
	// for the pool to see that, so the next request gets a fresh sandbox
	// rather than the dying one.
	if exec.WaitDied(3 * time.Second) {
		if cause := exec.Cause(); cause != nil {
			return errkind.Wrap(errkind.BadGateway, fmt.Errorf("program %s ended: %w", exec.Hash(), cause))
		}
		return errkind.Wrap(errkind.BadGateway, fmt.Errorf("program %s crashed: %w", exec.Hash(), err))
	}
	return errkind.Wrap(errkind.BadGateway, fmt.Errorf("program %s gave no response: %w", exec.Hash(), err))
}

func isUpgrade(r *http.Request) bool {
	return r.Header.Get("Upgrade") != "" &&
		strings.Contains(strings.ToLower(r.Header.Get("Connection")), "upgrade")
}

func unescapedAndRaw(escaped string) (string, string) {
	p, err := url.PathUnescape(escaped)
	if err != nil || p == "" {
		return "/", ""
	}
	u := url.URL{Path: p}
	if u.EscapedPath() != escaped {
		return p, escaped
	}
	return p, ""
}
