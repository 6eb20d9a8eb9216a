package cache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

func sum(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

func fetchBytes(b []byte) FetchFunc {
	return func(context.Context) (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }
}

// listDir returns every entry of dir, for "nothing was left behind" checks.
func listDir(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

func TestGet(t *testing.T) {
	content := bytes.Repeat([]byte("aleph"), 1000) // 5000 bytes
	good := sum(content)
	// failingReader hands out half of the content, then fails.
	half := func(context.Context) (io.ReadCloser, error) {
		return io.NopCloser(io.MultiReader(bytes.NewReader(content[:2500]), errReader{})), nil
	}
	tests := []struct {
		name     string
		hash     string
		limit    int64
		fetch    FetchFunc
		wantKind errkind.Kind
		wantErr  string
		cached   bool
	}{
		{name: "verified sha256", hash: good, limit: 0, fetch: fetchBytes(content), cached: true},
		{name: "exact limit", hash: good, limit: 5000, fetch: fetchBytes(content), cached: true},
		{name: "limit hit mid-stream", hash: good, limit: 4096, fetch: fetchBytes(content), wantKind: errkind.TooLarge, wantErr: "limit"},
		{name: "hash mismatch", hash: sum([]byte("other")), fetch: fetchBytes(content), wantKind: errkind.InvalidInput, wantErr: "mismatch"},
		{name: "interrupted download", hash: good, fetch: half, wantErr: "connection reset"},
		{name: "fetch fails", hash: good, fetch: func(context.Context) (io.ReadCloser, error) {
			return nil, errkind.New(errkind.NotFound, "no such file")
		}, wantKind: errkind.NotFound},
		{name: "IPFS CID not verified", hash: "QmWVxvresoeadRbCeG4BmvsoSsqHV7VwUNuGK6nUCKKFGQ", fetch: fetchBytes(content), cached: true},
		{name: "path traversal refused", hash: "../../etc", fetch: fetchBytes(content), wantKind: errkind.InvalidInput},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			c, err := Open(root)
			if err != nil {
				t.Fatal(err)
			}
			path, err := c.Get(context.Background(), "code", tt.hash, tt.limit, tt.fetch)
			if tt.cached {
				if err != nil {
					t.Fatalf("Get: %v", err)
				}
				got, err := os.ReadFile(path)
				if err != nil || !bytes.Equal(got, content) {
					t.Fatalf("cached content differs (err %v)", err)
				}
				if want := filepath.Join(root, "code", tt.hash); path != want {
					t.Fatalf("path %s, want %s", path, want)
				}
				if names := listDir(t, filepath.Join(root, "code")); len(names) != 1 {
					t.Fatalf("code dir holds %v, want only the file", names)
				}
				return
			}
			if err == nil {
				t.Fatalf("Get succeeded, want an error")
			}
			if tt.wantKind != errkind.Unknown && !errkind.Is(err, tt.wantKind) {
				t.Errorf("error %q is %v, want %v", err, errkind.Of(err), tt.wantKind)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q does not mention %q", err, tt.wantErr)
			}
			if names := listDir(t, filepath.Join(root, "code")); len(names) != 0 {
				t.Fatalf("failed download left %v behind", names)
			}
		})
	}
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, errors.New("connection reset by peer") }

func TestExistingFileReturnedWithoutFetch(t *testing.T) {
	c, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	content := []byte("hello")
	h := sum(content)
	if _, err := c.Get(context.Background(), "data", h, 0, fetchBytes(content)); err != nil {
		t.Fatal(err)
	}
	p, err := c.Get(context.Background(), "data", h, 0, func(context.Context) (io.ReadCloser, error) {
		t.Fatal("fetch called for a cached file")
		return nil, nil
	})
	if err != nil || filepath.Base(p) != h {
		t.Fatalf("second Get = %s, %v", p, err)
	}
	// A cached file above a (lower) limit is refused.
	if _, err := c.Get(context.Background(), "data", h, 2, nil); !errkind.Is(err, errkind.TooLarge) {
		t.Fatalf("cached file above limit: %v", err)
	}
}

