package integration

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestFoundationRoutes(t *testing.T) {
	s := startSupervisor(t)
	expect(t, s.get("/vm/not-a-hash/"), http.StatusBadRequest)
	expect(t, s.get("/vm/"+strings.Repeat("ab", 32)+"/"), http.StatusNotFound)

	// A program the API knows whose code file it does not: the error names
	// the missing ref instead of failing obscurely.
	content := fixtureContent(t, "machine.json")
	hash := s.api.addInline(t, "PROGRAM", content["address"].(string), content)
	r := s.get("/vm/" + hash + "/")
	expect(t, r, http.StatusBadRequest)
	// Code and runtime refs are both unknown to the API and resolve in
	// parallel: either may be reported, but by its role and hash.
	codeRef := content["code"].(map[string]any)["ref"].(string)
	runtimeRef := content["runtime"].(map[string]any)["ref"].(string)
	body := string(r.Body)
	if !(strings.Contains(body, "code ref "+codeRef) || strings.Contains(body, "runtime ref "+runtimeRef)) {
		t.Errorf("error does not name the missing ref: %s", body)
	}
	// INSTANCE messages are not served on /vm.
	instance := fixtureContent(t, "instance_machine.json")
	expect(t, s.get("/vm/"+s.api.addInline(t, "INSTANCE", instance["address"].(string), instance)+"/"), http.StatusBadRequest)

	r = s.get("/about/usage/system")
	expect(t, r, http.StatusOK)
	usage := r.json(t)
	for _, key := range []string{"cpu", "mem", "disk", "period", "properties", "active"} {
		if _, ok := usage[key]; !ok {
			t.Errorf("/about/usage/system lacks %q: %s", key, r.Body)
		}
	}
	if got := r.Header.Get("Server"); !strings.HasPrefix(got, "aleph-vm/") {
		t.Errorf("Server header %q", got)
	}
	expect(t, s.get("/about/config"), http.StatusUnauthorized)
}

