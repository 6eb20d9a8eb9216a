// Package guestapi is the API a program reaches from inside its sandbox
// through ALEPH_API_UNIX_SOCKET, served by the host once per
// execution over the guest channel: the node's signing key (properties
// and signatures), a small key-value cache namespaced by program, and a
// relay to the Aleph API.
//
// Routes answer as aleph-vm's guest API (aiohttp) and its VM connector
// do: the same paths and methods, bodies, statuses and content types.
package guestapi

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf16"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey"
)

// Program is what the guest API needs to know about the caller.
type Program struct {
	Hash string
}

// DefaultMaxValueSize is the largest value aleph-vm accepts: aiohttp's
// client_max_size of 1 MiB refuses a body of 1 MiB or more.
const DefaultMaxValueSize = 1<<20 - 1

// Cache is the guest cache shared by every execution's handler: a store
// and the bounds on what requests may hold in memory.
type Cache struct {
	Store Store
	// MaxValueSize bounds one value, in bytes.
	MaxValueSize int64
	// values limits how many values are in the supervisor's memory at
	// once across all programs (read from a request or from the store).
	values chan struct{}
	log    *slog.Logger
}

// Concurrency bounds: every value in flight holds at most MaxValueSize
// bytes (plus the driver's copy), so the supervisor holds at most
// globalValues of them whatever programs do.
const (
	globalValues     = 16
	perProgramValues = 4
	// perProgramLists bounds one execution's listings in progress: with
	// its values in flight, fewer than the embedded store's readers, so
	// that a program listing in a loop leaves readers to the others.
	perProgramLists = 2
)

// NewCache wraps a store. maxValueSize ≤ 0 means DefaultMaxValueSize.
func NewCache(store Store, maxValueSize int64, log *slog.Logger) *Cache {
	if maxValueSize <= 0 {
		maxValueSize = DefaultMaxValueSize
	}
	if log == nil {
		log = slog.Default()
	}
	return &Cache{Store: store, MaxValueSize: maxValueSize, values: make(chan struct{}, globalValues), log: log}
}

// Options configure the handler of one execution.
type Options struct {
	Program Program
	Cache   *Cache
	// APIServer is the Aleph API that GET requests outside the guest
	// API's own routes are relayed to; empty answers them 500 as
	// aleph-vm does when its API server cannot be reached.
	APIServer string
	// Signer is the node's signing key behind /properties and /sign; nil
	// answers them 500, as aleph-vm does without its VM connector.
	Signer *nodekey.Key
	// Client reaches APIServer; nil means a client with aleph-vm's
	// (aiohttp's) five-minute bound. Either way redirects are followed
	// only within APIServer's host.
	Client *http.Client
	// Publications limits what the node signs for programs; nil means
	// no limit. Share one between every execution's handler.
	Publications *Publications
	// Connections bound this execution's guest API connections; zero
	// fields take DefaultConnLimits.
	Connections ConnLimits
	Logger      *slog.Logger
}

// New returns the handler for one program's guest API.
func New(o Options) http.Handler {
	g := &guestAPI{o: o, log: o.Logger}
	if g.log == nil {
		g.log = slog.Default()
	}
	if o.Client != nil {
		c := *o.Client
		g.client = &c
	} else {
		g.client = &http.Client{Timeout: 5 * time.Minute}
	}
	g.apiServer = strings.TrimRight(o.APIServer, "/")
	g.client.CheckRedirect = sameHostRedirects(g.apiServer)
	if o.Cache != nil {
		g.cache = &cacheHandler{c: o.Cache, ns: namespace(o.Program.Hash),
			mine: make(chan struct{}, perProgramValues), lists: make(chan struct{}, perProgramLists)}
	}
	return g
}

type guestAPI struct {
	o         Options
	log       *slog.Logger
	client    *http.Client
	apiServer string
	cache     *cacheHandler
}

