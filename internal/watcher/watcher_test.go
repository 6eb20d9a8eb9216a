package watcher

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// stream is a websocket server like the API's: on connect it sends the
// messages whose time is >= startDate, then whatever is pushed, until it
// drops its connections.
type stream struct {
	t        *testing.T
	mu       sync.Mutex
	msgs     [][]byte
	times    []float64
	conns    map[*websocket.Conn]chan []byte
	dates    []int64
	refuse   int // connections to refuse with 503
	attempts []time.Time
}

func newStream(t *testing.T) (*stream, *httptest.Server) {
	s := &stream{t: t, conns: map[*websocket.Conn]chan []byte{}}
	srv := httptest.NewServer(http.HandlerFunc(s.serve))
	t.Cleanup(srv.Close)
	t.Cleanup(s.drop)
	return s, srv
}

func (s *stream) serve(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.attempts = append(s.attempts, time.Now())
	if r.URL.Path != "/api/ws0/messages" {
		s.mu.Unlock()
		http.NotFound(w, r)
		return
	}
	if s.refuse > 0 {
		s.refuse--
		s.mu.Unlock()
		http.Error(w, "restarting", http.StatusServiceUnavailable)
		return
	}
	s.mu.Unlock()
	date, err := strconv.ParseInt(r.URL.Query().Get("startDate"), 10, 64)
	if err != nil {
		http.Error(w, "startDate", http.StatusBadRequest)
		return
	}
	c, err := websocket.Accept(w, r, nil)
	if err != nil {
		return
	}
	out := make(chan []byte, 64)
	s.mu.Lock()
	s.dates = append(s.dates, date)
	for i, m := range s.msgs {
		if s.times[i] >= float64(date) {
			out <- m
		}
	}
	s.conns[c] = out
	s.mu.Unlock()
	for m := range out {
		if err := c.Write(r.Context(), websocket.MessageText, m); err != nil {
			break
		}
	}
	_ = c.Close(websocket.StatusGoingAway, "bye")
}

// push records a message and sends it to every connection.
func (s *stream) push(raw []byte, at float64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.msgs = append(s.msgs, raw)
	s.times = append(s.times, at)
	for _, out := range s.conns {
		out <- raw
	}
}

// drop ends every connection, as a restarting API does.
func (s *stream) drop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c, out := range s.conns {
		close(out)
		delete(s.conns, c)
	}
}

func (s *stream) connections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.dates)
}

func post(t *testing.T, text string, at float64) []byte {
	t.Helper()
	content, _ := json.Marshal(map[string]any{"type": "test", "address": "0xabc", "time": at, "content": map[string]any{"text": text}})
	sum := sha256.Sum256(content)
	raw, _ := json.Marshal(map[string]any{
		"item_hash": hex.EncodeToString(sum[:]), "type": "POST", "chain": "ETH", "sender": "0xabc",
		"channel": "TEST", "item_type": "inline", "item_content": string(content), "time": at, "signature": "0x00",
	})
	return raw
}

type received struct {
	mu sync.Mutex
	ms []*message.Message
	ch chan struct{}
}

func (r *received) handle(_ context.Context, m *message.Message) {
	r.mu.Lock()
	r.ms = append(r.ms, m)
	r.mu.Unlock()
	r.ch <- struct{}{}
}

func (r *received) wait(t *testing.T, n int) []*message.Message {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		r.mu.Lock()
		got := len(r.ms)
		r.mu.Unlock()
		if got >= n {
			break
		}
		select {
		case <-r.ch:
		case <-deadline:
			t.Fatalf("got %d messages, want %d", got, n)
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*message.Message(nil), r.ms...)
}

func run(t *testing.T, opts Options) *received {
	t.Helper()
	rec := &received{ch: make(chan struct{}, 100)}
	opts.Handle = rec.handle
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- New(opts).Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != context.Canceled {
			t.Errorf("Run returned %v, want context.Canceled", err)
		}
	})
	return rec
}

