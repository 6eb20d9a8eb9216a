package httpapi

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"html/template"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
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
<li><a href="/status/check/fastapi">Checks of the diagnostic program</a> (starts a sandbox; takes a few seconds; <a href="/status/check/fastapi/detail">with details</a>)</li>
<li><a href="/about/usage/system">System usage</a></li>
<li><a href="/about/executions/records">Execution records</a></li>
<li><a href="/status/config">Public configuration</a></li>
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

// checkResult is one line of /status/check/fastapi/detail.
type checkResult struct {
	OK     bool   `json:"ok"`
	Detail string `json:"detail,omitempty"`
}

// A check is one of aleph-vm's sub-checks of the diagnostic program
// (orchestrator/status.py): the requests it makes and what it accepts.
type check struct {
	name string
	run  func(c *checker) (bool, string)
	// legacy checks run in retro-compatibility mode too; the others were
	// added with the Debian 12 runtime (views/__init__.py
	// status_check_fastapi).
	legacy bool
}

// fastAPIChecks are aleph-vm's, in its order. crash_and_restart is ours:
// aleph-vm defines it but no longer runs it, so it shows only in the
// detailed view.
var fastAPIChecks = []check{
	{"index", (*checker).index, true},
	{"environ", (*checker).environ, true},
	{"messages", (*checker).messages, true},
	{"dns", (*checker).dns, true},
	{"ipv4", (*checker).ipv4, true},
	{"internet", (*checker).internet, true},
	{"cache", (*checker).cache, true},
	{"persistent_storage", (*checker).persistentStorage, true},
	{"error_handling", (*checker).errorHandling, true},
	{"get_a_message", (*checker).getAMessage, false},
	{"lifespan", (*checker).lifespan, false},
}

const crashCheck = "crash_and_restart"

// requiredChecks decide the status: 200 only if every one of them that
// ran passed, else 503 (views/__init__.py status_check_fastapi,
// required_keys). messages, cache, persistent_storage and get_a_message
// are reported but do not fail the node.
var requiredChecks = []string{"index", "environ", "ipv4", "internet", "dns", "error_handling", "lifespan"}

// checker sends a sub-check's requests through the server itself, the
// path a real request takes (aleph-vm goes through its own HTTP port).
type checker struct {
	s    *Server
	ctx  context.Context
	host string
	hash string
}

func (c *checker) get(path string) (int, []byte) {
	req, err := http.NewRequestWithContext(c.ctx, http.MethodGet, "/vm/"+c.hash+path, nil)
	if err != nil {
		return http.StatusInternalServerError, []byte(err.Error())
	}
	req.Host = c.host
	req.RemoteAddr = "127.0.0.1:0" // the node asking itself
	a := &checkAnswer{header: http.Header{}}
	func() {
		// The proxy aborts a copy that fails (here: an answer over
		// maxCheckAnswer) with http.ErrAbortHandler, as it would under
		// net/http; this request has no server of its own to recover it.
		defer func() {
			if r := recover(); r != nil && r != http.ErrAbortHandler {
				panic(r)
			}
		}()
		c.s.ServeHTTP(a, req)
	}()
	if a.tooLarge {
		return http.StatusBadGateway, []byte(errCheckAnswerTooLarge.Error())
	}
	if a.status == 0 {
		a.status = http.StatusOK
	}
	return a.status, a.body.Bytes()
}

// checkAnswer keeps what the server writes for a check's in-process request.
type checkAnswer struct {
	header   http.Header
	status   int
	body     bytes.Buffer
	tooLarge bool
}

func (a *checkAnswer) Header() http.Header { return a.header }

func (a *checkAnswer) WriteHeader(code int) {
	if a.status == 0 {
		a.status = code
	}
}

// maxCheckAnswer bounds what a check keeps of an answer: aleph-vm's
// checks read small JSON documents, and the self-test program is only
// as trusted as the operator's choice of it.
const maxCheckAnswer = 1 << 20

// errCheckAnswerTooLarge stops the proxy's copy of an oversized answer.
var errCheckAnswerTooLarge = fmt.Errorf("answer exceeds %d bytes", maxCheckAnswer)

