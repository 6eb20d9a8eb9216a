package guest_test

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest/guesttest"
)

type logWriter struct{ t *testing.T }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Logf("host: %s", strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func start(t *testing.T, codeDir string, cfg guest.Config) (*guesttest.Agent, *guest.Client, error) {
	t.Helper()
	guesttest.Require(t)
	a := guesttest.Start(t, guesttest.BuildAgent(t), codeDir)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	log := slog.New(slog.NewTextHandler(logWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	c, err := guest.Connect(ctx, a.Channel(), cfg, log)
	if c != nil {
		t.Cleanup(func() { c.Close() })
	}
	return a, c, err
}

func TestConnectReportsStartFailure(t *testing.T) {
	a, _, err := start(t, "testdata/broken", guest.Config{
		Interface: guest.InterfaceASGI, Entrypoint: "main:app",
	})
	if err == nil {
		t.Fatal("Connect succeeded with a program that cannot import")
	}
	// The host learns why from the program's own output.
	if !strings.Contains(err.Error(), "broken on purpose at import") {
		t.Errorf("error lacks the program's traceback: %v", err)
	}
	if werr := a.Wait(10 * time.Second); werr == nil {
		t.Error("agent exited 0 after a failed start")
	}
	if pids := a.ProcessesInRoot(); len(pids) > 0 {
		t.Errorf("processes left: %v", pids)
	}
}

func TestConnectBadEntrypoint(t *testing.T) {
	_, _, err := start(t, "testdata/apiclient", guest.Config{
		Interface: guest.InterfaceExecutable, Entrypoint: "../../bin/sh",
	})
	if err == nil || !strings.Contains(err.Error(), "not a path inside the code directory") {
		t.Fatalf("Connect = %v, want a refusal of the entrypoint", err)
	}
}

func TestGuestAPI(t *testing.T) {
	_, c, err := start(t, "testdata/apiclient", guest.Config{
		Interface: guest.InterfaceASGI, Entrypoint: "main:app",
	})
	if err != nil {
		t.Fatal(err)
	}
	c.ServeGuestAPI(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/properties" {
			http.NotFound(w, r)
			return
		}
		_, _ = io.WriteString(w, `{"served":"by the host"}`) // the test reads it back
	}))
	resp, err := guesttest.HTTPClient(c).Get("http://program/")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if string(body) != `{"served":"by the host"}` {
		t.Errorf("program got %q from the guest API", body)
	}
}

// A host that goes away must not leave the program running.
func TestChannelCloseStopsProgram(t *testing.T) {
	a, c, err := start(t, "../../examples/example_fastapi", guest.Config{
		Interface: guest.InterfaceASGI, Entrypoint: "main:app",
	})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if err := a.Wait(15 * time.Second); err != nil {
		t.Fatalf("agent after the channel closed: %v", err)
	}
	if !strings.Contains(a.Log.String(), "shutdown event ran") {
		t.Error("lifespan shutdown did not run")
	}
	if pids := a.ProcessesInRoot(); len(pids) > 0 {
		t.Errorf("processes left: %v", pids)
	}
}

func TestStopAfterExitIsHarmless(t *testing.T) {
	a, c, err := start(t, "../../examples/example_fastapi", guest.Config{
		Interface: guest.InterfaceASGI, Entrypoint: "main:app",
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := c.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	<-c.Done()
	if err := c.Stop(ctx); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if err := a.Wait(10 * time.Second); err != nil {
		t.Error(err)
	}
}

func TestAppWithoutLifespan(t *testing.T) {
	a, c, err := start(t, "testdata/nolifespan", guest.Config{
		Interface: guest.InterfaceASGI, Entrypoint: "main:app",
	})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := guesttest.HTTPClient(c).Get("http://program/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "no lifespan here" {
		t.Errorf("got %q", body)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := c.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.Wait(10 * time.Second); err != nil {
		t.Error(err)
	}
}
