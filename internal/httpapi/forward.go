package httpapi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/syncrt"
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
	var cb *clientBody
	if r.Body != nil && r.Body != http.NoBody {
		cb = &clientBody{ReadCloser: http.MaxBytesReader(w, r.Body, s.opts.MaxRequestBodySize)}
		r.Body = cb
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
			setForwardingHeaders(pr)
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
			if cerr := cb.failure(); cerr != nil {
				err = cerr
			}
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
	var clientErr *clientBodyError
	var tooLarge *syncrt.HeaderTooLargeError
	var bad *syncrt.BadResponseError
	switch {
	case errors.As(err, &maxBytes):
		return errkind.New(errkind.TooLarge, "request body exceeds the limit of %d bytes", maxBytes.Limit)
	case errors.As(err, &clientErr):
		// The client's side of the relay failed: a malformed chunked
		// body or trailer, a body shorter than its Content-Length.
		return errkind.Wrap(errkind.InvalidInput, clientErr)
	// The program answered, but not something the supervisor passes on:
	// no need to wait for it to die.
	case errors.As(err, &tooLarge):
		return errkind.Wrap(errkind.BadGateway, fmt.Errorf("program %s gave an invalid response: %w", exec.Hash(), tooLarge))
	case errors.As(err, &bad):
		return errkind.Wrap(errkind.BadGateway, fmt.Errorf("program %s gave an invalid response: %w", exec.Hash(), bad))
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

// clientBody remembers why reading the client's request body failed, so
// that the relay's failure is charged to the client (400), not to the
// program (502).
type clientBody struct {
	io.ReadCloser
	mu  sync.Mutex
	err error
}

func (b *clientBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && !errors.Is(err, io.EOF) {
		b.mu.Lock()
		if b.err == nil {
			b.err = err
		}
		b.mu.Unlock()
	}
	return n, err
}

// failure is the client's error, if reading its body failed; the limits'
// own errors (413, 408) are left to classifyProxyError.
func (b *clientBody) failure() error {
	if b == nil {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	var maxBytes *http.MaxBytesError
	if b.err == nil || errors.As(b.err, &maxBytes) || errors.Is(b.err, errBodyTooSlow) {
		return nil
	}
	return &clientBodyError{err: b.err}
}

// clientBodyError is a request body the client sent wrong.
type clientBodyError struct{ err error }

func (e *clientBodyError) Error() string { return "reading the request body: " + e.err.Error() }
func (e *clientBodyError) Unwrap() error { return e.err }

// spoofableForwarding are headers a proxy sets about its client: a
// client's own are dropped, so that a program never mistakes them for the
// supervisor's (SetXForwarded already replaces X-Forwarded-For, -Host and
// -Proto and drops Forwarded).
var spoofableForwarding = []string{
	"X-Real-Ip", "X-Forwarded-Port", "X-Forwarded-Server", "X-Forwarded-Ssl",
	"X-Forwarded-Prefix", "X-Client-Ip", "X-Cluster-Client-Ip", "True-Client-Ip",
}

// setForwardingHeaders drops the client's forwarding headers and sets
// X-Real-IP to the address the supervisor sees, as nginx's usual proxy
// configuration does.
func setForwardingHeaders(pr *httputil.ProxyRequest) {
	for _, h := range spoofableForwarding {
		pr.Out.Header.Del(h)
	}
	if ip, _, err := net.SplitHostPort(pr.In.RemoteAddr); err == nil {
		pr.Out.Header.Set("X-Real-Ip", ip)
	}
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
