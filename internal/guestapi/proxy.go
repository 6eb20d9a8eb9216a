package guestapi

import (
	"io"
	"net/http"
	"strings"
)

// proxy relays a GET, HEAD or OPTIONS request to the Aleph API as
// aleph-vm's guest API does (guest_api/__main__.py:40-49): same method,
// path and query, no request headers or body; the answer's status, body
// and media type only. Redirects are followed and compressed bodies
// decoded, as aiohttp's client does. An unreachable API is aiohttp's 500.
func (g *guestAPI) proxy(w http.ResponseWriter, r *http.Request) {
	if g.apiServer == "" {
		writeTrouble(w)
		return
	}
	// tail.lstrip("/"), and the query even when empty ("?" always).
	url := g.apiServer + "/" + strings.TrimLeft(r.URL.EscapedPath(), "/") + "?" + r.URL.RawQuery
	req, err := http.NewRequestWithContext(r.Context(), r.Method, url, nil)
	if err != nil {
		writeTrouble(w)
		return
	}
	resp, err := g.client.Do(req)
	if err != nil {
		g.log.Debug("guest API: Aleph API unreachable", "program", g.o.Program.Hash, "err", err)
		writeTrouble(w)
		return
	}
	defer resp.Body.Close()
	w.Header().Set("Content-Type", mediaType(resp.Header.Get("Content-Type")))
	w.WriteHeader(resp.StatusCode)
	// Streamed rather than read whole as aleph-vm does: the program sees
	// the same bytes and the supervisor holds none of them.
	_, _ = io.Copy(w, resp.Body)
}

// mediaType is aiohttp's ClientResponse.content_type (Python's email
// get_content_type): the lower-cased value before any parameter,
// application/octet-stream without a header, text/plain when it is not
// one type/subtype.
func mediaType(header string) string {
	if header == "" {
		return "application/octet-stream"
	}
	mt, _, _ := strings.Cut(header, ";")
	mt = strings.ToLower(strings.TrimSpace(mt))
	if strings.Count(mt, "/") != 1 {
		return "text/plain"
	}
	return mt
}

// repost is aleph-vm's pubsub publication route (guest_api/__main__.py:
// 52-73), which hands the message to its VM connector to publish as a
// POST signed by the node. This node has no connector, so it answers
// what aleph-vm answers when its connector is unreachable.
func (g *guestAPI) repost(w http.ResponseWriter, r *http.Request) {
	g.log.Debug("guest API: pubsub publication is not supported", "program", g.o.Program.Hash)
	writeTrouble(w)
}
