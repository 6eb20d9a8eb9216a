package reactor_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/metrics"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool/pooltest"
	"github.com/aleph-vm-go/vm-supervisor/internal/reactor"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/alephapi"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

// These tests run the reactor on the real pool over in-process sandboxes
// (pooltest): no root, no runsc.

var quiet = slog.New(slog.DiscardHandler)

func newPool(t *testing.T, st *pooltest.Store, handler http.Handler) *pool.Pool {
	t.Helper()
	b := &pooltest.Backend{Agent: func(guest.Config) pooltest.Agent { return pooltest.Agent{Handler: handler} }}
	p := pool.New(pool.Options{
		Source: st.Resolver, Backend: b, ReuseTimeout: time.Minute, InitTimeout: 5 * time.Second,
		ExecutionRoot: t.TempDir(), CapacityWait: 200 * time.Millisecond, Logger: quiet,
	})
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = p.Shutdown(ctx)
	})
	return p
}

func post(i int, channel string) *message.Message {
	content := fmt.Sprintf(`{"type":"t","address":"0xabc","time":1,"content":{"n":%d}}`, i)
	return &message.Message{
		ItemHash: fmt.Sprintf("%064x", i+1), Type: message.TypePost, Chain: "ETH", Sender: "0xabc",
		Channel: channel, ItemType: "inline", ItemContent: content, Time: 1, Content: json.RawMessage(content),
	}
}

func counter(t *testing.T, m *metrics.Metrics, name string) float64 {
	t.Helper()
	fams, err := m.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == name {
			return f.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

// TestFloodBounded: 2,000 matching messages while the program takes its
// time: at most Deliveries run at once, QueueSize wait, the rest are
// dropped and counted, goroutines stay bounded, and what was queued is
// delivered once the program answers again.
func TestFloodBounded(t *testing.T) {
	st := pooltest.NewStore(t)
	hash := st.Program(t, "subscriber", store.UploadOptions{})
	release := make(chan struct{})
	var running, most, served atomic.Int64
	p := newPool(t, st, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := running.Add(1)
		for {
			m := most.Load()
			if n <= m || most.CompareAndSwap(m, n) {
				break
			}
		}
		<-release
		running.Add(-1)
		served.Add(1)
		_, _ = w.Write([]byte("ok"))
	}))
	m := metrics.New()
	r := reactor.New(reactor.Options{Messages: true, QueueSize: 8, Deliveries: 3, DeliveriesTotal: 5, Logger: quiet})
	r.Use(p, m)
	r.Register(hash, &message.ProgramContent{On: message.Triggers{Message: []message.Filter{{"channel": "FLOOD"}}}})

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	before := runtime.NumGoroutine()
	const flood = 2000
	for i := range flood {
		r.Handle(ctx, post(i, "FLOOD"))
	}
	deadline := time.Now().Add(10 * time.Second)
	for running.Load() < 3 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	grown := runtime.NumGoroutine() - before
	dropped := counter(t, m, "aleph_vm_message_deliveries_dropped_total")
	close(release)
	deadline = time.Now().Add(10 * time.Second)
	for served.Load() < 3+8 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	r.Wait()

	if most.Load() != 3 {
		t.Errorf("%d deliveries at once, want 3 (Deliveries)", most.Load())
	}
	// Exactly 3 under way and 8 waiting fit; the rest was dropped.
	if want := float64(flood - 3 - 8); dropped != want {
		t.Errorf("%.0f deliveries dropped and counted, want %.0f", dropped, want)
	}
	if served.Load() != 3+8 {
		t.Errorf("%d deliveries served, want the 11 that fit", served.Load())
	}
	// The sandbox's own streams aside, a few workers: not one per message.
	if grown > 100 {
		t.Errorf("%d more goroutines during the flood: deliveries are not bounded", grown)
	}
}

// TestForgetLocalIgnored: a FORGET naming a program of the local store,
// even by its owner's address, leaves it running and known.
func TestForgetLocalIgnored(t *testing.T) {
	st := pooltest.NewStore(t)
	hash := st.Program(t, "local", store.UploadOptions{})
	p := newPool(t, st, pooltest.OK)
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t.Errorf("the API was asked %s: a local program's FORGET needs no confirmation", r.URL)
		http.NotFound(w, r)
	}))
	defer api.Close()
	r := reactor.New(reactor.Options{
		Forgetter: st.Resolver, API: alephapi.New(api.URL, "", alephapi.WithRetries(1, 0)), Logger: quiet,
	})
	r.Use(p, nil)
	ctx := context.Background()
	e, err := p.Acquire(ctx, hash)
	if err != nil {
		t.Fatal(err)
	}
	e.Release()
	owner := store.LocalAddress
	content := fmt.Sprintf(`{"address":%q,"time":1,"hashes":[%q]}`, owner, hash)
	r.Handle(ctx, &message.Message{ItemHash: fmt.Sprintf("%064x", 7), Type: message.TypeForget, Sender: owner, Content: json.RawMessage(content)})
	r.Wait()
	if len(p.Programs()) != 1 {
		t.Fatal("the local program was stopped by a FORGET")
	}
	if _, err := st.Resolver.Program(ctx, hash); err != nil {
		t.Fatalf("the local program became unknown: %v", err)
	}
}

