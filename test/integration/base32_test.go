package integration

import (
	"encoding/base32"
	"encoding/hex"
	"strings"
	"testing"
)

// base32Label is the first DNS label aleph-vm derives from a hash; written
// out here from the documented rule rather than imported, so the test
// checks the supervisor against the rule.
func base32Label(t *testing.T, hash string) string {
	raw, err := hex.DecodeString(hash)
	if err != nil {
		t.Fatal(err)
	}
	return strings.ToLower(strings.TrimRight(base32.StdEncoding.EncodeToString(raw), "="))
}
