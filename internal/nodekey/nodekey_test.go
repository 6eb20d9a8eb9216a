package nodekey

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Expected values computed independently with ethers 5.8.0 (the library
// @aleph-sdk/ethereum signs with): new Wallet(secret).address,
// utils.computePublicKey(publicKey, true) and signMessage(buffer).
func TestKnownVector(t *testing.T) {
	secret, _ := hex.DecodeString("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
	k, err := New(secret)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := k.Address(), "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"; got != want {
		t.Errorf("address %s, want %s", got, want)
	}
	if got, want := k.PublicKey(), "0x024e3b81af9c2234cad09d679ce6035ed1392347ce64ce405f5dcd36228a25de6e"; got != want {
		t.Errorf("public key %s, want %s", got, want)
	}
	buf := VerificationBuffer("ETH", k.Address(), "POST", strings.Repeat("a", 64))
	want := "0x17bb6fdd867695bd459bb29506071e67ce46e726d2b61f9c0a1604b2ef7eb8340dc0ff1093e165de15df25764b65a9bb031ee7601adf2ae9d951a3d1086989621c"
	if got := k.SignPersonal(buf); got != want {
		t.Errorf("signature\n %s\nwant\n %s", got, want)
	}

	one := make([]byte, 32)
	one[31] = 1
	k1, err := New(one)
	if err != nil {
		t.Fatal(err)
	}
	// The Aleph client documentation's example address for this key.
	if k1.Address() != "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf" ||
		k1.PublicKey() != "0x0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798" {
		t.Errorf("key 1: %s %s", k1.Address(), k1.PublicKey())
	}
}

func TestSignThenRecover(t *testing.T) {
	k, err := Generate()
	if err != nil {
		t.Fatal(err)
	}
	msg := VerificationBuffer("ETH", k.Address(), "POST", "deadbeef")
	sig := k.SignPersonal(msg)
	if v := sig[len(sig)-2:]; v != "1b" && v != "1c" {
		t.Errorf("v = %s, want 1b or 1c (27/28)", v)
	}
	got, err := RecoverPersonal(msg, sig)
	if err != nil || got != k.Address() {
		t.Fatalf("recovered %s (%v), want %s", got, err, k.Address())
	}
	if got, _ := RecoverPersonal(append(msg, 'x'), sig); got == k.Address() {
		t.Error("a changed message recovered the same signer")
	}
	for _, bad := range []string{"", "0x00", sig[:len(sig)-2] + "1d", "zz" + sig[4:]} {
		if _, err := RecoverPersonal(msg, bad); err == nil {
			t.Errorf("signature %q accepted", bad)
		}
	}
}

func TestInvalidSecrets(t *testing.T) {
	n, _ := hex.DecodeString("fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141") // the curve order
	for name, b := range map[string][]byte{"short": make([]byte, 31), "long": make([]byte, 33), "zero": make([]byte, 32), "order": n} {
		if _, err := New(b); err == nil {
			t.Errorf("%s secret accepted", name)
		}
	}
}

func TestLoadOrCreate(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", FileName)
	k, created, err := LoadOrCreate(path)
	if err != nil || !created {
		t.Fatalf("create: %v %v", created, err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 || fi.Size() != 32 {
		t.Fatalf("key file: %v %v", fi, err)
	}
	again, created, err := LoadOrCreate(path)
	if err != nil || created || again.Address() != k.Address() {
		t.Fatalf("reload: %v %v %v, want the same key", again, created, err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "sub", ".node-signing-*")); len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}

	// The secret never shows in formatting or logs.
	secret, _ := os.ReadFile(path)
	var logged bytes.Buffer
	slog.New(slog.NewTextHandler(&logged, nil)).Info("key", "key", k)
	for _, s := range []string{fmt.Sprint(k), fmt.Sprintf("%v %+v %#v %s", k, k, k, k), logged.String()} {
		if strings.Contains(s, hex.EncodeToString(secret)) || !strings.Contains(s, k.Address()) {
			t.Errorf("formatted key %q: shows the secret or hides the address", s)
		}
	}

	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadOrCreate(path); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("loose mode: %v", err)
	}
	bad := filepath.Join(dir, "bad.key")
	if err := os.WriteFile(bad, []byte("0x"+hex.EncodeToString(secret)), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadOrCreate(bad); err == nil || !strings.Contains(err.Error(), "32 bytes") {
		t.Errorf("hex text instead of raw bytes: %v", err)
	}
	link := filepath.Join(dir, "link.key")
	_ = os.Symlink(path, link)
	if _, _, err := LoadOrCreate(link); err == nil {
		t.Error("a symbolic link was followed")
	}
	if err := os.WriteFile(bad, make([]byte, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadOrCreate(bad); err == nil {
		t.Error("zero secret accepted")
	}
}

// EIP-55's own examples, and the addresses aleph-vm's settings tests
// accept and refuse (tests/supervisor/views/test_allocation_auth.py).
func TestIsChecksumAddress(t *testing.T) {
	for _, ok := range []string{
		"0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
		"0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
		"0xdAC17F958D2ee523a2206206994597C13D831ec7",
		"0x2937f62e5F81A88e921f883f8fE56ceCf4A4A44A",
	} {
		if !IsChecksumAddress(ok) {
			t.Errorf("%s refused", ok)
		}
	}
	for _, bad := range []string{
		"not-an-address",
		"0xdac17f958d2ee523a2206206994597c13d831ec7", // valid hex, not checksummed
		"0xdAC17F958D2ee523a2206206994597C13D831Ec7", // one letter's case wrong
		"dAC17F958D2ee523a2206206994597C13D831ec7",   // no 0x
		"0XdAC17F958D2ee523a2206206994597C13D831ec7",
		"0xdAC17F958D2ee523a2206206994597C13D831ec",
		"0xgAC17F958D2ee523a2206206994597C13D831ec7",
	} {
		if IsChecksumAddress(bad) {
			t.Errorf("%s accepted", bad)
		}
	}
}
