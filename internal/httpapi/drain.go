package httpapi

import (
	"context"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// drain counts the program requests being served, so that a stopping
// supervisor can let them finish while it refuses new ones. As in
// aleph-vm (supervisor.py drain_middleware, pool.py drain), only program
// requests are refused and waited for: status, operator and control
// pages answer until the process exits.
type drain struct {
	mu       sync.Mutex
	draining bool
	inFlight int
	idle     chan struct{} // closed when inFlight reaches 0 while draining
}

// begin counts a request in, or tells that the server is draining.
func (d *drain) begin() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.draining {
		return false
	}
	d.inFlight++
	return true
}

func (d *drain) end() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.inFlight--
	if d.inFlight == 0 && d.idle != nil {
		close(d.idle)
		d.idle = nil
	}
}

// errShuttingDown is what program requests that arrive while draining
// read: aleph-vm's body. The connection is closed after it, so that a
// client or load balancer reconnects (to another node, or to this one once
// restarted).
var errShuttingDown = errkind.New(errkind.ShuttingDown, "Server is draining, try another node")

// nodePagePrefixes are the paths that are the node's own on any host
// (aleph-vm's drain_middleware lets them through).
var nodePagePrefixes = []string{"/about/", "/control/", "/status/", "/static/", "/debug/"}

// isProgramRequest tells whether r would reach a program: /vm/..., or
// any path but the node's pages on a host that is not the node's own. It
// is what a drain refuses.
func (s *Server) isProgramRequest(r *http.Request) bool {
	p := r.URL.Path
	if strings.HasPrefix(p, "/vm/") {
		return true
	}
	for _, prefix := range nodePagePrefixes {
		if strings.HasPrefix(p, prefix) {
			return false
		}
	}
	return !s.isOwnHost(hostOnly(r.Host))
}

func (s *Server) refuseDraining(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Connection", "close")
	s.writeError(w, r, errShuttingDown)
}

// Drain makes every new program request answer 503 (errkind.ShuttingDown)
// and waits until those in flight have finished, or ctx ends. Other
// requests are served and not waited for. It returns how many program
// requests were still in flight when it gave up (0 on success).
func (s *Server) Drain(ctx context.Context) int {
	d := &s.drain
	d.mu.Lock()
	d.draining = true
	if d.inFlight == 0 {
		d.mu.Unlock()
		return 0
	}
	if d.idle == nil {
		d.idle = make(chan struct{})
	}
	idle := d.idle
	d.mu.Unlock()
	select {
	case <-idle:
		return 0
	case <-ctx.Done():
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.inFlight
	}
}

// Shutdown stops srv, which serves this server, gracefully: it drains
// for up to timeout (new program requests get 503 meanwhile, on the
// listener still open; the node's pages answer), then closes the listeners
// and connections. Requests still
// in flight at the deadline are cut. The caller stops the pool after it.
func (s *Server) Shutdown(srv *http.Server, timeout time.Duration) {
	s.log.Info("draining: new program requests get 503", "in_flight", s.InFlight(), "drain_timeout", timeout)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	started := time.Now()
	if left := s.Drain(ctx); left > 0 {
		s.log.Warn("drain timeout reached: cutting the requests still in flight", "in_flight", left)
		_ = srv.Close()
		return
	}
	s.log.Info("drained", "took", time.Since(started).Round(time.Millisecond))
	// Nothing in flight: this only closes the listeners and idle
	// connections.
	sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer scancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close()
	}
}

// InFlight is the number of program requests being served.
func (s *Server) InFlight() int {
	s.drain.mu.Lock()
	defer s.drain.mu.Unlock()
	return s.drain.inFlight
}
