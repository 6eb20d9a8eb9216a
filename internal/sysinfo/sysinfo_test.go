package sysinfo

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"
)

func TestCollectJSONShape(t *testing.T) {
	before := time.Now().UTC().Truncate(time.Minute)
	u, err := Collect(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(u)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	num := func(path ...string) float64 {
		t.Helper()
		var cur any = m
		for _, p := range path {
			obj, ok := cur.(map[string]any)
			if !ok {
				t.Fatalf("%v: not an object in %s", path, b)
			}
			if cur, ok = obj[p]; !ok {
				t.Fatalf("missing %v in %s", path, b)
			}
		}
		f, ok := cur.(float64)
		if !ok {
			t.Fatalf("%v = %v, not a number", path, cur)
		}
		return f
	}
	// NumCPU counts only the CPUs this process may use, so it is a lower bound.
	if n := num("cpu", "count"); n < 1 || n < float64(runtime.NumCPU()) {
		t.Errorf("cpu.count = %v (NumCPU %d)", n, runtime.NumCPU())
	}
	for _, l := range []string{"load1", "load5", "load15"} {
		if v := num("cpu", "load_average", l); v < 0 {
			t.Errorf("%s = %v", l, v)
		}
	}
	lo, hi := num("cpu", "core_frequencies", "min"), num("cpu", "core_frequencies", "max")
	if lo < 0 || hi < lo {
		t.Errorf("frequencies min %v max %v", lo, hi)
	}
	for _, part := range []string{"mem", "disk"} {
		total, avail := num(part, "total_kB"), num(part, "available_kB")
		if total <= 0 || avail <= 0 || avail > total {
			t.Errorf("%s: total %v available %v", part, total, avail)
		}
	}
	if d := num("period", "duration_seconds"); d != 60 {
		t.Errorf("duration_seconds = %v", d)
	}
	period := m["period"].(map[string]any)
	ts, ok := period["start_timestamp"].(string)
	if !ok {
		t.Fatalf("start_timestamp: %v", period["start_timestamp"])
	}
	start, err := time.Parse(time.RFC3339, ts)
	if err != nil {
		t.Fatalf("start_timestamp %q: %v", ts, err)
	}
	if start.Second() != 0 || start.Nanosecond() != 0 || start.Before(before) || start.After(time.Now()) {
		t.Errorf("start_timestamp %q is not the current minute", ts)
	}
	if _, off := start.Zone(); off != 0 {
		t.Errorf("start_timestamp %q not UTC", ts)
	}
	props := m["properties"].(map[string]any)["cpu"].(map[string]any)
	if a, _ := props["architecture"].(string); a == "" {
		t.Errorf("architecture empty: %s", b)
	}
	if runtime.GOARCH == "amd64" && props["architecture"] != "x86_64" {
		t.Errorf("architecture = %v", props["architecture"])
	}
	if _, ok := props["vendor"].(string); !ok {
		t.Errorf("vendor missing: %s", b)
	}
	if m["active"] != true {
		t.Errorf("active = %v", m["active"])
	}
}

func TestCollectBadDiskPath(t *testing.T) {
	_, err := Collect(context.Background(), filepath.Join(t.TempDir(), "absent"))
	if err == nil {
		t.Error("no error for a missing disk path")
	}
}

func TestCoreFrequencies(t *testing.T) {
	write := func(t *testing.T, root, cpu, file, v string) {
		t.Helper()
		d := filepath.Join(root, cpu, "cpufreq")
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, file), []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name  string
		files [][3]string
		want  CoreFrequencies
	}{
		{"none exposed", nil, CoreFrequencies{}},
		{"two cores", [][3]string{
			{"cpu0", "cpuinfo_min_freq", "800000\n"}, {"cpu0", "cpuinfo_max_freq", "3600000\n"},
			{"cpu1", "cpuinfo_min_freq", "400000\n"}, {"cpu1", "cpuinfo_max_freq", "4200000\n"},
		}, CoreFrequencies{Min: 400, Max: 4200}},
		{"garbage ignored", [][3]string{
			{"cpu0", "cpuinfo_min_freq", "n/a"}, {"cpu0", "cpuinfo_max_freq", "2000000"},
		}, CoreFrequencies{Min: 0, Max: 2000}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			for _, f := range tt.files {
				write(t, root, f[0], f[1], f[2])
			}
			if got := coreFrequencies(root); got != tt.want {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestKB(t *testing.T) {
	for _, tt := range []struct{ in, want uint64 }{{0, 0}, {1, 1}, {1000, 1}, {1001, 2}, {2_000_000, 2000}} {
		if got := kB(tt.in); got != tt.want {
			t.Errorf("kB(%d) = %d, want %d", tt.in, got, tt.want)
		}
	}
}

// Floats as CPython's repr writes them (what aleph-vm's answers hold).
func TestFloatAsPython(t *testing.T) {
	for f, want := range map[float64]string{
		60: "60.0", 0: "0.0", 2400.5: "2400.5", 1e-05: "1e-05", 1e16: "1e+16",
		123456789012345: "123456789012345.0", 0.0001: "0.0001", 0.52: "0.52",
	} {
		b, err := Float(f).MarshalJSON()
		if err != nil || string(b) != want {
			t.Errorf("Float(%v) = %s, %v; want %s", f, b, err, want)
		}
	}
}

// aleph-vm's MachineUsage has gpu {devices, available_devices} and
// properties.cpu.features (resources.py); this node offers neither GPUs nor
// confidential computing: empty lists, never null.
func TestUsageHasGPUAndFeatures(t *testing.T) {
	u, err := Collect(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(u)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"gpu":{"devices":[],"available_devices":[]},"active":true}`, `"features":[]}`, `"duration_seconds":60.0}`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("%s lacks %s", b, want)
		}
	}
}

// /about/capability's shape: aleph-vm's MachineCapability in its field
// order (tests/supervisor/test_views.py test_system_capability_mock).
func TestCapabilityShape(t *testing.T) {
	c, err := CollectCapability(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`^\{"cpu":\{"architecture":"[a-z0-9_]+","vendor":"[^"]*","features":\[\],"model":("[^"]*"|null),` +
		`"frequency":(\d+|null),"count":[1-9]\d*\},"memory":\{"size":[1-9]\d*,"units":"bytes","type":"","clock":null,"clock_units":null\}\}$`)
	if !re.Match(b) {
		t.Errorf("capability %s", b)
	}
}