// ServeHTTP routes as aleph-vm's aiohttp application does
// (guest_api/__main__.py:190-203): its own routes first, then every GET,
// HEAD and OPTIONS relayed to the Aleph API, and any other method 405
// with the methods the path would accept.
func (g *guestAPI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p, m := r.URL.Path, r.Method
	switch {
	case p == "/properties" && m == http.MethodGet:
		g.properties(w, r)
	case p == "/sign" && m == http.MethodPost:
		g.sign(w, r)
	case g.cache != nil && p == "/cache/" && m == http.MethodGet:
		g.cache.list(w, r)
	case g.cache != nil && strings.HasPrefix(p, "/cache/") &&
		(m == http.MethodGet || m == http.MethodHead || m == http.MethodPut || m == http.MethodDelete):
		// HEAD reads the cache too (aleph-vm would relay it to the
		// Aleph API, which has no such path).
		r.SetPathValue("key", strings.TrimPrefix(p, "/cache/"))
		g.cache.entry(w, r)
	case isPubsub(p) && m == http.MethodPost:
		g.repost(w, r)
	case m == http.MethodGet || m == http.MethodHead || m == http.MethodOptions:
		g.proxy(w, r)
	default:
		w.Header().Set("Allow", allowed(p))
		writeText(w, http.StatusMethodNotAllowed, "405: Method Not Allowed")
	}
}

// allowed is aiohttp's Allow header for a path: the sorted methods of
// every route whose path matches, the catch-all relay's included.
func allowed(p string) string {
	set := map[string]bool{http.MethodGet: true, http.MethodHead: true, http.MethodOptions: true}
	if p == "/sign" || isPubsub(p) {
		set[http.MethodPost] = true
	}
	if strings.HasPrefix(p, "/cache/") {
		set[http.MethodPut], set[http.MethodDelete] = true, true
	}
	ms := make([]string, 0, len(set))
	for k := range set {
		ms = append(ms, k)
	}
	sort.Strings(ms)
	return strings.Join(ms, ",")
}

func isPubsub(p string) bool {
	return p == "/api/v0/ipfs/pubsub/pub" || p == "/api/v0/p2p/pubsub/pub"
}

// writeTrouble is aiohttp's answer to a handler's unhandled exception
// (web_protocol.RequestHandler.handle_error), which is what aleph-vm
// gives for malformed requests and unreachable upstreams alike.
func writeTrouble(w http.ResponseWriter) {
	w.Header().Set("Connection", "close")
	writeText(w, http.StatusInternalServerError, "500 Internal Server Error\n\nServer got itself in trouble")
}

// namespace is aleph-vm's: the program's hash, or "_" without one.
func namespace(hash string) string {
	if hash == "" {
		return "_"
	}
	return hash
}

type cacheHandler struct {
	c     *Cache
	ns    string
	mine  chan struct{} // this execution's share of values in flight
	lists chan struct{} // this execution's listings in progress
}

// acquire takes one of this program's value slots, then a global one.
func (h *cacheHandler) acquire(ctx context.Context) (release func(), err error) {
	select {
	case h.mine <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	select {
	case h.c.values <- struct{}{}:
	case <-ctx.Done():
		<-h.mine
		return nil, ctx.Err()
	}
	return func() { <-h.c.values; <-h.mine }, nil
}

func (h *cacheHandler) list(w http.ResponseWriter, r *http.Request) {
	pattern := "*"
	if q := r.URL.Query(); q.Has("pattern") {
		pattern = q.Get("pattern")
	}
	if !ValidPattern(pattern) {
		writeText(w, http.StatusBadRequest, "Invalid key")
		return
	}
	select {
	case h.lists <- struct{}{}:
		defer func() { <-h.lists }()
	case <-r.Context().Done():
		h.fail(w, r, r.Context().Err())
		return
	}
	keys, err := h.c.Store.Keys(r.Context(), h.ns, pattern)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	_, _ = w.Write(pythonJSONStrings(keys))
}

func (h *cacheHandler) entry(w http.ResponseWriter, r *http.Request) {
	key := r.PathValue("key")
	if !ValidKey(key) {
		writeText(w, http.StatusBadRequest, "Invalid key")
		return
	}
	ctx := r.Context()
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		release, err := h.acquire(ctx)
		if err != nil {
			h.fail(w, r, err)
			return
		}
		defer release()
		v, ok, err := h.c.Store.Get(ctx, h.ns, key)
		if err != nil {
			h.fail(w, r, err)
			return
		}
		// aleph-vm answers `if body:`, so an empty value reads as absent.
		if !ok || len(v) == 0 {
			writeText(w, http.StatusNotFound, "No such key in cache")
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.Itoa(len(v)))
		_, _ = w.Write(v)
	case http.MethodPut:
		h.put(w, r, key)
	case http.MethodDelete:
		n, err := h.c.Store.Delete(ctx, h.ns, key)
		if err != nil {
			h.fail(w, r, err)
			return
		}
		writeJSONText(w, strconv.Itoa(n))
	}
}

