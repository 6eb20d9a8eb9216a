package integration

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// noUvicornRuntime is the runtime image without uvicorn (`make
// runtime-no-uvicorn`), like aleph-vm's official runtimes.
func noUvicornRuntime(t *testing.T) string {
	t.Helper()
	p := os.Getenv("ALEPH_TEST_RUNTIME_NO_UVICORN")
	if p == "" {
		p, _ = filepath.Abs("../../runtimes/aleph-debian-12-python/rootfs-no-uvicorn.squashfs")
	}
	if _, err := os.Stat(p); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("prerequisite missing in CI: runtime without uvicorn (make runtime-no-uvicorn): %v", err)
		}
		t.Skipf("runtime without uvicorn missing (make runtime-no-uvicorn): %v", err)
	}
	return p
}

// addRuntime registers a runtime image and returns its ref.
func (s *supervisor) addRuntime(path string) string {
	s.t.Helper()
	lines := strings.Split(strings.TrimSpace(s.cli("runtime", "add", path)), "\n")
	return strings.TrimSpace(lines[len(lines)-1])
}

// republish publishes, through the test Aleph API, the content of an
// uploaded program changed by edit, and returns the new program's hash.
func (s *supervisor) republish(uploaded string, edit func(content map[string]any)) string {
	t := s.t
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(s.execRoot, "store", "messages", uploaded+".json"))
	if err != nil {
		t.Fatal(err)
	}
	var m struct {
		ItemContent string `json:"item_content"`
	}
	if err := json.Unmarshal(raw, &m); err != nil || m.ItemContent == "" {
		t.Fatalf("uploaded message %s: %v", uploaded, err)
	}
	var content map[string]any
	if err := json.Unmarshal([]byte(m.ItemContent), &content); err != nil {
		t.Fatal(err)
	}
	edit(content)
	return s.api.addInline(t, "PROGRAM", content["address"].(string), content)
}

// TestExampleWithoutUvicorn: on a runtime without uvicorn the example
// program is served by the launcher's standard-library server: its routes,
// lifespan startup, a streamed response, a large request body, the
// traceback of an exception, and the lifespan shutdown when it stops.
func TestExampleWithoutUvicorn(t *testing.T) {
	rt := noUvicornRuntime(t)
	s := startSupervisor(t)
	ref := s.addRuntime(rt)
	hash := s.upload("../../examples/example_fastapi", "main:app", "--runtime", ref)

	r := s.get("/vm/" + hash + "/")
	expect(t, r, http.StatusOK)
	if got := r.json(t); got["Example"] != "example_fastapi" {
		t.Errorf("/: %s", r.Body)
	}
	// The program's output comes through its own pipe: the line may
	// follow the answer by a moment.
	s.waitLog("standard library server: no uvicorn", 1, 5*time.Second)
	r = s.get("/vm/" + hash + "/lifespan")
	expect(t, r, http.StatusOK)
	if got := r.json(t); got["Lifespan"] != true {
		t.Errorf("lifespan startup did not run: %s", r.Body)
	}

	// Streamed: the chunks arrive as the program yields them.
	start := time.Now()
	resp, err := client.Get(s.base + "/vm/" + hash + "/stream?chunks=4&delay=0.3")
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len("chunk 0\n"))
	if _, err := resp.Body.Read(buf); err != nil || string(buf) != "chunk 0\n" {
		t.Fatalf("first chunk %q: %v", buf, err)
	}
	first := time.Since(start)
	rest := new(bytes.Buffer)
	if _, err := rest.ReadFrom(resp.Body); err != nil {
		t.Errorf("rest of the stream after %q: %v", rest, err)
	}
	resp.Body.Close()
	if rest.String() != "chunk 1\nchunk 2\nchunk 3\n" {
		t.Errorf("rest of the stream: %q", rest)
	}
	if total := time.Since(start); total-first < 600*time.Millisecond {
		t.Errorf("first chunk after %s, all after %s: the stream was buffered", first, total)
	}

	// A request body larger than any single read, echoed as its digest.
	payload := make([]byte, 3<<20)
	rand.Read(payload)
	sum := sha256.Sum256(payload)
	r = s.do(http.MethodPost, "/vm/"+hash+"/echo", bytes.NewReader(payload))
	expect(t, r, http.StatusOK)
	if got := r.json(t); got["sha256"] != hex.EncodeToString(sum[:]) || got["length"] != float64(len(payload)) {
		t.Errorf("/echo: %s", r.Body)
	}

	r = s.get("/vm/" + hash + "/raise")
	expect(t, r, http.StatusInternalServerError)
	if !strings.Contains(string(r.Body), "Error: This exception was raised on purpose") {
		t.Errorf("/raise: %s", r.Body)
	}

	s.shutdown()
	if !strings.Contains(s.logs.String(), "example_fastapi: shutdown event ran") {
		t.Errorf("the lifespan shutdown did not run:\n%s", tail(s.logs.String(), 40))
	}
}

