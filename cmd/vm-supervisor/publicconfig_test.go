package main

import (
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/config"
	"github.com/aleph-vm-go/vm-supervisor/internal/pep440"
)

// /status/config as aleph-vm fills it with its defaults
// (views/__init__.py status_public_config; conf.py: PAYMENT_RECEIVER_ADDRESS
// falls back to OWNER_ADDRESS, "" by default), and the truth about QEMU.
func TestPublicConfigTellsTheTruth(t *testing.T) {
	s, _, err := config.Load(nil, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	m := publicConfig(s, false)
	if got := m["payment"].(map[string]any)["PAYMENT_RECEIVER_ADDRESS"]; got != "" {
		t.Errorf("PAYMENT_RECEIVER_ADDRESS = %#v, want \"\"", got)
	}
	if got := m["computing"].(map[string]any)["ENABLE_QEMU_SUPPORT"]; got != false {
		t.Errorf("ENABLE_QEMU_SUPPORT = %#v without QEMU+KVM", got)
	}
	if got := publicConfig(s, true)["computing"].(map[string]any)["ENABLE_QEMU_SUPPORT"]; got != true {
		t.Errorf("ENABLE_QEMU_SUPPORT = %#v with QEMU+KVM", got)
	}
	// Neither gVisor nor no backend at all is QEMU with KVM.
	if qemuWithKVM(nil) {
		t.Error("qemuWithKVM(nil)")
	}
	s.PaymentReceiverAddress = "0xabc"
	if got := publicConfig(s, false)["payment"].(map[string]any)["PAYMENT_RECEIVER_ADDRESS"]; got != "0xabc" {
		t.Errorf("PAYMENT_RECEIVER_ADDRESS = %#v", got)
	}
	v, err := pep440.Parse(m["version"].(string))
	if err != nil {
		t.Fatal(err)
	}
	if v.Release[0] == 0 {
		t.Errorf("version %q reads as older than any release", m["version"])
	}
}
