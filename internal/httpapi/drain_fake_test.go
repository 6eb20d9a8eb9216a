package httpapi

import (
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/pool/pooltest"
)

// slowProgram answers "finished" once release is closed, after telling
// entered that a request arrived.
func slowProgram(entered chan<- struct{}, release <-chan struct{}) program {
	return program{agent: pooltest.Agent{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		entered <- struct{}{}
		select {
		case <-release:
			_, _ = io.WriteString(w, "finished")
		case <-r.Context().Done():
		}
	})}}
}

type result struct {
	code int
	body string
	err  error
}

func get(url, host string) result {
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		return result{err: err}
	}
	req.Host = host
	resp, err := (&http.Client{Timeout: 15 * time.Second}).Do(req)
	if err != nil {
		return result{err: err}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return result{resp.StatusCode, string(b), err}
}

// While the server drains, a request in flight finishes with its answer
// and new program requests get aleph-vm's 503 (supervisor.py
// drain_middleware; tests/supervisor/test_drain.py) with Connection:
// close, while the node's own pages keep answering; the listener closes
// once no program request is in flight.
func TestDrainFinishesInFlightAndRefusesNew(t *testing.T) {
	entered, release := make(chan struct{}, 1), make(chan struct{})
	l := startLive(t, map[string]program{"slow": slowProgram(entered, release)}, nil)
	inFlight := make(chan result, 1)
	go func() { inFlight <- get(l.url+"/vm/"+l.hashes["slow"]+"/", "node.example") }()
	<-entered

	shut := make(chan struct{})
	go func() { l.srv.Shutdown(l.hs, 10*time.Second); close(shut) }()
	const drainingBody = `{"error": "Server is draining, try another node"}`
	var refused answer
	waitFor(t, "new program requests refused", func() bool {
		refused = l.do(t, "GET", "/vm/"+l.hashes["slow"]+"/other", nil)
		return refused.code == 503
	})
	if refused.body != drainingBody || refused.header.Get("Content-Type") != "application/json; charset=utf-8" {
		t.Errorf("new program request while draining: %d %q %v", refused.code, refused.body, refused.header)
	}
	// A program reached by its host is refused the same way.
	if r := get(l.url+"/", "somevmhash.example.com"); r.code != 503 || r.body != drainingBody {
		t.Errorf("host-routed request while draining: %d %q", r.code, r.body)
	}
	// The node's pages answer until the process exits, on any host.
	for _, c := range []struct {
		host, path string
		code       int
	}{
		{"node.example", "/status/check/version?reference=0", 200},
		{"node.example", "/about/executions/records", 200},
		{"node.example", "/about/executions/list", 200},
		{"node.example", "/control/nonexistent", 404},
		{"node.example", "/", 200},
		{"somevmhash.example.com", "/status/check/version?reference=0", 200},
	} {
		if r := get(l.url+c.path, c.host); r.err != nil || r.code != c.code {
			t.Errorf("%s%s while draining: %d %q %v, want %d", c.host, c.path, r.code, r.body, r.err, c.code)
		}
	}
	// On a keep-alive connection: the answer says it closes, and it does.
	c, err := net.Dial("tcp", strings.TrimPrefix(l.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = io.WriteString(c, "GET /vm/"+l.hashes["slow"]+"/ HTTP/1.1\r\nHost: node.example\r\n\r\n")
	raw, err := io.ReadAll(c) // ends only when the server closes
	if err != nil || !strings.HasPrefix(string(raw), "HTTP/1.1 503") || !strings.Contains(string(raw), "\r\nConnection: close\r\n") ||
		!strings.HasSuffix(string(raw), "\r\n\r\n"+drainingBody) {
		t.Errorf("keep-alive request while draining: %v %q", err, raw)
	}
	select {
	case <-shut:
		t.Fatal("Shutdown returned with a request in flight")
	case <-time.After(200 * time.Millisecond):
	}

	close(release)
	if r := <-inFlight; r.err != nil || r.code != 200 || r.body != "finished" {
		t.Errorf("the request in flight: %d %q %v, want 200 finished", r.code, r.body, r.err)
	}
	select {
	case <-shut:
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown did not return once the request finished")
	}
	if c, err := net.DialTimeout("tcp", strings.TrimPrefix(l.url, "http://"), time.Second); err == nil {
		c.Close()
		t.Error("the listener still accepts after the drain")
	}
}

// A request still in flight at the drain timeout is cut, and Shutdown
// returns at the timeout.
func TestDrainTimeoutCutsRequests(t *testing.T) {
	entered, release := make(chan struct{}, 1), make(chan struct{})
	l := startLive(t, map[string]program{"slow": slowProgram(entered, release)}, nil)
	t.Cleanup(func() { close(release) }) // before the pool's shutdown
	inFlight := make(chan result, 1)
	go func() { inFlight <- get(l.url+"/vm/"+l.hashes["slow"]+"/", "node.example") }()
	<-entered

	start := time.Now()
	l.srv.Shutdown(l.hs, 300*time.Millisecond)
	if took := time.Since(start); took < 300*time.Millisecond || took > 3*time.Second {
		t.Errorf("Shutdown took %s with a 300ms drain timeout", took)
	}
	select {
	case r := <-inFlight:
		if r.err == nil {
			t.Errorf("the request in flight was answered %d %q, want its connection cut", r.code, r.body)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the request in flight was not cut")
	}
}