// TestPermits follows pyaleph's reading of a security aggregate entry.
func TestPermits(t *testing.T) {
	forget := &message.Message{Type: message.TypeForget, Sender: "0xDeLe", Chain: "ETH", Channel: "C", Content: json.RawMessage(`{"address":"0xowner"}`)}
	postMsg := &message.Message{Type: message.TypePost, Sender: "0xdele", Chain: "ETH", Channel: "C", Content: json.RawMessage(`{"type":"blog"}`)}
	for _, c := range []struct {
		name string
		a    alephapi.Authorization
		m    *message.Message
		want bool
	}{
		{"no restriction", alephapi.Authorization{Address: "0xdele"}, forget, true},
		{"another delegate", alephapi.Authorization{Address: "0xother"}, forget, false},
		{"types include FORGET", alephapi.Authorization{Address: "0xdele", Types: []string{"STORE", "FORGET"}}, forget, true},
		{"types exclude FORGET", alephapi.Authorization{Address: "0xdele", Types: []string{"POST"}}, forget, false},
		{"other chain", alephapi.Authorization{Address: "0xdele", Chain: "SOL"}, forget, false},
		{"same chain", alephapi.Authorization{Address: "0xdele", Chain: "ETH"}, forget, true},
		{"other channel", alephapi.Authorization{Address: "0xdele", Channels: []string{"X"}}, forget, false},
		{"post type allowed", alephapi.Authorization{Address: "0xdele", PostTypes: []string{"blog"}}, postMsg, true},
		{"post type refused", alephapi.Authorization{Address: "0xdele", PostTypes: []string{"news"}}, postMsg, false},
		{"base58 case matters", alephapi.Authorization{Address: "AbC"}, &message.Message{Type: message.TypeForget, Sender: "abc"}, false},
	} {
		if got := reactor.Permits(c.a, c.m); got != c.want {
			t.Errorf("%s: Permits = %v, want %v", c.name, got, c.want)
		}
	}
}

// TestDelegateAmend: an amend of a followed ref stops the program when
// sent by the owner, or by an address the owner's security aggregate
// allows to send STOREs for it; not by another address, nor by a
// delegate limited to other types.
func TestDelegateAmend(t *testing.T) {
	st := pooltest.NewStore(t)
	var mu sync.Mutex
	auths := `{"address":"0xowner","data":{"security":{"authorizations":[{"address":"0xstoredelegate","types":["STORE"]},{"address":"0xpostdelegate","types":["POST"]}]}}}`
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		if r.URL.Path != "/api/v0/aggregates/"+store.LocalAddress+".json" || r.URL.Query().Get("keys") != "security" {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write([]byte(auths))
	}))
	defer api.Close()
	client := alephapi.New(api.URL, "", alephapi.WithRetries(1, 0))
	hash := st.Program(t, "followed", store.UploadOptions{})
	p := newPool(t, st, pooltest.OK)
	r := reactor.New(reactor.Options{Updates: true, API: client, Forgetter: st.Resolver, Logger: quiet})
	r.Use(p, nil)
	ctx := context.Background()
	start := func() string {
		e, err := p.Acquire(ctx, hash)
		if err != nil {
			t.Fatal(err)
		}
		e.Release()
		prog := p.Programs()[0]
		// The local store pins its refs; follow the code's for the test.
		prog.Content.Code.UseLatest = true
		return prog.Content.Code.Ref
	}
	amend := func(sender, address, ref string) *message.Message {
		content := fmt.Sprintf(`{"address":%q,"time":1,"item_type":"storage","item_hash":"%064x","ref":%q}`, address, 9, ref)
		return &message.Message{ItemHash: fmt.Sprintf("%064x", 8), Type: message.TypeStore, Chain: "ETH", Sender: sender, Content: json.RawMessage(content)}
	}
	for _, c := range []struct {
		name, sender, address string
		stops                 bool
	}{
		{"stranger", "0xstranger", "0xstranger", false},
		{"stranger claiming the owner", "0xstranger", store.LocalAddress, false},
		{"delegate for POSTs only", "0xpostdelegate", store.LocalAddress, false},
		{"delegate for STOREs", "0xstoredelegate", store.LocalAddress, true},
		{"owner", store.LocalAddress, store.LocalAddress, true},
	} {
		ref := start()
		r.Handle(ctx, amend(c.sender, c.address, ref))
		r.Wait()
		if stopped := len(p.Programs()) == 0; stopped != c.stops {
			t.Errorf("%s: stopped = %v, want %v", c.name, stopped, c.stops)
		}
	}
}
