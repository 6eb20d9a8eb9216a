package integration

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// apiStream is the test API's message websocket, /api/ws0/messages: on
// connect it sends the stored messages dated at or after startDate (the
// catch-up the real API does), then every message published.
type apiStream struct {
	mu      sync.Mutex
	conns   map[chan []byte]struct{}
	connect int // connections accepted so far
	order   []string
}

func (a *alephAPI) serveStream(t *testing.T, mux *http.ServeMux) {
	a.stream = &apiStream{conns: map[chan []byte]struct{}{}}
	mux.HandleFunc("GET /api/ws0/messages", func(w http.ResponseWriter, r *http.Request) {
		since, err := strconv.ParseFloat(r.URL.Query().Get("startDate"), 64)
		if err != nil {
			http.Error(w, "startDate", http.StatusBadRequest)
			return
		}
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer func() { _ = c.CloseNow() }()
		out := make(chan []byte, 256)
		st := a.stream
		// Registered and replayed under a.mu, which publish holds while it
		// records: a message is either replayed here or pushed later.
		a.mu.Lock()
		st.mu.Lock()
		st.conns[out] = struct{}{}
		st.connect++
		st.mu.Unlock()
		for _, h := range st.order {
			if m := a.messages[h]; m != nil && m["time"].(float64) >= since {
				raw, _ := json.Marshal(m)
				out <- raw
			}
		}
		a.mu.Unlock()
		defer func() {
			st.mu.Lock()
			delete(st.conns, out)
			st.mu.Unlock()
		}()
		for raw := range out {
			if err := c.Write(r.Context(), websocket.MessageText, raw); err != nil {
				return
			}
		}
		_ = c.Close(websocket.StatusGoingAway, "restarting")
	})
}

// connections is how many websocket connections the API accepted.
func (a *alephAPI) connections() int {
	a.stream.mu.Lock()
	defer a.stream.mu.Unlock()
	return a.stream.connect
}

// publish stores a message dated now and sends it to the connected
// watchers; it returns its item hash.
func (a *alephAPI) publish(t *testing.T, typ, sender, channel string, content map[string]any) string {
	t.Helper()
	raw, err := json.Marshal(content)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(raw)
	hash := hex.EncodeToString(sum[:])
	m := map[string]any{
		"item_hash": hash, "type": typ, "chain": "ETH", "sender": sender,
		"channel": channel, "item_type": "inline", "item_content": string(raw),
		"time": float64(time.Now().UnixNano()) / 1e9, "signature": "0x00", "confirmed": true,
	}
	frame, _ := json.Marshal(m)
	a.mu.Lock()
	a.messages[hash] = m
	a.stream.order = append(a.stream.order, hash)
	a.mu.Unlock()
	a.stream.mu.Lock()
	for out := range a.stream.conns {
		out <- frame
	}
	a.stream.mu.Unlock()
	return hash
}

// publishFile stores a file and a STORE message for it (amending ref
// when ref is set) and returns the message's hash.
func (a *alephAPI) publishFile(t *testing.T, owner string, data []byte, ref string) string {
	t.Helper()
	sum := sha256.Sum256(data)
	fileHash := hex.EncodeToString(sum[:])
	a.mu.Lock()
	a.files[fileHash] = data
	a.mu.Unlock()
	content := map[string]any{
		"address": owner, "time": float64(time.Now().UnixNano()) / 1e9,
		"item_type": "storage", "item_hash": fileHash, "size": len(data),
	}
	if ref != "" {
		content["ref"] = ref
	}
	return a.publish(t, "STORE", owner, "TEST", content)
}

// unpublish makes the API forget a message, as it does after a FORGET.
func (a *alephAPI) unpublish(hash string) {
	a.mu.Lock()
	delete(a.messages, hash)
	a.mu.Unlock()
}

// amends answers messages.json?msgType=STORE&refs=R&addresses=A: the
// STORE messages amending R by A, newest first.
func (a *alephAPI) amends(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	a.mu.Lock()
	found := []map[string]any{}
	for _, m := range a.messages {
		var c struct {
			Ref string `json:"ref"`
		}
		_ = json.Unmarshal([]byte(m["item_content"].(string)), &c)
		if m["type"] != q.Get("msgType") || c.Ref != q.Get("refs") {
			continue
		}
		if addr := q.Get("addresses"); addr != "" && m["sender"] != addr {
			continue
		}
		found = append(found, m)
	}
	a.mu.Unlock()
	for i := 1; i < len(found); i++ { // newest first, as sort_order=-1
		for j := i; j > 0 && found[j]["time"].(float64) > found[j-1]["time"].(float64); j-- {
			found[j], found[j-1] = found[j-1], found[j]
		}
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"messages": found, "pagination_page": 1, "pagination_total": len(found),
		"pagination_per_page": 20, "pagination_item": "messages",
	})
}

// stopStream ends the API's websocket connections and stops the server,
// as a restarting API does; restart brings it back on the same address.
func (a *alephAPI) stopStream() {
	a.stream.mu.Lock()
	for out := range a.stream.conns {
		close(out)
		delete(a.stream.conns, out)
	}
	a.stream.mu.Unlock()
	a.srv.Close()
}

func (a *alephAPI) restart(t *testing.T) {
	t.Helper()
	addr := a.srv.Listener.Addr().String()
	var l net.Listener
	var err error
	for range 50 { // the old socket may linger for a moment
		if l, err = net.Listen("tcp", addr); err == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("listening again on %s: %v", addr, err)
	}
	srv := &httptest.Server{Listener: l, Config: &http.Server{Handler: a.srv.Config.Handler}}
	srv.Start()
	a.srv = srv
}
