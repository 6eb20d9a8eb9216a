package integration

import (
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Under gVisor the supervisor reaches ASGI programs through a unix socket
// in a host directory the program can write to. A program that replaces
// that socket with a symbolic link to a host socket, a FIFO or a file must
// not make the supervisor connect anywhere else (a 502 is the answer),
// and filling the directory must stay within its tiny tmpfs.
func TestHostileSocketDirectory(t *testing.T) {
	if hypervisor != "gvisor" {
		t.Skip("the direct HTTP path is gVisor's")
	}
	// With spares (the default): the first program adopts one, so the
	// direct path is checked through a spare's launcher too.
	s := startSupervisor(t)

	// A host socket the program would like the supervisor to reach.
	hostSock := filepath.Join(t.TempDir(), "host.sock")
	ln, err := net.Listen("unix", hostSock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var reached atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			reached.Add(1)
			_, _ = c.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nhost"))
			c.Close()
		}
	}()

	t.Run("fill", func(t *testing.T) {
		prog := s.upload("testdata/sockswap", "main:app", "--env", "ROLE=fill")
		expect(t, s.get("/vm/"+prog+"/"), http.StatusOK)
		logs := s.logs.String()
		if !strings.Contains(logs, "using a pre-warmed sandbox") || !strings.Contains(logs, "http=direct") {
			t.Fatalf("the supervisor did not take the direct HTTP path to a spare; log:\n%s", tail(logs, 40))
		}
		r := s.get("/vm/" + prog + "/fill")
		expect(t, r, http.StatusOK)
		b := r.json(t)
		t.Logf("filling the socket directory: %v", b)
		if b["error"] == nil || b["bytes"].(float64) > 1<<20 || b["files"].(float64) > 16 {
			t.Errorf("the socket directory took %v bytes in %v files without an error", b["bytes"], b["files"])
		}
		// Its socket is still there, so it still answers.
		expect(t, s.get("/vm/"+prog+"/"), http.StatusOK)
	})

	for _, kind := range []string{"symlink", "fifo", "file"} {
		t.Run(kind, func(t *testing.T) {
			prog := s.upload("testdata/sockswap", "main:app", "--env", "ROLE="+kind)
			expect(t, s.get("/vm/"+prog+"/"), http.StatusOK)
			r := s.get("/vm/" + prog + "/swap?kind=" + kind + "&target=" + hostSock)
			expect(t, r, http.StatusOK)
			if b := r.json(t); b["ok"] != true {
				t.Fatalf("the program could not swap its socket for a %s: %v", kind, b)
			}
			start := time.Now()
			r = s.get("/vm/" + prog + "/")
			if r.Status != http.StatusBadGateway {
				t.Errorf("after the swap: %d %q; want 502", r.Status, r.Body)
			}
			if d := time.Since(start); d > 20*time.Second {
				t.Errorf("the answer took %s", d)
			}
			if n := reached.Load(); n != 0 {
				t.Fatalf("the supervisor connected %d times to the host socket the program pointed at", n)
			}
		})
	}
}
