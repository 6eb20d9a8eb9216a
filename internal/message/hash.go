package message

import (
	"encoding/base32"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/mr-tron/base58"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// maxRefLen bounds what we are willing to decode as a CID: refs end up in
// URLs, file names and log lines, and no real Aleph hash comes near it.
const maxRefLen = 256

// Item hash forms accepted by ValidateItemHash.
//
// Hex digests must be lowercase: aleph-message only accepts lowercase, and
// a message referring to an uppercase hash would point at nothing on the
// network. ParseRef, which reads refs typed by people into URLs, folds case
// before validating instead.
const (
	sha256HexLen = 64
	cidv0Len     = 46
)

// lowerBase32 is RFC 4648 base32 without padding, as multibase "b" uses and
// as aleph-vm derives host labels; input is upper-cased before decoding.
var lowerBase32 = base32.StdEncoding.WithPadding(base32.NoPadding)

// IsItemHash reports whether s is a well-formed Aleph item hash.
func IsItemHash(s string) bool { return itemHashProblem(s) == "" }

// ValidateItemHash accepts a sha256 digest in lowercase hex, an IPFS CIDv0
// ("Qm...", base58btc sha2-256 multihash) or an IPFS CIDv1 in multibase
// base32 ("b..."). The error is InvalidInput.
func ValidateItemHash(s string) error {
	if p := itemHashProblem(s); p != "" {
		return errkind.New(errkind.InvalidInput, "invalid item hash %s: %s", quoteShort(s), p)
	}
	return nil
}

// itemHashProblem returns why s is not an item hash, or "" when it is one.
// Returning a reason rather than a bool lets field errors say what is wrong.
func itemHashProblem(s string) string {
	switch {
	case s == "":
		return "empty"
	case len(s) > maxRefLen:
		return "too long"
	case len(s) == sha256HexLen && isLowerHex(s):
		return ""
	case strings.HasPrefix(s, "Qm"):
		return cidv0Problem(s)
	case s[0] == 'b':
		return cidv1Problem(s[1:])
	case len(s) == sha256HexLen && isHex(s):
		return "hex digest must be lowercase"
	default:
		return "neither a sha256 hex digest nor an IPFS CID"
	}
}

func isHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F') {
			return false
		}
	}
	return true
}

func isLowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

func cidv0Problem(s string) string {
	if len(s) != cidv0Len {
		return fmt.Sprintf("CIDv0 must be %d characters, got %d", cidv0Len, len(s))
	}
	b, err := base58.Decode(s)
	if err != nil {
		return "CIDv0 is not valid base58btc"
	}
	// A CIDv0 is nothing but a sha2-256 multihash.
	if len(b) != 34 || b[0] != 0x12 || b[1] != 0x20 {
		return "CIDv0 is not a sha2-256 multihash"
	}
	return ""
}

func cidv1Problem(body string) string {
	for i := 0; i < len(body); i++ {
		c := body[i]
		if !('a' <= c && c <= 'z' || '2' <= c && c <= '7') {
			return "CIDv1 must be lowercase base32 (multibase \"b\")"
		}
	}
	b, err := lowerBase32.DecodeString(strings.ToUpper(body))
	if err != nil {
		return "CIDv1 is not valid base32"
	}
	// The decoder tolerates non-zero trailing bits; insisting on the
	// canonical spelling keeps one CID from having several refs.
	if lowerBase32.EncodeToString(b) != strings.ToUpper(body) {
		return "CIDv1 base32 is not canonical"
	}
	version, b, ok := uvarint(b)
	if !ok || version != 1 {
		return "CIDv1 does not start with version 1"
	}
	if _, b, ok = uvarint(b); !ok {
		return "CIDv1 has a malformed codec"
	}
	if _, b, ok = uvarint(b); !ok {
		return "CIDv1 has a malformed multihash code"
	}
	size, b, ok := uvarint(b)
	if !ok || size == 0 || uint64(len(b)) != size {
		return "CIDv1 multihash length does not match its digest"
	}
	return ""
}

// uvarint reads one multiformats unsigned varint: at most 9 bytes and
// minimally encoded, so that a CID has a single binary form.
func uvarint(b []byte) (uint64, []byte, bool) {
	v, n := binary.Uvarint(b)
	if n <= 0 || n > 9 {
		return 0, b, false
	}
	if n > 1 && b[n-1] == 0 {
		return 0, b, false
	}
	return v, b[n:], true
}

// ParseRef reads the {ref} part of a /vm/{ref} URL: surrounding space is
// trimmed, hex digests and base32 CIDs are folded to lowercase (their
// canonical spelling), and the result must be an item hash. Errors are
// InvalidInput and name the ref.
func ParseRef(s string) (string, error) {
	ref := strings.TrimSpace(s)
	if len(ref) == sha256HexLen && isHex(ref) {
		ref = strings.ToLower(ref)
	} else if len(ref) > 1 && ref[0] == 'B' {
		// Multibase "B" is the uppercase spelling of the same base32 CID.
		ref = strings.ToLower(ref)
	}
	if p := itemHashProblem(ref); p != "" {
		return "", errkind.New(errkind.InvalidInput, "invalid ref %s: %s", quoteShort(s), p)
	}
	return ref, nil
}

// Base32Label is the DNS label aleph-vm derives from a sha256 item hash:
// b32encode(bytes.fromhex(hash)).strip("=").lower(), 52 characters. It
// returns "" for anything that is not a lowercase sha256 hex digest, since
// CIDs have no such label.
func Base32Label(hash string) string {
	if len(hash) != sha256HexLen || !isLowerHex(hash) {
		return ""
	}
	b, err := hex.DecodeString(hash)
	if err != nil {
		return ""
	}
	return strings.ToLower(lowerBase32.EncodeToString(b))
}

// HashFromBase32Label inverts Base32Label. Host names are case-insensitive,
// so the label is folded first; only canonical 52-character labels of a
// 32-byte digest are accepted.
func HashFromBase32Label(label string) (string, bool) {
	const labelLen = 52
	if len(label) != labelLen {
		return "", false
	}
	up := strings.ToUpper(label)
	b, err := lowerBase32.DecodeString(up)
	if err != nil || len(b) != 32 || lowerBase32.EncodeToString(b) != up {
		return "", false
	}
	return hex.EncodeToString(b), true
}

// quoteShort quotes untrusted input for an error message, cut short so a
// hostile ref cannot flood logs or responses.
func quoteShort(s string) string {
	const maxLen = 80
	if len(s) > maxLen {
		return fmt.Sprintf("%q…", s[:maxLen])
	}
	return fmt.Sprintf("%q", s)
}
