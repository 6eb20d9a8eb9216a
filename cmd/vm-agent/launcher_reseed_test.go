package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// reseedProbe stands for one interpreter restored from a snapshot: it
// sets every generator the launcher re-seeds to the same state (as every
// restore of one image has it), lets the launcher's reseed run, as it
// does when it takes its program, then prints what a program would draw.
const reseedProbe = `
import multiprocessing, random, sys, tempfile
sys.path.insert(0, sys.argv[1])
import launcher

random.seed(1)
multiprocessing.current_process().authkey = b"k" * 32
tempfile._name_sequence = None
next(tempfile._get_candidate_names())
tempfile._name_sequence._rng.seed(1)
launcher.reseed()
print(random.random())
print(bytes(multiprocessing.current_process().authkey).hex())
print(next(tempfile._get_candidate_names()))
`

// Two interpreters that were in the same state when the launcher took
// their programs draw different values from every generator it knows.
// (OpenSSL's is not here: two processes seed it apart anyway; the
// integration test TestAgentRestoredProgramsShareNoSecrets checks it, and
// aiohttp's, in real restores.)
func TestLauncherReseedsWhatARestoreShares(t *testing.T) {
	py := python3(t)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "launcher.py"), []byte(launcherSource), 0o644); err != nil {
		t.Fatal(err)
	}
	draw := func() []string {
		out, err := exec.Command(py, "-c", reseedProbe, dir).CombinedOutput()
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		return strings.Fields(string(out))
	}
	a, b := draw(), draw()
	if len(a) != 3 || len(b) != 3 {
		t.Fatalf("probe printed %q and %q", a, b)
	}
	for i, name := range []string{"random", "multiprocessing authkey", "tempfile name"} {
		if a[i] == b[i] {
			t.Errorf("%s: both drew %s", name, a[i])
		}
	}
}
