package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest/guesttest"
)

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testLogWriter struct{ t *testing.T }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Logf("host: %s", strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// startExample runs the agent with one of the examples and connects to it.
func startExample(t *testing.T, example string, cfg guest.Config) (*guesttest.Agent, *guest.Client) {
	t.Helper()
	guesttest.Require(t)
	bin := guesttest.BuildAgent(t)
	a := guesttest.Start(t, bin, filepath.Join(guesttest.ModuleRoot(t), "examples", example))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	started := time.Now()
	c, err := guest.Connect(ctx, a.Channel(), cfg, testLogger(t))
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Logf("program ready after %s", time.Since(started))
	t.Cleanup(func() { c.Close() })
	return a, c
}

func get(t *testing.T, hc *http.Client, path string) (int, []byte) {
	t.Helper()
	resp, err := hc.Get("http://program" + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: read body: %v", path, err)
	}
	return resp.StatusCode, body
}

func getJSON(t *testing.T, hc *http.Client, path string, v any) {
	t.Helper()
	code, body := get(t, hc, path)
	if code != http.StatusOK {
		t.Fatalf("GET %s: status %d: %s", path, code, body)
	}
	if err := json.Unmarshal(body, v); err != nil {
		t.Fatalf("GET %s: %v: %s", path, err, body)
	}
}

// stopAndCheck stops the program and checks nothing of the sandbox runs.
func stopAndCheck(t *testing.T, a *guesttest.Agent, c *guest.Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := c.Stop(ctx); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if err := a.Wait(10 * time.Second); err != nil {
		t.Fatalf("agent exit: %v", err)
	}
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
		t.Error("session still open after the agent exited")
	}
	if pids := a.ProcessesInRoot(); len(pids) > 0 {
		t.Errorf("processes left in the sandbox root: %v", pids)
	}
}

func TestExampleFastAPI(t *testing.T) {
	a, c := startExample(t, "example_fastapi", guest.Config{
		ProgramHash: "cafe",
		Interface:   guest.InterfaceASGI,
		Entrypoint:  "main:app",
		Encoding:    "zip",
		Variables:   map[string]string{"GREETING": "hello", "EMPTY": ""},
		AlephEnv: map[string]string{
			"ALEPH_API_HOST":        "http://localhost",
			"ALEPH_API_UNIX_SOCKET": guest.GuestAPISocket,
			"ALEPH_ADDRESS_TO_USE":  "0x0000000000000000000000000000000000000001",
		},
	})
	hc := guesttest.HTTPClient(c)

	t.Run("index", func(t *testing.T) {
		var got map[string]any // aleph-vm's index also lists the endpoints
		getJSON(t, hc, "/", &got)
		if got["Example"] != "example_fastapi" {
			t.Errorf("got %v", got)
		}
	})
	t.Run("lifespan", func(t *testing.T) {
		var got map[string]bool
		getJSON(t, hc, "/lifespan", &got)
		if !got["Lifespan"] {
			t.Errorf("startup event did not run: %v", got)
		}
	})
	t.Run("raise", func(t *testing.T) {
		code, body := get(t, hc, "/raise")
		if code != http.StatusInternalServerError {
			t.Errorf("status %d, want 500", code)
		}
		for _, want := range []string{"Traceback", "raised on purpose"} {
			if !bytes.Contains(body, []byte(want)) {
				t.Errorf("body lacks %q:\n%s", want, body)
			}
		}
	})
	t.Run("environ", func(t *testing.T) {
		var env map[string]string
		getJSON(t, hc, "/environ", &env)
		want := map[string]string{
			"GREETING":              "hello",
			"EMPTY":                 "",
			"ALEPH_API_HOST":        "http://localhost",
			"ALEPH_API_UNIX_SOCKET": guest.GuestAPISocket,
			"ALEPH_ADDRESS_TO_USE":  "0x0000000000000000000000000000000000000001",
		}
		for k, v := range want {
			if got, ok := env[k]; !ok || got != v {
				t.Errorf("%s = %q (set: %v), want %q", k, got, ok, v)
			}
		}
		if _, ok := env["AGENT_SECRET_SHOULD_NOT_LEAK"]; ok {
			t.Error("the agent's environment leaked into the program")
		}
	})
	t.Run("stream", func(t *testing.T) { streamedChunks(t, hc) })
	t.Run("echo 5 MiB", func(t *testing.T) { echo5MiB(t, hc) })
	t.Run("processes", func(t *testing.T) {
		var got struct {
			Pids []int `json:"pids"`
		}
		getJSON(t, hc, "/processes", &got)
		// The agent (PID 1) and Python: nothing of the host.
		if len(got.Pids) != 2 || got.Pids[0] != 1 {
			t.Errorf("visible pids %v, want [1 <python>]", got.Pids)
		}
	})

	stopAndCheck(t, a, c)
	if !strings.Contains(a.Log.String(), "shutdown event ran") {
		t.Error("the lifespan shutdown did not run on stop")
	}
}

// streamedChunks checks that the chunks of a streamed response arrive as
// the app sends them, not buffered until the end.
func streamedChunks(t *testing.T, hc *http.Client) {
	resp, err := hc.Get("http://program/stream?chunks=4&delay=0.4")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var arrivals []time.Time
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		arrivals = append(arrivals, time.Now())
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if len(arrivals) != 4 {
		t.Fatalf("got %d chunks, want 4", len(arrivals))
	}
	// Buffered, all chunks would arrive together at the end.
	if spread := arrivals[3].Sub(arrivals[0]); spread < 800*time.Millisecond {
		t.Errorf("chunks arrived within %s of each other: not streamed", spread)
	}
}

// echo5MiB checks a 5 MiB request body reaches the app whole.
func echo5MiB(t *testing.T, hc *http.Client) {
	body := make([]byte, 5<<20)
	rand.Read(body)
	sum := sha256.Sum256(body)
	resp, err := hc.Post("http://program/echo", "application/octet-stream", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var got struct {
		Length int    `json:"length"`
		SHA256 string `json:"sha256"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
		t.Fatal(err)
	}
	if got.Length != len(body) || got.SHA256 != hex.EncodeToString(sum[:]) {
		t.Errorf("echo = %+v, want length %d", got, len(body))
	}
}

func TestProgramCrash(t *testing.T) {
	a, c := startExample(t, "example_fastapi", guest.Config{
		ProgramHash: "crash",
		Interface:   guest.InterfaceASGI,
		Entrypoint:  "main:app",
	})
	hc := guesttest.HTTPClient(c)
	if resp, err := hc.Get("http://program/crash"); err == nil {
		resp.Body.Close()
		t.Errorf("crash answered %d", resp.StatusCode)
	}
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("session still open after the program crashed")
	}
	if err := c.Err(); err == nil || !strings.Contains(err.Error(), "exit status 1") {
		t.Errorf("Err() = %v, want the exit status", err)
	}
	if err := a.Wait(10 * time.Second); err == nil {
		t.Error("agent exited 0 after its program crashed")
	}
	if pids := a.ProcessesInRoot(); len(pids) > 0 {
		t.Errorf("processes left: %v", pids)
	}
}

func TestExecutable(t *testing.T) {
	a, c := startExample(t, "executable_http", guest.Config{
		ProgramHash: "exec",
		Interface:   guest.InterfaceExecutable,
		Entrypoint:  "server.sh",
	})
	hc := guesttest.HTTPClient(c)
	code, body := get(t, hc, "/")
	if code != http.StatusOK || !bytes.Contains(body, []byte("executable_http")) {
		t.Errorf("GET / = %d %q", code, body)
	}
	stopAndCheck(t, a, c)
}
