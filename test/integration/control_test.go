package integration

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"

	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey"
	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey/nodekeytest"
	"github.com/aleph-vm-go/vm-supervisor/internal/ownerauth"
)

const controlDomain = "node.test"

func credentials(t *testing.T, w *nodekey.Key, expires time.Time) *ownerauth.Credentials {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	c, err := ownerauth.Authorize(w, key, controlDomain, expires)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// signed sends method path with c's headers for that operation.
func (s *supervisor) signed(c *ownerauth.Credentials, method, path string) response {
	s.t.Helper()
	h, err := c.Headers(ownerauth.NewOperation(method, path, controlDomain))
	if err != nil {
		s.t.Fatal(err)
	}
	req, err := http.NewRequest(method, s.base+path, nil)
	if err != nil {
		s.t.Fatal(err)
	}
	req.Header = h
	return s.send(req)
}

func (s *supervisor) send(req *http.Request) response {
	s.t.Helper()
	resp, err := client.Do(req)
	if err != nil {
		s.t.Fatalf("%s %s: %v", req.Method, req.URL.Path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		s.t.Fatalf("%s %s: reading body: %v", req.Method, req.URL.Path, err)
	}
	return response{Status: resp.StatusCode, Header: resp.Header, Body: b}
}

func expectBody(t *testing.T, r response, status int, body string) {
	t.Helper()
	if r.Status != status || string(r.Body) != body {
		t.Fatalf("got %d %q, want %d %q", r.Status, r.Body, status, body)
	}
}

// logStream opens stream_logs and authenticates with c.
func (s *supervisor) logStream(ctx context.Context, c *ownerauth.Credentials, hash string) (*websocket.Conn, map[string]string) {
	t := s.t
	t.Helper()
	path := "/control/machine/" + hash + "/stream_logs"
	conn, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(s.base, "http")+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.CloseNow() })
	auth, err := c.AuthMessage(ownerauth.NewOperation(http.MethodGet, path, controlDomain))
	if err != nil {
		t.Fatal(err)
	}
	if err := conn.Write(ctx, websocket.MessageText, auth); err != nil {
		t.Fatal(err)
	}
	var status map[string]string
	if err := wsjson.Read(ctx, conn, &status); err != nil {
		t.Fatal(err)
	}
	return conn, status
}

// readUntil reads stream lines until one's message is want.
func readUntil(ctx context.Context, t *testing.T, conn *websocket.Conn, want string) map[string]string {
	t.Helper()
	for {
		var line map[string]string
		if err := wsjson.Read(ctx, conn, &line); err != nil {
			t.Fatalf("waiting for %q: %v", want, err)
		}
		if line["message"] == want {
			return line
		}
	}
}

// TestOwnerControl: the owner of a program (a wallet that signed an
// ephemeral key, which signs each operation) reads its logs, follows them
// live over the websocket and stops it; another wallet gets 403, and a
// forged or expired key 401, with aleph-vm's bodies.
func TestOwnerControl(t *testing.T) {
	s := startSupervisor(t, "ALEPH_VM_DOMAIN_NAME="+controlDomain)
	owner, other := nodekeytest.Fixed(t, 0x11), nodekeytest.Fixed(t, 0x22)
	hash := s.republish(s.upload("testdata/probe", "main:app"), func(c map[string]any) {
		c["address"] = owner.Address()
	})
	expect(t, s.get("/vm/"+hash+"/print?text=before-stream"), http.StatusOK)

	mine := credentials(t, owner, time.Now().Add(time.Hour))
	theirs := credentials(t, other, time.Now().Add(time.Hour))
	expired := credentials(t, owner, time.Now().Add(-time.Minute))
	forged := *mine
	forged.PubKey.Signature = theirs.PubKey.Signature
	base := "/control/machine/" + hash

	// Refusals first, while the program runs.
	expectBody(t, s.signed(theirs, "POST", base+"/stop"), 403, "Unauthorized sender")
	expectBody(t, s.signed(theirs, "GET", base+"/logs"), 403, "Unauthorized sender")
	r := s.signed(&forged, "POST", base+"/stop")
	if r.Status != 401 || r.json(t)["error"] != "Invalid signature" {
		t.Fatalf("forged key: %d %s", r.Status, r.Body)
	}
	r = s.signed(expired, "POST", base+"/stop")
	if r.Status != 401 || r.json(t)["error"] != "Token expired" {
		t.Fatalf("expired key: %d %s", r.Status, r.Body)
	}
	r = s.do("POST", base+"/stop", nil)
	if r.Status != 400 || r.json(t)["error"] != "Missing X-SignedPubKey header" {
		t.Fatalf("no credentials: %d %s", r.Status, r.Body)
	}
	if n := s.runningExecutions(); n != 1 {
		t.Fatalf("%d executions after refused stops, want 1", n)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// Another wallet's stream is refused in its first answer.
	conn, status := s.logStream(ctx, theirs, hash)
	if status["status"] != "failed" || status["reason"] != "unauthorized sender" {
		t.Fatalf("other wallet's stream: %v", status)
	}
	_ = conn.CloseNow()

	// The owner's stream: what was printed, then what is printed now.
	conn, status = s.logStream(ctx, mine, hash)
	if status["status"] != "connected" {
		t.Fatalf("owner's stream: %v", status)
	}
	if line := readUntil(ctx, t, conn, "before-stream 0"); line["type"] != "stdout" {
		t.Fatalf("line %v", line)
	}
	expect(t, s.get("/vm/"+hash+"/print?text=live&n=3"), http.StatusOK)
	readUntil(ctx, t, conn, "live 2")

	// GET logs: every kept line in upstream's journald shape.
	r = s.signed(mine, "GET", base+"/logs")
	expect(t, r, http.StatusOK)
	var entries []map[string]string
	if err := json.Unmarshal(r.Body, &entries); err != nil {
		t.Fatalf("logs: %v: %s", err, r.Body)
	}
	found := false
	for _, e := range entries {
		if e["MESSAGE"] == "live 1" {
			found = e["file"] == "stdout" && e["SYSLOG_IDENTIFIER"] == "vm-"+hash+"-stdout" && e["__REALTIME_TIMESTAMP"] != ""
		}
	}
	if !found {
		t.Fatalf("logs lack a well-formed %q line: %s", "live 1", tail(string(r.Body), 20))
	}

	// The owner stops it.
	expectBody(t, s.signed(mine, "POST", base+"/stop"), 200, "Stopped VM with ref "+hash)
	if n := s.runningExecutions(); n != 0 {
		t.Fatalf("%d executions after the owner's stop", n)
	}
	expectBody(t, s.signed(mine, "POST", base+"/stop"), 404, "No virtual machine with ref "+hash)

	// Once stopped, a stream gives the kept lines and ends.
	conn2, status := s.logStream(ctx, mine, hash)
	if status["status"] != "connected" {
		t.Fatalf("stream after stop: %v", status)
	}
	readUntil(ctx, t, conn2, "live 2")
	readUntil(ctx, t, conn2, "VM is not running, past logs sent")
	if _, _, err := conn2.Read(ctx); websocket.CloseStatus(err) != websocket.StatusNormalClosure {
		t.Fatalf("stream after stop should close normally, got %v", err)
	}
	// The logs stay readable by their owner only.
	expect(t, s.signed(mine, "GET", base+"/logs"), http.StatusOK)
	expectBody(t, s.signed(theirs, "GET", base+"/logs"), 403, "Unauthorized sender")
}
