package integration

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Faults: what happens to the node when the supervisor is killed, its
// sandbox runtime fails, its API server is gone or its disk is full.

// cgroupsNamed lists the cgroup directories, in any hierarchy, named after
// one of ids (gVisor sandboxes' cgroups are named by execution).
func cgroupsNamed(ids []string) []string {
	var out []string
	roots, _ := filepath.Glob("/sys/fs/cgroup/*")
	roots = append(roots, "/sys/fs/cgroup")
	for _, root := range roots {
		for _, id := range ids {
			matches, _ := filepath.Glob(filepath.Join(root, "*", id))
			out = append(out, matches...)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// loopDevicesUnder lists loop devices whose backing file is under dir.
func loopDevicesUnder(dir string) []string {
	var out []string
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err == nil && strings.HasPrefix(strings.TrimSpace(string(b)), dir) {
			out = append(out, strings.Split(f, "/")[3]+" -> "+strings.TrimSpace(string(b)))
		}
	}
	return out
}

func (s *supervisor) records(t *testing.T) []map[string]any {
	t.Helper()
	resp, err := client.Get(s.base + "/about/executions/records")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var recs []map[string]any // aleph-vm's shape: a bare array
	if err := json.NewDecoder(resp.Body).Decode(&recs); err != nil {
		t.Fatalf("records: %v", err)
	}
	return recs
}

// kill -9 of a supervisor with warm programs, then a restart: nothing of
// the old run is left (mounts, loop devices, cgroups, directories,
// sandboxes) and every execution has its record, closed.
func TestKill9WithWarmProgramsLeavesNothingAndLosesNoRecord(t *testing.T) {
	if hypervisor != "gvisor" {
		t.Skip("the VM backends' start-up sweep is covered by TestNetworkNothingLeaksAfterKill9")
	}
	s := startSupervisor(t)
	const programs = 8
	var hashes []string
	for i := range programs {
		hashes = append(hashes, s.upload("testdata/probe", "main:app", "--env", fmt.Sprintf("ROLE=warm%d", i)))
	}
	var wg sync.WaitGroup
	for _, h := range hashes {
		wg.Go(func() { expect(t, s.get("/vm/"+h+"/"), http.StatusOK) })
	}
	wg.Wait()
	var ids []string
	for _, e := range s.executions(t) {
		ids = append(ids, e["uuid"].(string))
	}
	if len(ids) != programs {
		t.Fatalf("%d executions running, want %d", len(ids), programs)
	}
	if got := cgroupsNamed(ids); len(got) == 0 {
		t.Fatalf("no cgroup named after the running executions %v: the leak check looks in the wrong place", ids)
	}
	// Rows exist while the programs run, before anything ended.
	open := 0
	for _, r := range s.records(t) {
		if slices.Contains(ids, r["uuid"].(string)) && r["time_stopping"] == nil {
			open++
		}
	}
	if open != programs {
		t.Errorf("%d open records for %d running executions", open, programs)
	}

	s.kill9()
	s.restart("ALEPH_VM_PREWARM=false")

	root := filepath.Dir(s.execRoot)
	mounts, _ := os.ReadFile("/proc/mounts")
	for _, line := range strings.Split(string(mounts), "\n") {
		if strings.Contains(line, root) {
			t.Errorf("mount of the killed run left: %s", line)
		}
	}
	if left := loopDevicesUnder(root); len(left) > 0 {
		t.Errorf("loop devices of the killed run left: %v", left)
	}
	if left := cgroupsNamed(ids); len(left) > 0 {
		t.Errorf("cgroups of the killed run left: %v", left)
	}
	if entries, _ := os.ReadDir(filepath.Join(s.execRoot, "executions")); len(entries) > 0 {
		t.Errorf("%d execution directories of the killed run left", len(entries))
	}
	if c := s.runscContainers(); len(c) > 0 {
		t.Errorf("sandboxes of the killed run left: %v", c)
	}
	closed := 0
	for _, r := range s.records(t) {
		if slices.Contains(ids, r["uuid"].(string)) {
			if r["time_stopping"] == nil || r["time_started"] == nil {
				t.Errorf("record of a killed execution: %v", r)
			}
			closed++
		}
	}
	if closed != programs {
		t.Errorf("%d records for the %d executions of the killed run", closed, programs)
	}
	expect(t, s.get("/vm/"+hashes[0]+"/"), http.StatusOK)
}

// An idle spare outlives the agent's keepalive timeout (it died at 25 s
// when the host ran no session until adoption) and still serves.
func TestIdleSpareStaysAlive(t *testing.T) {
	if hypervisor != "gvisor" {
		t.Skip("spares are a gVisor feature")
	}
	s := startSupervisor(t)
	hash := s.upload("testdata/probe", "main:app")
	var spares []string
	for deadline := time.Now().Add(60 * time.Second); len(spares) != 2; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("want 2 spares after 60 s, have %v", spares)
		}
		spares = s.runscContainers()
	}
	time.Sleep(40 * time.Second)
	if now := s.runscContainers(); !slices.Equal(now, spares) {
		t.Errorf("spares changed while idle: %v, then %v", spares, now)
	}
	// Each agent said when its interpreter was warm (guest.StreamWarm),
	// which lets the next spare start.
	if n := strings.Count(s.logs.String(), "by=agent"); n < 2 {
		t.Errorf("%d spares said they were warm, want 2:\n%s", n, tail(s.logs.String(), 30))
	}
	if strings.Contains(s.logs.String(), "spare sandbox died") {
		t.Errorf("a spare died while idle:\n%s", tail(s.logs.String(), 30))
	}
	expect(t, s.get("/vm/"+hash+"/"), http.StatusOK)
	if ids := s.executions(t); len(ids) != 1 || !slices.Contains(spares, ids[0]["uuid"].(string)) {
		t.Errorf("the request did not run in an idle spare %v: %v", spares, ids)
	}
}

