package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// runIn runs the CLI in dir with the given environment additions, as a
// user would from a shell there.
func runIn(t *testing.T, dir string, env map[string]string, args ...string) (int, string, string) {
	t.Helper()
	for k, v := range env {
		t.Setenv(k, v)
	}
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chdir(dir); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := os.Chdir(wd); err != nil {
			t.Fatalf("back to %s: %v", wd, err)
		}
	}()
	var out, errOut bytes.Buffer
	code := run(args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestHelpListsFlags(t *testing.T) {
	code, out, _ := runIn(t, t.TempDir(), nil, "--help")
	if code != 0 {
		t.Fatalf("--help exited %d", code)
	}
	for _, flag := range []string{"--print-settings", "--do-not-run", "--no-jailer", "--fake-data-program", "--benchmark", "--system-logs", "--profile", "program upload"} {
		if !strings.Contains(out, flag) {
			t.Errorf("--help does not mention %s", flag)
		}
	}
}

func TestPortPrecedence(t *testing.T) {
	dir := t.TempDir()
	line := func(out string) string {
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, "ALEPH_VM_SUPERVISOR_PORT = ") {
				return l
			}
		}
		return ""
	}
	if _, out, _ := runIn(t, dir, nil, "-p", "-n"); line(out) != "ALEPH_VM_SUPERVISOR_PORT = 4020" {
		t.Fatalf("default: %q", line(out))
	}
	if err := os.WriteFile(filepath.Join(dir, ".env"), []byte("ALEPH_VM_SUPERVISOR_PORT=5001\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, out, _ := runIn(t, dir, nil, "-p", "-n"); line(out) != "ALEPH_VM_SUPERVISOR_PORT = 5001" {
		t.Errorf(".env: %q", line(out))
	}
	env := map[string]string{"ALEPH_VM_SUPERVISOR_PORT": "5002"}
	if _, out, _ := runIn(t, dir, env, "--print-config", "-n"); line(out) != "ALEPH_VM_SUPERVISOR_PORT = 5002" {
		t.Errorf("variable over .env: %q", line(out))
	}
	if _, out, _ := runIn(t, dir, env, "-p", "-n", "--port", "5003"); line(out) != "ALEPH_VM_SUPERVISOR_PORT = 5003" {
		t.Errorf("flag over variable: %q", line(out))
	}
}

func TestBadSettingNamesIt(t *testing.T) {
	code, _, errOut := runIn(t, t.TempDir(), map[string]string{"ALEPH_VM_SUPERVISOR_PORT": "99999"}, "-p", "-n")
	if code == 0 || !strings.Contains(errOut, "ALEPH_VM_SUPERVISOR_PORT") || !strings.Contains(errOut, "99999") {
		t.Errorf("exit %d, stderr %q", code, errOut)
	}
	if n := strings.Count(strings.TrimSpace(errOut), "\n"); n != 0 {
		t.Errorf("error is not one line: %q", errOut)
	}
}

func TestSecretsRedacted(t *testing.T) {
	_, out, _ := runIn(t, t.TempDir(), map[string]string{"ALEPH_VM_REDIS_URL": "redis://u:hunter2@127.0.0.1:6379/0"}, "-p", "-n")
	if strings.Contains(out, "hunter2") || strings.Contains(out, "151ba92f2eb90bce67e912af2f7a5c17") {
		t.Errorf("secret printed:\n%s", out)
	}
}

// `check` and /about/config say where the guest cache lives, never with
// Redis's password.
func TestGuestCacheStoreShown(t *testing.T) {
	dir := t.TempDir()
	env := map[string]string{"ALEPH_VM_EXECUTION_ROOT": dir}
	if _, out, _ := runIn(t, dir, env, "check"); !strings.Contains(out, "guest cache: embedded "+filepath.Join(dir, "guest-cache.sqlite3")+"\n") {
		t.Errorf("check without REDIS_URL:\n%s", out)
	}
	env["ALEPH_VM_REDIS_URL"] = "redis://u:hunter2@127.0.0.1:6379/0"
	_, out, _ := runIn(t, dir, env, "check")
	if !strings.Contains(out, "guest cache: redis redis://u:<redacted>@127.0.0.1:6379/0\n") || strings.Contains(out, "hunter2") {
		t.Errorf("check with REDIS_URL:\n%s", out)
	}
}
