package message

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

const (
	fixtureCodeRef = "7eb2eca2378ea8855336ed76c8b26219f1cb90234d04441de9cf8cb1c649d003"
	// Examples from the IPFS documentation: the same DAG as CIDv0 and CIDv1.
	docCIDv0 = "QmbWqxBEKC3P8tqsKc98xmWNzrzDtRLMiMPL8wBuTGsMnR"
	docCIDv1 = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"
	// CIDv1 raw/sha2-256 of "hello", computed independently with Python.
	helloCIDv1 = "bafkreibm6jg3ux5qumhcn2b3flc3tyu6dmlb4xa7u5bf44yegnrjhc4yeq"
)

func TestValidateItemHash(t *testing.T) {
	tests := []struct {
		name string
		in   string
		ok   bool
		why  string
	}{
		{"sha256 lowercase hex", fixtureCodeRef, true, ""},
		// Rejected: aleph-message only knows lowercase digests, so an
		// uppercase one names nothing on the network. ParseRef folds it.
		{"sha256 uppercase hex", strings.ToUpper(fixtureCodeRef), false, "lowercase"},
		{"sha256 too short", fixtureCodeRef[:63], false, ""},
		{"sha256 non-hex", strings.Repeat("g", 64), false, ""},
		{"CIDv0", docCIDv0, true, ""},
		{"CIDv0 too short", docCIDv0[:45], false, "46 characters"},
		{"CIDv0 bad base58 char", docCIDv0[:45] + "0", false, "base58"},
		{"CIDv0 not sha2-256", "Qm" + strings.Repeat("1", 44), false, ""},
		{"CIDv1 dag-pb", docCIDv1, true, ""},
		{"CIDv1 raw", helloCIDv1, true, ""},
		{"CIDv1 truncated", docCIDv1[:50], false, ""},
		{"CIDv1 uppercase body", "b" + strings.ToUpper(docCIDv1[1:]), false, "lowercase"},
		{"CIDv1 version 2", "b" + strings.ToLower(lowerBase32.EncodeToString(append([]byte{2, 0x55, 0x12, 0x20}, make([]byte, 32)...))), false, "version 1"},
		{"CIDv1 empty digest", "b" + strings.ToLower(lowerBase32.EncodeToString([]byte{1, 0x55, 0x12, 0x00})), false, "length"},
		{"CIDv1 trailing byte", "b" + strings.ToLower(lowerBase32.EncodeToString(append([]byte{1, 0x55, 0x12, 0x01}, 7, 7))), false, "length"},
		{"placeholder", "fake-hash-fake-hash-fake-hash-fake-hash-fake-hash-fake-hash-hash", false, ""},
		{"empty", "", false, "empty"},
		{"garbage", "not-a-hash", false, ""},
		{"path traversal", "../../etc/passwd", false, ""},
		{"huge", "b" + strings.Repeat("a", 1000), false, "too long"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidateItemHash(tt.in)
			if got := err == nil; got != tt.ok {
				t.Fatalf("ValidateItemHash(%q) = %v, want ok=%v", tt.in, err, tt.ok)
			}
			if IsItemHash(tt.in) != tt.ok {
				t.Errorf("IsItemHash disagrees with ValidateItemHash")
			}
			if err != nil {
				if !errkind.Is(err, errkind.InvalidInput) {
					t.Errorf("error kind = %v, want InvalidInput", errkind.Of(err))
				}
				if !strings.Contains(err.Error(), tt.why) {
					t.Errorf("error %q does not mention %q", err, tt.why)
				}
			}
		})
	}
}

func TestParseRef(t *testing.T) {
	tests := []struct {
		in, want string
	}{
		{fixtureCodeRef, fixtureCodeRef},
		{"  " + fixtureCodeRef + "\n", fixtureCodeRef},
		{strings.ToUpper(fixtureCodeRef), fixtureCodeRef},
		{docCIDv0, docCIDv0},
		{docCIDv1, docCIDv1},
		{"B" + strings.ToUpper(docCIDv1[1:]), docCIDv1},
		{"not-a-hash", ""},
		{"", ""},
		{strings.ToLower(docCIDv0), ""}, // base58 is case-sensitive
		{fixtureCodeRef + "/", ""},
	}
	for _, tt := range tests {
		got, err := ParseRef(tt.in)
		if tt.want == "" {
			if err == nil {
				t.Errorf("ParseRef(%q) = %q, want error", tt.in, got)
				continue
			}
			if !errkind.Is(err, errkind.InvalidInput) || !strings.Contains(err.Error(), "ref") {
				t.Errorf("ParseRef(%q) error = %v, want InvalidInput naming the ref", tt.in, err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("ParseRef(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
}

func TestBase32Label(t *testing.T) {
	// Expected value computed with aleph-vm's own expression in Python:
	// b32encode(bytes.fromhex(h)).strip(b"=").lower()
	const want = "p2zozirxr2uikuzw5v3mrmtcdhy4xebdjuceihpjz6gldrsj2abq"
	if got := Base32Label(fixtureCodeRef); got != want {
		t.Fatalf("Base32Label = %q, want %q", got, want)
	}
	for _, label := range []string{want, strings.ToUpper(want)} {
		h, ok := HashFromBase32Label(label)
		if !ok || h != fixtureCodeRef {
			t.Errorf("HashFromBase32Label(%q) = %q, %v", label, h, ok)
		}
	}

	for i := range 50 {
		sum := sha256.Sum256([]byte{byte(i)})
		h := hex.EncodeToString(sum[:])
		label := Base32Label(h)
		if len(label) != 52 {
			t.Fatalf("label %q has length %d", label, len(label))
		}
		back, ok := HashFromBase32Label(label)
		if !ok || back != h {
			t.Fatalf("round trip of %s gave %q, %v", h, back, ok)
		}
	}

	for _, bad := range []string{
		"", "www", want[:51], want + "a",
		want[:51] + "r", // non-zero trailing bits: not the canonical spelling
		want[:51] + "1", // not base32
	} {
		if h, ok := HashFromBase32Label(bad); ok {
			t.Errorf("HashFromBase32Label(%q) = %q, want rejection", bad, h)
		}
	}
	for _, bad := range []string{docCIDv0, strings.ToUpper(fixtureCodeRef), "zz"} {
		if l := Base32Label(bad); l != "" {
			t.Errorf("Base32Label(%q) = %q, want empty", bad, l)
		}
	}
}
