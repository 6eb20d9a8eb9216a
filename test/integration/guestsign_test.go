package integration

import (
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey"
	"github.com/aleph-vm-go/vm-supervisor/test/sdkverify"
)

// A program sees aleph-vm's environment and reaches the guest API at
// /tmp/socat-socket, the path upstream programs hard-code, as well as at
// the agent's own socket. It has the node sign a message; the official
// TypeScript SDK accepts the signature, and the key, kept 0600 under
// EXECUTION_ROOT, is the same after a restart and never shown.
func TestGuestAPISigningFromInsideTheSandbox(t *testing.T) {
	sdkverify.Install(t) // skip or fail before starting anything
	s := startSupervisor(t)
	hash := s.upload("testdata/probe", "main:app")

	// runtimes/aleph-debian-12-python/init1.py:94-97 and 102-103 (the
	// host name is the base32 label of the item hash, init1.py:528-533).
	r := s.get("/vm/" + hash + "/environ")
	expect(t, r, http.StatusOK)
	env := r.json(t)
	for k, want := range map[string]string{
		"ALEPH_API_HOST":                  "http://localhost",
		"ALEPH_API_UNIX_SOCKET":           "/tmp/socat-socket",
		"ALEPH_REMOTE_CRYPTO_HOST":        "http://localhost",
		"ALEPH_REMOTE_CRYPTO_UNIX_SOCKET": "/tmp/socat-socket",
		"ALEPH_ADDRESS_TO_USE":            message.Base32Label(hash),
	} {
		if env[k] != want {
			t.Errorf("%s = %v, want %s", k, env[k], want)
		}
	}

	call := func(method, path, body, sock string) (int, string) {
		t.Helper()
		q := url.Values{"method": {method}, "path": {path}, "body": {body}, "sock": {sock}}
		r := s.get("/vm/" + hash + "/guest-api?" + q.Encode())
		expect(t, r, http.StatusOK)
		m := r.json(t)
		status, _ := m["status"].(float64)
		text, _ := m["body"].(string)
		return int(status), text
	}
	code, props := call("GET", "/properties", "", "")
	if code != 200 {
		t.Fatalf("properties over ALEPH_API_UNIX_SOCKET: %d %s", code, props)
	}
	for _, sock := range []string{"/tmp/socat-socket", "/run/aleph/api.sock"} {
		if code, body := call("GET", "/properties", "", sock); code != 200 || body != props {
			t.Errorf("properties over %s: %d %s, want %s", sock, code, body, props)
		}
	}

	keyFile := filepath.Join(s.execRoot, nodekey.FileName)
	fi, err := os.Stat(keyFile)
	if err != nil || fi.Mode().Perm() != 0o600 || fi.Size() != 32 {
		t.Fatalf("key file %s: %v %v", keyFile, fi, err)
	}
	key, _, err := nodekey.LoadOrCreate(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	var p map[string]string
	if err := json.Unmarshal([]byte(props), &p); err != nil || p["address"] != key.Address() || p["public_key"] != key.PublicKey() {
		t.Errorf("properties %s are not the key in %s (%s)", props, keyFile, key.Address())
	}

	content, _ := json.Marshal(map[string]any{"address": hash, "time": 1.5, "type": "test", "content": map[string]string{"n": "1"}})
	msg, _ := json.Marshal(map[string]any{
		"chain": "ETH", "type": "POST", "channel": "TEST", "time": 1.5, "item_type": "inline",
		"item_content": string(content), "item_hash": gapiSHA256Hex(content),
	})
	code, signed := call("POST", "/sign", string(msg), "/tmp/socat-socket")
	if code != 200 {
		t.Fatalf("sign: %d %s", code, signed)
	}
	if err := sdkverify.Verify(t, []byte(signed), []byte(props)); err != nil {
		t.Errorf("%v\nsigned: %s", err, signed)
	}
	// guest_api/__main__.py:96-98: only messages the program itself sends.
	foreign := strings.Replace(string(msg), hash, strings.Repeat("0", 64), 1)
	if code, body := call("POST", "/sign", foreign, ""); code != 400 || body != "400: Message address does not match VM item_hash" {
		t.Errorf("foreign address: %d %s", code, body)
	}

	// The secret is in no page and no log line.
	secret, _ := os.ReadFile(keyFile)
	req, _ := http.NewRequest(http.MethodGet, s.base+"/about/config", nil)
	req.AddCookie(s.loginCookie())
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var cfg strings.Builder
	_ = resp.Write(&cfg)
	resp.Body.Close()
	for where, text := range map[string]string{"/about/config": cfg.String(), "the log": s.logs.String()} {
		if strings.Contains(strings.ToLower(text), hex.EncodeToString(secret)) {
			t.Errorf("%s shows the node's secret key", where)
		}
	}

	// A restart reuses the key.
	s.shutdown()
	s.restart()
	if code, again := call("GET", "/properties", "", ""); code != 200 || again != props {
		t.Errorf("after restart: %d %s, want %s", code, again, props)
	}
}
