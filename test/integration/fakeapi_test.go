package integration

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
)

// alephAPI is an in-test Aleph API server that speaks the real response
// shapes of /api/v0/messages.json and /api/v0/storage/raw/.
type alephAPI struct {
	srv      *httptest.Server
	mu       sync.Mutex
	messages map[string]map[string]any
	files    map[string][]byte
	stream   *apiStream // /api/ws0/messages (fakeapi_stream_test.go)
}

func newAlephAPI(t *testing.T) *alephAPI {
	a := &alephAPI{messages: map[string]map[string]any{}, files: map[string][]byte{}}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/v0/messages.json", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Has("refs") {
			a.amends(w, r)
			return
		}
		a.mu.Lock()
		defer a.mu.Unlock()
		found := []any{}
		for _, h := range strings.Split(r.URL.Query().Get("hashes"), ",") {
			if m, ok := a.messages[h]; ok {
				found = append(found, m)
			}
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"messages": found, "pagination_page": 1, "pagination_total": len(found),
			"pagination_per_page": 20, "pagination_item": "messages",
		})
	})
	// The SDK's get_message reads this one.
	mux.HandleFunc("GET /api/v0/messages/{hash}", func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		defer a.mu.Unlock()
		m, ok := a.messages[r.PathValue("hash")]
		if !ok {
			http.Error(w, `{"error":"Message not found"}`, http.StatusNotFound)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"status": "processed", "item_hash": m["item_hash"], "message": m})
	})
	mux.HandleFunc("GET /api/v0/storage/raw/{hash}", func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		defer a.mu.Unlock()
		b, ok := a.files[r.PathValue("hash")]
		if !ok {
			http.Error(w, `{"error":"not found"}`, http.StatusNotFound)
			return
		}
		_, _ = w.Write(b)
	})
	a.serveStream(t, mux)
	a.srv = httptest.NewServer(mux)
	t.Cleanup(func() { a.srv.Close() })
	return a
}

// addInline publishes content as an inline message whose item_hash is the
// sha256 of its item_content, as the network serves them.
func (a *alephAPI) addInline(t *testing.T, typ, sender string, content any) string {
	t.Helper()
	raw, err := json.Marshal(content)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(raw)
	hash := hex.EncodeToString(sum[:])
	a.mu.Lock()
	defer a.mu.Unlock()
	a.messages[hash] = map[string]any{
		"item_hash": hash, "type": typ, "chain": "ETH", "sender": sender,
		"channel": "TEST", "item_type": "inline", "item_content": string(raw),
		"time": 1700000000.0, "signature": "0x00", "confirmed": true,
	}
	return hash
}

// fixtureContent reads the content of a shared fixture message.
func fixtureContent(t *testing.T, name string) map[string]any {
	t.Helper()
	b, err := os.ReadFile("../../internal/message/testdata/aleph-messages/" + name)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m["content"].(map[string]any)
}