func (a *checkAnswer) Write(b []byte) (int, error) {
	a.WriteHeader(http.StatusOK)
	if a.body.Len()+len(b) > maxCheckAnswer {
		a.tooLarge = true
		return 0, errCheckAnswerTooLarge
	}
	return a.body.Write(b)
}

// Flush lets streamed answers through (the proxy flushes as it copies).
func (a *checkAnswer) Flush() {}

// getJSON is aleph-vm's get_json_from_vm: an error status or a body that
// is not JSON fails the check.
func (c *checker) getJSON(path string, into any) (bool, string) {
	code, body := c.get(path)
	if code >= 400 {
		return false, brief(code, body)
	}
	if err := json.Unmarshal(body, into); err != nil {
		return false, "not JSON: " + brief(code, body)
	}
	return true, brief(code, body)
}

func (c *checker) index() (bool, string) {
	var m map[string]any
	ok, d := c.getJSON("/", &m)
	return ok && m["Example"] == "example_fastapi", d
}

func (c *checker) environ() (bool, string) {
	var m map[string]any
	ok, d := c.getJSON("/environ", &m)
	for _, k := range []string{"ALEPH_API_HOST", "ALEPH_API_UNIX_SOCKET", "ALEPH_REMOTE_CRYPTO_HOST",
		"ALEPH_REMOTE_CRYPTO_UNIX_SOCKET", "ALEPH_ADDRESS_TO_USE"} {
		if _, has := m[k]; !has {
			return false, "missing " + k + "; " + d
		}
	}
	return ok, d
}

func (c *checker) messages() (bool, string) {
	var m struct {
		Messages struct {
			Messages []map[string]any `json:"messages"`
		} `json:"Messages"`
	}
	ok, d := c.getJSON("/messages", &m)
	if !ok || len(m.Messages.Messages) == 0 {
		return false, d
	}
	_, has := m.Messages.Messages[0]["item_hash"]
	return has, d
}

func (c *checker) dns() (bool, string) {
	var m map[string]any
	ok, d := c.getJSON("/dns", &m)
	return ok && truthy(m["ipv4"]) && truthy(m["ipv6"]), d
}

func (c *checker) ipv4() (bool, string) {
	var m map[string]any
	ok, d := c.getJSON("/ip/4", &m)
	return ok && m["result"] == true, d
}

// internet accepts {"result": true} or {"result": <integer below 400>}:
// aleph-vm's check_internet (status.py) wants an int under 400, and
// Python's True is an int.
func (c *checker) internet() (bool, string) {
	var m map[string]any
	ok, d := c.getJSON("/internet", &m)
	if !ok {
		return false, d
	}
	switch v := m["result"].(type) {
	case bool:
		return v, d
	case float64:
		return v == float64(int64(v)) && v < 400, d
	}
	return false, d
}

func (c *checker) cache() (bool, string) {
	var set bool
	ok, d := c.getJSON("/cache/set/a/42", &set)
	if !ok || !set {
		return false, "set: " + d
	}
	var got any
	if ok, d = c.getJSON("/cache/get/a", &got); !ok || got != "42" {
		return false, "get: " + d
	}
	var keys []string
	if ok, d = c.getJSON("/cache/keys", &keys); !ok || !slices.Contains(keys, "a") {
		return false, "keys: " + d
	}
	return true, d
}

func (c *checker) persistentStorage() (bool, string) {
	var first, second struct {
		Counter *int `json:"counter"`
	}
	ok, d := c.getJSON("/state/increment", &first)
	if !ok || first.Counter == nil {
		return false, d
	}
	ok, d = c.getJSON("/state/increment", &second)
	return ok && second.Counter != nil && *second.Counter >= *first.Counter+1, d
}

func (c *checker) errorHandling() (bool, string) {
	code, body := c.get("/raise")
	return code == http.StatusInternalServerError && bytes.Contains(body, []byte("Traceback")), brief(code, body)
}

func (c *checker) getAMessage() (bool, string) {
	var m map[string]any
	ok, d := c.getJSON("/get_a_message", &m)
	_, has := m["item_hash"]
	return ok && has, d
}

func (c *checker) lifespan() (bool, string) {
	var m map[string]any
	ok, d := c.getJSON("/lifespan", &m)
	return ok && m["Lifespan"] == true, d
}

