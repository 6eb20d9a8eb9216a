package main

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// eventsApp answers aleph.message events the way aleph-sdk's AlephApp
// hands them to a handler, and tells over HTTP what it saw.
const eventsApp = `
import json, os
seen = []

async def app(scope, receive, send):
    if scope["type"] == "aleph.message":
        event = await receive()
        msg = json.loads(event["body"])
        if msg.get("channel") == "RAISE":
            raise RuntimeError("event handler failed on purpose")
        seen.append({"scope": scope, "event_type": event["type"], "channel": msg["channel"]})
        await send({"result": "Good", "channel": msg["channel"]})
        return
    if scope["type"] != "http":
        return
    await receive()
    body = json.dumps({"seen": seen, "token_visible": "_ALEPH_EVENT_TOKEN" in os.environ}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
`

func TestLauncherDeliversAlephMessages(t *testing.T) {
	cfg := guest.Config{Entrypoint: "events:app", AlephEnv: map[string]string{"_ALEPH_EVENT_TOKEN": "s3cret"}}
	l, err := startLauncher(t, cfg, codeDir(t, map[string]string{"events.py": eventsApp}))
	if err != nil {
		t.Fatal(err)
	}
	post := func(token, body string) (int, string) {
		req, _ := http.NewRequest(http.MethodPost, "http://program/", strings.NewReader(body))
		if token != "" {
			req.Header.Set("Aleph-Event-Token", token)
		}
		resp, err := l.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return resp.StatusCode, string(b)
	}

	code, body := post("s3cret", `{"channel":"TEST","type":"POST"}`)
	if code != 200 || body != `{"result": "Good", "channel": "TEST"}` {
		t.Fatalf("event: %d %s", code, body)
	}
	// A wrong token is an ordinary HTTP request.
	if code, body := post("guess", `{"channel":"FORGED"}`); code != 200 || strings.Contains(body, "FORGED") {
		t.Fatalf("forged event: %d %s", code, body)
	}
	if code, body := post("s3cret", `{"channel":"RAISE"}`); code != 500 || !strings.Contains(body, "event handler failed on purpose") {
		t.Fatalf("failing handler: %d %s", code, body)
	}
	_, _, seen := l.get(t, "/")
	want := `{"seen": [{"scope": {"type": "aleph.message"}, "event_type": "aleph.message", "channel": "TEST"}], "token_visible": false}`
	if seen != want {
		t.Fatalf("app saw %s\nwant %s", seen, want)
	}
}
