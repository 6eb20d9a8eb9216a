package main

import (
	"context"
	"io"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest/guesttest"
)

// With --hold the agent says "held" on its raw channel only once the
// interpreter is warm, writes nothing more until the host's newline, and
// then serves an ordinary session (the backend checkpoints it in between;
// TestSnapshotRestoredSandboxes runs that under runsc).
func TestHoldHandshake(t *testing.T) {
	guesttest.Require(t)
	bin := guesttest.BuildAgent(t)
	a := guesttest.Start(t, bin, filepath.Join(guesttest.ModuleRoot(t), "examples", "example_fastapi"), "--preload", "--hold")
	ch := a.Channel()

	held := make(chan string, 1)
	go func() {
		buf := make([]byte, len(guest.HoldReadyLine))
		_, err := io.ReadFull(ch, buf)
		if err != nil {
			held <- "error: " + err.Error()
			return
		}
		held <- string(buf)
	}()
	select {
	case got := <-held:
		if got != guest.HoldReadyLine {
			t.Fatalf("agent said %q, want %q", got, guest.HoldReadyLine)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("no hold line after 60 s")
	}
	// The launcher's own line travels through the agent's output relay,
	// so it may trail the hold line a little.
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(a.Log.String(), "preloaded in"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("held, but the interpreter never said it was warm; log:\n%s", a.Log.String())
		}
	}
	// Nothing more until released. The read stays pending: what it gets
	// after the release is the session's first bytes, handed on below.
	type readResult struct {
		b   []byte
		err error
	}
	extra := make(chan readResult, 1)
	go func() {
		buf := make([]byte, 4096)
		n, err := ch.Read(buf)
		extra <- readResult{buf[:n], err}
	}()
	select {
	case r := <-extra:
		t.Fatalf("the agent wrote %q (%v) while held", r.b, r.err)
	case <-time.After(500 * time.Millisecond):
	}
	if _, err := ch.Write([]byte("\n")); err != nil {
		t.Fatal(err)
	}
	r := <-extra
	if r.err != nil {
		t.Fatalf("after the release: %v", r.err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := guest.Connect(ctx, &prefixed{early: r.b, ReadWriteCloser: ch}, guest.Config{
		ProgramHash: "cafe", Interface: guest.InterfaceASGI, Entrypoint: "main:app", Encoding: "zip",
	}, testLogger(t))
	if err != nil {
		t.Fatalf("connect after the release: %v", err)
	}
	defer c.Close()
	var got map[string]any
	getJSON(t, guesttest.HTTPClient(c), "/", &got)
	if got["Example"] != "example_fastapi" {
		t.Errorf("got %v", got)
	}
	if !strings.Contains(a.Log.String(), "released from hold") {
		t.Error("the agent did not log its release")
	}
	stopAndCheck(t, a, c)
}

// prefixed reads early before the rest of its stream.
type prefixed struct {
	early []byte
	io.ReadWriteCloser
}

func (p *prefixed) Read(b []byte) (int, error) {
	if len(p.early) > 0 {
		n := copy(b, p.early)
		p.early = p.early[n:]
		return n, nil
	}
	return p.ReadWriteCloser.Read(b)
}

// --hold only makes sense where the host can checkpoint before a session.
func TestHoldNeedsPreloadAndStdio(t *testing.T) {
	code, err := run(context.Background(), options{channel: "stdio", hold: true}, testLogger(t))
	if code != 2 || err == nil || !strings.Contains(err.Error(), "--hold needs --preload") {
		t.Errorf("--hold without --preload: code %d, %v", code, err)
	}
}
