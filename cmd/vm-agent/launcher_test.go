package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// These tests run the real launcher and its standard-library ASGI server
// (the code directory's uvicorn.py hides any uvicorn of this machine) with
// the machine's python3, started by the agent's own startProgram.

type launched struct {
	prog   *program
	spec   programSpec
	client *http.Client
}

func python3(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("python3")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("python3 missing: %v", err)
		}
		t.Skip("python3 missing")
	}
	return p
}

// codeDir copies testdata/asgi into a fresh directory, plus extra files.
func codeDir(t *testing.T, extra map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	entries, err := os.ReadDir("testdata/asgi")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join("testdata/asgi", e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, e.Name()), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for name, content := range extra {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func startLauncher(t *testing.T, cfg guest.Config, code string) (*launched, error) {
	t.Helper()
	sockDir, err := os.MkdirTemp("", "asgi-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	spec := programSpec{
		dir:       sockDir,
		codeDir:   code,
		python:    python3(t),
		socket:    filepath.Join(sockDir, "asgi.sock"),
		apiSocket: filepath.Join(sockDir, "api.sock"),
	}
	if cfg.Interface == "" {
		cfg.Interface = guest.InterfaceASGI
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	p, err := startProgram(cfg, spec, nil, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.stop(5 * time.Second) })
	l := &launched{prog: p, spec: spec, client: &http.Client{
		Timeout: 20 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", spec.socket)
		}},
	}}
	return l, p.waitReady(context.Background(), 30*time.Second)
}

