package httpapi

import (
	"context"
	"encoding/json"
	"html/template"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"time"
)

var indexPage = template.Must(template.New("index").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Aleph VM Supervisor</title>
<style>body{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;color:#222}
code{background:#f3f3f3;padding:0 .3em}td{padding:.2em .8em .2em 0}</style></head>
<body><h1>Aleph VM Supervisor</h1>
<p>This node runs programs of the <a href="https://aleph.im">Aleph.im</a> network in isolated sandboxes.</p>
<table>
<tr><td>Version</td><td><code>aleph-vm/{{.Version}}</code></td></tr>
<tr><td>Isolation backend</td><td><code>{{.Backend}}</code></td></tr>
<tr><td>Running executions</td><td>{{.Running}}</td></tr>
</table>
<h2>Diagnostics</h2>
<ul>
<li><a href="/status/check/fastapi">Self-test of an example program</a> (starts a sandbox; takes a few seconds)</li>
<li><a href="/about/usage/system">System usage</a></li>
<li><a href="/about/executions/records">Execution records</a></li>
<li><a href="/status/check/version">Version</a></li>
</ul>
<p>Call a program at <code>/vm/&lt;item hash&gt;/</code>.</p>
</body></html>
`))

func (s *Server) handleIndex(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	_ = indexPage.Execute(w, map[string]any{
		"Version": s.opts.Version,
		"Backend": s.opts.Pool.BackendName(),
		"Running": len(s.opts.Pool.List()),
	})
}

// checkResult is one line of /status/check/fastapi.
type checkResult struct {
	OK     bool   `json:"ok"`
	Detail string `json:"detail,omitempty"`
}

// notAvailableChecks need features that this build does not offer yet;
// they are listed as such rather than reported as failures.
var notAvailableChecks = []string{"internet", "messages", "persistent_storage", "sign"}

// handleCheckFastAPI exercises the self-test program through the same path
// a real request takes, and answers 200 only if every check passes.
func (s *Server) handleCheckFastAPI(w http.ResponseWriter, r *http.Request) {
	if s.opts.SelfTestProgram == nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "no self-test program configured"})
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 3*time.Minute)
	defer cancel()
	hash, err := s.opts.SelfTestProgram(ctx)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	get := func(path string) (int, string) {
		req := httptest.NewRequestWithContext(ctx, http.MethodGet, "/vm/"+hash+path, nil)
		req.Host = r.Host
		rec := httptest.NewRecorder()
		s.ServeHTTP(rec, req)
		return rec.Code, rec.Body.String()
	}
	jsonField := func(body, key string) any {
		var m map[string]any
		if json.Unmarshal([]byte(body), &m) != nil {
			return nil
		}
		return m[key]
	}
	checks := map[string]checkResult{}
	run := func(name string, f func() (bool, string)) {
		ok, detail := f()
		checks[name] = checkResult{OK: ok, Detail: detail}
	}
	run("index", func() (bool, string) {
		code, body := get("/")
		return code == 200 && jsonField(body, "Example") == "example_fastapi", brief(code, body)
	})
	run("environ", func() (bool, string) {
		code, body := get("/environ")
		return code == 200 && jsonField(body, "ALEPH_API_UNIX_SOCKET") != nil, brief(code, body)
	})
	run("lifespan", func() (bool, string) {
		code, body := get("/lifespan")
		return code == 200 && jsonField(body, "Lifespan") == true, brief(code, body)
	})
	run("cache", func() (bool, string) {
		token := strconv.FormatInt(time.Now().UnixNano(), 36)
		setCode, setBody := get("/cache/set/check/" + token)
		code, body := get("/cache/get/check")
		ok := setCode == 200 && code == 200 && jsonField(body, "value") == token
		return ok, "set: " + brief(setCode, setBody) + "; get: " + brief(code, body)
	})
	run("error_handling", func() (bool, string) {
		code, body := get("/raise")
		return code == 500 && strings.Contains(body, "Traceback"), brief(code, body)
	})
	run("crash_and_restart", func() (bool, string) {
		crashCode, crashBody := get("/crash")
		code, body := get("/")
		ok := crashCode == http.StatusBadGateway && code == 200 && jsonField(body, "Example") == "example_fastapi"
		return ok, "crash: " + brief(crashCode, crashBody) + "; after: " + brief(code, body)
	})
	allOK := true
	for _, c := range checks {
		allOK = allOK && c.OK
	}
	status := http.StatusOK
	if !allOK {
		status = http.StatusServiceUnavailable
	}
	writeJSON(w, status, map[string]any{
		"program":       hash,
		"result":        allOK,
		"checks":        checks,
		"not_available": notAvailableChecks,
	})
}

func brief(code int, body string) string {
	if len(body) > 200 {
		body = body[:200] + "…"
	}
	return http.StatusText(code) + ": " + strings.TrimSpace(body)
}
