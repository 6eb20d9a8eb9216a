package reactor

import (
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool/pooltest"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/alephapi"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/cache"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

// statusAPI serves one network program (messages.json?hashes=) and every
// message's status (/api/v0/messages/{hash}) as the Aleph API does.
type statusAPI struct {
	srv      *httptest.Server
	mu       sync.Mutex
	program  *message.Message
	amends   []*message.Message // STOREs served for messages.json?refs=
	status   string             // "" answers 500
	asked    []string
	requests atomic.Int32
}

func newStatusAPI(t *testing.T, program *message.Message) *statusAPI {
	a := &statusAPI{program: program, status: "processed"}
	a.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		defer a.mu.Unlock()
		switch {
		case r.URL.Path == "/api/v0/messages.json" && r.URL.Query().Get("hashes") == a.program.ItemHash:
			_ = json.NewEncoder(w).Encode(map[string]any{"messages": []any{envelope(a.program)},
				"pagination_page": 1, "pagination_total": 1, "pagination_per_page": 20, "pagination_item": "messages"})
		case r.URL.Path == "/api/v0/messages.json" && r.URL.Query().Get("refs") != "":
			found := []any{}
			for _, m := range a.amends {
				found = append(found, envelope(m))
			}
			_ = json.NewEncoder(w).Encode(map[string]any{"messages": found, "pagination_page": 1, "pagination_total": len(found), "pagination_per_page": 20, "pagination_item": "messages"})
		case strings.HasPrefix(r.URL.Path, "/api/v0/messages/"):
			a.requests.Add(1)
			h := strings.TrimPrefix(r.URL.Path, "/api/v0/messages/")
			a.asked = append(a.asked, h)
			if a.status == "" {
				http.Error(w, "lagging", http.StatusInternalServerError)
				return
			}
			_ = json.NewEncoder(w).Encode(map[string]any{"status": a.status, "item_hash": h})
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(a.srv.Close)
	return a
}

func envelope(m *message.Message) map[string]any {
	return map[string]any{
		"item_hash": m.ItemHash, "type": m.Type, "chain": "ETH", "sender": m.Sender, "channel": "TEST",
		"item_type": "inline", "item_content": m.ItemContent, "content": json.RawMessage(m.ItemContent),
		"time": m.Time, "signature": "0x00", "confirmed": true,
	}
}

func (a *statusAPI) set(status string) {
	a.mu.Lock()
	a.status = status
	a.mu.Unlock()
}

// statusSetup runs a program of the local store and one the API serves
// (the local one's content, another time: another hash).
func statusSetup(t *testing.T, followCode bool) (r *Reactor, p *pool.Pool, api *statusAPI, local, remote string) {
	t.Helper()
	quiet := slog.New(slog.DiscardHandler)
	st := pooltest.NewStore(t)
	local = st.Program(t, "local", store.UploadOptions{})
	lm, err := st.Store.GetMessage(local)
	if err != nil {
		t.Fatal(err)
	}
	c, err := lm.Program()
	if err != nil {
		t.Fatal(err)
	}
	c.Time++
	c.Code.UseLatest = followCode
	nm, err := message.InlineMessage(message.TypeProgram, c, lm.Sender, time.Unix(1700000000, 0))
	if err != nil {
		t.Fatal(err)
	}
	api = newStatusAPI(t, nm)
	dl, err := cache.Open(filepath.Join(t.TempDir(), "cache"))
	if err != nil {
		t.Fatal(err)
	}
	client := alephapi.New(api.srv.URL, "", alephapi.WithRetries(1, 0))
	resolver := sources.New(st.Store, client, dl, sources.DefaultLimits(), sources.WithLogger(quiet))
	b := &pooltest.Backend{Agent: func(guest.Config) pooltest.Agent { return pooltest.Agent{Handler: pooltest.OK} }}
	p = pool.New(pool.Options{
		Source: resolver, Backend: b, ReuseTimeout: time.Minute, InitTimeout: 5 * time.Second,
		ExecutionRoot: t.TempDir(), CapacityWait: 200 * time.Millisecond, Logger: quiet,
	})
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = p.Shutdown(ctx)
	})
	r = New(Options{Forgetter: resolver, API: client, Updates: true, Logger: quiet})
	r.Use(p, nil)
	for _, h := range []string{local, nm.ItemHash} {
		e, err := p.Acquire(context.Background(), h)
		if err != nil {
			t.Fatal(err)
		}
		e.Release()
	}
	return r, p, api, local, nm.ItemHash
}

