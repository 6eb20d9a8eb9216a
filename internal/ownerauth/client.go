package ownerauth

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/mr-tron/base58"

	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey"
)

// Credentials make signed requests the way aleph's console does: a wallet
// approves an ephemeral P-256 key once, the key signs each operation.
// Tests and tools use them; the supervisor only verifies.
type Credentials struct {
	PubKey Signed
	key    *ecdsa.PrivateKey
}

// Authorize has wallet approve key for domain until expires.
func Authorize(wallet *nodekey.Key, key *ecdsa.PrivateKey, domain string, expires time.Time) (*Credentials, error) {
	return AuthorizePayload(wallet, key, PubKeyPayload{
		PubKey:  JWK(&key.PublicKey),
		Alg:     "ECDSA",
		Domain:  domain,
		Address: wallet.Address(),
		Chain:   nodekey.Chain,
		Expires: expires.UTC().Format(time.RFC3339),
	})
}

// AuthorizePayload has wallet sign p as it is, for tests that need a
// payload a well-behaved client would not send.
func AuthorizePayload(wallet *nodekey.Key, key *ecdsa.PrivateKey, p PubKeyPayload) (*Credentials, error) {
	b, err := json.Marshal(p)
	if err != nil {
		return nil, fmt.Errorf("encoding the key payload: %w", err)
	}
	return &Credentials{
		PubKey: Signed{Payload: hex.EncodeToString(b), Signature: wallet.SignPersonal(b)},
		key:    key,
	}, nil
}

// AuthorizeSolana has a Solana wallet (its ed25519 key) approve key for
// domain until expires, as upstream's tests and the console sign it: the
// wallet signs the payload's hex text; the signature goes as 0x-hex and
// the address is the wallet's public key in base58.
func AuthorizeSolana(wallet ed25519.PrivateKey, key *ecdsa.PrivateKey, domain string, expires time.Time) (*Credentials, error) {
	pub, ok := wallet.Public().(ed25519.PublicKey)
	if !ok {
		return nil, fmt.Errorf("not an ed25519 key")
	}
	return AuthorizeSolanaPayload(wallet, key, PubKeyPayload{
		PubKey:  JWK(&key.PublicKey),
		Alg:     "ECDSA",
		Domain:  domain,
		Address: base58.Encode(pub),
		Chain:   ChainSolana,
		Expires: expires.UTC().Format(time.RFC3339),
	})
}

// AuthorizeSolanaPayload has a Solana wallet sign p as it is.
func AuthorizeSolanaPayload(wallet ed25519.PrivateKey, key *ecdsa.PrivateKey, p PubKeyPayload) (*Credentials, error) {
	b, err := json.Marshal(p)
	if err != nil {
		return nil, fmt.Errorf("encoding the key payload: %w", err)
	}
	text := hex.EncodeToString(b)
	return &Credentials{
		PubKey: Signed{Payload: text, Signature: "0x" + hex.EncodeToString(ed25519.Sign(wallet, []byte(text)))},
		key:    key,
	}, nil
}

// JWK is pub as a JSON Web Key.
func JWK(pub *ecdsa.PublicKey) map[string]any {
	b, err := pub.Bytes() // 0x04 ‖ x ‖ y
	if err != nil || len(b) != 65 {
		return nil
	}
	enc := base64.RawURLEncoding
	return map[string]any{"kty": "EC", "crv": "P-256", "x": enc.EncodeToString(b[1:33]), "y": enc.EncodeToString(b[33:])}
}

// Sign signs op with the ephemeral key (ES256, r‖s).
func (c *Credentials) Sign(op Operation) (Signed, error) {
	b, err := json.Marshal(op)
	if err != nil {
		return Signed{}, fmt.Errorf("encoding the operation: %w", err)
	}
	h := sha256.Sum256(b)
	r, s, err := ecdsa.Sign(rand.Reader, c.key, h[:])
	if err != nil {
		return Signed{}, fmt.Errorf("signing the operation: %w", err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return Signed{Payload: hex.EncodeToString(b), Signature: hex.EncodeToString(sig)}, nil
}

// NewOperation is an operation for method and path on domain, timed now
// to the microsecond as Python's isoformat() does: a node honours each
// operation once, so two made in one second must differ.
func NewOperation(method, path, domain string) Operation {
	return Operation{Time: time.Now().UTC().Format("2006-01-02T15:04:05.000000Z07:00"), Method: method, Path: path, Domain: domain}
}

// Headers are the two request headers for op.
func (c *Credentials) Headers(op Operation) (http.Header, error) {
	so, err := c.Sign(op)
	if err != nil {
		return nil, err
	}
	pub, _ := json.Marshal(c.PubKey)
	sop, _ := json.Marshal(so)
	h := http.Header{}
	h.Set(HeaderPubKey, string(pub))
	h.Set(HeaderOperation, string(sop))
	return h, nil
}

// AuthMessage is the first websocket message for op: {"auth": {...}}.
func (c *Credentials) AuthMessage(op Operation) ([]byte, error) {
	so, err := c.Sign(op)
	if err != nil {
		return nil, err
	}
	return json.Marshal(map[string]any{"auth": map[string]any{HeaderPubKey: c.PubKey, HeaderOperation: so}})
}
