// Package ownerauth checks aleph-vm's authentication of a program's owner
// (its doc/operator_auth.md): the owner's wallet signs a short-lived P-256
// key (X-SignedPubKey) with Ethereum's personal_sign, or, for a Solana
// wallet ("chain": "SOL"), with ed25519 over the payload's hex text; that key
// signs each operation, ES256 over method, path, domain and time
// (X-SignedOperation). The result is the wallet address; whether that
// wallet may act on a program is the caller's decision.
//
// Statuses and reasons are upstream's (orchestrator/views/authentication.py):
// malformed headers are 400, an expired key, a wallet signature that does
// not match, another domain, path or method, or a bad operation signature
// are 401, each with upstream's reason text.
package ownerauth

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"strings"
	"time"

	"github.com/mr-tron/base58"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey"
)

// Header names.
const (
	HeaderPubKey    = "X-SignedPubKey"
	HeaderOperation = "X-SignedOperation"
)

// OperationWindow is how far an operation's time may be from now, either
// way (upstream's replay bound).
const OperationWindow = 2 * time.Minute

// Verifier checks signed requests for one node.
type Verifier struct {
	// Domain is the node's DOMAIN_NAME; operations signed for another
	// domain are refused.
	Domain string
	// Now is the clock (time.Now when nil).
	Now func() time.Time
	// Replays, when set, refuses a second use of an operation within
	// its window (401). Upstream has no nonce: without it a captured
	// request can be replayed for OperationWindow.
	Replays *Replays
}

// Signed is one header's value: a hex payload and its signature.
type Signed struct {
	Payload   string `json:"payload"`
	Signature string `json:"signature"`
}

// PubKeyPayload is what the wallet signs: the ephemeral key and its scope.
type PubKeyPayload struct {
	PubKey  map[string]any `json:"pubkey"`
	Alg     string         `json:"alg,omitempty"`
	Domain  string         `json:"domain,omitempty"`
	Address string         `json:"address"`
	Chain   string         `json:"chain,omitempty"`
	Expires string         `json:"expires"`
}

// Operation is what the ephemeral key signs.
type Operation struct {
	Time   string `json:"time"`
	Method string `json:"method"`
	Path   string `json:"path"`
	Domain string `json:"domain"`
}

func (v Verifier) now() time.Time {
	if v.Now != nil {
		return v.Now()
	}
	return time.Now()
}

func badRequest(reason string) error   { return errkind.New(errkind.InvalidInput, "%s", reason) }
func unauthorized(reason string) error { return errkind.New(errkind.Unauthorized, "%s", reason) }

// Request authenticates an HTTP request by its two headers and returns
// the wallet address the key was signed by. The operation must name this
// request's method and path.
func (v Verifier) Request(r *http.Request) (string, error) {
	raw := r.Header.Get(HeaderPubKey)
	if raw == "" {
		return "", badRequest("Missing X-SignedPubKey header")
	}
	var pub Signed
	if err := json.Unmarshal([]byte(raw), &pub); err != nil {
		var syntax *json.SyntaxError
		if !errors.As(err, &syntax) {
			return "", badRequest("Invalid X-SignedPubKey data")
		}
		return "", badRequest("Invalid X-SignedPubKey format")
	}
	key, err := v.pubKey(pub)
	if err != nil {
		return "", err
	}
	rawOp := r.Header.Get(HeaderOperation)
	if rawOp == "" {
		return "", badRequest("Missing X-SignedOperation header")
	}
	var signedOp Signed
	if err := json.Unmarshal([]byte(rawOp), &signedOp); err != nil {
		return "", badRequest("Invalid X-SignedOperation fields")
	}
	op, payload, sig, at, err := v.operation(signedOp)
	if err != nil {
		return "", err
	}
	switch {
	case op.Domain != v.Domain:
		return "", unauthorized(fmt.Sprintf("Invalid domain: Signed: '%s' != Request: '%s'", op.Domain, v.Domain))
	case op.Path != r.URL.Path:
		return "", unauthorized(fmt.Sprintf("Invalid path. Signed: '%s' !=  requested path: '%s'", op.Path, r.URL.Path))
	case op.Method != r.Method:
		// Upstream's text, unbalanced quote included.
		return "", unauthorized(fmt.Sprintf("Invalid method. Signed: '%s' !=  request:'%s", op.Method, r.Method))
	}
	if err := key.verify(payload, sig); err != nil {
		return "", err
	}
	if err := v.Replays.use(key.payload, payload, at.Add(OperationWindow), v.now()); err != nil {
		return "", err
	}
	return key.address, nil
}

