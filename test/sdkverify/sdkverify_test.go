package sdkverify

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/guestapi"
	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey"
)

// The real guest API handler, served on a unix socket as programs reach
// it, signs a message with a freshly generated node key; the official
// TypeScript SDK must accept the signature and agree with /properties.
// (test/integration TestGuestAPISigningFromInsideTheSandbox does the same
// from a program inside a sandbox.)
func TestTypeScriptSDKAcceptsGuestAPISignatures(t *testing.T) {
	Install(t) // skip or fail early, before anything starts
	dir := t.TempDir()
	key, _, err := nodekey.LoadOrCreate(filepath.Join(dir, nodekey.FileName))
	if err != nil {
		t.Fatal(err)
	}
	const vmHash = "a2f7c0f5b1de5e4c0e9a4c4b8f1f0e1d2c3b4a5968778695a4b3c2d1e0f0a1b2"
	sock := filepath.Join(dir, "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: guestapi.New(guestapi.Options{Program: guestapi.Program{Hash: vmHash}, Signer: key})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", sock)
	}}}
	call := func(method, path, body string) []byte {
		t.Helper()
		req, _ := http.NewRequest(method, "http://localhost"+path, strings.NewReader(body))
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			t.Fatalf("%s %s: %s %s", method, path, resp.Status, b)
		}
		return b
	}

	props := call("GET", "/properties", "")
	content, _ := json.Marshal(map[string]any{"address": vmHash, "time": 1.25, "type": "test", "content": map[string]string{"hello": "wörld"}})
	msg, _ := json.Marshal(map[string]any{
		"chain": "ETH", "type": "POST", "channel": "TEST", "time": 1.25, "item_type": "inline",
		// The guest API signs only a message whose item_hash is its content's.
		"item_content": string(content), "item_hash": fmt.Sprintf("%x", sha256.Sum256(content)),
	})
	signed := call("POST", "/sign", string(msg))
	if err := Verify(t, signed, props); err != nil {
		t.Fatalf("%v\nproperties %s\nsigned %s", err, props, signed)
	}

	// The same check refuses a signature that is not the node's.
	other, err := nodekey.Generate()
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	_ = json.Unmarshal(signed, &m)
	m["signature"] = other.SignPersonal(nodekey.VerificationBuffer("ETH", key.Address(), "POST", m["item_hash"].(string)))
	forged, _ := json.Marshal(m)
	if err := Verify(t, forged, props); err == nil {
		t.Fatal("the SDK accepted another key's signature")
	}
}
