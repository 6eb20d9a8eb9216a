package integration

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey/nodekeytest"
	"github.com/aleph-vm-go/vm-supervisor/internal/ownerauth"
)

// Attacks through the Aleph message stream (issue 20, findings 3, 6 and
// 9): anyone can publish a message, so what the supervisor does on one
// must be bounded by who sent it and by how many arrive.

const msgsStranger = "0x000000000000000000000000000000000000dEaD"

// msgsStreamOnly sends a message on the API's websocket without storing
// it: a message the API will not confirm. It returns its item hash.
func msgsStreamOnly(t *testing.T, api *alephAPI, typ, sender, channel string, content map[string]any) string {
	t.Helper()
	frame, hash := msgsFrame(t, typ, sender, channel, content)
	api.stream.mu.Lock()
	for out := range api.stream.conns {
		out <- frame
	}
	api.stream.mu.Unlock()
	return hash
}

// msgsFrame is a message as the websocket carries it.
func msgsFrame(t *testing.T, typ, sender, channel string, content map[string]any) ([]byte, string) {
	t.Helper()
	raw, err := json.Marshal(content)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(raw)
	hash := hex.EncodeToString(sum[:])
	frame, err := json.Marshal(map[string]any{
		"item_hash": hash, "type": typ, "chain": "ETH", "sender": sender,
		"channel": channel, "item_type": "inline", "item_content": string(raw),
		"time": float64(time.Now().UnixNano()) / 1e9, "signature": "0x00", "confirmed": true,
	})
	if err != nil {
		t.Fatal(err)
	}
	return frame, hash
}

