package sdkverify

import (
	"context"
	"encoding/json"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/ownerauth"
)

// consoleScript makes the owner's headers as aleph's web console does:
// WebCrypto's ECDSA P-256 key exported as a JWK, approved by an ethers
// wallet's signMessage over the JSON payload, and WebCrypto's ES256
// signature (r‖s) of the operation. Input: the wallet's private key, the
// domain and the path; output: the two header values.
const consoleScript = `
import { Wallet } from "ethers";
const [secret, domain, path] = process.argv.slice(2);
const wallet = new Wallet(secret);
const { subtle } = globalThis.crypto;
const key = await subtle.generateKey({ name: "ECDSA", namedCurve: "P-256" }, true, ["sign", "verify"]);
const { kty, crv, x, y } = await subtle.exportKey("jwk", key.publicKey);
const hex = (s) => Buffer.from(s, "utf8").toString("hex");
const pubkey = JSON.stringify({
  pubkey: { kty, crv, x, y }, alg: "ECDSA", domain, address: wallet.address,
  expires: new Date(Date.now() + 3600e3).toISOString(),
});
const op = JSON.stringify({ time: new Date().toISOString(), method: "POST", path, domain });
const sig = await subtle.sign({ name: "ECDSA", hash: "SHA-256" }, key.privateKey, Buffer.from(op, "utf8"));
console.log(JSON.stringify({
  "X-SignedPubKey": JSON.stringify({ payload: hex(pubkey), signature: await wallet.signMessage(pubkey) }),
  "X-SignedOperation": JSON.stringify({ payload: hex(op), signature: Buffer.from(sig).toString("hex") }),
  address: wallet.address,
}));
`

// TestConsoleMadeOwnerHeaders: headers made by another implementation
// (ethers and WebCrypto, as the console makes them) pass ownerauth.
func TestConsoleMadeOwnerHeaders(t *testing.T) {
	dir := Install(t)
	f, err := os.CreateTemp(dir, "ownerauth-*.mjs")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(f.Name())
	if _, err := f.WriteString(consoleScript); err != nil {
		t.Fatal(err)
	}
	f.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const domain, path = "node.example", "/control/machine/abc/stop"
	secret := "0x" + strings.Repeat("11", 32)
	cmd := exec.CommandContext(ctx, "node", f.Name(), secret, domain, path)
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("node: %v", err)
	}
	var h map[string]string
	if err := json.Unmarshal(out, &h); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	r := httptest.NewRequest("POST", path, nil)
	r.Header.Set(ownerauth.HeaderPubKey, h["X-SignedPubKey"])
	r.Header.Set(ownerauth.HeaderOperation, h["X-SignedOperation"])
	addr, err := ownerauth.Verifier{Domain: domain}.Request(r)
	if err != nil {
		t.Fatal(err)
	}
	if addr != h["address"] {
		t.Fatalf("authenticated %s, want %s", addr, h["address"])
	}
}