func runningHashes(p *pool.Pool) []string {
	var out []string
	for _, prog := range p.Programs() {
		out = append(out, prog.Hash)
	}
	return out
}

// TestStatusConfirmations pins upstream's check_payment: a terminal
// status stops the program only on the third poll in a row; a healthy
// status in between starts the count again, a failed read leaves it as
// it is; the local store's programs are never asked about.
func TestStatusConfirmations(t *testing.T) {
	r, p, api, local, remote := statusSetup(t, false)
	ctx := context.Background()
	strikes := map[string]int{}
	poll := func(status string, stillRuns bool) {
		t.Helper()
		api.set(status)
		r.checkStatuses(ctx, api.client(), strikes)
		r.Wait()
		if got := slices.Contains(runningHashes(p), remote); got != stillRuns {
			t.Fatalf("after %q: network program running = %v, want %v (strikes %v)", status, got, stillRuns, strikes)
		}
		if !slices.Contains(runningHashes(p), local) {
			t.Fatal("the local program was stopped")
		}
	}
	poll("processed", true)
	poll("forgotten", true)
	poll("forgotten", true)
	poll("processed", true) // healthy: the count starts again
	poll("forgotten", true)
	poll("rejected", true)
	poll("", true) // the API fails: the count stays
	poll("removed", false)
	if _, err := r.opts.Forgetter.(*sources.Resolver).Program(ctx, remote); err == nil {
		t.Fatal("the stopped program can still be started")
	}
	api.mu.Lock()
	defer api.mu.Unlock()
	if slices.Contains(api.asked, local) {
		t.Fatal("the API was asked about a program of the local store")
	}
}

// TestPollStatus: the poller notices a FORGET the stream never delivered
// within three intervals.
func TestPollStatus(t *testing.T) {
	r, p, api, local, remote := statusSetup(t, false)
	api.set("forgotten")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.PollStatus(ctx, 20*time.Millisecond); close(done) }()
	deadline := time.Now().Add(5 * time.Second)
	for slices.Contains(runningHashes(p), remote) {
		if time.Now().After(deadline) {
			t.Fatal("the forgotten program still runs")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := api.requests.Load(); n < StatusConfirmations {
		t.Fatalf("stopped after %d status reads, want %d", n, StatusConfirmations)
	}
	cancel()
	<-done
	r.Wait()
	if !slices.Contains(runningHashes(p), local) {
		t.Fatal("the local program was stopped")
	}
}

func (a *statusAPI) client() StatusAPI {
	return alephapi.New(a.srv.URL, "", alephapi.WithRetries(1, 0))
}

// TestPollAmend: an amend of a followed ref that the stream missed is
// seen by the poll: a stranger's is ignored, the owner's stops the
// program (its next start runs the amend, as use_latest picks it).
func TestPollAmend(t *testing.T) {
	r, p, api, _, remote := statusSetup(t, true)
	ctx := context.Background()
	prog := p.Programs()[slices.Index(runningHashes(p), remote)]
	codeRef, owner := prog.Content.Code.Ref, prog.Content.Address
	amend := func(sender string, n int64) *message.Message {
		m, err := message.InlineMessage(message.TypeStore, message.StoreContent{
			Address: owner, Time: float64(1700000000 + n), ItemType: "storage",
			ItemHash: strings.Repeat("b", 63) + string(rune('0'+n)), Ref: codeRef,
		}, sender, time.Unix(1700000000+n, 0))
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	poll := func(stillRuns bool) {
		t.Helper()
		r.checkStatuses(ctx, api.client(), map[string]int{})
		r.Wait()
		if got := slices.Contains(runningHashes(p), remote); got != stillRuns {
			t.Fatalf("network program running = %v, want %v", got, stillRuns)
		}
	}
	poll(true) // no amend
	api.mu.Lock()
	api.amends = []*message.Message{amend("0x5555555555555555555555555555555555555555", 1)}
	api.mu.Unlock()
	poll(true) // a stranger's amend does not count (and no delegation is known)
	api.mu.Lock()
	api.amends = append(api.amends, amend(owner, 2))
	api.mu.Unlock()
	poll(false)
}
