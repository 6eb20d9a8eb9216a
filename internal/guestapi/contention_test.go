package guestapi

import (
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// One program listing its keys in a loop, with many guest API calls at
// once, does not starve another program's writes nor reads: the
// neighbour's PUT and GET stay within a bound an order of magnitude under
// what a PUT took with one connection for all (1.2 s).
func TestListingDoesNotStarveWrites(t *testing.T) {
	ctx := context.Background()
	store, err := OpenDisk(ctx, filepath.Join(t.TempDir(), "guest-cache.sqlite3"), DefaultLimits())
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	cache := NewCache(store, 0, nil)
	lister := New(Options{Program: Program{Hash: "lister"}, Cache: cache})
	neighbour := New(Options{Program: Program{Hash: "neighbour"}, Cache: cache})
	for i := range 1000 {
		key := fmt.Sprintf("key_%04d_%s", i, strings.Repeat("k", 500))
		if r := do(t, lister, "PUT", "/cache/"+key, strings.NewReader("v")); r.code != 200 {
			t.Fatalf("put: %+v", r)
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var listings atomic.Int64
	for range 32 { // a program's concurrent guest API calls
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if r := do(t, lister, "GET", "/cache/", nil); r.code != 200 || len(r.body) < 500_000 {
					t.Errorf("listing: %d, %d bytes", r.code, len(r.body))
					return
				}
				listings.Add(1)
			}
		}()
	}
	time.Sleep(200 * time.Millisecond)
	var puts, gets []time.Duration
	value := strings.Repeat("v", 4096)
	for i := range 50 {
		start := time.Now()
		if r := do(t, neighbour, "PUT", fmt.Sprintf("/cache/k%d", i), strings.NewReader(value)); r.code != 200 {
			t.Fatalf("neighbour's put: %+v", r)
		}
		puts = append(puts, time.Since(start))
		start = time.Now()
		if r := do(t, neighbour, "GET", fmt.Sprintf("/cache/k%d", i), nil); r.code != 200 || r.body != value {
			t.Fatalf("neighbour's get: %d", r.code)
		}
		gets = append(gets, time.Since(start))
	}
	close(stop)
	wg.Wait()
	slices.Sort(puts)
	slices.Sort(gets)
	t.Logf("during %d listings of 1000 keys: neighbour's PUT p50 %v p90 %v max %v; GET p50 %v p90 %v max %v",
		listings.Load(), puts[25], puts[45], puts[49], gets[25], gets[45], gets[49])
	if listings.Load() == 0 {
		t.Error("no listing ran")
	}
	if puts[25] > 100*time.Millisecond || gets[25] > 100*time.Millisecond {
		t.Errorf("neighbour's p50: PUT %v, GET %v, bound 100 ms", puts[25], gets[25])
	}
}

// A listing returns at most maxListedKeys keys, whatever the key cap.
func TestListingIsBounded(t *testing.T) {
	ctx := context.Background()
	s, _ := openTestDisk(t, "", Limits{})
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range maxListedKeys + 5 {
		if _, err := tx.ExecContext(ctx, `INSERT INTO entries (ns, key, size, expires, value) VALUES ('p', ?, 1, ?, x'00')`,
			fmt.Sprintf("k%06d", i), s.nowMs()+60_000); err != nil {
			t.Fatal(err)
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	keys, err := s.Keys(ctx, "p", "*")
	if err != nil || len(keys) != maxListedKeys {
		t.Errorf("listing: %d keys, %v; want %d", len(keys), err, maxListedKeys)
	}
}