func TestDeliversNewMessagesAndSkipsConfirmations(t *testing.T) {
	s, srv := newStream(t)
	now := float64(time.Now().Unix())
	s.push(post(t, "old", now-1000), now-1000) // before Since: not asked for
	rec := run(t, Options{APIServer: srv.URL})
	waitFor(t, func() bool { return s.connections() == 1 })
	s.push([]byte(`{"item_hash":"abc","confirmation":{"chain":"ETH"}}`), now+1)
	s.push([]byte(`not json`), now+1)
	s.push(post(t, "one", now+1), now+1)
	ms := rec.wait(t, 1)
	if len(ms) != 1 || ms[0].Type != message.TypePost || ms[0].Channel != "TEST" {
		t.Fatalf("got %+v", ms)
	}
}

func TestReconnectCatchesUpWithoutDuplicates(t *testing.T) {
	s, srv := newStream(t)
	now := float64(time.Now().Unix())
	rec := run(t, Options{APIServer: srv.URL, MinBackoff: 20 * time.Millisecond, MaxBackoff: 100 * time.Millisecond})
	waitFor(t, func() bool { return s.connections() == 1 })
	s.push(post(t, "a", now+5), now+5)
	rec.wait(t, 1)

	// The API goes away; a message arrives meanwhile; the API refuses
	// twice while it restarts.
	s.mu.Lock()
	s.refuse = 2
	s.mu.Unlock()
	s.drop()
	s.push(post(t, "b", now+6), now+6)
	waitFor(t, func() bool { return s.connections() == 2 })

	rec.wait(t, 2)
	time.Sleep(100 * time.Millisecond) // a duplicate would arrive now
	ms := rec.wait(t, 2)
	if len(ms) != 2 {
		t.Fatalf("got %d messages after the catch-up, want 2 (a, b once each)", len(ms))
	}
	s.mu.Lock()
	dates := append([]int64(nil), s.dates...)
	s.mu.Unlock()
	if dates[1] != int64(now+5) {
		t.Fatalf("reconnect asked startDate=%d, want the newest message's time %d", dates[1], int64(now+5))
	}
	var texts []string
	for _, m := range ms {
		var c struct{ Content struct{ Text string } }
		_ = json.Unmarshal(m.Content, &c)
		texts = append(texts, c.Content.Text)
	}
	if fmt.Sprint(texts) != "[a b]" {
		t.Fatalf("texts %v, want [a b]", texts)
	}
}

func TestBackoffGrowsWithJitterAndIsBounded(t *testing.T) {
	s, srv := newStream(t)
	s.refuse = 1000
	run(t, Options{APIServer: srv.URL, MinBackoff: 40 * time.Millisecond, MaxBackoff: 320 * time.Millisecond})
	waitFor(t, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.attempts) >= 7
	})
	s.mu.Lock()
	at := append([]time.Time(nil), s.attempts...)
	s.mu.Unlock()
	// Gaps: ~[20,40], [40,80], [80,160], [160,320], then capped [160,320].
	for i := 1; i < 7; i++ {
		gap := at[i].Sub(at[i-1])
		want := min(40*time.Millisecond<<(i-1), 320*time.Millisecond)
		if gap < want/2 || gap > want+200*time.Millisecond {
			t.Errorf("gap %d = %v, want within [%v, %v]", i, gap, want/2, want)
		}
	}
}

func TestStreamURL(t *testing.T) {
	for in, want := range map[string]string{
		"https://api2.aleph.im":        "wss://api2.aleph.im/api/ws0/messages?startDate=1700000000",
		"http://127.0.0.1:4024/":       "ws://127.0.0.1:4024/api/ws0/messages?startDate=1700000000",
		"http://h/prefix":              "ws://h/prefix/api/ws0/messages?startDate=1700000000",
		"https://official.aleph.cloud": "wss://official.aleph.cloud/api/ws0/messages?startDate=1700000000",
	} {
		got, err := StreamURL(in, 1700000000)
		if err != nil || got != want {
			t.Errorf("StreamURL(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}

func TestRecentForgetsOldest(t *testing.T) {
	r := newRecent(2)
	if !r.add("a") || !r.add("b") || r.add("a") {
		t.Fatal("a, b new; a again not new")
	}
	r.add("c") // evicts a
	if !r.add("a") {
		t.Fatal("a should have been forgotten")
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
