package main

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// `runtime add` (what `make runtime` runs before any serve) makes the
// execution root and the local store private, whatever the umask; run
// again over a root an older version left 0755, it makes it private and
// says so.
func TestRuntimeAddMakesRootsPrivate(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	dir := t.TempDir()
	execRoot := filepath.Join(dir, "exec")
	cacheRoot := filepath.Join(dir, "cache")
	runtime := filepath.Join(dir, "rootfs.squashfs")
	if err := os.WriteFile(runtime, []byte("hsqs not really a squashfs"), 0o644); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"ALEPH_VM_EXECUTION_ROOT": execRoot, "ALEPH_VM_CACHE_ROOT": cacheRoot}
	wantModes := func() {
		t.Helper()
		for p, want := range map[string]os.FileMode{
			execRoot:                              0o700,
			filepath.Join(execRoot, "store"):      0o700,
			filepath.Join(cacheRoot, "code"):      0o700,
			filepath.Join(cacheRoot, "snapshots"): 0o700,
			cacheRoot:                             0o755,
		} {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != want {
				t.Errorf("%s: mode %v, want %v", p, fi.Mode().Perm(), want)
			}
		}
	}
	if code, _, errOut := runIn(t, dir, env, "runtime", "add", runtime, "--default"); code != 0 {
		t.Fatalf("runtime add exited %d: %s", code, errOut)
	}
	wantModes()

	for _, p := range []string{execRoot, filepath.Join(execRoot, "store")} {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	code, _, errOut := runIn(t, dir, env, "runtime", "add", runtime)
	if code != 0 {
		t.Fatalf("runtime add exited %d: %s", code, errOut)
	}
	wantModes()
	if !strings.Contains(errOut, "made a directory private") || !strings.Contains(errOut, execRoot) {
		t.Errorf("tightening the roots was not logged:\n%s", errOut)
	}
}