// msgsWaitLog waits until the supervisor's log holds want n times (an
// error if it does not within the delay).
func msgsWaitLog(t *testing.T, s *supervisor, want string, n int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for strings.Count(s.logs.String(), want) < n {
		if time.Now().After(deadline) {
			t.Errorf("the supervisor did not log %q %d times within %s", want, n, within)
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// msgsWaitStream waits for the supervisor's first websocket connection.
func msgsWaitStream(t *testing.T, s *supervisor) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for s.api.connections() < 1 {
		if time.Now().After(deadline) {
			t.Fatal("the supervisor did not connect to the message stream")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// msgsExecutionID is the id of the running execution of program, or "".
func msgsExecutionID(t *testing.T, s *supervisor, program string) string {
	t.Helper()
	for _, e := range s.executions(t) {
		if e["vm_hash"] == program {
			id, _ := e["uuid"].(string)
			return id
		}
	}
	return ""
}

func msgsForget(t *testing.T, api *alephAPI, sender string, hashes ...string) string {
	return api.publish(t, "FORGET", sender, "WATCHTEST", map[string]any{
		"address": sender, "time": float64(time.Now().UnixNano()) / 1e9, "hashes": hashes, "reason": "attack",
	})
}

// TestMsgsForgetByStranger: a FORGET of a running program by another
// address than its owner, even one the API serves, leaves it answering
// with the same execution; a FORGET by the owner seen only on the
// websocket (not confirmed by the API) too; a FORGET of a program of the
// local store, even by its owner's address, never makes it unknown; the
// owner's confirmed FORGET stops the program and it answers 404.
func TestMsgsForgetByStranger(t *testing.T) {
	backendIndependent(t)
	s := startSupervisor(t)
	api := s.api
	msgsWaitStream(t, s)
	program, _ := publishWatchedProgram(t, s)
	local := s.upload("testdata/probe", "main:app")
	expectBody(t, s.get("/vm/"+program+"/version"), http.StatusOK, "v1")
	expect(t, s.get("/vm/"+local+"/"), http.StatusOK)
	before := msgsExecutionID(t, s, program)
	if before == "" {
		t.Fatalf("no running execution of %s", program)
	}

	// The stranger's FORGET is on the API (as a relay would serve a
	// message it has not judged yet) and on the stream.
	msgsForget(t, api, msgsStranger, program, local)
	msgsWaitLog(t, s, "FORGET by another address than the owner: ignored", 1, 30*time.Second)
	// Its owner's address, but for a program of the local store.
	msgsForget(t, api, "0x0000000000000000000000000000000000000000", local)
	msgsWaitLog(t, s, "FORGET of a program of the local store: ignored", 2, 30*time.Second)
	// The owner's, but only on the stream: the API does not know it.
	msgsStreamOnly(t, api, "FORGET", watchOwner, "WATCHTEST", map[string]any{
		"address": watchOwner, "time": float64(time.Now().UnixNano()) / 1e9, "hashes": []string{program}, "reason": "forged",
	})
	msgsWaitLog(t, s, "FORGET not confirmed by the Aleph API: ignored", 1, 60*time.Second)
	time.Sleep(time.Second)

	expectBody(t, s.get("/vm/"+program+"/version"), http.StatusOK, "v1")
	expect(t, s.get("/vm/"+local+"/"), http.StatusOK)
	if after := msgsExecutionID(t, s, program); after != before {
		t.Fatalf("the program was restarted by a foreign FORGET:\nbefore %s\nafter  %s", before, after)
	}

	// The owner's FORGET, confirmed by the API, stops it for good.
	api.unpublish(program)
	msgsForget(t, api, watchOwner, program)
	deadline := time.Now().Add(60 * time.Second)
	for {
		r := s.get("/vm/" + program + "/version")
		if r.Status == http.StatusNotFound {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the owner's FORGET did not make the program unknown: %d %s", r.Status, r.Body)
		}
		time.Sleep(300 * time.Millisecond)
	}
	if id := msgsExecutionID(t, s, program); id != "" {
		t.Fatalf("the forgotten program still runs: execution %s", id)
	}
	// The local program, its neighbour, is untouched.
	expect(t, s.get("/vm/"+local+"/"), http.StatusOK)
}

// TestMsgsAmendByStranger: a STORE amending the code ref a running
// program follows (use_latest), sent by another address, leaves the
// program warm (same execution, same code), also when the stranger's
// content claims the owner's address without a delegation; the owner's
// amend stops it and the next request runs the new code.
func TestMsgsAmendByStranger(t *testing.T) {
	backendIndependent(t)
	s := startSupervisor(t)
	api := s.api
	msgsWaitStream(t, s)
	program, codeRef := publishWatchedProgram(t, s)
	expectBody(t, s.get("/vm/"+program+"/version"), http.StatusOK, "v1")
	before := msgsExecutionID(t, s, program)
	if before == "" {
		t.Fatalf("no running execution of %s", program)
	}

	api.publishFile(t, msgsStranger, watchCode(t, "evil"), codeRef)
	// Claiming to act for the owner, without the owner's delegation.
	data := watchCode(t, "evil2")
	sum := sha256.Sum256(data)
	api.mu.Lock()
	api.files[hex.EncodeToString(sum[:])] = data
	api.mu.Unlock()
	api.publish(t, "STORE", msgsStranger, "TEST", map[string]any{
		"address": watchOwner, "time": float64(time.Now().UnixNano()) / 1e9,
		"item_type": "storage", "item_hash": hex.EncodeToString(sum[:]), "size": len(data), "ref": codeRef,
	})
	msgsWaitLog(t, s, "amend of a followed ref by another address than its owner: ignored", 2, 30*time.Second)
	time.Sleep(time.Second)
	expectBody(t, s.get("/vm/"+program+"/version"), http.StatusOK, "v1")
	if after := msgsExecutionID(t, s, program); after != before {
		t.Fatalf("a stranger's amend restarted the program:\nbefore %s\nafter  %s", before, after)
	}

	api.publishFile(t, watchOwner, watchCode(t, "v2"), codeRef)
	s.until(t, "the owner's amend runs the new code", "/vm/"+program+"/version", 120*time.Second, func(r response) bool {
		return r.Status == http.StatusOK && string(r.Body) == "v2"
	})
}

// msgsSlowApp takes each message for 200 ms: deliveries pile up.
const msgsSlowApp = `
import asyncio

async def app(scope, receive, send):
    if scope["type"] == "aleph.message":
        await receive()
        await asyncio.sleep(0.2)
        await send({"result": "ok"})
        return
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"slow"})
`

// msgsFDs counts the open file descriptors of process pid.
func msgsFDs(t *testing.T, pid int) int {
	t.Helper()
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// TestMsgsFlood: thousands of messages matching a program's on.message
// filter, streamed as fast as the supervisor reads them, cost a bounded
// number of goroutines and file descriptors (deliveries are queued per
// program with a bounded backlog and bounded concurrency), the drops are
// counted in /metrics, and the node and a neighbour program keep
// answering meanwhile.
func TestMsgsFlood(t *testing.T) {
	backendIndependent(t)
	const messages = 5000
	s := startSupervisor(t, "ALEPH_VM_MESSAGE_QUEUE_SIZE=32", "ALEPH_VM_MESSAGE_DELIVERIES=4", "ALEPH_VM_MESSAGE_DELIVERIES_TOTAL=8")
	api := s.api
	msgsWaitStream(t, s)
	runtime := s.addRuntime(runtimeFile)
	codeRef := api.publishFile(t, watchOwner, zipBytes(t, map[string]string{"main.py": msgsSlowApp}, nil), "")
	program := api.publish(t, "PROGRAM", watchOwner, "FLOOD", map[string]any{
		"type": "vm-function", "address": watchOwner, "time": 1700000000.0, "allow_amend": false,
		"code":    map[string]any{"encoding": "zip", "entrypoint": "main:app", "ref": codeRef, "use_latest": false},
		"runtime": map[string]any{"ref": runtime, "use_latest": false, "comment": ""},
		"on":      map[string]any{"http": true, "message": []any{map[string]any{"channel": "FLOOD", "type": "POST"}}},
		"environment": map[string]any{
			"reproducible": false, "internet": false, "aleph_api": false, "shared_cache": false,
		},
		"resources": map[string]any{"vcpus": 1, "memory": 256, "seconds": 30},
	})
	neighbour := s.upload("testdata/probe", "main:app")
	expectBody(t, s.get("/vm/"+program+"/"), http.StatusOK, "slow")
	expect(t, s.get("/vm/"+neighbour+"/"), http.StatusOK)
	pid := s.cmd.Process.Pid
	fdsBefore := msgsFDs(t, pid)
	goroutinesBefore := metricValue(metricsOf(t, s), "go_goroutines", "", "")
	t.Logf("before the flood: %d fds, %.0f goroutines", fdsBefore, goroutinesBefore)

	// Sample the supervisor while the flood is under way.
	stopSampling := msgsSampleWhileFlooded(s, pid, neighbour)

	start := time.Now()
	for i := range messages {
		frame, _ := msgsFrame(t, "POST", msgsStranger, "FLOOD", map[string]any{
			"type": "flood", "address": msgsStranger, "time": float64(time.Now().UnixNano()) / 1e9, "content": map[string]any{"n": i},
		})
		api.stream.mu.Lock()
		for out := range api.stream.conns {
			out <- frame
		}
		api.stream.mu.Unlock()
	}
	t.Logf("streamed %d messages in %s", messages, time.Since(start))
	// Let the deliveries under way and queued run.
	time.Sleep(5 * time.Second)
	worst := stopSampling()

	fams := metricsOf(t, s)
	dropped := metricValue(fams, "aleph_vm_message_deliveries_dropped_total", "", "")
	t.Logf("during the flood: at most %d fds (before %d), %d goroutines (before %.0f); neighbour at worst %s; %.0f deliveries dropped",
		worst.fds, fdsBefore, worst.goroutines, goroutinesBefore, worst.neighbourTook, dropped)
	if dropped < messages/2 {
		t.Errorf("%.0f deliveries dropped and counted, want most of the %d (the program takes 200 ms each, 4 at a time)", dropped, messages)
	}
	// Bounded: 8 deliveries under way at most, each a connection and a
	// few goroutines; the rest of the node is the same as before.
	if worst.fds > fdsBefore+64 {
		t.Errorf("the supervisor held %d fds during the flood, %d before: deliveries are not bounded", worst.fds, fdsBefore)
	}
	if float64(worst.goroutines) > goroutinesBefore+200 {
		t.Errorf("the supervisor ran %d goroutines during the flood, %.0f before: deliveries are not bounded", worst.goroutines, goroutinesBefore)
	}
	if worst.neighbourErr != "" || worst.neighbourTook > 5*time.Second {
		t.Errorf("the neighbour program: %q, slowest answer %s during the flood", worst.neighbourErr, worst.neighbourTook)
	}
	if n := strings.Count(s.logs.String(), "message deliveries dropped"); n == 0 || n > 10 {
		t.Errorf("the drops were logged %d times: want a few reports, not one per message", n)
	}
	expect(t, s.get("/vm/"+neighbour+"/"), http.StatusOK)
	expectBody(t, s.get("/vm/"+program+"/"), http.StatusOK, "slow")
}

// TestMsgsControlReplay: a captured owner request (its two signed
// headers) cannot be sent again: the owner's stop works once, and the
// same headers replayed once the program runs again are refused with 401
// and leave it running; a replayed logs read is refused too.
func TestMsgsControlReplay(t *testing.T) {
	backendIndependent(t)
	s := startSupervisor(t, "ALEPH_VM_DOMAIN_NAME="+controlDomain)
	owner := nodekeytest.Fixed(t, 0x11)
	hash := s.republish(s.upload("testdata/probe", "main:app"), func(c map[string]any) {
		c["address"] = owner.Address()
	})
	expect(t, s.get("/vm/"+hash+"/"), http.StatusOK)
	mine := credentials(t, owner, time.Now().Add(time.Hour))
	base := "/control/machine/" + hash
	captured := func(method, path string) *http.Request {
		h, err := mine.Headers(ownerauth.NewOperation(method, path, controlDomain))
		if err != nil {
			t.Fatal(err)
		}
		req, err := http.NewRequest(method, s.base+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header = h
		return req
	}
	replay := func(req *http.Request) *http.Request {
		again, _ := http.NewRequest(req.Method, req.URL.String(), nil)
		again.Header = req.Header.Clone()
		return again
	}

	stop := captured("POST", base+"/stop")
	expectBody(t, s.send(replay(stop)), http.StatusOK, "Stopped VM with ref "+hash)
	expect(t, s.get("/vm/"+hash+"/"), http.StatusOK) // running again
	r := s.send(replay(stop))
	if r.Status != http.StatusUnauthorized || r.json(t)["error"] != "Operation already used" {
		t.Fatalf("replayed stop: %d %s, want 401 Operation already used", r.Status, r.Body)
	}
	if n := s.runningExecutions(); n != 1 {
		t.Fatalf("%d executions after a replayed stop, want 1", n)
	}

	logs := captured("GET", base+"/logs")
	expect(t, s.send(replay(logs)), http.StatusOK)
	if r := s.send(replay(logs)); r.Status != http.StatusUnauthorized {
		t.Fatalf("replayed logs read: %d %s, want 401", r.Status, r.Body)
	}
	// A new operation of the same key still works.
	expect(t, s.signed(mine, "GET", base+"/logs"), http.StatusOK)
}

// msgsSample is the worst the supervisor did while sampled.
type msgsSample struct {
	fds, goroutines int
	neighbourErr    string
	neighbourTook   time.Duration
}

// msgsSampleWhileFlooded samples the supervisor's fds and goroutines, and
// a neighbour's answers, every 200 ms until the returned stop is called.
func msgsSampleWhileFlooded(s *supervisor, pid int, neighbour string) (stop func() msgsSample) {
	done := make(chan struct{})
	samples := make(chan msgsSample, 1)
	go func() {
		var worst msgsSample
		probe := &http.Client{Timeout: 10 * time.Second}
		for {
			select {
			case <-done:
				samples <- worst
				return
			case <-time.After(200 * time.Millisecond):
			}
			entries, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
			worst.fds = max(worst.fds, len(entries))
			start := time.Now()
			resp, err := probe.Get(s.base + "/vm/" + neighbour + "/")
			took := time.Since(start)
			worst.neighbourTook = max(worst.neighbourTook, took)
			switch {
			case err != nil:
				worst.neighbourErr = err.Error()
			case resp.StatusCode != http.StatusOK:
				worst.neighbourErr = resp.Status
			}
			if resp != nil {
				resp.Body.Close()
			}
			if resp, err := probe.Get(s.base + "/metrics"); err == nil {
				var body strings.Builder
				buf := make([]byte, 64<<10)
				for {
					n, err := resp.Body.Read(buf)
					body.Write(buf[:n])
					if err != nil {
						break
					}
				}
				resp.Body.Close()
				for _, line := range strings.Split(body.String(), "\n") {
					var n int
					if _, err := fmt.Sscanf(line, "go_goroutines %d", &n); err == nil {
						worst.goroutines = max(worst.goroutines, n)
					}
				}
			}
		}
	}()

	return func() msgsSample {
		close(done)
		return <-samples
	}
}