// Message authenticates the first message of a websocket, where browsers
// cannot set headers: the two headers' objects under one JSON value. Only
// the domain of the operation is checked, as upstream does.
func (v Verifier) Message(auth json.RawMessage) (string, error) {
	var m struct {
		PubKey    *Signed `json:"X-SignedPubKey"`
		Operation *Signed `json:"X-SignedOperation"`
	}
	if err := json.Unmarshal(auth, &m); err != nil || m.PubKey == nil || m.Operation == nil {
		return "", badRequest("Invalid format for auth packet, see /doc/operator_auth.md")
	}
	key, err := v.pubKey(*m.PubKey)
	if err != nil {
		return "", err
	}
	op, payload, sig, at, err := v.operation(*m.Operation)
	if err != nil {
		return "", err
	}
	if op.Domain != v.Domain {
		return "", unauthorized("Invalid domain")
	}
	if err := key.verify(payload, sig); err != nil {
		return "", err
	}
	if err := v.Replays.use(key.payload, payload, at.Add(OperationWindow), v.now()); err != nil {
		return "", err
	}
	return key.address, nil
}

// ephemeral is a wallet-approved operation key.
type ephemeral struct {
	address string
	jwk     map[string]any
	payload []byte // what the wallet signed: names the key
}

// pubKey checks the wallet's approval of the ephemeral key: expiry first,
// then the signature, in upstream's order.
func (v Verifier) pubKey(s Signed) (*ephemeral, error) {
	invalid := badRequest("Invalid X-SignedPubKey data")
	payload, err1 := hex.DecodeString(s.Payload)
	_, err2 := hex.DecodeString(strings.TrimPrefix(s.Signature, "0x"))
	if s.Payload == "" || s.Signature == "" || err1 != nil || err2 != nil {
		return nil, invalid
	}
	var p PubKeyPayload
	if err := json.Unmarshal(payload, &p); err != nil || p.PubKey == nil || p.Address == "" || p.Expires == "" {
		return nil, invalid
	}
	expires, err := parseTime(p.Expires)
	if err != nil {
		return nil, invalid
	}
	if !expires.After(v.now()) {
		return nil, unauthorized("Token expired")
	}
	switch p.Chain {
	case "", nodekey.Chain:
		signer, err := nodekey.RecoverPersonal(payload, s.Signature)
		if err != nil || !strings.EqualFold(signer, p.Address) {
			return nil, unauthorized("Invalid signature")
		}
	case ChainSolana:
		if err := verifySolana(p.Address, s.Signature, payload); err != nil {
			return nil, err
		}
	default:
		// Upstream's "Unsupported chain" is a 400 with the generic reason.
		return nil, invalid
	}
	return &ephemeral{address: p.Address, jwk: p.PubKey, payload: payload}, nil
}

// ChainSolana is aleph's name of the Solana chain.
const ChainSolana = "SOL"

// verifySolana checks a Solana wallet's approval as upstream does
// (solathon's verify_signature): address is the wallet's ed25519 public
// key in base58, the signature (hex) is ed25519 over the payload's
// lowercase hex text, as a wallet's signMessage signs the text it is
// shown. A malformed address or signature is upstream's 400, a signature
// that does not verify its 401.
func verifySolana(address, signature string, payload []byte) error {
	pub, err := base58.Decode(address)
	if err != nil || len(pub) != ed25519.PublicKeySize {
		return badRequest("Invalid X-SignedPubKey data")
	}
	sig, err := hex.DecodeString(strings.TrimPrefix(signature, "0x"))
	if err != nil || len(sig) != ed25519.SignatureSize {
		return badRequest("Invalid X-SignedPubKey data")
	}
	if !ed25519.Verify(ed25519.PublicKey(pub), []byte(hex.EncodeToString(payload)), sig) {
		return unauthorized("Invalid signature")
	}
	return nil
}

