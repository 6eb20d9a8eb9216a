package integration

import (
	"encoding/json"
	"strings"
	"testing"
)

// `program inspect --hypervisor firecracker` prints the configuration the
// firecracker backend would start with. Firecracker cannot run here; the
// schema itself is checked by the backend's contract tests, this checks
// that the CLI plans from the message.
func TestInspectFirecrackerPlan(t *testing.T) {
	s := startSupervisor(t)
	hash := s.upload("testdata/probe", "main:app", "--memory", "256", "--vcpus", "2")
	out := s.cli("program", "inspect", hash, "--hypervisor", "firecracker")
	_, after, ok := strings.Cut(out, "configuration (")
	if !ok {
		t.Fatalf("no configuration in:\n%s", out)
	}
	_, cfgText, _ := strings.Cut(after, "):\n")
	var cfg struct {
		MachineConfig struct {
			VCPUs  int `json:"vcpu_count"`
			MemMiB int `json:"mem_size_mib"`
		} `json:"machine-config"`
		Drives []struct {
			ID       string `json:"drive_id"`
			Root     bool   `json:"is_root_device"`
			ReadOnly bool   `json:"is_read_only"`
		} `json:"drives"`
		Vsock *struct {
			CID     int    `json:"guest_cid"`
			UDSPath string `json:"uds_path"`
		} `json:"vsock"`
	}
	if err := json.Unmarshal([]byte(cfgText), &cfg); err != nil {
		t.Fatalf("configuration is not JSON: %v\n%s", err, cfgText)
	}
	if cfg.MachineConfig.VCPUs != 2 || cfg.MachineConfig.MemMiB != 256 {
		t.Errorf("machine-config %+v, want 2 vCPUs and 256 MiB", cfg.MachineConfig)
	}
	if len(cfg.Drives) < 2 || !cfg.Drives[0].Root || !cfg.Drives[0].ReadOnly {
		t.Errorf("runtime is not the read-only root drive: %+v", cfg.Drives)
	}
	if cfg.Vsock == nil || cfg.Vsock.UDSPath == "" {
		t.Errorf("no vsock device")
	}
	if !strings.Contains(out, "--exec-file") || !strings.Contains(out, "--chroot-base-dir") {
		t.Errorf("no jailer command line:\n%s", out)
	}
}
