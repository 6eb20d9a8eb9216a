package integration

import (
	"encoding/json"
	"net/http"
	"os"
	"strings"
	"testing"
)

// Upstream references are aleph-vm at commit 6da21a3a.

// The messages aleph-vm's example program asks the network for
// (examples/example_fastapi/main.py there and here).
const (
	diagMessagesHash = "f246f873c3e0f637a15c566e7a465d2ecbb83eaa024d54ccb8fb566b549a929e"
	diagProgramHash  = "3fc0aa9569da840c43e7bd2033c3c580abb46b007527d6d20f2d4e98e867f7af"
)

// allChecks are aleph-vm's sub-checks (views/__init__.py:336-357).
var allChecks = []string{"index", "environ", "messages", "dns", "ipv4", "internet", "cache",
	"persistent_storage", "error_handling", "get_a_message", "lifespan"}

// seedDiagnosticMessages serves real fixture messages under the hashes
// the diagnostic program asks for, as the network would.
func seedDiagnosticMessages(t *testing.T, api *alephAPI) {
	t.Helper()
	for hash, name := range map[string]string{
		diagMessagesHash: "machine.json",
		diagProgramHash:  "program_message_aleph_vm_newest.json",
	} {
		b, err := os.ReadFile("../../internal/message/testdata/aleph-messages/" + name)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		m["item_hash"] = hash
		m["type"] = "PROGRAM"
		api.mu.Lock()
		api.messages[hash] = m
		api.mu.Unlock()
	}
}

// flatChecks GETs /status/check/fastapi and decodes aleph-vm's flat body.
func flatChecks(t *testing.T, s *supervisor) (int, map[string]bool) {
	t.Helper()
	r := s.get("/status/check/fastapi")
	var flat map[string]bool
	if err := json.Unmarshal(r.Body, &flat); err != nil {
		t.Fatalf("/status/check/fastapi: %d %s: %v", r.Status, r.Body, err)
	}
	if len(flat) != len(allChecks) {
		t.Errorf("checks %v, want exactly %v", flat, allChecks)
	}
	return r.Status, flat
}

// wantChecks compares the flat result with want (every check true but
// those listed as failing) and logs the detailed view when they differ.
func wantChecks(t *testing.T, s *supervisor, flat map[string]bool, failing ...string) {
	t.Helper()
	bad := false
	for _, k := range allChecks {
		want := !strings.Contains(" "+strings.Join(failing, " ")+" ", " "+k+" ")
		if flat[k] != want {
			t.Errorf("check %s = %v, want %v", k, flat[k], want)
			bad = true
		}
	}
	if bad {
		t.Logf("detail: %s", s.get("/status/check/fastapi/detail").Body)
	}
}

