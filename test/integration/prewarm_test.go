package integration

import (
	"net/http"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// runscContainers lists the runsc containers of this supervisor.
func (s *supervisor) runscContainers() []string {
	out, _ := exec.Command("runsc", "--root", filepath.Join(s.execRoot, "runsc"), "list", "-quiet").Output()
	return strings.Fields(string(out))
}

// With PREWARM (the default under gVisor) a sandbox waits, before any
// request, for a program on the default runtime with default resources;
// the first request runs in that very sandbox, and another spare follows.
func TestPrewarmedSpareServesTheColdStart(t *testing.T) {
	if hypervisor != "gvisor" {
		t.Skip("spares are a gVisor feature: VMs receive their code as a drive at boot")
	}
	s := startSupervisor(t)
	hash := s.upload("testdata/probe", "main:app")
	online := s.upload("testdata/probe", "main:app", "--internet")

	// One spare for programs without the internet, one for programs with
	// it (networking is on by default).
	var spares []string
	for deadline := time.Now().Add(60 * time.Second); len(spares) != 2; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("want 2 spare sandboxes after 60s, have %v", spares)
		}
		spares = s.runscContainers()
	}
	if n := s.runningExecutions(); n != 0 {
		t.Fatalf("spares count as %d executions", n)
	}
	ranIn := map[string]string{}
	for _, h := range []string{hash, online} {
		expect(t, s.get("/vm/"+h+"/"), http.StatusOK)
		token := s.loginCookie()
		req, _ := http.NewRequest("GET", s.base+"/about/executions", nil)
		req.AddCookie(token)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range decodeList(t, resp) {
			if e["vm_hash"] == h {
				ranIn[h], _ = e["uuid"].(string)
			}
		}
		resp.Body.Close()
	}
	if ranIn[hash] == ranIn[online] || !slices.Contains(spares, ranIn[hash]) || !slices.Contains(spares, ranIn[online]) {
		t.Errorf("the requests did not run in the spares %v: %v", spares, ranIn)
	}
	// A program with other resources does not fit the spare: it starts fresh.
	big := s.upload("testdata/probe", "main:app", "--memory", "256")
	expect(t, s.get("/vm/"+big+"/"), http.StatusOK)
}

// Code that ships its own copy of a module the spare's interpreter has
// already imported gets its own copy, not the runtime's.
func TestVendoredModuleWinsOverPreload(t *testing.T) {
	s := startSupervisor(t)
	hash := s.upload("testdata/vendored", "main:app")
	r := s.get("/vm/" + hash + "/")
	expect(t, r, http.StatusOK)
	if got := r.json(t)["fastapi"]; got != "vendored" {
		t.Errorf("program imported the %s fastapi, want its vendored one", got)
	}
}
