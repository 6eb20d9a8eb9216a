package network

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestForwardingRestoredByTheLastUser(t *testing.T) {
	dir := t.TempDir()
	sw := filepath.Join(dir, "ip_forward")
	old := ipForward
	ipForward = sw
	t.Cleanup(func() { ipForward = old })
	set := func(v string) {
		if err := os.WriteFile(sw, []byte(v+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	get := func() string {
		b, err := os.ReadFile(sw)
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	who := func(pid int) lease {
		start, err := processStart(pid)
		if err != nil {
			t.Fatal(err)
		}
		return lease{OwnerPID: pid, OwnerStart: start}
	}
	self, other := who(os.Getpid()), who(1)
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	dead := lease{OwnerPID: cmd.Process.Pid, OwnerStart: 1}
	f := forwarding(filepath.Join(dir, "forwarding"))

	set("0")
	for _, l := range []lease{self, other} {
		if err := f.enable(l); err != nil {
			t.Fatal(err)
		}
	}
	if get() != "1" {
		t.Fatalf("forwarding %s after enable", get())
	}
	if restored, err := f.release(self); err != nil || restored || get() != "1" {
		t.Errorf("first of two users stopped: restored %v, %v, forwarding %s; want it left on", restored, err, get())
	}
	if restored, err := f.release(other); err != nil || !restored || get() != "0" {
		t.Errorf("last user stopped: restored %v, %v, forwarding %s; want 0 again", restored, err, get())
	}

	// A crashed run (its user file names a dead process) and a restart:
	// the value saved by the crashed run is what comes back.
	if err := f.enable(dead); err != nil {
		t.Fatal(err)
	}
	if err := f.enable(self); err != nil {
		t.Fatal(err)
	}
	if restored, err := f.release(self); err != nil || !restored || get() != "0" {
		t.Errorf("after a crash: restored %v, %v, forwarding %s; want 0 again", restored, err, get())
	}

	// On before any supervisor: left on.
	set("1")
	if err := f.enable(self); err != nil {
		t.Fatal(err)
	}
	if restored, err := f.release(self); err != nil || restored || get() != "1" {
		t.Errorf("forwarding that was on before: restored %v, %v, now %s; want left on", restored, err, get())
	}
}
