package httpapi

import (
	"net/http"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/pool/pooltest"
)

func okProgram() program {
	return program{agent: pooltest.Agent{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte("ok"))
	})}}
}

// POST /control/machine/{ref}/update: aleph-vm's operate_update
// (views/__init__.py; tests/supervisor/test_views.py test_operate): no
// authentication, 200 {} for a running execution; its errors through
// error_middleware: 404 {"error": "404: VM not found"}, 400 for a bad ref.
func TestControlUpdateAsUpstream(t *testing.T) {
	l := startLiveOn(t, pooltest.NewStore(t), map[string]program{"a": okProgram()}, nil,
		func(o *Options) { o.Control = nil })
	l.srv.opts.Control = l.pool
	l.srv.controlRoutes()
	hash := l.hashes["a"]
	if a := l.do(t, "POST", "/control/machine/"+hash+"/update", nil); a.code != 404 || a.body != `{"error": "404: VM not found"}` ||
		a.header.Get("Content-Type") != "application/json; charset=utf-8" {
		t.Errorf("update of a program not running: %d %q %q", a.code, a.header.Get("Content-Type"), a.body)
	}
	if a := l.do(t, "GET", "/vm/"+hash+"/", nil); a.code != 200 {
		t.Fatalf("start: %d %q", a.code, a.body)
	}
	if a := l.do(t, "POST", "/control/machine/"+hash+"/update", nil); a.code != 200 || a.body != `{}` ||
		a.header.Get("Content-Type") != "application/json; charset=utf-8" {
		t.Errorf("update of a running program: %d %q %q", a.code, a.header.Get("Content-Type"), a.body)
	}
	if a := l.do(t, "POST", "/control/machine/nothash/update", nil); a.code != 400 || a.body != `{"error": "Invalid ref: 'nothash'"}` {
		t.Errorf("update of a bad ref: %d %q", a.code, a.body)
	}
	// Only POST: a GET is an unknown /control path.
	if a := l.do(t, "GET", "/control/machine/"+hash+"/update", nil); a.code != 404 || a.body != `{"error": "404: Not Found"}` {
		t.Errorf("GET update: %d %q", a.code, a.body)
	}
}

// GET /about/certificates on a node without confidential computing
// (tests/supervisor/test_views.py test_about_certificates_missing_setting).
func TestCertificatesAsUpstream(t *testing.T) {
	s, _ := newTestServer(t)
	rec := serve(s, "GET", "node.example", "/about/certificates")
	if rec.Code != 503 || rec.Body.String() != `{"error": "Confidential computing setting not enabled on that server"}` ||
		rec.Header().Get("Content-Type") != "application/json; charset=utf-8" {
		t.Errorf("certificates: %d %q %q", rec.Code, rec.Header().Get("Content-Type"), rec.Body)
	}
}