// gatedReader serves its content only after the gate is closed, so that all
// concurrent callers are waiting on the same flight when the data comes.
type gatedReader struct {
	gate <-chan struct{}
	r    io.Reader
}

func (g *gatedReader) Read(p []byte) (int, error) {
	<-g.gate
	return g.r.Read(p)
}

func TestConcurrentSameRefFetchesOnce(t *testing.T) {
	c, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	content := bytes.Repeat([]byte{7}, 1<<20)
	h := sum(content)
	gate := make(chan struct{})
	var fetches atomic.Int32
	fetch := func(context.Context) (io.ReadCloser, error) {
		fetches.Add(1)
		return io.NopCloser(&gatedReader{gate: gate, r: bytes.NewReader(content)}), nil
	}

	const n = 20
	var wg sync.WaitGroup
	paths := make([]string, n)
	errs := make([]error, n)
	// Some callers give up early; the others must still get the file.
	cancelled, cancel := context.WithCancel(context.Background())
	for i := range n {
		ctx := context.Background()
		if i%4 == 0 {
			ctx = cancelled
		}
		wg.Go(func() { paths[i], errs[i] = c.Get(ctx, "code", h, 0, fetch) })
	}
	waitFor(t, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		f := c.flights["code/"+h]
		return f != nil && f.waiters == n
	})
	cancel()
	waitFor(t, func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.flights["code/"+h].waiters == n-5
	})
	close(gate)
	wg.Wait()

	if got := fetches.Load(); got != 1 {
		t.Fatalf("%d fetches, want exactly 1", got)
	}
	for i := range n {
		if i%4 == 0 {
			if !errors.Is(errs[i], context.Canceled) {
				t.Errorf("caller %d: err %v, want context.Canceled", i, errs[i])
			}
			continue
		}
		if errs[i] != nil {
			t.Fatalf("caller %d: %v", i, errs[i])
		}
		if got, _ := os.ReadFile(paths[i]); !bytes.Equal(got, content) {
			t.Fatalf("caller %d got a corrupt file", i)
		}
	}
}

func TestAllCallersCancelledStopsDownload(t *testing.T) {
	root := t.TempDir()
	c, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	content := []byte("slow content")
	h := sum(content)
	stopped := make(chan struct{})
	fetch := func(ctx context.Context) (io.ReadCloser, error) {
		return io.NopCloser(readerFunc(func(p []byte) (int, error) {
			<-ctx.Done()
			close(stopped)
			return 0, ctx.Err()
		})), nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := c.Get(ctx, "code", h, 0, fetch); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Get: %v, want deadline exceeded", err)
	}
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("download still running after every caller left")
	}
	waitFor(t, func() bool { return len(listDir(t, filepath.Join(root, "code"))) == 0 })
	// A new caller starts afresh and succeeds.
	if _, err := c.Get(context.Background(), "code", h, 0, fetchBytes(content)); err != nil {
		t.Fatalf("Get after cancellation: %v", err)
	}
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

func TestOpenRemovesLeftoverTempFiles(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "runtime")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	keep := filepath.Join(dir, sum([]byte("x")))
	leftover := filepath.Join(dir, tmpPrefix+"abc-123")
	for _, p := range []string{keep, leftover} {
		if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := Open(root); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(leftover); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("leftover temp file still there: %v", err)
	}
	if _, err := os.Stat(keep); err != nil {
		t.Errorf("cached file removed: %v", err)
	}
}

func TestGetChecked(t *testing.T) {
	c, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	bad := errkind.New(errkind.InvalidInput, "not a message")
	_, err = c.GetChecked(context.Background(), "message", sum([]byte("k")), 0, fetchBytes([]byte("{")),
		func(string) error { return bad })
	if !errors.Is(err, bad) {
		t.Fatalf("GetChecked: %v", err)
	}
	p, err := c.GetChecked(context.Background(), "message", sum([]byte("k")), 0, fetchBytes([]byte("{}")),
		func(string) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); string(b) != "{}" {
		t.Fatalf("content %q", b)
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in time")
		}
		time.Sleep(time.Millisecond)
	}
}