// The bundled diagnostic program, then an uploaded copy named by
// CHECK_FASTAPI_VM_ID as operators configure it: every check passes but
// those needing the internet, which this supervisor does not give
// (networking off), so the answer is aleph-vm's 503 (views/__init__.py:362-364).
// The uploaded copy's counter then continues across a supervisor restart.
func TestDiagnosticProgramWithoutInternet(t *testing.T) {
	s := startSupervisor(t, "ALEPH_VM_ALLOW_VM_NETWORKING=false")
	seedDiagnosticMessages(t, s.api)

	status, flat := flatChecks(t, s)
	if status != http.StatusServiceUnavailable {
		t.Errorf("status %d, want 503 (internet checks are required)", status)
	}
	wantChecks(t, s, flat, "dns", "ipv4", "internet")

	// Uploaded the way operators do, published with its volume through
	// the (test) Aleph API, and named by CHECK_FASTAPI_VM_ID.
	uploaded := s.upload("../../examples/example_fastapi", "main:app", "--internet")
	hash := s.programWithVolumes(uploaded, []map[string]any{
		{"mount": "/var/lib/example", "persistence": "host", "name": "example-state", "size_mib": 16},
	})
	s.shutdown()
	s.restart("ALEPH_VM_CHECK_FASTAPI_VM_ID=" + hash)
	status, flat = flatChecks(t, s)
	if status != http.StatusServiceUnavailable {
		t.Errorf("uploaded copy: status %d, want 503", status)
	}
	wantChecks(t, s, flat, "dns", "ipv4", "internet")

	// persistent_storage incremented twice from 0: the counter is at 1.
	var before struct{ Counter int }
	r := s.get("/vm/" + hash + "/state/increment")
	expect(t, r, http.StatusOK)
	_ = json.Unmarshal(r.Body, &before)
	s.shutdown()
	s.restart()
	var after struct{ Counter int }
	r = s.get("/vm/" + hash + "/state/increment")
	expect(t, r, http.StatusOK)
	_ = json.Unmarshal(r.Body, &after)
	if before.Counter != 2 || after.Counter != before.Counter+1 {
		t.Errorf("counter %d before the restart, %d after: want 2 then 3", before.Counter, after.Counter)
	}
	// And across a kill -9: the volume holds what the program wrote.
	s.kill9()
	s.restart()
	r = s.get("/vm/" + hash + "/state/increment")
	expect(t, r, http.StatusOK)
	_ = json.Unmarshal(r.Body, &after)
	if after.Counter != before.Counter+2 {
		t.Errorf("counter %d after kill -9 and restart, want %d", after.Counter, before.Counter+2)
	}

	// The detailed view adds crash recovery (status.py:167-182).
	r = s.get("/status/check/fastapi/detail")
	var detail struct {
		Checks map[string]struct{ OK bool } `json:"checks"`
	}
	if err := json.Unmarshal(r.Body, &detail); err != nil || !detail.Checks["crash_and_restart"].OK {
		t.Errorf("detail: %s", r.Body)
	}
}

// With the test internet standing in for the real one (names and
// addresses given to the program through its variables), every check
// passes and the answer is 200.
func TestDiagnosticProgramWithTestInternet(t *testing.T) {
	inet := newTestInternet(t)
	s := startNetworkSupervisor(t, inet)
	seedDiagnosticMessages(t, s.api)
	uploaded := s.upload("../../examples/example_fastapi", "main:app", "--internet",
		"--env", "DIAGNOSTIC_DNS_HOSTNAME="+strings.TrimSuffix(inetName, "."),
		"--env", "DIAGNOSTIC_IPV4_URLS=http://"+inet.Addr.String()+"/",
		"--env", "DIAGNOSTIC_INTERNET_URLS=http://"+strings.TrimSuffix(inetName, ".")+"/")
	hash := s.programWithVolumes(uploaded, []map[string]any{
		{"mount": "/var/lib/example", "persistence": "host", "name": "example-state", "size_mib": 16},
	})
	s.shutdown()
	s.restart("ALEPH_VM_CHECK_FASTAPI_VM_ID=" + hash)
	status, flat := flatChecks(t, s)
	if status != http.StatusOK {
		t.Errorf("status %d, want 200", status)
	}
	wantChecks(t, s, flat)
	if !inet.Asked(inetName) {
		t.Errorf("the program never asked the test internet's DNS for %s", inetName)
	}
}

