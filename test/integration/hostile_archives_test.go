package integration

import (
	"archive/zip"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

const hostileOwner = "0x9319Ad3B7A8E0eE24f2E639c40D8eD124C5520Ba"

// addCodeProgram publishes code (the bytes of an archive) on the fake
// Aleph API with a STORE message, and a PROGRAM on the default runtime
// with default resources (so a spare can take it). It returns the
// program's hash and the code file's hash.
func (s *supervisor) addCodeProgram(t *testing.T, runtimeRef, encoding string, code []byte) (program, codeHash string) {
	t.Helper()
	sum := sha256.Sum256(code)
	codeHash = hex.EncodeToString(sum[:])
	s.api.mu.Lock()
	s.api.files[codeHash] = code
	s.api.mu.Unlock()
	ref := s.api.addInline(t, "STORE", hostileOwner, map[string]any{
		"address": hostileOwner, "time": 1700000000.0, "item_type": "storage", "item_hash": codeHash,
	})
	program = s.api.addInline(t, "PROGRAM", hostileOwner, map[string]any{
		"type": "vm-function", "address": hostileOwner, "time": 1700000000.0, "allow_amend": false,
		"code":        map[string]any{"encoding": encoding, "entrypoint": "main:app", "ref": ref, "use_latest": false},
		"runtime":     map[string]any{"ref": runtimeRef, "use_latest": false, "comment": "default"},
		"on":          map[string]any{"http": true},
		"environment": map[string]any{"internet": false, "aleph_api": false, "reproducible": false, "shared_cache": false},
		"resources":   map[string]any{"vcpus": 1, "memory": 128, "seconds": 30},
		"variables":   map[string]any{},
	})
	return program, codeHash
}

// must fails the test when a setup step fails.
func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func zipBytes(t *testing.T, entries map[string]string, links map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for name, body := range entries {
		w, err := zw.Create(name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write([]byte(body)); err != nil {
			t.Fatal(err)
		}
	}
	for name, target := range links {
		h := &zip.FileHeader{Name: name}
		h.SetMode(os.ModeSymlink | 0o777)
		w, err := zw.CreateHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write([]byte(target)); err != nil {
			t.Fatal(err)
		}
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func squashfsBytes(t *testing.T, build func(src string)) []byte {
	t.Helper()
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "main.py"), []byte(probeApp), 0o644); err != nil {
		t.Fatal(err)
	}
	build(src)
	img := filepath.Join(t.TempDir(), "code.squashfs")
	if out, err := exec.Command("mksquashfs", src, img, "-noappend", "-quiet", "-no-progress").CombinedOutput(); err != nil {
		t.Fatalf("mksquashfs: %v: %s", err, out)
	}
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// probeApp is a minimal ASGI app without dependencies beyond the runtime.
const probeApp = `
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"fine"})
`

// Archives that try to escape, forge or flood are refused with a 4xx that
// names the problem; the refusal is remembered (one extraction, the spare
// kept); programs next to them keep working.
func TestHostileArchives(t *testing.T) {
	if hypervisor != "gvisor" {
		t.Skip("the code cache and spares are the gVisor backend's")
	}
	if _, err := exec.LookPath("mksquashfs"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("mksquashfs (squashfs-tools) missing in CI")
		}
		t.Skip("mksquashfs not installed")
	}
	s := startSupervisor(t)
	runtimeRef := strings.TrimSpace(s.cli("runtime", "add", runtimeFile, "--default"))
	neighbour := s.upload("testdata/probe", "main:app")

	// The neighbour runs before the attacks (in the first spare); another
	// spare follows, which the attacks must not cost.
	expect(t, s.get("/vm/"+neighbour+"/"), http.StatusOK)
	discarded := func() int { return strings.Count(s.logs.String(), `msg="discarding spare sandbox"`) }
	adopted := func() int { return strings.Count(s.logs.String(), `msg="using a pre-warmed sandbox"`) }
	offlineSpares := regexp.MustCompile(`msg="spare sandbox ready" .*internet=false`)
	for deadline := time.Now().Add(60 * time.Second); len(offlineSpares.FindAllString(s.logs.String(), -1)) < 2; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no spare sandbox after 60s")
		}
	}
	discardedBefore, adoptedBefore := discarded(), adopted()

	deep := strings.Repeat("d/", 30)
	var bomb = map[string]string{}
	for i := range 5000 {
		bomb[fmt.Sprintf("b%d/%sf", i, deep)] = ""
	}
	cases := []struct {
		name, encoding string
		code           []byte
		status         int
		want           string
	}{
		{"zip link chain", "zip", zipBytes(t, map[string]string{"main.py": probeApp, "d/f": "x"},
			map[string]string{"d/up": "..", "esc": "d/up/../etc/passwd"}), http.StatusBadRequest, "does not resolve inside the code directory"},
		{"zip directory bomb", "zip", zipBytes(t, bomb, nil), http.StatusRequestEntityTooLarge, "entries once extracted (directories included)"},
		{"squashfs forged listing", "squashfs", squashfsBytes(t, func(src string) {
			must(t, os.WriteFile(filepath.Join(src, "x\n-rw-r--r-- 0 -3221225472 2024-01-01 00:00 squashfs-root"), nil, 0o644))
		}), http.StatusBadRequest, "squashfs listing: malformed owner"},
		{"squashfs device", "squashfs", squashfsBytes(t, func(src string) {
			if err := syscall.Mknod(filepath.Join(src, "mem"), syscall.S_IFCHR|0o666, 1<<8|1); err != nil {
				t.Fatal(err)
			}
		}), http.StatusBadRequest, "device node"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			prog, codeHash := s.addCodeProgram(t, runtimeRef, c.encoding, c.code)
			// A neighbour asked while the archive is examined answers.
			neighbourDone := make(chan response, 1)
			go func() {
				time.Sleep(200 * time.Millisecond)
				neighbourDone <- s.get("/vm/" + neighbour + "/")
			}()
			start := time.Now()
			r1 := s.get("/vm/" + prog + "/")
			first := time.Since(start)
			if r := <-neighbourDone; r.Status != http.StatusOK {
				t.Errorf("neighbour answered %d: %s", r.Status, r.Body)
			}
			start = time.Now()
			r2 := s.get("/vm/" + prog + "/")
			second := time.Since(start)
			expect(t, r1, c.status)
			expect(t, r2, c.status)
			if !strings.Contains(string(r1.Body), "unsafe code archive") || !strings.Contains(string(r1.Body), c.want) {
				t.Errorf("the error does not name the problem: %s", r1.Body)
			}
			if string(r1.Body) != string(r2.Body) {
				t.Errorf("second answer differs:\n%s\n%s", r1.Body, r2.Body)
			}
			// One extraction: the refusal is logged once, the second
			// answer comes from the remembered refusal. The log reaches
			// the test through a pipe, possibly after the answer.
			refused := func() int {
				return strings.Count(s.logs.String(), `msg="code refused" backend=gvisor cache=code key=`+codeHash)
			}
			for deadline := time.Now().Add(5 * time.Second); refused() == 0 && time.Now().Before(deadline); {
				time.Sleep(50 * time.Millisecond)
			}
			if n := refused(); n != 1 {
				t.Errorf("code extracted and refused %d times, want 1", n)
			}
			t.Logf("%s: %d in %s, again in %s", c.name, r1.Status, first.Round(time.Millisecond), second.Round(time.Millisecond))
		})
	}
	// No spare was thrown away for them, and one serves the next program.
	if n := discarded() - discardedBefore; n != 0 {
		t.Errorf("%d spares discarded while refusing archives", n)
	}
	if strings.Contains(s.logs.String(), "could not use the spare sandbox") {
		t.Error("a refused archive made the pool start a fresh sandbox")
	}
	good, _ := s.addCodeProgram(t, runtimeRef, "zip", zipBytes(t, map[string]string{"main.py": probeApp}, nil))
	if r := s.get("/vm/" + good + "/"); r.Status != http.StatusOK || string(r.Body) != "fine" {
		t.Errorf("good program after the attacks: %d %s", r.Status, r.Body)
	}
	if adopted() == adoptedBefore {
		t.Error("no spare served the good program")
	}
	checkCodeNormalised(t, s, runtimeRef)
}