// TestStartFailureAnswersTraceback: a program that cannot start (its
// import raises, its lifespan startup raises) answers 500 with the Python
// traceback as text, as aleph-vm does, with uvicorn and without.
func TestStartFailureAnswersTraceback(t *testing.T) {
	s := startSupervisor(t)
	runtimes := map[string]string{"uvicorn": "", "stdlib": s.addRuntime(noUvicornRuntime(t))}
	for name, ref := range runtimes {
		for _, c := range []struct{ entry, want string }{
			{"import_error:app", "ModuleNotFoundError: No module named 'module_that_is_not_installed'"},
			{"lifespan_error:app", "RuntimeError: startup refused on purpose"},
		} {
			t.Run(name+"/"+c.entry, func(t *testing.T) {
				flags := []string{}
				if ref != "" {
					flags = append(flags, "--runtime", ref)
				}
				hash := s.upload("testdata/startfail", c.entry, flags...)
				r := s.get("/vm/" + hash + "/")
				expect(t, r, http.StatusInternalServerError)
				body := string(r.Body)
				if !strings.HasPrefix(body, "Traceback (most recent call last):") || !strings.Contains(body, c.want) {
					t.Errorf("body does not carry the traceback with %q:\n%s", c.want, body)
				}
				if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
					t.Errorf("Content-Type %q", ct)
				}
			})
		}
	}
}

// TestCodeInterface: the message's code.interface decides how the code
// runs, over the entrypoint's look; plain code with interface asgi names
// the app in the file, as aleph-vm's runtimes take it.
func TestCodeInterface(t *testing.T) {
	s := startSupervisor(t)

	plain := s.upload("testdata/plain_app.py", "app", "--encoding", "plain")
	asgi := s.republish(plain, func(c map[string]any) {
		c["code"].(map[string]any)["interface"] = "asgi"
	})
	r := s.get("/vm/" + asgi + "/")
	expect(t, r, http.StatusOK)
	if got := r.json(t); got["encoding"] != "plain" {
		t.Errorf("plain code, interface asgi: %s", r.Body)
	}

	exe := s.upload("testdata/executable", "serve")
	binary := s.republish(exe, func(c map[string]any) {
		c["code"].(map[string]any)["interface"] = "binary"
	})
	r = s.get("/vm/" + binary + "/")
	expect(t, r, http.StatusOK)
	if got := r.json(t); got["kind"] != "executable" {
		t.Errorf("interface binary: %s", r.Body)
	}
}

// TestPackagesVolume: a dependency volume mounted at /opt/packages is on
// the program's import path, right after the code, as on aleph-vm; and
// upstream's library directory follows.
func TestPackagesVolume(t *testing.T) {
	s := startSupervisor(t)
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "aleph_test_dependency.py"), []byte("VALUE = 'from the volume'\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "packages.squashfs")
	if out, err := exec.Command("mksquashfs", src, img, "-noappend", "-all-root", "-quiet").CombinedOutput(); err != nil {
		t.Fatalf("mksquashfs: %v %s", err, out)
	}
	vol, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(vol)
	volHash := hex.EncodeToString(sum[:])
	s.api.mu.Lock()
	s.api.files[volHash] = vol
	s.api.mu.Unlock()
	volRef := s.api.addInline(t, "STORE", hostileOwner, map[string]any{
		"address": hostileOwner, "time": 1700000000.0, "item_type": "storage", "item_hash": volHash,
	})

	uploaded := s.upload("testdata/uses_packages", "main:app")
	hash := s.republish(uploaded, func(c map[string]any) {
		c["volumes"] = []map[string]any{{"mount": "/opt/packages", "ref": volRef, "use_latest": false}}
	})
	r := s.get("/vm/" + hash + "/")
	expect(t, r, http.StatusOK)
	var got struct {
		Dependency string   `json:"dependency"`
		File       string   `json:"file"`
		SysPath    []string `json:"sys_path"`
	}
	if err := json.Unmarshal(r.Body, &got); err != nil {
		t.Fatal(err)
	}
	if got.Dependency != "from the volume" || got.File != "/opt/packages/aleph_test_dependency.py" {
		t.Errorf("dependency: %+v", got)
	}
	idx := func(p string) int {
		for i, e := range got.SysPath {
			if e == p {
				return i
			}
		}
		return -1
	}
	code, pkgs, libs := idx("/opt/code"), idx("/opt/packages"), idx("/opt/aleph/libs")
	if code != 0 || pkgs != 1 || libs < 2 || libs > idx("/usr/lib/python3/dist-packages") {
		t.Errorf("sys.path %v: want /opt/code, /opt/packages first and /opt/aleph/libs before the runtime's packages", got.SysPath)
	}
}
