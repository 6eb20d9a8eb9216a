// Package nodekeytest gives tests fixed Ethereum keys, so that a failure
// reproduces with the same addresses and signatures.
package nodekeytest

import (
	"bytes"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey"
)

// Fixed is the key whose 32 secret bytes are all b (b from 1).
func Fixed(t testing.TB, b byte) *nodekey.Key {
	t.Helper()
	k, err := nodekey.New(bytes.Repeat([]byte{b}, 32))
	if err != nil {
		t.Fatal(err)
	}
	return k
}
