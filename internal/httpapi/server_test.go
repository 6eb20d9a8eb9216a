package httpapi

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

var quiet = slog.New(slog.DiscardHandler)

// txtRecords answers TXT lookups from a table, so no test touches DNS.
type txtRecords map[string][]string

func (r txtRecords) LookupTXT(_ context.Context, name string) ([]string, error) {
	if v, ok := r[name]; ok {
		return v, nil
	}
	return nil, errors.New("no such host")
}

// newTestServer wires the real store, resolver and pool, without a
// sandbox backend: resolvable programs then answer 503.
func newTestServer(t *testing.T) (*Server, string) {
	t.Helper()
	dir := t.TempDir()
	st, err := store.Open(filepath.Join(dir, "store"), store.WithLogger(quiet))
	if err != nil {
		t.Fatal(err)
	}
	rt := filepath.Join(dir, "runtime.squashfs")
	if err := os.WriteFile(rt, []byte("not really a filesystem"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := st.AddRuntime(context.Background(), rt, "test runtime", true); err != nil {
		t.Fatal(err)
	}
	app := filepath.Join(dir, "app.py")
	if err := os.WriteFile(app, []byte("app = None\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	res, err := st.UploadProgram(context.Background(), store.UploadOptions{Path: app, Entrypoint: "app:app"})
	if err != nil {
		t.Fatal(err)
	}
	p := pool.New(pool.Options{
		Source:        sources.New(st, nil, nil, sources.DefaultLimits()),
		BackendError:  errors.New("runsc not installed"),
		ExecutionRoot: filepath.Join(dir, "exec"),
		Logger:        quiet,
	})
	s := New(Options{
		Version: "test", DomainName: "node.example", Pool: p, LoginToken: "secret-token",
		Resolver: txtRecords{"_aleph-id.app.example": {res.ProgramHash}},
		Config:   func() any { return map[string]string{"SUPERVISOR_PORT": "4020"} },
		Logger:   quiet,
	})
	return s, res.ProgramHash
}

func serve(s *Server, method, host, path string, cookies ...*http.Cookie) *httptest.ResponseRecorder {
	req := httptest.NewRequest(method, path, nil)
	req.Host = host
	for _, c := range cookies {
		req.AddCookie(c)
	}
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, req)
	return rec
}

func TestRoutesAndErrors(t *testing.T) {
	s, hash := newTestServer(t)
	label := message.Base32Label(hash)
	cases := []struct {
		name, host, path string
		status           int
		bodyHas          string
	}{
		{"malformed ref", "node.example", "/vm/not-a-hash/", 400, "not-a-hash"},
		{"unknown hash", "node.example", "/vm/" + strings.Repeat("0", 64) + "/", 404, "not in the local store"},
		{"known program, no backend", "node.example", "/vm/" + hash + "/x?y=1", 503, "runsc not installed"},
		{"base32 host label", label + ".node.example", "/anything", 503, "no backend"},
		{"TXT record host", "app.example", "/", 503, "no backend"},
		{"host naming nothing", "other.example", "/", 404, "does not name a program"},
		{"status page", "node.example", "/", 200, "Aleph VM Supervisor"},
		{"unknown path on own host", "node.example", "/nope", 404, "no route"},
		{"config needs login", "node.example", "/about/config", 401, "login"},
		{"executions need login", "node.example", "/about/executions", 401, "login"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rec := serve(s, "GET", c.host, c.path)
			if rec.Code != c.status || !strings.Contains(rec.Body.String(), c.bodyHas) {
				t.Errorf("%s %s%s: %d %q, want %d containing %q", "GET", c.host, c.path, rec.Code, rec.Body.String(), c.status, c.bodyHas)
			}
			if got := rec.Header().Get("Server"); got != "aleph-vm/0+test" {
				t.Errorf("Server header %q", got)
			}
			if rec.Code >= 400 {
				var body map[string]string
				if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body["error"] == "" {
					t.Errorf("error body is not {\"error\": ...}: %q", rec.Body.String())
				}
			}
		})
	}
}

func TestLoginGrantsOperatorPages(t *testing.T) {
	s, _ := newTestServer(t)
	rec := serve(s, "GET", "node.example", "/about/login?token=secret-token")
	if rec.Code != http.StatusFound {
		t.Fatalf("login: %d %s", rec.Code, rec.Body)
	}
	cookies := rec.Result().Cookies()
	if len(cookies) != 1 || !cookies[0].HttpOnly {
		t.Fatalf("login cookie: %+v", cookies)
	}
	if rec := serve(s, "GET", "node.example", "/about/config", cookies...); rec.Code != 200 || !strings.Contains(rec.Body.String(), "SUPERVISOR_PORT") {
		t.Errorf("config with cookie: %d %s", rec.Code, rec.Body)
	}
	if rec := serve(s, "GET", "node.example", "/about/executions", cookies...); rec.Code != 200 {
		t.Errorf("executions with cookie: %d %s", rec.Code, rec.Body)
	}
}

func TestBodyLimitBeforeStart(t *testing.T) {
	s, hash := newTestServer(t)
	s.opts.MaxRequestBodySize = 10
	req := httptest.NewRequest("POST", "/vm/"+hash+"/", strings.NewReader(strings.Repeat("x", 11)))
	req.Host = "node.example"
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, req)
	if rec.Code != http.StatusRequestEntityTooLarge {
		t.Errorf("got %d %s", rec.Code, rec.Body)
	}
}