func TestEncodingsAndExecutable(t *testing.T) {
	s := startSupervisor(t)
	probe, _ := filepath.Abs("testdata/probe")
	cases := []struct {
		name, path, entrypoint string
		flags                  []string
		check                  func(t *testing.T, body map[string]any)
	}{
		{"zip", probe, "main:app", nil, func(t *testing.T, b map[string]any) {
			if b["boot_id"] == nil {
				t.Errorf("no boot_id: %v", b)
			}
		}},
		{"squashfs", probe, "main:app", []string{"--encoding", "squashfs"}, func(t *testing.T, b map[string]any) {
			if b["boot_id"] == nil {
				t.Errorf("no boot_id: %v", b)
			}
		}},
		{"plain", "testdata/plain_app.py", "plain_app:app", []string{"--encoding", "plain"}, func(t *testing.T, b map[string]any) {
			if b["encoding"] != "plain" {
				t.Errorf("got %v", b)
			}
		}},
		{"executable", "testdata/executable", "serve", nil, func(t *testing.T, b map[string]any) {
			if b["kind"] != "executable" || b["path"] != "/" {
				t.Errorf("got %v", b)
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			hash := s.upload(c.path, c.entrypoint, c.flags...)
			r := s.get("/vm/" + hash + "/")
			expect(t, r, http.StatusOK)
			c.check(t, r.json(t))
			if got := r.Header.Get("Aleph-Program-ItemHash"); got != hash {
				t.Errorf("Aleph-Program-ItemHash = %q", got)
			}
			if r.Header.Get("Aleph-Program-Code-Ref") == "" {
				t.Errorf("no Aleph-Program-Code-Ref header")
			}
		})
	}
}

func TestWarmReuseAndForwarding(t *testing.T) {
	s := startSupervisor(t)
	hash := s.upload("testdata/probe", "main:app")
	first := s.get("/vm/" + hash + "/").json(t)
	second := s.get("/vm/" + hash + "/").json(t)
	if first["boot_id"] != second["boot_id"] {
		t.Errorf("second request was served by a new sandbox: %v vs %v", first, second)
	}
	r := s.get("/vm/" + hash + "/path/a%2Fb/c?x=1&y=two")
	expect(t, r, http.StatusOK)
	b := r.json(t)
	if b["rest"] != "a/b/c" || b["query"] != "x=1&y=two" {
		t.Errorf("path or query not preserved: %v", b)
	}
	// Host-based routing reaches the same program.
	label := base32Label(t, hash)
	req, _ := http.NewRequest("GET", s.base+"/", nil)
	req.Host = label + ".aleph.example"
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !bytes.Contains(body, []byte(first["boot_id"].(string))) {
		t.Errorf("host routing: %d %s", resp.StatusCode, body)
	}
}

func TestStreamingAndBodies(t *testing.T) {
	s := startSupervisor(t)
	hash := s.upload("testdata/probe", "main:app")
	expect(t, s.get("/vm/"+hash+"/"), http.StatusOK)

	resp, err := client.Get(s.base + "/vm/" + hash + "/stream?chunks=4&delay=0.5")
	if err != nil {
		t.Fatal(err)
	}
	var arrivals []time.Time
	buf := make([]byte, 64)
	for {
		n, err := resp.Body.Read(buf)
		if n > 0 {
			arrivals = append(arrivals, time.Now())
		}
		if err != nil {
			break
		}
	}
	resp.Body.Close()
	if len(arrivals) < 3 || arrivals[len(arrivals)-1].Sub(arrivals[0]) < time.Second {
		t.Errorf("response was not streamed: %d reads spread over %v", len(arrivals), arrivals[len(arrivals)-1].Sub(arrivals[0]))
	}

	payload := make([]byte, 5<<20)
	_, _ = rand.Read(payload)
	sum := sha256.Sum256(payload)
	r := s.do("POST", "/vm/"+hash+"/echo", bytes.NewReader(payload))
	expect(t, r, http.StatusOK)
	b := r.json(t)
	if b["sha256"] != hex.EncodeToString(sum[:]) || b["length"] != float64(len(payload)) {
		t.Errorf("5 MiB body altered: %v", b)
	}
	big := make([]byte, 11<<20)
	expect(t, s.do("POST", "/vm/"+hash+"/echo", bytes.NewReader(big)), http.StatusRequestEntityTooLarge)
}

func TestIsolation(t *testing.T) {
	s := startSupervisor(t)
	secret := filepath.Join(t.TempDir(), "host-secret.txt")
	if err := os.WriteFile(secret, []byte("host secret"), 0o644); err != nil {
		t.Fatal(err)
	}
	hash := s.upload("testdata/probe", "main:app")
	for _, path := range []string{secret, "/etc/shadow-host-check", "/proc/1/root" + secret} {
		b := s.get("/vm/" + hash + "/read-file?path=" + path).json(t)
		if b["ok"] == true && strings.Contains(fmt.Sprint(b["content"]), "host secret") {
			t.Errorf("program read a host file %s: %v", path, b)
		}
	}
	procs := s.get("/vm/" + hash + "/processes").json(t)
	for _, c := range procs["cmdlines"].([]any) {
		if strings.Contains(fmt.Sprint(c), "vm-supervisor") || strings.Contains(fmt.Sprint(c), "go test") {
			t.Errorf("program sees a host process: %v", c)
		}
	}
	// Kernel threads of a VM guest have no command line; user processes
	// are the agent, the program and its workers.
	user := 0
	for _, c := range procs["cmdlines"].([]any) {
		if strings.TrimSpace(fmt.Sprint(c)) != "" {
			user++
		}
	}
	if user > 10 {
		t.Errorf("program sees %d processes: %v", user, procs["cmdlines"])
	}
	conn := s.get(fmt.Sprintf("/vm/%s/connect?host=127.0.0.1&port=%d", hash, s.port)).json(t)
	if conn["connected"] == true {
		t.Errorf("program reached the supervisor's port on the host loopback")
	}
}

func TestLimits(t *testing.T) {
	s := startSupervisor(t)
	hash := s.upload("testdata/probe", "main:app", "--memory", "128", "--timeout-seconds", "3")
	other := s.upload("testdata/plain_app.py", "plain_app:app", "--encoding", "plain")
	expect(t, s.get("/vm/"+other+"/"), http.StatusOK)

	expect(t, s.get("/vm/"+hash+"/"), http.StatusOK) // boot first: the budget is per request
	t.Run("timeout", func(t *testing.T) {
		start := time.Now()
		expect(t, s.get("/vm/"+hash+"/sleep?seconds=10"), http.StatusGatewayTimeout)
		if d := time.Since(start); d > 8*time.Second {
			t.Errorf("504 took %v", d)
		}
		expect(t, s.get("/vm/"+hash+"/"), http.StatusOK)
	})
	t.Run("crash", func(t *testing.T) {
		r := s.get("/vm/" + hash + "/crash")
		expect(t, r, http.StatusBadGateway)
		// The agent's account (exit status, last lines), not the
		// sandbox's "guest channel closed".
		if !strings.Contains(string(r.Body), "program exited by itself: exit status 1") {
			t.Errorf("the 502 does not say how the program ended: %s", r.Body)
		}
		expect(t, s.get("/vm/"+hash+"/"), http.StatusOK)
	})
	t.Run("memory", func(t *testing.T) {
		// A budget long enough for the hog to reach the limit even under
		// emulation, so that the limit, not the timeout, ends it.
		hog := s.upload("testdata/probe", "main:app", "--memory", "128", "--timeout-seconds", "60", "--env", "ROLE=hog")
		r := s.get("/vm/" + hog + "/memory?mib=400")
		if r.Status < 500 {
			t.Errorf("memory hog got %d: %s", r.Status, r.Body)
		}
		expect(t, s.get("/vm/"+hog+"/"), http.StatusOK)
		expect(t, s.get("/vm/"+other+"/"), http.StatusOK)
	})
}

func TestParallelColdStartsShareOneSandbox(t *testing.T) {
	s := startSupervisor(t)
	hash := s.upload("testdata/probe", "main:app")
	var wg sync.WaitGroup
	boots := make(chan string, 20)
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := client.Get(s.base + "/vm/" + hash + "/")
			if err != nil {
				t.Error(err)
				return
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != 200 {
				t.Errorf("status %d: %s", resp.StatusCode, body)
				return
			}
			boots <- string(body[:bytes.IndexByte(body, ',')])
		}()
	}
	wg.Wait()
	close(boots)
	seen := map[string]bool{}
	for b := range boots {
		seen[b] = true
	}
	if len(seen) != 1 {
		t.Errorf("20 cold requests were served by %d sandboxes", len(seen))
	}
	if n := s.runningExecutions(); n != 1 {
		t.Errorf("%d executions running, want 1", n)
	}
}

func TestIdleExecutionStopsAndIsRecorded(t *testing.T) {
	s := startSupervisor(t, "ALEPH_VM_REUSE_TIMEOUT=1")
	hash := s.upload("testdata/probe", "main:app")
	expect(t, s.get("/vm/"+hash+"/"), http.StatusOK)
	deadline := time.Now().Add(30 * time.Second)
	for s.runningExecutions() > 0 {
		if time.Now().After(deadline) {
			t.Fatal("idle sandbox still running 30s after REUSE_TIMEOUT=1")
		}
		time.Sleep(200 * time.Millisecond)
	}
	// The record is written once the sandbox is gone; allow it a moment.
	var r response
	var recs []any
	for range 50 {
		r = s.get("/about/executions/records")
		expect(t, r, http.StatusOK)
		if err := json.Unmarshal(r.Body, &recs); err != nil {
			t.Fatalf("records: %v: %s", err, r.Body)
		}
		if len(recs) > 0 {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if len(recs) != 1 {
		t.Fatalf("want 1 record, got %s", r.Body)
	}
	rec := recs[0].(map[string]any)
	if rec["vm_hash"] != hash || rec["memory"] != float64(128) {
		t.Errorf("record %v", rec)
	}
}