// The operator and status pages in aleph-vm's shapes, on a real server.
func TestPagesInUpstreamShapes(t *testing.T) {
	s := startSupervisor(t)

	// /status/check/version (views/__init__.py:417-438); errors are JSON
	// from aleph-vm's error_middleware (supervisor.py).
	r := s.get("/status/check/version")
	if r.Status != 400 || string(r.Body) != `{"error": "Query field '?reference=`+"`"+` must be specified"}` {
		t.Errorf("version without reference: %d %q", r.Status, r.Body)
	}
	// The build is internal/version's release, never "0+<commit>".
	r = s.get("/status/check/version?reference=1.0.0")
	server := r.Header.Get("Server")
	current := strings.TrimPrefix(server, "aleph-vm/")
	if r.Status != 200 || string(r.Body) != "Up-to-date: version "+current+" >= 1.0.0" || current == server || strings.HasPrefix(current, "0") {
		t.Errorf("version 1.0.0: %d %q Server %q", r.Status, r.Body, server)
	}
	r = s.get("/status/check/version?reference=99999")
	if r.Status != 403 || string(r.Body) != `{"error": "Outdated: version `+current+` < 99999"}` {
		t.Errorf("version 99999: %d %q", r.Status, r.Body)
	}
	r = s.get("/status/check/version?reference=x.y")
	if r.Status != 400 || string(r.Body) != `{"error": "Invalid version: 'x.y'"}` {
		t.Errorf("version x.y: %d %q", r.Status, r.Body)
	}

	// /about/login (views/__init__.py:151-160).
	cookie := s.loginCookie()
	if cookie.Name != "token" || cookie.Path != "/about" {
		t.Errorf("login cookie %+v", cookie)
	}
	token, _ := os.ReadFile(s.execRoot + "/login_token")
	noFollow := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noFollow.Get(s.base + "/about/login?token=" + strings.TrimSpace(string(token)))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusFound || resp.Header.Get("Location") != "/about/config" {
		t.Errorf("login: %d Location %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	if r := s.get("/about/login?token=wrong"); r.Status != 401 || r.json(t)["success"] != false {
		t.Errorf("bad login: %d %s", r.Status, r.Body)
	}

	// /about/executions/records is an array (views/__init__.py:306-308),
	// /about/executions/list an object by hash (views/__init__.py:237-256),
	// /status/config aleph-vm's public settings (views/__init__.py:442-...).
	hash := s.upload("testdata/probe", "main:app")
	expect(t, s.get("/vm/"+hash+"/"), http.StatusOK)
	r = s.get("/about/executions/list")
	var list map[string]map[string]any
	if err := json.Unmarshal(r.Body, &list); err != nil || list[hash]["vm_type"] != "microvm" {
		t.Errorf("executions/list: %d %s", r.Status, r.Body)
	}
	r = s.get("/about/executions/records")
	var recs []map[string]any
	if err := json.Unmarshal(r.Body, &recs); err != nil || r.Status != 200 {
		t.Errorf("records: %d %s", r.Status, r.Body)
	}
	r = s.get("/status/config")
	cfg := r.json(t)
	for _, k := range []string{"DOMAIN_NAME", "node_hash", "version", "references", "security", "networking", "debug", "payment", "computing"} {
		if _, ok := cfg[k]; !ok {
			t.Errorf("/status/config lacks %s: %s", k, r.Body)
		}
	}
	if cfg["version"] != current {
		t.Errorf("/status/config version %v, Server says %s", cfg["version"], current)
	}

	// CORS on /about and /status (supervisor.py:169-222).
	for _, path := range []string{"/about/executions/records", "/status/config", "/about/usage/system"} {
		req, _ := http.NewRequest("GET", s.base+path, nil)
		req.Header.Set("Origin", "https://monitor.example")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.Header.Get("Access-Control-Allow-Origin") != "https://monitor.example" ||
			resp.Header.Get("Access-Control-Allow-Credentials") != "true" ||
			!strings.Contains(resp.Header.Get("Access-Control-Expose-Headers"), "Server") {
			t.Errorf("GET %s: %v", path, resp.Header)
		}
		req, _ = http.NewRequest("OPTIONS", s.base+path, nil)
		req.Header.Set("Origin", "https://monitor.example")
		req.Header.Set("Access-Control-Request-Method", "GET")
		req.Header.Set("Access-Control-Request-Headers", "X-Requested-With")
		resp, err = client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.Header.Get("Access-Control-Allow-Methods") != "GET" ||
			resp.Header.Get("Access-Control-Allow-Headers") != "X-REQUESTED-WITH" ||
			resp.Header.Get("Access-Control-Allow-Origin") != "https://monitor.example" {
			t.Errorf("OPTIONS %s: %d %v", path, resp.StatusCode, resp.Header)
		}
	}
}