func (l *launched) get(t *testing.T, path string) (int, http.Header, string) {
	t.Helper()
	resp, err := l.client.Get("http://program" + path)
	if err != nil {
		t.Fatalf("GET %s: %v\n%s", path, err, l.prog.tail.String())
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, resp.Header, string(b)
}

func TestStdlibServer(t *testing.T) {
	l, err := startLauncher(t, guest.Config{Entrypoint: "app:app"}, codeDir(t, nil))
	if err != nil {
		t.Fatal(err)
	}

	t.Run("lifespan startup and scope", func(t *testing.T) {
		req, _ := http.NewRequest("GET", "http://program/?a=1&b=%20", nil)
		req.Header.Set("X-Forwarded-For", "203.0.113.7")
		req.Header.Set("X-Forwarded-Proto", "https")
		resp, err := l.client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var got struct {
			Startup     bool     `json:"startup"`
			Query       string   `json:"query"`
			HTTPVersion string   `json:"http_version"`
			Client      []any    `json:"client"`
			Scheme      string   `json:"scheme"`
			SysPath     []string `json:"sys_path"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
			t.Fatal(err)
		}
		if !got.Startup || got.Query != "a=1&b=%20" || got.HTTPVersion != "1.1" || got.Scheme != "https" ||
			len(got.Client) != 2 || got.Client[0] != "203.0.113.7" {
			t.Errorf("scope: %+v", got)
		}
		// aleph-vm's order: the code, then the dependency volume.
		if len(got.SysPath) < 2 || got.SysPath[0] != l.spec.codeDir || got.SysPath[1] != "/opt/packages" {
			t.Errorf("sys.path starts with %v, want [%s /opt/packages ...]", got.SysPath, l.spec.codeDir)
		}
		if resp.Header.Get("Content-Length") == "" || resp.Header.Get("Date") == "" {
			t.Errorf("headers: %v", resp.Header)
		}
	})

	t.Run("keep-alive, HEAD and Expect: 100-continue on one connection", func(t *testing.T) { keepAliveHeadContinue(t, l) })

	t.Run("request bodies, chunked and sized", func(t *testing.T) { requestBodies(t, l) })

	t.Run("streamed response", func(t *testing.T) { streamedResponse(t, l) })

	t.Run("client disconnect reaches the app", func(t *testing.T) {
		resp, err := l.client.Get("http://program/forever")
		if err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 5)
		if _, err := io.ReadFull(resp.Body, buf); err != nil {
			t.Fatal(err)
		}
		resp.Body.Close() // closes the connection mid-body
		deadline := time.Now().Add(10 * time.Second)
		for {
			_, _, body := l.get(t, "/disconnects")
			if strings.Contains(body, `"disconnects": 1`) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the app never saw http.disconnect: %s", body)
			}
			time.Sleep(50 * time.Millisecond)
		}
	})

	t.Run("exception answers the traceback", func(t *testing.T) {
		code, h, body := l.get(t, "/raise")
		if code != 500 || !strings.Contains(body, "ValueError: raised on purpose") || !strings.HasPrefix(h.Get("Content-Type"), "text/plain") {
			t.Errorf("%d %v %s", code, h, body)
		}
	})

	t.Run("SIGTERM runs the lifespan shutdown", func(t *testing.T) {
		l.prog.stop(10 * time.Second)
		if l.prog.exitDesc != "exit status 0" || !strings.Contains(l.prog.tail.String(), "asgi-test: shutdown ran") {
			t.Errorf("stopped with %q, output:\n%s", l.prog.exitDesc, l.prog.tail.String())
		}
	})
}

// keepAliveHeadContinue sends GET, HEAD and a POST that waits for
// 100 Continue over one connection, as a proxy reusing it would.
func keepAliveHeadContinue(t *testing.T, l *launched) {
	c, err := net.Dial("unix", l.spec.socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(20 * time.Second)); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("first: %v %v", resp, err)
	}
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
	resp, err = http.ReadResponse(br, &http.Request{Method: "HEAD"})
	if err != nil || resp.StatusCode != 200 || resp.ContentLength <= 0 {
		t.Fatalf("HEAD: %+v %v", resp, err)
	}
	fmt.Fprintf(c, "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
	line, err := br.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "HTTP/1.1 100 ") {
		t.Fatalf("want 100 Continue before the body, got %q %v", line, err)
	}
	if blank, _ := br.ReadString('\n'); blank != "\r\n" {
		t.Fatalf("after 100: %q", blank)
	}
	fmt.Fprintf(c, "hello")
	resp, err = http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	sum := sha256.Sum256([]byte("hello"))
	if !strings.Contains(string(b), hex.EncodeToString(sum[:])) {
		t.Errorf("echo after 100-continue: %s", b)
	}
}

// requestBodies posts a 4.8 MB body, sized then chunked, and checks
// the app saw all of it.
func requestBodies(t *testing.T, l *launched) {
	payload := bytes.Repeat([]byte("0123456789abcdef"), 300_000) // 4.8 MB
	sum := sha256.Sum256(payload)
	for _, chunked := range []bool{false, true} {
		var body io.Reader = bytes.NewReader(payload)
		if chunked {
			body = io.MultiReader(body) // unknown length: Go sends it chunked
		}
		resp, err := l.client.Post("http://program/echo", "application/octet-stream", body)
		if err != nil {
			t.Fatal(err)
		}
		var got struct {
			Length int    `json:"length"`
			SHA256 string `json:"sha256"`
		}
		err = json.NewDecoder(resp.Body).Decode(&got)
		resp.Body.Close()
		if err != nil {
			t.Fatalf("chunked=%v: %v", chunked, err)
		}
		if got.Length != len(payload) || got.SHA256 != hex.EncodeToString(sum[:]) {
			t.Errorf("chunked=%v: %+v", chunked, got)
		}
	}
}

// streamedResponse checks the app's chunks arrive as it sends them.
func streamedResponse(t *testing.T, l *launched) {
	start := time.Now()
	resp, err := l.client.Get("http://program/stream")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if len(resp.TransferEncoding) == 0 || resp.TransferEncoding[0] != "chunked" {
		t.Errorf("transfer encoding %v, want chunked", resp.TransferEncoding)
	}
	br := bufio.NewReader(resp.Body)
	first, err := br.ReadString('\n')
	firstAt := time.Since(start)
	if err != nil {
		t.Fatalf("first chunk: %q %v", first, err)
	}
	rest, _ := io.ReadAll(br)
	total := time.Since(start)
	if first != "chunk 0\n" || string(rest) != "chunk 1\nchunk 2\n" {
		t.Errorf("body %q + %q", first, rest)
	}
	// Chunks come as the app sends them, 0.3 s apart.
	if total-firstAt < 400*time.Millisecond {
		t.Errorf("first chunk at %s, end at %s: the response was buffered", firstAt, total)
	}
}

func TestLauncherStartFailures(t *testing.T) {
	for _, c := range []struct {
		name, entry string
		vars        map[string]string
		want        string
	}{
		{"import error", "broken:app", nil, "ModuleNotFoundError: No module named 'this_module_does_not_exist'"},
		{"lifespan startup raises", "app:app", map[string]string{"FAIL_STARTUP": "1"}, "RuntimeError: startup failed on purpose"},
	} {
		t.Run(c.name, func(t *testing.T) {
			l, err := startLauncher(t, guest.Config{Entrypoint: c.entry, Variables: c.vars}, codeDir(t, nil))
			if err == nil {
				t.Fatal("the program started")
			}
			tb := startError(l.spec)
			if !strings.HasPrefix(tb, "Traceback (most recent call last):") || !strings.Contains(tb, c.want) {
				t.Errorf("start error %q, want a traceback with %q (err %v)", tb, c.want, err)
			}
		})
	}
}

func TestLauncherPlainEntrypoint(t *testing.T) {
	plain, err := os.ReadFile("testdata/asgi/plain_named")
	if err != nil {
		t.Fatal(err)
	}
	// As codeprep stores plain code: the file is named by the entrypoint.
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "application"), plain, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "uvicorn.py"), []byte("raise ImportError\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := startLauncher(t, guest.Config{Entrypoint: "application", Encoding: "plain"}, dir)
	if err != nil {
		t.Fatal(err)
	}
	if code, _, body := l.get(t, "/"); code != 200 || body != "plain ok" {
		t.Errorf("%d %q", code, body)
	}
	if _, _, _, err := programCommand(guest.Config{Interface: guest.InterfaceASGI, Entrypoint: "application", Encoding: "zip"}, l.spec); err == nil {
		t.Error("a bare name is accepted for zip code")
	}
}
