package integration

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// A websocket to a program goes through the supervisor both ways, text
// and binary, and the program's close code reaches the client.
func TestWebsocketToProgram(t *testing.T) {
	s := startSupervisor(t)
	prog := s.upload("testdata/wsecho", "main:app")
	expect(t, s.get("/vm/"+prog+"/"), http.StatusOK)

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(s.base, "http")+"/vm/"+prog+"/ws", nil)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer func() { _ = conn.CloseNow() }()
	conn.SetReadLimit(1 << 20)
	for i, msg := range []string{"hello", strings.Repeat("x", 200_000)} {
		if err := conn.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		typ, got, err := conn.Read(ctx)
		if err != nil || typ != websocket.MessageText || string(got) != "echo "+msg {
			t.Fatalf("read %d: %v %d bytes %.20q", i, err, len(got), got)
		}
	}
	if err := conn.Write(ctx, websocket.MessageBinary, []byte{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	if typ, got, err := conn.Read(ctx); err != nil || typ != websocket.MessageBinary || string(got) != "\x03\x02\x01" {
		t.Fatalf("binary: %v %v %q", err, typ, got)
	}
	if err := conn.Write(ctx, websocket.MessageText, []byte("close")); err != nil {
		t.Fatal(err)
	}
	_, _, err = conn.Read(ctx)
	var ce websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != 4000 {
		t.Fatalf("after asking to close: %v; want close code 4000", err)
	}
}
