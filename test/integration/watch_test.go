package integration

import (
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

// watchApp keeps the item hashes of the messages it is run with and
// tells them, and its version, over HTTP. Plain ASGI: no framework.
const watchApp = `
import json
VERSION = "%s"
events = []

async def app(scope, receive, send):
    if scope["type"] == "aleph.message":
        event = await receive()
        events.append(json.loads(event["body"])["item_hash"])
        await send({"result": "stored"})
        return
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = (VERSION if scope["path"] == "/version" else json.dumps(events)).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
`

const watchOwner = "0x5aDf5a1A9Ba9E4e6E4f1Ee9cCd0fbAfD0D0F4c01"

func watchCode(t *testing.T, version string) []byte {
	return zipBytes(t, map[string]string{"main.py": strings.Replace(watchApp, "%s", version, 1)}, nil)
}

// until polls get(path) until check accepts the answer.
func (s *supervisor) until(t *testing.T, what, path string, within time.Duration, check func(response) bool) response {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		r := s.get(path)
		if check(r) {
			return r
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: last answer %d %s", what, r.Status, r.Body)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

// TestWatchMessages follows one program published on the network through
// the message stream: a PROGRAM message subscribes it, a matching POST
// runs it, the API's websocket restarting loses nothing (the message
// published meanwhile is caught up), an amend of its code makes the next
// request run the new code, and a FORGET stops it for good.
func TestWatchMessages(t *testing.T) {
	s := startSupervisor(t)
	api := s.api
	waitConnections := func(n int) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for api.connections() < n {
			if time.Now().After(deadline) {
				t.Fatalf("the supervisor made %d websocket connections, want %d", api.connections(), n)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	waitConnections(1)

	program, codeRef := publishWatchedProgram(t, s)
	events := func() []string {
		r := s.get("/vm/" + program + "/events")
		var out []string
		if r.Status != http.StatusOK || json.Unmarshal(r.Body, &out) != nil {
			t.Fatalf("events: %d %s", r.Status, r.Body)
		}
		return out
	}
	post := func(channel string, n int) string {
		return api.publish(t, "POST", watchOwner, channel, map[string]any{
			"type": "test", "address": watchOwner, "time": float64(time.Now().Unix()), "content": map[string]any{"n": n},
		})
	}

	// No request yet: the POST alone starts the program.
	ignored := post("OTHER", 0)
	first := post("WATCHTEST", 1)
	deadline := time.Now().Add(120 * time.Second)
	for s.runningExecutions() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the matching POST did not start the subscribed program")
		}
		time.Sleep(200 * time.Millisecond)
	}
	s.until(t, "the program ran with the POST", "/vm/"+program+"/events", 60*time.Second, func(r response) bool {
		return strings.Contains(string(r.Body), first)
	})
	if got := events(); slices.Contains(got, ignored) || len(got) != 1 {
		t.Fatalf("events %v: want only %s (%s is on another channel)", got, first, ignored)
	}

	t.Run("the stream recovers after the API restarts", func(t *testing.T) {
		api.stopStream()
		missed := post("WATCHTEST", 2) // stored while nobody listens
		time.Sleep(time.Second)
		api.restart(t)
		waitConnections(2)
		after := post("WATCHTEST", 3)
		s.until(t, "the catch-up delivered the missed message", "/vm/"+program+"/events", 60*time.Second, func(r response) bool {
			return strings.Contains(string(r.Body), missed) && strings.Contains(string(r.Body), after)
		})
		if got := events(); len(got) != 3 {
			t.Fatalf("events %v: want 3, each once", got)
		}
	})

	t.Run("an amend of the code runs the new code", func(t *testing.T) {
		r := s.get("/vm/" + program + "/version")
		if r.Status != http.StatusOK || string(r.Body) != "v1" {
			t.Fatalf("version: %d %s", r.Status, r.Body)
		}
		api.publishFile(t, watchOwner, watchCode(t, "v2"), codeRef)
		s.until(t, "the amended code answers", "/vm/"+program+"/version", 120*time.Second, func(r response) bool {
			return r.Status == http.StatusOK && string(r.Body) == "v2"
		})
		if !strings.Contains(s.logs.String(), "ref of a running program was amended") {
			t.Error("the supervisor did not say it stopped the program for the amend")
		}
	})

	t.Run("a FORGET stops the program and makes it unknown", func(t *testing.T) {
		if s.runningExecutions() != 1 {
			t.Fatalf("%d executions running, want 1", s.runningExecutions())
		}
		api.unpublish(program)
		api.publish(t, "FORGET", watchOwner, "WATCHTEST", map[string]any{
			"address": watchOwner, "time": float64(time.Now().Unix()), "hashes": []string{program}, "reason": "test",
		})
		deadline := time.Now().Add(60 * time.Second)
		for s.runningExecutions() != 0 {
			if time.Now().After(deadline) {
				t.Fatal("the forgotten program still runs")
			}
			time.Sleep(200 * time.Millisecond)
		}
		expect(t, s.get("/vm/"+program+"/version"), http.StatusNotFound)
		// Nor is it run by messages any more.
		post("WATCHTEST", 4)
		time.Sleep(2 * time.Second)
		if n := s.runningExecutions(); n != 0 {
			t.Fatalf("%d executions after a message for the forgotten program", n)
		}
	})
}

// publishWatchedProgram publishes watchApp v1 (code followed with
// use_latest) subscribed to POSTs on channel WATCHTEST.
func publishWatchedProgram(t *testing.T, s *supervisor) (program, codeRef string) {
	t.Helper()
	api := s.api
	runtime := s.addRuntime(runtimeFile)
	codeRef = api.publishFile(t, watchOwner, watchCode(t, "v1"), "")
	program = api.publish(t, "PROGRAM", watchOwner, "WATCHTEST", map[string]any{
		"type": "vm-function", "address": watchOwner, "time": 1700000000.0, "allow_amend": false,
		"code":    map[string]any{"encoding": "zip", "entrypoint": "main:app", "ref": codeRef, "use_latest": true},
		"runtime": map[string]any{"ref": runtime, "use_latest": false, "comment": ""},
		"on":      map[string]any{"http": true, "message": []any{map[string]any{"channel": "WATCHTEST", "type": "POST"}}},
		"environment": map[string]any{
			"reproducible": false, "internet": false, "aleph_api": false, "shared_cache": false,
		},
		"resources": map[string]any{"vcpus": 1, "memory": 256, "seconds": 30},
	})
	return program, codeRef
}