// With a sandbox runtime that fails every start, spares are retried with
// growing delays (not in a tight loop), and a client reads the runtime's
// own words instead of "guest channel closed".
func TestFailingRuntimeBacksOffAndNamesTheCause(t *testing.T) {
	if hypervisor != "gvisor" {
		t.Skip("runsc-specific")
	}
	requirePrerequisites(t)
	realRunsc, err := exec.LookPath("runsc")
	if err != nil {
		t.Fatal(err)
	}
	wrapper := filepath.Join(t.TempDir(), "runsc")
	// Only sandbox starts fail; listing, killing and deleting still work.
	script := "#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = run ] && { echo 'simulated runsc failure: cannot create the sandbox' >&2; exit 3; }; done\nexec " + realRunsc + " \"$@\"\n"
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	s := startSupervisor(t, "ALEPH_VM_RUNSC_PATH="+wrapper)
	hash := s.upload("testdata/probe", "main:app")
	start := time.Now()
	time.Sleep(10 * time.Second)
	attempts := strings.Count(s.logs.String(), "spare sandbox died") + strings.Count(s.logs.String(), "could not make a spare sandbox")
	// Two shapes, waits of 1, 2, 4 s: about 4 attempts each in 10 s. A
	// tight loop makes dozens.
	if attempts < 2 || attempts > 12 {
		t.Errorf("%d failed spare starts in %s, want a few with backoff:\n%s", attempts, time.Since(start).Round(time.Second), tail(s.logs.String(), 40))
	}
	r := s.get("/vm/" + hash + "/")
	expect(t, r, http.StatusBadGateway)
	if !strings.Contains(string(r.Body), "simulated runsc failure") {
		t.Errorf("the client does not read the cause: %s", r.Body)
	}
}

// With the Aleph API unreachable, programs in the local store still run,
// and an unknown hash gets a clear error naming the API, promptly.
func TestAPIServerDown(t *testing.T) {
	backendIndependent(t)
	s := startSupervisor(t, "ALEPH_VM_PREWARM=false")
	local := s.upload("testdata/probe", "main:app")
	s.api.srv.Close()
	begin := time.Now()
	r := s.get("/vm/" + strings.Repeat("cd", 32) + "/")
	if r.Status < 500 || !strings.Contains(strings.ToLower(string(r.Body)), "api") {
		t.Errorf("unknown hash with the API down: %d %s", r.Status, r.Body)
	}
	if d := time.Since(begin); d > 30*time.Second {
		t.Errorf("the answer took %s", d)
	}
	expect(t, s.get("/vm/"+local+"/"), http.StatusOK)
}

