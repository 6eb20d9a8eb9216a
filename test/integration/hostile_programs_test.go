package integration

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Hostile programs: each attack is either refused or contained, and a
// neighbour program keeps answering throughout. (Cache floods and disk
// fills have tests of their own, beside the guest API and volumes.)
func TestHostileProgramsAreContained(t *testing.T) {
	if hypervisor != "gvisor" {
		t.Skip("VM limits (memory, crash, timeout) are TestLimits'; these attacks target gVisor's sandbox")
	}
	const logBudget = 1 << 20
	s := startSupervisor(t, fmt.Sprintf("ALEPH_VM_PROGRAM_LOG_MAX_BYTES=%d", logBudget))
	hostile := s.upload("testdata/probe", "main:app", "--timeout-seconds", "120", "--env", "ROLE=hostile")
	neighbour := s.upload("testdata/probe", "main:app", "--env", "ROLE=neighbour")
	expect(t, s.get("/vm/"+hostile+"/"), http.StatusOK)
	expect(t, s.get("/vm/"+neighbour+"/"), http.StatusOK)
	pid := s.cmd.Process.Pid

	t.Run("fork bomb", func(t *testing.T) {
		neighbourAnswers(t, s, neighbour, func() {
			r := s.get("/vm/" + hostile + "/fork-bomb?n=100000")
			if r.Status == http.StatusOK {
				b := r.json(t)
				t.Logf("fork bomb: %v", b)
				if b["error"] == nil {
					t.Errorf("100000 processes forked without hitting a limit")
				}
			} else {
				// Contained by the memory limit: the client reads why.
				t.Logf("fork bomb ended its sandbox: %d %s", r.Status, r.Body)
				if r.Status != http.StatusBadGateway || !strings.Contains(string(r.Body), "limit") {
					t.Errorf("fork bomb: %d %s; want a 502 naming the limit it hit", r.Status, r.Body)
				}
			}
		})
	})

	t.Run("CPU bomb", func(t *testing.T) {
		// Memory enough for 8 interpreters: the CPU limit is what is tested.
		burner := s.upload("testdata/probe", "main:app", "--memory", "1024", "--timeout-seconds", "120", "--env", "ROLE=burner")
		expect(t, s.get("/vm/"+burner+"/"), http.StatusOK)
		neighbourAnswers(t, s, neighbour, func() {
			expect(t, s.get("/vm/"+burner+"/cpu-burn?seconds=6&processes=8"), http.StatusOK)
		})
	})

	t.Run("memory bomb", func(t *testing.T) {
		neighbourAnswers(t, s, neighbour, func() {
			r := s.get("/vm/" + hostile + "/memory?mib=4096")
			if r.Status < 500 {
				t.Errorf("a program held 4 GiB with a 128 MiB budget: %d %s", r.Status, r.Body)
			}
		})
		expect(t, s.get("/vm/"+hostile+"/"), http.StatusOK)
	})

	t.Run("log flood", func(t *testing.T) {
		before := len(s.logs.String())
		neighbourAnswers(t, s, neighbour, func() {
			expect(t, s.get("/vm/"+hostile+"/log-flood?mib=100"), http.StatusOK)
		})
		grew := len(s.logs.String()) - before
		t.Logf("100 MiB of program output grew the supervisor log by %d KiB (budget %d KiB)", grew>>10, logBudget>>10)
		// The budget counts messages; records add their attributes.
		if grew > 3*logBudget {
			t.Errorf("the supervisor log grew by %d bytes for a budget of %d", grew, logBudget)
		}
	})

	t.Run("huge response", func(t *testing.T) {
		peaks := watchPeaks(pid, 100*time.Millisecond)
		neighbourAnswers(t, s, neighbour, func() {
			resp, err := client.Get(s.base + "/vm/" + hostile + "/big-response?mib=512")
			if err != nil {
				t.Fatal(err)
			}
			n, err := io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if err != nil || n != 512<<20 {
				t.Errorf("read %d bytes of 512 MiB: %v", n, err)
			}
		})
		peak, _ := peaks()
		t.Logf("supervisor RSS peak while relaying 512 MiB: %d KiB", peak)
		if peak > 200<<10 {
			t.Errorf("the supervisor held %d KiB while relaying a huge response", peak)
		}
	})

	t.Run("other programs' files", func(t *testing.T) {
		w := s.get("/vm/" + neighbour + "/write-file?path=/tmp/neighbour-secret&content=secret").json(t)
		if w["ok"] != true {
			t.Fatalf("the neighbour could not write its own /tmp: %v", w)
		}
		if r := s.get("/vm/" + hostile + "/read-file?path=/tmp/neighbour-secret").json(t); r["ok"] == true {
			t.Errorf("a program read another program's file: %v", r)
		}
	})
}

// neighbourAnswers runs during, an attack, while it asks the neighbour
// program every 300 ms; the neighbour must answer each time, within 5 s.
func neighbourAnswers(t *testing.T, s *supervisor, neighbour string, during func()) {
	t.Helper()
	var slowest, failures atomic.Int64
	var wg sync.WaitGroup
	done := make(chan struct{})
	var once sync.Once
	stop := func() { once.Do(func() { close(done); wg.Wait() }) }
	defer stop() // also when during fails the test
	wg.Go(func() {
		for {
			select {
			case <-done:
				return
			case <-time.After(300 * time.Millisecond):
			}
			begin := time.Now()
			if r := s.get("/vm/" + neighbour + "/"); r.Status != http.StatusOK {
				failures.Add(1)
			}
			if d := time.Since(begin); int64(d) > slowest.Load() {
				slowest.Store(int64(d))
			}
		}
	})
	during()
	stop()
	if failures.Load() > 0 {
		t.Errorf("the neighbour failed %d times during the attack", failures.Load())
	}
	t.Logf("neighbour's slowest answer during the attack: %s", time.Duration(slowest.Load()).Round(time.Millisecond))
	if time.Duration(slowest.Load()) > 5*time.Second {
		t.Errorf("the neighbour took %s to answer", time.Duration(slowest.Load()))
	}
}
