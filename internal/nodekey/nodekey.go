// Package nodekey is the node's Ethereum signing key: the key aleph-vm's
// VM connector holds to sign messages on behalf of programs (guest API
// POST /sign) and whose address and public key GET /properties shows.
//
// Signatures are Ethereum personal_sign (EIP-191) over Aleph's
// verification buffer, as the Aleph SDKs make and check them.
package nodekey

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/decred/dcrd/dcrec/secp256k1/v4"
	"github.com/decred/dcrd/dcrec/secp256k1/v4/ecdsa"
	"golang.org/x/crypto/sha3"
)

// Chain and Curve are what aleph-vm's connector reports for its ETHAccount.
const (
	Chain = "ETH"
	Curve = "secp256k1"
)

// FileName is the key's file under EXECUTION_ROOT.
const FileName = "node-signing.key"

// keySize is the file's length: the raw 32-byte secret, the format of the
// Aleph Python SDK's key files, so an operator can bring an existing one.
const keySize = 32

// Key is a secp256k1 private key with its Ethereum identity. It never
// prints its secret: fmt and slog show the address only.
type Key struct {
	priv    *secp256k1.PrivateKey
	address string
	public  string
}

// New wraps a raw 32-byte secret.
func New(secret []byte) (*Key, error) {
	if len(secret) != keySize {
		return nil, fmt.Errorf("a secp256k1 key is %d bytes, not %d", keySize, len(secret))
	}
	var s secp256k1.ModNScalar
	if overflow := s.SetByteSlice(secret); overflow || s.IsZero() {
		return nil, errors.New("not a valid secp256k1 secret (zero or not below the curve order)")
	}
	priv := secp256k1.NewPrivateKey(&s)
	pub := priv.PubKey()
	return &Key{
		priv:    priv,
		address: addressOf(pub),
		public:  "0x" + hex.EncodeToString(pub.SerializeCompressed()),
	}, nil
}

// Generate makes a fresh key from the system's random source.
func Generate() (*Key, error) {
	for {
		b := make([]byte, keySize)
		if _, err := io.ReadFull(rand.Reader, b); err != nil {
			return nil, fmt.Errorf("reading random bytes: %w", err)
		}
		if k, err := New(b); err == nil {
			return k, nil
		}
		// Out of range: probability about 2^-128; draw again.
	}
}

// LoadOrCreate reads the key at path, or creates it (mode 0600) when no
// file is there. A file others can read or write, or that is not a raw
// 32-byte secret, is refused rather than used or replaced: it may be an
// operator's mistake worth seeing, and replacing it would change the
// node's identity.
func LoadOrCreate(path string) (k *Key, created bool, err error) {
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		k, err := create(path)
		return k, err == nil, err
	case err != nil:
		return nil, false, fmt.Errorf("node signing key: %w", err)
	case !fi.Mode().IsRegular():
		return nil, false, fmt.Errorf("node signing key %s: not a regular file (%s)", path, fi.Mode().Type())
	case fi.Mode().Perm()&0o077 != 0:
		return nil, false, fmt.Errorf("node signing key %s: mode %04o lets others read or write it; make it 0600 (chmod 600)", path, fi.Mode().Perm())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, false, fmt.Errorf("node signing key: %w", err)
	}
	k, err = New(b)
	if err != nil {
		return nil, false, fmt.Errorf("node signing key %s: %w", path, err)
	}
	return k, false, nil
}