// A full disk under EXECUTION_ROOT (a small filesystem made by the test):
// starts fail with a clear error, the supervisor stays up, and once space
// is back programs run again.
func TestFullDisk(t *testing.T) {
	requirePrerequisites(t)
	if hypervisor != "gvisor" {
		t.Skip("the disk path is backend-independent; gVisor is the quick one")
	}
	dir := t.TempDir()
	img, mnt := filepath.Join(dir, "small.img"), filepath.Join(dir, "mnt")
	for _, c := range [][]string{
		{"truncate", "-s", "192M", img},
		{"mkfs.ext4", "-q", "-F", img},
		{"mkdir", "-p", mnt},
		{"mount", "-o", "loop", img, mnt},
	} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v %s", c, err, out)
		}
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", "-l", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v %s", mnt, err, out)
		}
	})
	execRoot, cache := filepath.Join(mnt, "exec"), filepath.Join(mnt, "cache")
	s := startSupervisor(t, "ALEPH_VM_EXECUTION_ROOT="+execRoot, "ALEPH_VM_CACHE_ROOT="+cache, "ALEPH_VM_PREWARM=false")
	s.execRoot, s.cache = execRoot, cache
	hash := s.upload("testdata/probe", "main:app")
	other := s.upload("testdata/probe", "main:app", "--env", "ROLE=other")

	filler := filepath.Join(mnt, "filler")
	out, err := exec.Command("dd", "if=/dev/zero", "of="+filler, "bs=1M").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "No space left") {
		t.Fatalf("dd did not fill the disk: %v %s", err, out)
	}
	// The last partial megabyte, block by block: dd fails, by design, once
	// the disk is full.
	_ = exec.Command("dd", "if=/dev/zero", "of="+filler+".tail", "bs=4096").Run()
	// Running a stored program needs little room: it runs, or fails
	// naming the cause.
	r := s.get("/vm/" + hash + "/")
	if r.Status != http.StatusOK && !strings.Contains(strings.ToLower(string(r.Body)), "no space left") {
		t.Errorf("start on a full disk: %d %s; want 200 or an error naming the cause", r.Status, r.Body)
	}
	// Publishing new code needs room: refused, saying why, nothing half-written.
	cmd := exec.Command(filepath.Join(binDir, "vm-supervisor"), "program", "upload", "testdata/vendored", "main:app")
	cmd.Env = s.env
	out, err = cmd.CombinedOutput()
	if err == nil || !strings.Contains(strings.ToLower(string(out)), "no space left") {
		t.Errorf("upload on a full disk: %v %s; want a failure naming the cause", err, out)
	}
	if r := s.get("/status/check/version?reference=0"); r.Status != http.StatusOK {
		t.Errorf("supervisor not answering on a full disk: %d", r.Status)
	}
	os.Remove(filler)
	os.Remove(filler + ".tail")
	expect(t, s.get("/vm/"+other+"/"), http.StatusOK)
}

// Load: 500 requests over 20 programs at concurrency 50 are all answered,
// with the supervisor's memory and descriptors bounded.
func TestLoadManyProgramsBounded(t *testing.T) {
	backendIndependent(t)
	// 20 programs of 1 vCPU on 2 cores: an operator running this many
	// mostly idle programs raises the overcommit factor (default 4).
	s := startSupervisor(t, "ALEPH_VM_INIT_TIMEOUT=300", "ALEPH_VM_VCPU_OVERCOMMIT_FACTOR=16")
	const programs, requests, concurrency = 20, 500, 50
	var hashes []string
	for i := range programs {
		hashes = append(hashes, s.upload("testdata/probe", "main:app", "--env", fmt.Sprintf("ROLE=load%d", i)))
	}
	pid := s.cmd.Process.Pid
	rssBefore, fdsBefore := rssKiB(pid), fdCount(pid)
	var (
		next, failed atomic.Int64
		wg           sync.WaitGroup
		firstErr     sync.Once
	)
	peaks := watchPeaks(pid, 200*time.Millisecond)
	begin := time.Now()
	for range concurrency {
		wg.Go(func() {
			for {
				i := next.Add(1) - 1
				if i >= requests {
					return
				}
				r := s.get("/vm/" + hashes[i%programs] + "/")
				if r.Status != http.StatusOK {
					failed.Add(1)
					firstErr.Do(func() { t.Errorf("request %d: %d %s", i, r.Status, r.Body) })
				}
			}
		})
	}
	wg.Wait()
	peakRSS, peakFDs := peaks()
	t.Logf("%d requests over %d programs at c=%d in %s; %d failed; supervisor RSS %d -> peak %d KiB; fds %d -> peak %d",
		requests, programs, concurrency, time.Since(begin).Round(time.Millisecond), failed.Load(),
		rssBefore, peakRSS, fdsBefore, peakFDs)
	// Bounds with room for noise: the supervisor itself, not the sandboxes
	// (they are other processes), must not grow with the load.
	if peakRSS > 400<<10 {
		t.Errorf("supervisor RSS peaked at %d KiB", peakRSS)
	}
	if peakFDs > 2000 {
		t.Errorf("supervisor used %d descriptors", peakFDs)
	}
	if n := s.runningExecutions(); n != programs {
		t.Errorf("%d executions after the load, want one per program (%d)", n, programs)
	}
}

