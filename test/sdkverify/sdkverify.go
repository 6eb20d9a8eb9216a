// Package sdkverify checks what the guest API signs with the official
// Aleph TypeScript SDK (@aleph-sdk/evm's verifyEthereum over
// @aleph-sdk/message's verification buffer), run by Node.js.
//
// The npm packages are pinned by package-lock.json and installed once
// with `npm ci` into a cache directory outside the work tree, keyed by the
// lock file's hash; later runs reuse them without the network.
package sdkverify

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"time"
)

// Verify has the SDK check a message signed by POST /sign against the
// node's GET /properties. It skips the test when Node.js or npm is
// missing, except with CI=true, where that is a failure.
func Verify(t testing.TB, message, properties []byte) error {
	t.Helper()
	dir := Install(t)
	in, err := json.Marshal(map[string]json.RawMessage{"message": message, "properties": properties})
	if err != nil {
		return fmt.Errorf("not JSON: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "node", "verify.mjs")
	cmd.Dir = dir
	cmd.Stdin = bytes.NewReader(in)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("the TypeScript SDK refused it: %w: %s", err, bytes.TrimSpace(out))
	}
	if string(bytes.TrimSpace(out)) != "ok" {
		return fmt.Errorf("verify.mjs said %q", out)
	}
	return nil
}

// Install makes sure the pinned SDK is installed and returns the
// directory holding it and verify.mjs.
func Install(t testing.TB) string {
	t.Helper()
	for _, tool := range []string{"node", "npm"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s missing in CI (scripts/install-deps.sh installs nodejs and npm): %v", tool, err)
			}
			t.Skipf("%s missing: %v", tool, err)
		}
	}
	src := sourceDir()
	lock, err := os.ReadFile(filepath.Join(src, "package-lock.json"))
	if err != nil {
		t.Fatal(err)
	}
	manifest, err := os.ReadFile(filepath.Join(src, "package.json"))
	if err != nil {
		t.Fatal(err)
	}
	script, err := os.ReadFile(filepath.Join(src, "verify.mjs"))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(append(append([]byte{}, manifest...), lock...))
	dir := filepath.Join(cacheRoot(), "sdkverify", hex.EncodeToString(sum[:8]))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// Test binaries of several packages may run at once.
	unlock, err := lockDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	marker := filepath.Join(dir, "node_modules", ".installed")
	if _, err := os.Stat(marker); err != nil {
		for name, b := range map[string][]byte{"package.json": manifest, "package-lock.json": lock} {
			if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		// No install scripts: the SDK's native add-ons have pure-JS
		// fallbacks, and nothing from the registry runs but the SDK itself.
		cmd := exec.CommandContext(ctx, "npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund")
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("npm ci in %s: %v\n%s", dir, err, out)
		}
		if err := os.WriteFile(marker, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "verify.mjs"), script, 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

func sourceDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(file)
}

// cacheRoot is the project's cache of slow artefacts when writable (as
// root), else the user's cache.
func cacheRoot() string {
	const shared = "/var/cache/aleph-vm-build"
	if err := os.MkdirAll(shared, 0o755); err == nil {
		if f, err := os.CreateTemp(shared, ".probe-*"); err == nil {
			f.Close()
			os.Remove(f.Name())
			return shared
		}
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "aleph-vm-build")
	}
	return filepath.Join(os.TempDir(), "aleph-vm-build")
}

func lockDir(dir string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, errors.Join(errors.New("locking the SDK cache"), err)
	}
	return func() { _ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
}