// checkCodeNormalised: set-id bits, foreign owners and world-writable
// modes are accepted but normalised in the host's cache.
func checkCodeNormalised(t *testing.T, s *supervisor, runtimeRef string) {
	t.Helper()
	prog, codeHash := s.addCodeProgram(t, runtimeRef, "squashfs", squashfsBytes(t, func(src string) {
		must(t, os.Chmod(src, 0o777))
		p := filepath.Join(src, "suid")
		must(t, os.WriteFile(p, []byte("x"), 0o644))
		must(t, os.Chown(p, 1234, 5678))
		must(t, syscall.Chmod(p, 0o4777))
		must(t, os.Mkdir(filepath.Join(src, "tmp"), 0o777))
		must(t, syscall.Chmod(filepath.Join(src, "tmp"), 0o1777))
	}))
	expect(t, s.get("/vm/"+prog+"/"), http.StatusOK)
	tree := filepath.Join(s.cache, "code", codeHash+".squashfs")
	err := filepath.WalkDir(tree, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		m := fi.Mode() & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
		if st.Uid != 0 || st.Gid != 0 || (fi.IsDir() && m != 0o755) || (fi.Mode().IsRegular() && m != 0o644 && m != 0o755) {
			t.Errorf("%s in the host cache: owner %d:%d mode %v", p, st.Uid, st.Gid, fi.Mode())
		}
		return nil
	})
	if err != nil {
		t.Fatalf("walking the cached tree %s: %v", tree, err)
	}
}
