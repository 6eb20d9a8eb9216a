// Package guestapi is the API a program reaches from inside its sandbox
// through ALEPH_API_UNIX_SOCKET (DESIGN §6), served by the host once per
// execution over the guest channel: the program's properties, a small
// key-value cache namespaced by program, and a proxy to the Aleph API.
package guestapi

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httputil"
	"net/url"
	"regexp"
	"strings"
)

// Program is what the guest API needs to know about the caller.
type Program struct {
	Hash    string
	Address string // the message's owner
	Chain   string
}

// Options configure the handler of one execution.
type Options struct {
	Program Program
	Cache   *Cache
	// APIServer is the Aleph API that /api/ proxies to; empty disables it.
	APIServer string
	// MaxValueSize bounds a cached value.
	MaxValueSize int64
}

var cacheKey = regexp.MustCompile(`^\w+$`)

// New returns the handler for one program's guest API.
func New(o Options) http.Handler {
	if o.MaxValueSize <= 0 {
		o.MaxValueSize = 1 << 20
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /properties", func(w http.ResponseWriter, r *http.Request) {
		chain := o.Program.Chain
		if chain == "" {
			chain = "ETH"
		}
		writeJSON(w, http.StatusOK, map[string]string{
			"chain": chain, "address": o.Program.Address, "vm_hash": o.Program.Hash,
		})
	})
	mux.HandleFunc("POST /sign", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotImplemented, map[string]string{
			"error": "message signing is not available on this node",
		})
	})
	mux.HandleFunc("GET /cache/{$}", func(w http.ResponseWriter, r *http.Request) {
		pattern := r.URL.Query().Get("pattern")
		if pattern == "" {
			pattern = "*"
		}
		keys, err := o.Cache.Keys(o.Program.Hash, pattern)
		if err != nil {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
			return
		}
		writeJSON(w, http.StatusOK, keys)
	})
	mux.HandleFunc("/cache/{key}", func(w http.ResponseWriter, r *http.Request) {
		key := r.PathValue("key")
		if !cacheKey.MatchString(key) {
			writeJSON(w, http.StatusBadRequest, map[string]string{"error": "cache keys may only contain letters, digits and underscores"})
			return
		}
		switch r.Method {
		case http.MethodGet:
			v, ok := o.Cache.Get(o.Program.Hash, key)
			if !ok {
				writeJSON(w, http.StatusNotFound, map[string]string{"error": "no such key"})
				return
			}
			w.Header().Set("Content-Type", "application/octet-stream")
			_, _ = w.Write(v)
		case http.MethodPut, http.MethodPost:
			v, err := io.ReadAll(http.MaxBytesReader(w, r.Body, o.MaxValueSize))
			if err != nil {
				writeJSON(w, http.StatusRequestEntityTooLarge, map[string]string{"error": err.Error()})
				return
			}
			o.Cache.Set(o.Program.Hash, key, v)
			writeJSON(w, http.StatusOK, map[string]string{"status": "stored"})
		case http.MethodDelete:
			o.Cache.Delete(o.Program.Hash, key)
			writeJSON(w, http.StatusOK, map[string]string{"status": "deleted"})
		default:
			writeJSON(w, http.StatusMethodNotAllowed, map[string]string{"error": "use GET, PUT or DELETE"})
		}
	})
	if target, err := url.Parse(o.APIServer); err == nil && o.APIServer != "" {
		proxy := &httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			// /api/v0/messages.json → <API_SERVER>/api/v0/messages.json
			pr.Out.Host = target.Host
		}}
		mux.Handle("/api/", proxy)
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, map[string]string{"error": "no such guest API route: " + strings.TrimSpace(r.URL.Path)})
	})
	return mux
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}
