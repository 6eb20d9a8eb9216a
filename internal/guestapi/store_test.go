package guestapi

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// fakeClock drives the embedded store's expiry.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func openTestDisk(t *testing.T, path string, l Limits) (*DiskStore, *fakeClock) {
	t.Helper()
	if path == "" {
		path = filepath.Join(t.TempDir(), "guest-cache.sqlite3")
	}
	s, err := OpenDisk(context.Background(), path, l)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	clock := &fakeClock{t: time.Unix(1_800_000_000, 0)}
	s.now = clock.now
	return s, clock
}

// startRedis runs a private redis-server on a unix socket in a temporary
// directory (never a system service) and returns its URL. Without
// redis-server the test skips, except under CI=true where it fails.
func startRedis(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("redis-server is missing in CI (scripts/install-deps.sh installs it): %v", err)
		}
		t.Skipf("redis-server not installed: %v", err)
	}
	dir, err := os.MkdirTemp("", "redis-") // short: sun_path holds 107 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "redis.sock")
	cmd := exec.Command(bin, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700",
		"--dir", dir, "--save", "", "--appendonly", "no", "--daemonize", "no")
	out, err := os.Create(filepath.Join(dir, "log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait(); out.Close() })
	url := "unix://" + sock
	deadline := time.Now().Add(10 * time.Second)
	for {
		opts, _ := redis.ParseURL(url)
		c := redis.NewClient(opts)
		err := c.Ping(context.Background()).Err()
		c.Close()
		if err == nil {
			return url
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(filepath.Join(dir, "log"))
			t.Fatalf("redis-server did not answer: %v\n%s", err, log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func rawRedis(t *testing.T, url string) *redis.Client {
	opts, err := redis.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	c := redis.NewClient(opts)
	t.Cleanup(func() { c.Close() })
	return c
}

// storeKind opens a fresh store of one kind with the given limits.
type storeKind struct {
	name string
	open func(t *testing.T, l Limits) Store
}

// storeKinds lists the embedded store, and Redis on a server of the
// parent test's, shared by subtests (without redis-server outside CI, the
// embedded store alone).
func storeKinds(parent *testing.T) []storeKind {
	kinds := []storeKind{
		{"embedded", func(t *testing.T, l Limits) Store { s, _ := openTestDisk(t, "", l); return s }},
	}
	if _, err := exec.LookPath("redis-server"); err != nil && os.Getenv("CI") != "true" {
		parent.Logf("redis-server not installed: only the embedded store is tested")
		return kinds
	}
	redisURL := startRedis(parent)
	return append(kinds, storeKind{"redis", func(t *testing.T, l Limits) Store {
		c := rawRedis(t, redisURL)
		if err := c.FlushAll(context.Background()).Err(); err != nil {
			t.Fatal(err)
		}
		s, err := OpenRedis(context.Background(), redisURL, l)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}})
}

func mustSet(t *testing.T, s Store, ns, key, value string) {
	t.Helper()
	if err := s.Set(context.Background(), ns, key, []byte(value)); err != nil {
		t.Fatalf("set %s/%s: %v", ns, key, err)
	}
}

func get(t *testing.T, s Store, ns, key string) (string, bool) {
	t.Helper()
	v, ok, err := s.Get(context.Background(), ns, key)
	if err != nil {
		t.Fatalf("get %s/%s: %v", ns, key, err)
	}
	return string(v), ok
}

func keys(t *testing.T, s Store, ns, pattern string) []string {
	t.Helper()
	k, err := s.Keys(context.Background(), ns, pattern)
	if err != nil {
		t.Fatalf("keys %s %q: %v", ns, pattern, err)
	}
	return k
}

// Both stores answer the same table.
func TestStores(t *testing.T) {
	ctx := context.Background()
	for _, kind := range storeKinds(t) {
		t.Run(kind.name, func(t *testing.T) {
			t.Run("shapes and namespaces", func(t *testing.T) {
				s := kind.open(t, Limits{})
				mustSet(t, s, "a", "greeting", "hello")
				mustSet(t, s, "a", "grey", "x")
				mustSet(t, s, "a", "key", "k")
				mustSet(t, s, "b", "greeting", "other program")
				if v, ok := get(t, s, "a", "greeting"); !ok || v != "hello" {
					t.Errorf("get: %q %v", v, ok)
				}
				if v, _ := get(t, s, "b", "greeting"); v != "other program" {
					t.Errorf("namespace b reads %q", v)
				}
				if _, ok := get(t, s, "c", "greeting"); ok {
					t.Error("namespace c sees another program's key")
				}
				mustSet(t, s, "a", "greeting", "replaced")
				if v, _ := get(t, s, "a", "greeting"); v != "replaced" {
					t.Errorf("after replace: %q", v)
				}
				for pattern, want := range map[string][]string{
					"*": {"greeting", "grey", "key"}, "gr*": {"greeting", "grey"}, "?ey": {"key"},
					"gre?": {"grey"}, "nothing*": {}, "k-y": {}, "^*": {},
				} {
					if got := keys(t, s, "a", pattern); !slices.Equal(got, want) {
						t.Errorf("keys %q = %q, want %q", pattern, got, want)
					}
				}
				if n, err := s.Delete(ctx, "a", "grey"); err != nil || n != 1 {
					t.Errorf("delete: %d %v", n, err)
				}
				if n, err := s.Delete(ctx, "a", "grey"); err != nil || n != 0 {
					t.Errorf("delete again: %d %v", n, err)
				}
				if _, ok := get(t, s, "a", "grey"); ok {
					t.Error("deleted key still there")
				}
			})
			t.Run("caps", func(t *testing.T) {
				s := kind.open(t, Limits{MaxKeys: 3, MaxBytes: 10})
				mustSet(t, s, "a", "k1", "12")
				mustSet(t, s, "a", "k2", "34")
				mustSet(t, s, "a", "k3", "56")
				err := s.Set(ctx, "a", "k4", []byte("7"))
				if !errkind.Is(err, errkind.TooLarge) {
					t.Fatalf("fourth key: %v, want a TooLarge refusal", err)
				}
				mustSet(t, s, "a", "k3", "5678") // replacing is not a new key: 8 bytes
				if err := s.Set(ctx, "a", "k3", []byte("5678901")); !errkind.Is(err, errkind.TooLarge) {
					t.Fatalf("11 bytes: %v, want a TooLarge refusal", err)
				}
				mustSet(t, s, "b", "k4", "1234567890") // other programs have their own caps
				if _, err := s.Delete(ctx, "a", "k1"); err != nil {
					t.Fatal(err)
				}
				mustSet(t, s, "a", "k4", "xy")
				if v, _ := get(t, s, "a", "k3"); v != "5678" {
					t.Errorf("a refused write changed the value: %q", v)
				}
			})
			t.Run("expiry is aleph-vm's", func(t *testing.T) {
				s := kind.open(t, Limits{})
				mustSet(t, s, "a", "k", "v")
				switch s := s.(type) {
				case *RedisStore:
					ttl := s.client.TTL(ctx, "a:k").Val()
					if ttl < DefaultExpiry-time.Minute || ttl > DefaultExpiry {
						t.Errorf("TTL %v, want 7 days", ttl)
					}
				case *DiskStore:
					var expires int64
					if err := s.db.QueryRow(`SELECT expires FROM entries`).Scan(&expires); err != nil {
						t.Fatal(err)
					}
					if got := time.UnixMilli(expires).Sub(s.now()); got != DefaultExpiry {
						t.Errorf("expires in %v, want 7 days", got)
					}
				}
			})
		})
	}
}

func TestRedisExpiresAndFreesQuota(t *testing.T) {
	url := startRedis(t)
	ctx := context.Background()
	s, err := OpenRedis(ctx, url, Limits{Expiry: time.Second, MaxKeys: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	mustSet(t, s, "a", "k1", "v")
	mustSet(t, s, "a", "k2", "v")
	if err := s.Set(ctx, "a", "k3", []byte("v")); !errkind.Is(err, errkind.TooLarge) {
		t.Fatalf("third key: %v", err)
	}
	// Another node (or an operator) removes a key: the quota follows.
	raw := rawRedis(t, url)
	raw.Del(ctx, "a:k1")
	mustSet(t, s, "a", "k3", "v")
	time.Sleep(1100 * time.Millisecond)
	if _, ok := get(t, s, "a", "k2"); ok {
		t.Error("k2 outlived its expiry")
	}
	if k := keys(t, s, "a", "*"); len(k) != 0 {
		t.Errorf("expired keys listed: %q", k)
	}
	mustSet(t, s, "a", "k4", "v")
	mustSet(t, s, "a", "k5", "v")
}

// Operators sharing one Redis with aleph-vm nodes see the same keys:
// `<hash>:<key>`, and nothing of ours under a program's prefix.
func TestRedisKeysAreAlephVMs(t *testing.T) {
	url := startRedis(t)
	ctx := context.Background()
	s, err := OpenRedis(ctx, url, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if d := s.Describe(); d != "redis unix://"+url[len("unix://"):]+"/0" {
		t.Errorf("describe: %q", d)
	}
	raw := rawRedis(t, url)
	const hash = "3fc0aa9569da840c43e7bd2033c3c580abb46b007527d6d20f2d4e98e867f7af"
	mustSet(t, s, hash, "ours", "from go")
	if v := raw.Get(ctx, hash+":ours").Val(); v != "from go" {
		t.Errorf("raw GET %s:ours = %q", hash, v)
	}
	// What aleph-vm's guest API writes and lists.
	raw.Set(ctx, hash+":theirs", "from python", DefaultExpiry)
	if v, _ := get(t, s, hash, "theirs"); v != "from python" {
		t.Errorf("a value written by aleph-vm reads %q", v)
	}
	if k := keys(t, s, hash, "*"); !slices.Equal(k, []string{"ours", "theirs"}) {
		t.Errorf("keys: %q", k)
	}
	if k := raw.Keys(ctx, hash+":*").Val(); len(k) != 2 {
		t.Errorf("aleph-vm's KEYS %s:* sees %q", hash, k)
	}
}

func TestDiskExpirySweepAndCaps(t *testing.T) {
	ctx := context.Background()
	s, clock := openTestDisk(t, "", Limits{MaxKeys: 2, MaxTotalBytes: 10})
	mustSet(t, s, "a", "k1", "12345")
	clock.add(time.Hour)
	mustSet(t, s, "a", "k2", "1234")
	if err := s.Set(ctx, "b", "k", []byte("12")); !errkind.Is(err, errkind.NoCapacity) {
		t.Fatalf("over the store's cap: %v, want NoCapacity", err)
	}
	clock.add(DefaultExpiry - time.Hour - time.Millisecond)
	if _, ok := get(t, s, "a", "k1"); !ok {
		t.Fatal("k1 expired early")
	}
	clock.add(time.Millisecond)
	if _, ok := get(t, s, "a", "k1"); ok {
		t.Error("k1 served after 7 days")
	}
	if k := keys(t, s, "a", "*"); !slices.Equal(k, []string{"k2"}) {
		t.Errorf("keys: %q", k)
	}
	// k1's bytes are free again, for any program.
	mustSet(t, s, "b", "k", "12")
	clock.add(time.Hour)
	// k2 expired: it neither counts as a key nor as bytes.
	mustSet(t, s, "a", "k3", "12345678")
	if n, _ := s.Delete(ctx, "b", "k"); n != 1 {
		t.Errorf("deleting a live key counted %d", n)
	}
	if err := s.Sweep(ctx); err != nil {
		t.Fatal(err)
	}
	var rows, usage int
	if err := s.db.QueryRow(`SELECT COUNT(*) FROM entries`).Scan(&rows); err != nil {
		t.Fatal(err)
	}
	if err := s.db.QueryRow(`SELECT COUNT(*) FROM usage`).Scan(&usage); err != nil {
		t.Fatal(err)
	}
	if rows != 1 || usage != 1 {
		t.Errorf("after sweep: %d entries, %d usage rows; want 1 and 1", rows, usage)
	}
	clock.add(DefaultExpiry)
	if n, _ := s.Delete(ctx, "a", "k3"); n != 0 {
		t.Errorf("deleting an expired key counted %d", n)
	}
}

func TestDiskSurvivesRestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "guest-cache.sqlite3")
	s, err := OpenDisk(context.Background(), path, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	mustSet(t, s, "a", "k", "kept")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = OpenDisk(context.Background(), path, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if v, _ := get(t, s, "a", "k"); v != "kept" {
		t.Errorf("after reopening: %q", v)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
}

func TestKeyAndPatternRules(t *testing.T) {
	for key, want := range map[string]bool{
		"abc": true, "A_1": true, "café": true, "键": true, "": false, "a-b": false,
		"a b": false, "a/b": false, "a:b": false, "abc\n": false, "a.b": false,
		fmt.Sprintf("%01025d", 0): false,
	} {
		if ValidKey(key) != want {
			t.Errorf("ValidKey(%q) = %v", key, !want)
		}
	}
	for p, want := range map[string]bool{"*": true, "a?b*": true, "^x-y": true, "[ab]": false, `a\*`: false, "": false} {
		if ValidPattern(p) != want {
			t.Errorf("ValidPattern(%q) = %v", p, !want)
		}
	}
}
