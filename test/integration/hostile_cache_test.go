package integration

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// vmRSS reads a process's resident set size in bytes.
func vmRSS(t *testing.T, pid int) int64 {
	t.Helper()
	rss, err := readVMRSS(pid)
	if err != nil {
		t.Fatal(err)
	}
	return rss
}

func readVMRSS(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// peakRSS samples a process's RSS every 50 ms until stop is called, and
// returns the highest value seen.
func peakRSS(pid int) (stop func() int64) {
	var mu sync.Mutex
	var peak int64
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		for {
			if rss, err := readVMRSS(pid); err == nil {
				mu.Lock()
				peak = max(peak, rss)
				mu.Unlock()
			}
			select {
			case <-done:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	}()
	return func() int64 {
		close(done)
		<-finished
		mu.Lock()
		defer mu.Unlock()
		return peak
	}
}

// flood asks the probe to PUT n values of size bytes into its guest cache.
func flood(t *testing.T, s *supervisor, hash string, n, size int, prefix string) (counts map[string]any, samples map[string]any) {
	t.Helper()
	q := url.Values{"n": {strconv.Itoa(n)}, "size": {strconv.Itoa(size)}, "prefix": {prefix}}
	r := s.get("/vm/" + hash + "/cache-flood?" + q.Encode())
	expect(t, r, http.StatusOK)
	body := r.json(t)
	return body["counts"].(map[string]any), body["samples"].(map[string]any)
}

const mib = 1 << 20

// A program floods the guest cache with values of the largest size
// aleph-vm accepts: its own cap is reached and refused with 413, the node's
// cap with 503, the supervisor's memory stays bounded, and a neighbour
// still answers.
func TestHostileCacheFlood(t *testing.T) {
	backendIndependent(t)
	const perProgram, total = 64 * mib, 100 * mib
	s := startSupervisor(t,
		fmt.Sprintf("ALEPH_VM_GUEST_CACHE_MAX_BYTES=%d", perProgram),
		fmt.Sprintf("ALEPH_VM_GUEST_CACHE_MAX_TOTAL_BYTES=%d", total))
	// 800 MiB through the guest channel takes longer than the default 30 s.
	hostile := s.upload("testdata/probe", "main:app", "--timeout-seconds", "600")
	neighbour := s.upload("testdata/probe", "main:app", "--timeout-seconds", "600", "--env", "ROLE=neighbour")
	for _, h := range []string{hostile, neighbour} {
		expect(t, s.get("/vm/"+h+"/"), http.StatusOK)
	}
	pid := s.cmd.Process.Pid
	before := vmRSS(t, pid)

	// aiohttp's limit: a value of 1 MiB is refused, before it is read.
	counts, samples := flood(t, s, hostile, 1, mib, "exact")
	if counts["413"] != float64(1) || samples["413"] != "Maximum request body size 1048576 exceeded, actual body size 1048576" {
		t.Errorf("1 MiB value: %v %v", counts, samples)
	}

	stop := peakRSS(pid)
	start := time.Now()
	counts, samples = flood(t, s, hostile, 800, mib-1, "flood")
	elapsed := time.Since(start)
	peak := stop()
	accepted := perProgram / (mib - 1) // 64 values fit in 64 MiB
	t.Logf("800 PUTs of 1 MiB-1 in %v: %v; supervisor RSS %d MiB before, peak %d MiB", elapsed, counts, before>>20, peak>>20)
	if counts["200"] != float64(accepted) || counts["413"] != float64(800-accepted) {
		t.Errorf("flood answers: %v, want %d × 200 then 413 (%v)", counts, accepted, samples)
	}
	if !strings.Contains(fmt.Sprint(samples["413"]), "cache quota exceeded") {
		t.Errorf("refusal: %v", samples["413"])
	}
	// 16 values in flight, each read once and copied once by the driver.
	const rssBound = 128 * mib
	if peak-before > rssBound {
		t.Errorf("supervisor RSS grew by %d MiB (bound %d MiB)", (peak-before)>>20, rssBound>>20)
	}

	// The neighbour answers and caches, until the node's cap.
	r := s.get("/vm/" + neighbour + "/guest-api?" + url.Values{"method": {"PUT"}, "path": {"/cache/mine"}, "body": {"41"}}.Encode())
	expect(t, r, http.StatusOK)
	if b := r.json(t); b["status"] != float64(200) || b["body"] != "true" {
		t.Errorf("neighbour's put: %v", b)
	}
	counts, samples = flood(t, s, neighbour, 50, mib-1, "fill")
	room := (total - accepted*(mib-1) - 2) / (mib - 1)
	if counts["200"] != float64(room) || counts["503"] != float64(50-room) {
		t.Errorf("node cap: %v, want %d × 200 then 503 (%v)", counts, room, samples)
	}
	if !strings.Contains(fmt.Sprint(samples["503"]), "guest cache of this node is full") {
		t.Errorf("node cap refusal: %v", samples["503"])
	}
	expect(t, s.get("/vm/"+neighbour+"/"), http.StatusOK)

	// The file stays within the node's cap, plus SQLite's own pages and WAL.
	var disk int64
	for _, suffix := range []string{"", "-wal", "-shm"} {
		if fi, err := os.Stat(filepath.Join(s.execRoot, "guest-cache.sqlite3"+suffix)); err == nil {
			disk += fi.Size()
		}
	}
	t.Logf("guest cache on disk: %d MiB (cap %d MiB of values)", disk>>20, total>>20)
	if disk > total+32*mib {
		t.Errorf("guest cache file is %d MiB for a %d MiB cap", disk>>20, total>>20)
	}
}

// startRedisServer runs a private redis-server on a unix socket in a
// temporary directory and returns its URL. It fails when redis-server is
// missing under CI=true.
func startRedisServer(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("redis-server missing in CI (scripts/install-deps.sh): %v", err)
		}
		t.Skipf("redis-server not installed: %v", err)
	}
	dir, err := os.MkdirTemp("", "redis-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "redis.sock")
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bin, "--port", "0", "--unixsocket", sock, "--unixsocketperm", "700",
		"--dir", dir, "--save", "", "--appendonly", "no")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); _ = cmd.Wait() })
	for deadline := time.Now().Add(10 * time.Second); ; {
		if _, err := os.Stat(sock); err == nil {
			return "unix://" + sock
		}
		if time.Now().After(deadline) {
			t.Fatal("redis-server did not create its socket")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A value a program cached is still there after the supervisor restarts,
// after a clean stop and after kill -9: in the embedded store and in Redis.
func TestCacheSurvivesRestart(t *testing.T) {
	backendIndependent(t)
	for _, store := range []string{"embedded", "redis"} {
		t.Run(store, func(t *testing.T) {
			var env []string
			if store == "redis" {
				env = append(env, "ALEPH_VM_REDIS_URL="+startRedisServer(t))
			}
			s := startSupervisor(t, env...)
			hash := s.upload("testdata/probe", "main:app")
			call := func(method, path, body string) map[string]any {
				t.Helper()
				q := url.Values{"method": {method}, "path": {path}, "body": {body}}
				r := s.get("/vm/" + hash + "/guest-api?" + q.Encode())
				expect(t, r, http.StatusOK)
				return r.json(t)
			}
			if put := call("PUT", "/cache/visits", "41"); put["status"] != float64(200) || put["body"] != "true" {
				t.Fatalf("put: %v", put)
			}
			// /about/config says which store is in use.
			req, _ := http.NewRequest(http.MethodGet, s.base+"/about/config", nil)
			req.AddCookie(s.loginCookie())
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			var cfg map[string]any
			err = json.NewDecoder(resp.Body).Decode(&cfg)
			resp.Body.Close()
			want := map[string]string{"embedded": "embedded " + filepath.Join(s.execRoot, "guest-cache.sqlite3"), "redis": "redis unix://"}[store]
			if err != nil || !strings.HasPrefix(fmt.Sprint(cfg["GUEST_CACHE_STORE"]), want) {
				t.Errorf("/about/config GUEST_CACHE_STORE = %v (%v), want %s…", cfg["GUEST_CACHE_STORE"], err, want)
			}
			s.shutdown()
			s.restart()
			if get := call("GET", "/cache/visits", ""); get["status"] != float64(200) || get["body"] != "41" {
				t.Errorf("after a restart: %v", get)
			}
			call("PUT", "/cache/visits", "42")
			s.kill9()
			s.restart()
			if get := call("GET", "/cache/visits", ""); get["status"] != float64(200) || get["body"] != "42" {
				t.Errorf("after kill -9: %v", get)
			}
			if list := call("GET", "/cache/?pattern=vis*", ""); list["body"] != `["visits"]` {
				t.Errorf("list: %v", list)
			}
		})
	}
}