// rssKiB is a process's resident set in KiB, 0 once it is gone.
func rssKiB(pid int) int64 {
	rss, err := readVMRSS(pid)
	if err != nil {
		return 0
	}
	return rss >> 10
}

// watchPeaks samples a process's RSS (KiB) and descriptor count every
// period until the returned function is called, which gives the peaks.
func watchPeaks(pid int, period time.Duration) (stop func() (rss, fds int64)) {
	var peakRSS, peakFDs int64
	done, finished := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(finished)
		for {
			peakRSS = max(peakRSS, rssKiB(pid))
			peakFDs = max(peakFDs, fdCount(pid))
			select {
			case <-done:
				return
			case <-time.After(period):
			}
		}
	}()
	return func() (int64, int64) {
		close(done)
		<-finished
		return peakRSS, peakFDs
	}
}

func fdCount(pid int) int64 {
	entries, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return int64(len(entries))
}

// Admission: over capacity a request gets 503 with a clear JSON error;
// idle executions are evicted (least recently used first) to make room.
func TestAdmissionEvictsIdleAndRefusesWhenBusy(t *testing.T) {
	backendIndependent(t)
	s := startSupervisor(t, "ALEPH_VM_MAX_EXECUTIONS=2", "ALEPH_VM_PREWARM=false")
	a := s.upload("testdata/probe", "main:app", "--env", "ROLE=a")
	b := s.upload("testdata/probe", "main:app", "--env", "ROLE=b")
	c := s.upload("testdata/probe", "main:app", "--env", "ROLE=c")
	huge := s.upload("testdata/probe", "main:app", "--memory", "1048576")
	expect(t, s.get("/vm/"+a+"/"), http.StatusOK)
	expect(t, s.get("/vm/"+b+"/"), http.StatusOK)
	// Full, both idle: a (least recently used) makes room for c.
	expect(t, s.get("/vm/"+c+"/"), http.StatusOK)
	var running []string
	for _, e := range s.executions(t) {
		running = append(running, e["vm_hash"].(string))
	}
	slices.Sort(running)
	want := []string{b, c}
	slices.Sort(want)
	if !slices.Equal(running, want) {
		t.Errorf("running after eviction: %v, want b and c %v", running, want)
	}
	// Full and both busy: a waits briefly, then is refused.
	var wg sync.WaitGroup
	for _, h := range []string{b, c} {
		wg.Go(func() { expect(t, s.get("/vm/"+h+"/sleep?seconds=12"), http.StatusOK) })
	}
	time.Sleep(time.Second)
	r := s.get("/vm/" + a + "/")
	expect(t, r, http.StatusServiceUnavailable)
	if msg, _ := r.json(t)["error"].(string); !strings.Contains(msg, "Insufficient capacity") || !strings.Contains(msg, "executions: 2 running, limit 2") {
		t.Errorf("503 body: %s", r.Body)
	}
	wg.Wait()
	// A program larger than the whole node is refused at once.
	r = s.get("/vm/" + huge + "/")
	expect(t, r, http.StatusServiceUnavailable)
	if !strings.Contains(string(r.Body), "memory: required 1048576 MiB") {
		t.Errorf("503 body for a program larger than the node: %s", r.Body)
	}
}