func (c *checker) crashAndRestart() (bool, string) {
	crashCode, crashBody := c.get("/crash")
	if crashCode != http.StatusBadGateway {
		return false, "crash: " + brief(crashCode, crashBody)
	}
	ok, d := c.index()
	return ok, "after the crash: " + d
}

// truthy is Python's truth of a JSON value.
func truthy(v any) bool {
	switch v := v.(type) {
	case nil:
		return false
	case bool:
		return v
	case string:
		return v != ""
	case float64:
		return v != 0
	case []any:
		return len(v) > 0
	case map[string]any:
		return len(v) > 0
	}
	return true
}

// runChecks runs aleph-vm's sub-checks against the diagnostic program
// (the legacy ones only when retro), then ours when detail is set.
func (s *Server) runChecks(w http.ResponseWriter, r *http.Request, retro, detail bool) (hash string, results map[string]checkResult, ok bool) {
	if s.opts.SelfTestProgram == nil {
		s.writeError(w, r, errkind.New(errkind.NoBackend, "no diagnostic program configured"))
		return "", nil, false
	}
	ctx, cancel := context.WithTimeout(r.Context(), 3*time.Minute)
	defer cancel()
	hash, err := s.opts.SelfTestProgram(ctx)
	if err != nil {
		s.writeError(w, r, err)
		return "", nil, false
	}
	c := &checker{s: s, ctx: ctx, host: r.Host, hash: hash}
	results = map[string]checkResult{}
	for _, chk := range fastAPIChecks {
		if retro && !chk.legacy {
			continue
		}
		passed, d := chk.run(c)
		results[chk.name] = checkResult{OK: passed, Detail: d}
	}
	if detail {
		passed, d := c.crashAndRestart()
		results[crashCheck] = checkResult{OK: passed, Detail: d}
	}
	return hash, results, true
}

func requiredPass(results map[string]checkResult) bool {
	for _, k := range requiredChecks {
		if res, ran := results[k]; ran && !res.OK {
			return false
		}
	}
	return true
}

// handleCheckFastAPI is aleph-vm's /status/check/fastapi: a flat
// {check: bool} body, 200 when the required checks pass, else 503.
// ?retro-compatibility=true runs only the checks older runtimes pass.
func (s *Server) handleCheckFastAPI(w http.ResponseWriter, r *http.Request) {
	s.checkFastAPI(w, r, r.URL.Query().Get("retro-compatibility") == "true")
}

// handleCheckFastAPILegacy is /status/check/fastapi/legacy. aleph-vm runs
// it against LEGACY_CHECK_FASTAPI_VM_ID in retro-compatibility mode; this
// node has a single diagnostic program, checked in that mode.
func (s *Server) handleCheckFastAPILegacy(w http.ResponseWriter, r *http.Request) {
	s.checkFastAPI(w, r, true)
}

func (s *Server) checkFastAPI(w http.ResponseWriter, r *http.Request, retro bool) {
	_, results, ok := s.runChecks(w, r, retro, false)
	if !ok {
		return
	}
	flat := make(map[string]bool, len(results))
	for k, v := range results {
		flat[k] = v.OK
	}
	status := http.StatusOK
	if !requiredPass(results) {
		status = http.StatusServiceUnavailable
	}
	writeJSON(w, status, flat)
}

// handleCheckFastAPIDetail is ours: the same checks plus crash recovery,
// with what each request answered, for an operator finding out why a
// check fails. Same status rule as the flat view.
func (s *Server) handleCheckFastAPIDetail(w http.ResponseWriter, r *http.Request) {
	hash, results, ok := s.runChecks(w, r, r.URL.Query().Get("retro-compatibility") == "true", true)
	if !ok {
		return
	}
	status := http.StatusOK
	if !requiredPass(results) {
		status = http.StatusServiceUnavailable
	}
	writeJSON(w, status, map[string]any{
		"program":  hash,
		"result":   status == http.StatusOK,
		"required": requiredChecks,
		"checks":   results,
	})
}

func brief(code int, body []byte) string {
	b := strings.TrimSpace(string(body))
	if len(b) > 300 {
		b = b[:300] + "…"
	}
	return fmt.Sprintf("%d %s: %s", code, http.StatusText(code), b)
}
