package integration

import (
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// diskSandboxIDs names every sandbox of s that has a state directory
// (executions and spares alike): the ids its cgroups are named after.
func diskSandboxIDs(s *supervisor) []string {
	entries, _ := os.ReadDir(filepath.Join(s.execRoot, "executions"))
	var ids []string
	for _, e := range entries {
		ids = append(ids, e.Name())
	}
	return ids
}

// diskCgroupsOf lists the cgroup directories of ids in the memory, cpuacct
// and blkio hierarchies (and every other one, through cgroupsNamed).
func diskCgroupsOf(ids []string) []string { return cgroupsNamed(ids) }

// Finding 11 of issue 20: after kill -9, the sandboxes' memory, cpuacct
// and blkio cgroups (and runsc's own) stayed forever. After a restart,
// none of the killed run's cgroups may remain, spares' included.
func TestHostileDiskCgroupsAfterKill9(t *testing.T) {
	if hypervisor != "gvisor" {
		t.Skip("cgroups of sandboxes are gVisor's; VMs are swept by TestNetworkNothingLeaksAfterKill9")
	}
	s := startSupervisor(t)
	var hashes []string
	for i := range 3 {
		hashes = append(hashes, s.upload("testdata/probe", "main:app", "--env", "ROLE=cg"+itoa(i)))
	}
	for _, h := range hashes {
		expect(t, s.get("/vm/"+h+"/"), http.StatusOK)
	}
	// Let spares come up too: their cgroups are ours as well.
	time.Sleep(3 * time.Second)
	ids := diskSandboxIDs(s)
	if len(ids) < len(hashes) {
		t.Fatalf("%d sandbox directories for %d running programs", len(ids), len(hashes))
	}
	before := diskCgroupsOf(ids)
	var memory int
	for _, d := range before {
		if filepath.Base(filepath.Dir(filepath.Dir(d))) == "memory" {
			memory++
		}
	}
	if memory < len(hashes) {
		t.Fatalf("only %d memory cgroups named after the sandboxes %v (%v): the check looks in the wrong place", memory, ids, before)
	}
	t.Logf("before kill -9: %d sandboxes, %d cgroup directories", len(ids), len(before))

	s.kill9()
	s.restart("ALEPH_VM_PREWARM=false")
	left := diskCgroupsOf(ids)
	t.Logf("after restart: %d cgroup directories of the killed run", len(left))
	for _, d := range left {
		t.Errorf("cgroup of the killed run left: %s", d)
	}
	// The node still serves.
	expect(t, s.get("/vm/"+hashes[0]+"/"), http.StatusOK)
}