// operation decodes and time-checks the signed operation; every fault is
// upstream's one 400. at is the operation's time.
func (v Verifier) operation(s Signed) (op Operation, payload, sig []byte, at time.Time, err error) {
	invalid := badRequest("Invalid X-SignedOperation fields")
	payload, err = hex.DecodeString(s.Payload)
	if err != nil || s.Payload == "" {
		return op, nil, nil, at, invalid
	}
	sig, err = hex.DecodeString(strings.TrimPrefix(s.Signature, "0x"))
	if err != nil || s.Signature == "" {
		return op, nil, nil, at, invalid
	}
	var raw struct {
		Time   json.RawMessage `json:"time"`
		Method string          `json:"method"`
		Path   *string         `json:"path"`
		Domain *string         `json:"domain"`
	}
	if err := json.Unmarshal(payload, &raw); err != nil || raw.Path == nil || raw.Domain == nil {
		return op, nil, nil, at, invalid
	}
	switch raw.Method {
	case http.MethodGet, http.MethodPost, http.MethodDelete:
	default:
		return op, nil, nil, at, invalid
	}
	t, err := operationTime(raw.Time)
	if err != nil {
		return op, nil, nil, at, invalid
	}
	now := v.now()
	if t.Before(now.Add(-OperationWindow)) || t.After(now.Add(OperationWindow)) {
		return op, nil, nil, at, invalid
	}
	op = Operation{Time: string(raw.Time), Method: raw.Method, Path: *raw.Path, Domain: *raw.Domain}
	return op, payload, sig, t, nil
}

// operationTime reads an ISO 8601 time with its zone, or Unix seconds,
// as pydantic reads a datetime field.
func operationTime(raw json.RawMessage) (time.Time, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return parseTime(s)
	}
	var f float64
	if err := json.Unmarshal(raw, &f); err != nil {
		return time.Time{}, fmt.Errorf("time is neither a string nor a number: %w", err)
	}
	sec := int64(f)
	return time.Unix(sec, int64((f-float64(sec))*1e9)), nil
}

// parseTime reads ISO 8601 with an explicit zone ("Z" or an offset); a
// time without one is refused, as it cannot be compared.
func parseTime(s string) (time.Time, error) {
	for _, layout := range []string{time.RFC3339Nano, "2006-01-02 15:04:05.999999999Z07:00"} {
		if t, err := time.Parse(layout, s); err == nil {
			return t, nil
		}
	}
	return time.Time{}, fmt.Errorf("not an ISO 8601 time with a zone: %q", s)
}

// verify checks an ES256 signature (JWS form: r‖s, 32 bytes each) of
// payload by the ephemeral key.
func (k *ephemeral) verify(payload, sig []byte) error {
	fail := unauthorized("Signature could not verified")
	pub, err := p256Key(k.jwk)
	if err != nil || len(sig) != 64 {
		return fail
	}
	h := sha256.Sum256(payload)
	r, s := new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])
	if !ecdsa.Verify(pub, h[:], r, s) {
		return fail
	}
	return nil
}

// p256Key reads an EC P-256 public JWK.
func p256Key(jwk map[string]any) (*ecdsa.PublicKey, error) {
	kty, _ := jwk["kty"].(string)
	crv, _ := jwk["crv"].(string)
	xs, _ := jwk["x"].(string)
	ys, _ := jwk["y"].(string)
	if kty != "EC" || crv != "P-256" {
		return nil, fmt.Errorf("not an EC P-256 key (kty %q, crv %q)", kty, crv)
	}
	x, err1 := base64.RawURLEncoding.DecodeString(strings.TrimRight(xs, "="))
	y, err2 := base64.RawURLEncoding.DecodeString(strings.TrimRight(ys, "="))
	if err1 != nil || err2 != nil || len(x) != 32 || len(y) != 32 {
		return nil, errors.New("bad JWK coordinates")
	}
	// The parser refuses points off the curve.
	uncompressed := append(append([]byte{4}, x...), y...)
	pub, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), uncompressed)
	if err != nil {
		return nil, fmt.Errorf("JWK point: %w", err)
	}
	return pub, nil
}