// create writes a new key beside path and renames it into place, so a
// crash never leaves a truncated key that the next start would refuse.
func create(path string) (*Key, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("node signing key: %w", err)
	}
	k, err := Generate()
	if err != nil {
		return nil, err
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".node-signing-*.tmp")
	if err != nil {
		return nil, fmt.Errorf("node signing key: %w", err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op once renamed
	secret := k.priv.Serialize()
	defer clear(secret)
	// One err for the three steps: the check below must see a failed
	// write or sync, not only a failed chmod.
	err = f.Chmod(0o600)
	if err == nil {
		_, err = f.Write(secret)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("node signing key: writing %s: %w", tmp, err)
	}
	// Link, not rename: a key another process created meanwhile wins
	// instead of being overwritten.
	if err := os.Link(tmp, path); err != nil {
		if errors.Is(err, os.ErrExist) {
			k, _, err := LoadOrCreate(path)
			return k, err
		}
		return nil, fmt.Errorf("node signing key: %w", err)
	}
	return k, nil
}

// Address is the key's Ethereum address, EIP-55 checksummed (as eth_account
// and ethers print it, and as ethers' verifyMessage compares it).
func (k *Key) Address() string { return k.address }

// PublicKey is "0x" and the 33-byte compressed public key in hex, as the
// Aleph Python SDK's get_public_key (coincurve's default format) gives it.
func (k *Key) PublicKey() string { return k.public }

// String, LogValue, GoString and Format keep the secret out of logs and
// error messages, whatever verb or handler prints the key.
func (k *Key) String() string { return "nodekey(" + k.address + ")" }

// LogValue is the address alone: slog never reaches the secret.
func (k *Key) LogValue() slog.Value { return slog.StringValue(k.address) }

// GoString is String, so %#v does not dump the private key.
func (k *Key) GoString() string { return k.String() }

// Format prints String for every verb, %x and %+v included.
func (k *Key) Format(f fmt.State, _ rune) { _, _ = io.WriteString(f, k.String()) }

// SignPersonal signs msg as Ethereum's personal_sign does: over
// keccak256("\x19Ethereum Signed Message:\n" + len + msg), the result as
// 0x-prefixed hex of r‖s‖v with v 27 or 28. RFC 6979 nonces and low s,
// so the signature is the one eth_account and ethers make for the key.
func (k *Key) SignPersonal(msg []byte) string {
	compact := ecdsa.SignCompact(k.priv, personalHash(msg), false)
	// compact is v‖r‖s with v = 27 + recovery id; Ethereum puts v last.
	sig := make([]byte, 65)
	copy(sig, compact[1:])
	sig[64] = compact[0]
	return "0x" + hex.EncodeToString(sig)
}

// RecoverPersonal returns the checksummed address that made sig (as
// SignPersonal formats it, 0x optional) over msg.
func RecoverPersonal(msg []byte, sig string) (string, error) {
	b, err := hex.DecodeString(strings.TrimPrefix(sig, "0x"))
	if err != nil || len(b) != 65 {
		return "", errors.New("a signature is 65 bytes of hex")
	}
	v := b[64]
	if v < 27 {
		v += 27 // some signers write the recovery id itself
	}
	if v != 27 && v != 28 {
		return "", fmt.Errorf("signature recovery byte %d is not 27 or 28", b[64])
	}
	compact := append([]byte{v}, b[:64]...)
	pub, _, err := ecdsa.RecoverCompact(compact, personalHash(msg))
	if err != nil {
		return "", fmt.Errorf("recovering the signer: %w", err)
	}
	return addressOf(pub), nil
}

// VerificationBuffer is what Aleph signs for a message: its chain, sender,
// type and item hash, one per line (aleph SDKs' get_verification_buffer /
// getVerificationBuffer).
func VerificationBuffer(chain, sender, typ, itemHash string) []byte {
	return []byte(chain + "\n" + sender + "\n" + typ + "\n" + itemHash)
}

func personalHash(msg []byte) []byte {
	h := sha3.NewLegacyKeccak256()
	h.Write([]byte("\x19Ethereum Signed Message:\n" + strconv.Itoa(len(msg))))
	h.Write(msg)
	return h.Sum(nil)
}

func keccak(b []byte) []byte {
	h := sha3.NewLegacyKeccak256()
	h.Write(b)
	return h.Sum(nil)
}

// addressOf is the last 20 bytes of keccak256 of the uncompressed public
// key (without its 0x04 prefix), checksummed per EIP-55.
func addressOf(pub *secp256k1.PublicKey) string {
	return checksum(hex.EncodeToString(keccak(pub.SerializeUncompressed()[1:])[12:]))
}

// checksum is "0x" and raw (40 lower-case hex digits) in EIP-55 mixed case.
func checksum(raw string) string {
	sum := keccak([]byte(raw))
	var b bytes.Buffer
	b.WriteString("0x")
	for i, c := range []byte(raw) {
		nibble := sum[i/2] >> 4
		if i%2 == 1 {
			nibble = sum[i/2] & 0x0f
		}
		if c >= 'a' && nibble >= 8 {
			c -= 'a' - 'A'
		}
		b.WriteByte(c)
	}
	return b.String()
}

// IsChecksumAddress reports whether s is an Ethereum address written in
// its EIP-55 form ("0x" and 40 hex digits in checksummed case), as
// eth_utils.is_checksum_address decides: a typo in a mixed-case address
// fails it, and so does an all-lower-case one.
func IsChecksumAddress(s string) bool {
	raw, ok := strings.CutPrefix(s, "0x")
	if !ok || len(raw) != 40 {
		return false
	}
	if _, err := hex.DecodeString(raw); err != nil {
		return false
	}
	return checksum(strings.ToLower(raw)) == s
}
