package ownerauth_test

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/mr-tron/base58"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/ownerauth"
)

// solanaWallet is a fixed Solana wallet (ed25519 is deterministic: the
// same seed gives the same address and signatures on every run).
func solanaWallet(n byte) ed25519.PrivateKey {
	seed := sha256.Sum256([]byte{n})
	return ed25519.NewKeyFromSeed(seed[:])
}

// TestSolanaUpstreamShape builds the headers exactly as upstream's
// test_require_jwk_authentication_good_key_solana does: Python's
// json.dumps of the payload (", " and ": " separators), chain "SOL",
// the wallet's signature (solathon Keypair.sign of the payload's hex
// text) as 0x-hex, an operation GET / on localhost at the patched time
// 2010-12-25T17:05:55Z; the key expires a day later. The answer is the
// wallet's base58 address.
func TestSolanaUpstreamShape(t *testing.T) {
	now := time.Date(2010, 12, 25, 17, 5, 55, 0, time.UTC)
	wallet := solanaWallet(1)
	address := base58.Encode(wallet.Public().(ed25519.PublicKey))
	key := ephemeralKey(t)
	jwk, _ := json.Marshal(ownerauth.JWK(&key.PublicKey))
	payload := fmt.Sprintf(`{"pubkey": %s, "alg": "ECDSA", "domain": "localhost", "address": "%s", "expires": "2010-12-26T17:05:55Z", "chain": "SOL"}`, jwk, address)
	payloadHex := hex.EncodeToString([]byte(payload))
	sig := "0x" + hex.EncodeToString(ed25519.Sign(wallet, []byte(payloadHex)))
	pubHeader, _ := json.Marshal(map[string]string{"payload": payloadHex, "signature": sig})

	c, err := ownerauth.AuthorizeSolana(wallet, key, "localhost", now.Add(24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	op := ownerauth.Operation{Time: "2010-12-25T17:05:55Z", Method: "GET", Path: "/", Domain: "localhost"}
	signedOp, err := c.Sign(op)
	if err != nil {
		t.Fatal(err)
	}
	opHeader, _ := json.Marshal(signedOp)

	v := ownerauth.Verifier{Domain: "localhost", Now: func() time.Time { return now }}
	r := httptest.NewRequest(http.MethodGet, "/", nil)
	r.Header.Set(ownerauth.HeaderPubKey, string(pubHeader))
	r.Header.Set(ownerauth.HeaderOperation, string(opHeader))
	got, err := v.Request(r)
	if err != nil {
		t.Fatalf("Solana wallet refused: %v", err)
	}
	if got != address {
		t.Fatalf("authenticated %q, want the wallet's base58 address %q", got, address)
	}
	// The client's own headers are accepted too.
	r = request(t, c, ownerauth.Operation{Time: "2010-12-25T17:05:56Z", Method: "GET", Path: "/", Domain: "localhost"}, http.MethodGet, "/")
	if got, err := v.Request(r); err != nil || got != address {
		t.Fatalf("AuthorizeSolana's headers: %q, %v", got, err)
	}
}

// TestSolanaRefusals: upstream's answers to a Solana approval that does
// not hold: another wallet's signature is 401 "Invalid signature"
// (nacl's BadSignatureError); an address that is not a 32-byte base58
// key or a signature that is not 64 bytes are ValueErrors, so 400
// "Invalid X-SignedPubKey data"; an expired key is 401 "Token expired".
func TestSolanaRefusals(t *testing.T) {
	key := ephemeralKey(t)
	wallet := solanaWallet(2)
	address := base58.Encode(wallet.Public().(ed25519.PublicKey))
	expires := time.Now().Add(time.Hour).UTC().Format(time.RFC3339)
	payload := func(addr, exp string) ownerauth.PubKeyPayload {
		return ownerauth.PubKeyPayload{PubKey: ownerauth.JWK(&key.PublicKey), Alg: "ECDSA", Domain: domain, Address: addr, Chain: "SOL", Expires: exp}
	}
	good, err := ownerauth.AuthorizeSolanaPayload(wallet, key, payload(address, expires))
	if err != nil {
		t.Fatal(err)
	}
	// Another wallet signs a payload that names wallet.
	forged, _ := ownerauth.AuthorizeSolanaPayload(solanaWallet(3), key, payload(address, expires))
	badAddress, _ := ownerauth.AuthorizeSolanaPayload(wallet, key, payload("0OIl-not-base58", expires))
	shortAddress, _ := ownerauth.AuthorizeSolanaPayload(wallet, key, payload(base58.Encode([]byte("short")), expires))
	shortSig := *good
	shortSig.PubKey.Signature = good.PubKey.Signature[:len(good.PubKey.Signature)-2]
	expired, _ := ownerauth.AuthorizeSolanaPayload(wallet, key, payload(address, time.Now().Add(-time.Second).UTC().Format(time.RFC3339)))
	// An Ethereum-style signature of a SOL payload.
	ethSig := *good
	ethSig.PubKey.Signature = "0x" + hex.EncodeToString(make([]byte, 65))
	// A chain upstream's enum knows but does not take.
	other, _ := ownerauth.AuthorizeSolanaPayload(wallet, key, ownerauth.PubKeyPayload{PubKey: ownerauth.JWK(&key.PublicKey), Address: address, Chain: "AVAX", Expires: expires})

	cases := []struct {
		name   string
		creds  *ownerauth.Credentials
		status int
		reason string
	}{
		{"valid", good, 0, ""},
		{"another wallet's signature", forged, 401, "Invalid signature"},
		{"address not base58", badAddress, 400, "Invalid X-SignedPubKey data"},
		{"address not 32 bytes", shortAddress, 400, "Invalid X-SignedPubKey data"},
		{"signature not 64 bytes", &shortSig, 400, "Invalid X-SignedPubKey data"},
		{"65-byte Ethereum signature", &ethSig, 400, "Invalid X-SignedPubKey data"},
		{"expired key", expired, 401, "Token expired"},
		{"unsupported chain", other, 400, "Invalid X-SignedPubKey data"},
	}
	v := ownerauth.Verifier{Domain: domain}
	path := "/control/machine/abc/stop"
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := request(t, c.creds, ownerauth.NewOperation(http.MethodPost, path, domain), http.MethodPost, path)
			got, err := v.Request(r)
			if c.status == 0 {
				if err != nil || got != address {
					t.Fatalf("got %q, %v; want %q", got, err, address)
				}
				return
			}
			if err == nil {
				t.Fatalf("accepted as %q", got)
			}
			if status := errkind.HTTPStatus(err); status != c.status || err.Error() != c.reason {
				t.Fatalf("got %d %q, want %d %q", status, err.Error(), c.status, c.reason)
			}
		})
	}
}
