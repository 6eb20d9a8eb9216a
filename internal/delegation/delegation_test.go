package delegation_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/delegation"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/alephapi"
)

const (
	owner    = "0x9319Ad3B7A8E0eE24f2E639c40D8eD124C5520Ba"
	delegate = "0x1111111111111111111111111111111111111111"
)

// api serves owner's security aggregate with auths, counting reads.
func api(t *testing.T, auths string, calls *atomic.Int32) *alephapi.Client {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		if r.URL.Path != "/api/v0/aggregates/"+owner+".json" || r.URL.Query().Get("keys") != "security" {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write([]byte(`{"address":"` + owner + `","data":{"security":{"authorizations":` + auths + `}}}`))
	}))
	t.Cleanup(srv.Close)
	return alephapi.New(srv.URL, "", alephapi.WithRetries(1, time.Millisecond))
}

func store(t *testing.T, sender, address string) *message.Message {
	t.Helper()
	m, err := message.InlineMessage(message.TypeStore, message.StoreContent{
		Address: address, Time: 1700000000, ItemType: "storage", ItemHash: strings.Repeat("a", 64), Ref: strings.Repeat("c", 64),
	}, sender, time.Unix(1700000000, 0))
	if err != nil {
		t.Fatal(err)
	}
	m.Chain, m.Channel = "ETH", "TEST"
	return m
}

// TestMaySend is pyaleph's rule: the sender acts for content.address when
// it is that address or a delegate whose chain/channels/types allow the
// message.
func TestMaySend(t *testing.T) {
	ctx := context.Background()
	for _, c := range []struct {
		name  string
		auths string
		m     func(t *testing.T) *message.Message
		want  bool
	}{
		{"owner, no aggregate needed", `[]`, func(t *testing.T) *message.Message { return store(t, owner, owner) }, true},
		{"delegate allowed STORE", `[{"address":"` + delegate + `","types":["STORE"]}]`, func(t *testing.T) *message.Message { return store(t, delegate, owner) }, true},
		{"delegate allowed POST only", `[{"address":"` + delegate + `","types":["POST"]}]`, func(t *testing.T) *message.Message { return store(t, delegate, owner) }, false},
		{"delegate on another chain", `[{"address":"` + delegate + `","chain":"SOL"}]`, func(t *testing.T) *message.Message { return store(t, delegate, owner) }, false},
		{"delegate on another channel", `[{"address":"` + delegate + `","channels":["OTHER"]}]`, func(t *testing.T) *message.Message { return store(t, delegate, owner) }, false},
		{"delegate acting for itself", `[{"address":"` + delegate + `"}]`, func(t *testing.T) *message.Message { return store(t, delegate, delegate) }, false},
		{"stranger", `[{"address":"` + delegate + `"}]`, func(t *testing.T) *message.Message { return store(t, "0x22", owner) }, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			var calls atomic.Int32
			got, err := delegation.New(api(t, c.auths, &calls), 0).MaySend(ctx, c.m(t), owner)
			if err != nil || got != c.want {
				t.Fatalf("MaySend = %v, %v; want %v", got, err, c.want)
			}
		})
	}
}

// TestMayOperate is upstream's operator rule, and its cache: one read per
// TTL however many checks.
func TestMayOperate(t *testing.T) {
	ctx := context.Background()
	var calls atomic.Int32
	auths, _ := json.Marshal([]map[string]any{
		{"address": delegate, "types": []string{"INSTANCE"}, "chain": "SOL", "channels": []string{"X"}},
		{"address": "0x3333333333333333333333333333333333333333", "types": []string{"PROGRAM"}},
	})
	c := delegation.New(api(t, string(auths), &calls), time.Hour)
	for _, tc := range []struct {
		wallet string
		want   bool
	}{
		{owner, true},
		{"0x9319ad3b7a8e0ee24f2e639c40d8ed124c5520ba", true},
		// chain and channels are not looked at by upstream's operator check.
		{delegate, true},
		// Upstream wants INSTANCE named, for programs too.
		{"0x3333333333333333333333333333333333333333", false},
		{"0x4444444444444444444444444444444444444444", false},
		{"", false},
	} {
		if got, err := c.MayOperate(ctx, tc.wallet, owner); err != nil || got != tc.want {
			t.Errorf("MayOperate(%q) = %v, %v; want %v", tc.wallet, got, err, tc.want)
		}
	}
	if n := calls.Load(); n != 1 {
		t.Fatalf("the aggregate was read %d times, want once", n)
	}
	// A nil checker knows only owners.
	var none *delegation.Checker
	if ok, _ := none.MayOperate(ctx, delegate, owner); ok {
		t.Fatal("a nil checker let a delegate operate")
	}
	if ok, _ := none.MayOperate(ctx, owner, owner); !ok {
		t.Fatal("a nil checker refused the owner")
	}
}
