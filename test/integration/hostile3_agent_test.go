package integration

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Programs restored from one snapshot start from one interpreter's memory:
// whatever it drew from the kernel's generator before the checkpoint and
// kept would be the same in all of them, known to every other program
// restored from the image. The launcher draws it again when it takes its
// program. Two programs restored from the same image report what a
// program could use as a secret or a nonce (random, multiprocessing's
// authentication key, aiohttp's websocket masks, tempfile's names,
// OpenSSL's generator, os.urandom): each must differ between them.
func TestAgentRestoredProgramsShareNoSecrets(t *testing.T) {
	snapshotsUnderTest(t)
	s := startSupervisor(t)
	waitDefaultImages(t, s)
	s.shutdown()
	s.restart("ALEPH_VM_PREWARM=false")
	mark := len(s.logs.String())

	var reports []map[string]any
	for i := range 2 {
		h := s.upload(agentSecretsProgram(t, i), "main:app")
		r := s.get("/vm/" + h + "/secrets")
		expect(t, r, http.StatusOK)
		reports = append(reports, r.json(t))
	}
	if n := strings.Count(s.logs.String()[mark:], "restored a warm sandbox"); n != 2 {
		t.Fatalf("%d restores for 2 cold starts without spares, want 2:\n%s", n, tail(s.logs.String()[mark:], 60))
	}
	a, b := reports[0], reports[1]
	t.Logf("preloaded at the checkpoint: %v", a["preloaded"])
	for _, k := range []string{"random", "authkey", "aiohttp_mask", "tempfile", "ssl_rand", "urandom"} {
		va, vb := fmt.Sprint(a[k]), fmt.Sprint(b[k])
		switch {
		case strings.HasPrefix(va, "error:") || strings.HasPrefix(vb, "error:"):
			t.Errorf("%s: the program could not draw it: %s / %s", k, va, vb)
		case va == vb:
			t.Errorf("%s: two programs restored from one snapshot drew the same %s", k, va)
		}
	}
	// runsc restore gives each sandbox the hostname of its own spec (its
	// execution's), not the checkpointed spare's.
	if a["hostname"] == b["hostname"] {
		t.Errorf("two programs restored from one snapshot have the same hostname %v", a["hostname"])
	}
	// Shared by design (the hash seed, gVisor's boot id), or the same in
	// every sandbox anyway: logged for the record.
	for _, k := range []string{"hash", "boot_id", "machine_id", "tmp", "pid", "env"} {
		t.Logf("%s: %v | %v", k, a[k], b[k])
	}
}

// agentSecretsProgram is a copy of testdata/agent_secrets with a hash of
// its own for each n.
func agentSecretsProgram(t *testing.T, n int) string {
	t.Helper()
	src, err := os.ReadFile("testdata/agent_secrets/main.py")
	if err != nil {
		t.Fatal(err)
	}
	code := t.TempDir()
	if err := os.WriteFile(filepath.Join(code, "main.py"), fmt.Appendf(src, "\n# program %d\n", n), 0o644); err != nil {
		t.Fatal(err)
	}
	return code
}

// The supervisor's roots are private from the first command that makes
// them (`runtime add`, as `make runtime` runs it, in the harness), and
// the files that hold programs' data are the supervisor's alone: no
// other user of the host can list the store, read the records or the
// guest cache, or the cached code and snapshot images.
func TestAgentRootsArePrivate(t *testing.T) {
	backendIndependent(t)
	s := startSupervisor(t)
	h := s.upload("testdata/probe", "main:app")
	expect(t, s.get("/vm/"+h+"/"), http.StatusOK)
	for _, dir := range []string{
		s.execRoot, filepath.Join(s.execRoot, "store"), filepath.Join(s.cache, "code"),
		filepath.Join(s.cache, "snapshots"),
	} {
		agentWantMode(t, dir, 0o700)
	}
	dbs, _ := filepath.Glob(filepath.Join(s.execRoot, "*.sqlite3*"))
	if len(dbs) == 0 {
		t.Fatal("no database files in the execution root")
	}
	for _, f := range dbs {
		agentWantMode(t, f, 0o600)
	}
	// No file directly under the execution root is open to others.
	entries, err := os.ReadDir(s.execRoot)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if fi, err := e.Info(); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o077 != 0 {
			t.Errorf("%s: mode %v, open to other users", e.Name(), fi.Mode().Perm())
		}
	}
}

func agentWantMode(t *testing.T, path string, want os.FileMode) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Error(err)
		return
	}
	if fi.Mode().Perm() != want {
		t.Errorf("%s: mode %v, want %v", path, fi.Mode().Perm(), want)
	}
}