func (h *cacheHandler) put(w http.ResponseWriter, r *http.Request, key string) {
	limit := h.c.MaxValueSize
	tooLarge := func(actual int64) {
		// aiohttp's words; its limit is the first size refused.
		writeText(w, http.StatusRequestEntityTooLarge,
			fmt.Sprintf("Maximum request body size %d exceeded, actual body size %d", limit+1, actual))
	}
	if r.ContentLength > limit {
		tooLarge(r.ContentLength)
		return
	}
	release, err := h.acquire(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	defer release()
	var buf bytes.Buffer
	if r.ContentLength > 0 {
		buf.Grow(int(r.ContentLength))
	}
	n, err := buf.ReadFrom(http.MaxBytesReader(w, r.Body, limit))
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		tooLarge(n + 1)
		return
	}
	if err != nil {
		h.fail(w, r, errkind.Wrap(errkind.InvalidInput, fmt.Errorf("reading the value: %w", err)))
		return
	}
	if err := h.c.Store.Set(r.Context(), h.ns, key, buf.Bytes()); err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSONText(w, "true")
}

// fail answers a store or request error with its kind's status and a
// plain-text reason, as aiohttp's error responses are.
func (h *cacheHandler) fail(w http.ResponseWriter, r *http.Request, err error) {
	code := errkind.HTTPStatus(err)
	msg := err.Error()
	switch code {
	case http.StatusInternalServerError:
		h.c.log.Error("guest cache", "program", h.ns, "method", r.Method, "path", r.URL.Path, "err", err)
		msg = "500: Internal Server Error"
	case http.StatusServiceUnavailable:
		h.c.log.Warn("guest cache", "program", h.ns, "method", r.Method, "path", r.URL.Path, "err", err)
	default:
		// Refusals are a program's doing: debug, so that a flood of them
		// cannot flood the supervisor's log.
		h.c.log.Debug("guest cache refused", "program", h.ns, "method", r.Method, "path", r.URL.Path, "status", code, "err", err)
	}
	writeText(w, code, msg)
}

// writeText answers as aiohttp's web.Response(text=...) does.
func writeText(w http.ResponseWriter, code int, text string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(code)
	_, _ = io.WriteString(w, text)
}

// writeJSONText answers as aiohttp's web.json_response does, with an
// already encoded body.
func writeJSONText(w http.ResponseWriter, body string) {
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	_, _ = io.WriteString(w, body)
}

// pythonJSONStrings encodes a list of strings byte for byte as Python's
// json.dumps does by default: ", " between items and non-ASCII escaped
// as \uXXXX (surrogate pairs beyond the BMP).
func pythonJSONStrings(items []string) []byte {
	var b bytes.Buffer
	b.WriteByte('[')
	for i, s := range items {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteByte('"')
		for _, r := range s {
			switch {
			case r == '"' || r == '\\':
				b.WriteByte('\\')
				b.WriteRune(r)
			case r < 0x20 || r > 0x7f:
				if r > 0xffff {
					r1, r2 := utf16.EncodeRune(r)
					fmt.Fprintf(&b, `\u%04x\u%04x`, r1, r2)
				} else {
					fmt.Fprintf(&b, `\u%04x`, r)
				}
			default:
				b.WriteRune(r)
			}
		}
		b.WriteByte('"')
	}
	b.WriteByte(']')
	return b.Bytes()
}
