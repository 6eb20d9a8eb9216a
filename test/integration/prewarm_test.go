package integration

import (
	"net/http"
	"os/exec"
	"path/filepath"
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

	var spare []string
	for deadline := time.Now().Add(60 * time.Second); len(spare) != 1; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no spare sandbox after 60s: %v", spare)
		}
		spare = s.runscContainers()
	}
	if n := s.runningExecutions(); n != 0 {
		t.Fatalf("a spare counts as %d executions", n)
	}
	r := s.get("/vm/" + hash + "/")
	expect(t, r, http.StatusOK)

	token := s.loginCookie()
	req, _ := http.NewRequest("GET", s.base+"/about/executions", nil)
	req.AddCookie(token)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	execs := decodeList(t, resp)
	if len(execs) != 1 || execs[0]["uuid"] != spare[0] {
		t.Errorf("the request did not run in the spare %s: executions %v", spare[0], execs)
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
