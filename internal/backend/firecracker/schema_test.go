package firecracker

// Contract tests of the generated configuration. Firecracker itself cannot
// run on the project's machines (no firecracker binary can be fetched, and
// the CI hosts have no usable /dev/kvm), so the configuration is checked
// against Firecracker v1.0.0's own API definitions (testdata/firecracker.yaml)
// and its example config file (testdata/vm_config.json) instead.

import (
	"encoding/json"
	"fmt"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/vmimage"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// schemaSet is the definitions section of an OpenAPI 2 document.
type schemaSet map[string]any

func loadDefinitions(t *testing.T) schemaSet {
	t.Helper()
	b, err := os.ReadFile("testdata/firecracker.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := yaml.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	if v := doc["info"].(map[string]any)["version"]; v != "1.0.0" {
		t.Fatalf("fixture is Firecracker API %v, want 1.0.0", v)
	}
	defs, ok := doc["definitions"].(map[string]any)
	if !ok {
		t.Fatal("no definitions in firecracker.yaml")
	}
	return defs
}

// validate checks value (decoded JSON) against the named definition and
// returns every violation. It covers the subset of JSON schema that
// firecracker.yaml's definitions use: type, required, properties, items,
// enum, minimum, maximum and $ref to #/definitions.
//
// Two choices are stricter or looser than plain JSON schema, to match how
// Firecracker parses these bodies (serde structs with deny_unknown_fields
// and Option fields): a property the definition does not declare is an
// error (the spec sets no additionalProperties, but Firecracker rejects
// unknown fields), and null is accepted for a property that is not
// required (serde reads it as absent, as the example config file relies on).
func (s schemaSet) validate(def string, value any) []string {
	return s.check(map[string]any{"$ref": "#/definitions/" + def}, value, def)
}

func (s schemaSet) check(schema map[string]any, v any, at string) []string {
	if ref, ok := schema["$ref"].(string); ok {
		name, found := strings.CutPrefix(ref, "#/definitions/")
		def, ok := s[name].(map[string]any)
		if !found || !ok {
			return []string{fmt.Sprintf("%s: unresolvable $ref %q", at, ref)}
		}
		return s.check(def, v, at)
	}
	var errs []string
	fail := func(format string, args ...any) {
		errs = append(errs, at+": "+fmt.Sprintf(format, args...))
	}
	switch typ, _ := schema["type"].(string); typ {
	case "object":
		obj, ok := v.(map[string]any)
		if !ok {
			fail("want an object, got %T", v)
			return errs
		}
		props, _ := schema["properties"].(map[string]any)
		required := map[string]bool{}
		if req, ok := schema["required"].([]any); ok {
			for _, r := range req {
				required[r.(string)] = true
				if _, ok := obj[r.(string)]; !ok {
					fail("missing required property %q", r)
				}
			}
		}
		keys := make([]string, 0, len(obj))
		for k := range obj {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			ps, ok := props[k].(map[string]any)
			if !ok {
				fail("property %q is not in the definition", k)
				continue
			}
			if obj[k] == nil && !required[k] {
				continue
			}
			errs = append(errs, s.check(ps, obj[k], at+"."+k)...)
		}
	case "array":
		arr, ok := v.([]any)
		if !ok {
			fail("want an array, got %T", v)
			return errs
		}
		if items, ok := schema["items"].(map[string]any); ok {
			for n, e := range arr {
				errs = append(errs, s.check(items, e, fmt.Sprintf("%s[%d]", at, n))...)
			}
		}
	case "string":
		if _, ok := v.(string); !ok {
			fail("want a string, got %T", v)
			return errs
		}
	case "boolean":
		if _, ok := v.(bool); !ok {
			fail("want a boolean, got %T", v)
			return errs
		}
	case "integer":
		f, ok := v.(float64)
		if !ok || f != math.Trunc(f) {
			fail("want an integer, got %v (%T)", v, v)
			return errs
		}
		if lo, ok := number(schema["minimum"]); ok && f < lo {
			fail("%v is below the minimum %v", f, lo)
		}
		if hi, ok := number(schema["maximum"]); ok && f > hi {
			fail("%v is above the maximum %v", f, hi)
		}
	case "":
		// Schemas with no type (none in these definitions) accept anything.
	default:
		fail("validator does not know type %q", typ)
	}
	if enum, ok := schema["enum"].([]any); ok && !slices.Contains(enum, v) {
		fail("%v is not one of %v", v, enum)
	}
	return errs
}

func number(v any) (float64, bool) {
	switch n := v.(type) {
	case int:
		return float64(n), true
	case float64:
		return n, true
	}
	return 0, false
}

// configSections maps the config file's top-level keys to the definition
// of their body, and to the FullVmConfiguration property that names the
// same definition (checked below, so the mapping is the spec's, not ours).
type configSection struct {
	key, def, fullVMProp string
	array                bool
}

var configSections = []configSection{
	{key: "boot-source", def: "BootSource", fullVMProp: "boot_source"},
	{key: "drives", def: "Drive", fullVMProp: "block_devices", array: true},
	{key: "machine-config", def: "MachineConfiguration", fullVMProp: "machine_config"},
	{key: "network-interfaces", def: "NetworkInterface", fullVMProp: "net_devices", array: true},
	{key: "vsock", def: "Vsock", fullVMProp: "vsock_device"},
	{key: "logger", def: "Logger", fullVMProp: "logger"},
	{key: "metrics", def: "Metrics", fullVMProp: "metrics"},
	{key: "balloon", def: "Balloon", fullVMProp: "balloon_device"},
	{key: "mmds-config", def: "MmdsConfig", fullVMProp: "mmds_config"},
}

// validateConfigFile checks a whole --config-file document: its top-level
// keys are those of the example file, the required sections are there,
// and each section validates against its definition.
// validPlan builds the plan and fails the test unless its config file
// passes Firecracker's schema; it returns the plan and that file decoded.
func validPlan(t *testing.T, defs schemaSet, opts Options, spec backend.Spec, drives []vmimage.Drive) (*Plan, map[string]any) {
	t.Helper()
	plan, err := BuildPlan(opts, spec, drives)
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal(plan.ConfigJSON, &doc); err != nil {
		t.Fatal(err)
	}
	if errs := validateConfigFile(t, defs, doc); len(errs) > 0 {
		t.Fatalf("jailed=%v: config rejected:\n%s\n%s", opts.UseJailer, strings.Join(errs, "\n"), plan.ConfigJSON)
	}
	return plan, doc
}

func validateConfigFile(t *testing.T, defs schemaSet, doc map[string]any) []string {
	t.Helper()
	example := exampleKeys(t)
	var errs []string
	for _, k := range []string{"boot-source", "drives"} {
		if _, ok := doc[k]; !ok {
			errs = append(errs, "missing section "+k)
		}
	}
	for k, v := range doc {
		if !example[k] {
			errs = append(errs, fmt.Sprintf("top-level key %q is not in vm_config.json", k))
			continue
		}
		if v == nil {
			continue
		}
		i := slices.IndexFunc(configSections, func(s configSection) bool { return s.key == k })
		if i < 0 {
			errs = append(errs, "no definition known for "+k)
			continue
		}
		sec := configSections[i]
		if !sec.array {
			errs = append(errs, defs.validate(sec.def, v)...)
			continue
		}
		arr, ok := v.([]any)
		if !ok {
			errs = append(errs, fmt.Sprintf("%s: want an array, got %T", k, v))
			continue
		}
		for n, e := range arr {
			msgs := defs.validate(sec.def, e)
			if sec.def == "NetworkInterface" {
				msgs = append(msgs, netParseRules(e)...)
			}
			for _, msg := range msgs {
				errs = append(errs, fmt.Sprintf("%s[%d]: %s", k, n, msg))
			}
		}
	}
	sort.Strings(errs)
	return errs
}

// netParseRules are what Firecracker v1.0.0 demands of a network interface
// beyond its API definitions, which give guest_mac and host_dev_name as
// plain strings: guest_mac is parsed by MacAddr::parse_str (six
// ':'-separated fields of exactly two hex digits; the serde error is "The
// provided MAC address is invalid."), and the tap name must fit in
// IFNAMSIZ with its NUL (Tap::open_named refuses 16 bytes and more). Written
// from those rules, independently of the package's own checks.
func netParseRules(v any) []string {
	obj, ok := v.(map[string]any)
	if !ok {
		return nil
	}
	var errs []string
	if mac, ok := obj["guest_mac"].(string); ok {
		fields := strings.Split(mac, ":")
		valid := len(fields) == 6
		for _, f := range fields {
			if _, err := strconv.ParseUint(f, 16, 8); len(f) != 2 || err != nil {
				valid = false
			}
		}
		if !valid {
			errs = append(errs, fmt.Sprintf("guest_mac %q: Firecracker cannot parse it", mac))
		}
	}
	if name, ok := obj["host_dev_name"].(string); ok && len(name) >= 16 {
		errs = append(errs, fmt.Sprintf("host_dev_name %q: longer than a network interface name", name))
	}
	return errs
}

func exampleKeys(t *testing.T) map[string]bool {
	t.Helper()
	b, err := os.ReadFile("testdata/vm_config.json")
	if err != nil {
		t.Fatal(err)
	}
	var ex map[string]any
	if err := json.Unmarshal(b, &ex); err != nil {
		t.Fatal(err)
	}
	keys := map[string]bool{}
	for k := range ex {
		keys[k] = true
	}
	return keys
}

func decode(t *testing.T, v any) map[string]any {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// TestSectionMappingMatchesSpec makes sure each config-file section is
// validated against the definition the spec itself uses for it.
func TestSectionMappingMatchesSpec(t *testing.T) {
	defs := loadDefinitions(t)
	full := defs["FullVmConfiguration"].(map[string]any)["properties"].(map[string]any)
	example := exampleKeys(t)
	for _, sec := range configSections {
		prop, ok := full[sec.fullVMProp].(map[string]any)
		if !ok {
			t.Errorf("FullVmConfiguration has no %s", sec.fullVMProp)
			continue
		}
		if sec.array {
			prop, _ = prop["items"].(map[string]any)
		}
		if ref, _ := prop["$ref"].(string); ref != "#/definitions/"+sec.def {
			t.Errorf("%s: spec says %q, test maps to %s", sec.key, ref, sec.def)
		}
		if !example[sec.key] {
			t.Errorf("%s is not a key of vm_config.json", sec.key)
		}
	}
}

// TestExampleConfigValidates is the validator's positive control: the
// upstream example file passes.
func TestExampleConfigValidates(t *testing.T) {
	defs := loadDefinitions(t)
	b, _ := os.ReadFile("testdata/vm_config.json")
	var doc map[string]any
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	if errs := validateConfigFile(t, defs, doc); len(errs) > 0 {
		t.Fatalf("example config rejected:\n%s", strings.Join(errs, "\n"))
	}
}

// TestValidatorRejects shows the validator can fail: each broken config
// must be rejected with a message naming the problem.
func TestValidatorRejects(t *testing.T) {
	defs := loadDefinitions(t)
	good := func() map[string]any {
		spec := testSpec(2, 512)
		spec.Network = testNetwork()
		return decode(t, mustConfig(t, spec, testDrives()))
	}
	nic := func(m map[string]any) map[string]any { return m["network-interfaces"].([]any)[0].(map[string]any) }
	for _, tc := range []struct {
		name   string
		mutate func(m map[string]any)
		want   string
	}{
		{"missing kernel", func(m map[string]any) { delete(m["boot-source"].(map[string]any), "kernel_image_path") }, `missing required property "kernel_image_path"`},
		{"vcpus as string", func(m map[string]any) { m["machine-config"].(map[string]any)["vcpu_count"] = "2" }, "want an integer"},
		{"too many vcpus", func(m map[string]any) { m["machine-config"].(map[string]any)["vcpu_count"] = 33.0 }, "above the maximum"},
		{"fractional memory", func(m map[string]any) { m["machine-config"].(map[string]any)["mem_size_mib"] = 1.5 }, "want an integer"},
		{"read-only missing", func(m map[string]any) { delete(m["drives"].([]any)[0].(map[string]any), "is_read_only") }, `missing required property "is_read_only"`},
		{"bad cache type", func(m map[string]any) { m["drives"].([]any)[0].(map[string]any)["cache_type"] = "Fast" }, "not one of"},
		{"unknown drive field", func(m map[string]any) { m["drives"].([]any)[0].(map[string]any)["readonly"] = true }, `"readonly" is not in the definition`},
		{"reserved guest cid", func(m map[string]any) { m["vsock"].(map[string]any)["guest_cid"] = 2.0 }, "below the minimum"},
		{"vsock without path", func(m map[string]any) { delete(m["vsock"].(map[string]any), "uds_path") }, `missing required property "uds_path"`},
		{"drives not an array", func(m map[string]any) { m["drives"] = map[string]any{} }, "want an array"},
		{"unknown section", func(m map[string]any) { m["boot_source"] = m["boot-source"] }, `"boot_source" is not in vm_config.json`},
		{"no drives", func(m map[string]any) { delete(m, "drives") }, "missing section drives"},
		{"required null", func(m map[string]any) { m["vsock"].(map[string]any)["uds_path"] = nil }, "want a string"},
		{"interface without tap", func(m map[string]any) { delete(nic(m), "host_dev_name") }, `missing required property "host_dev_name"`},
		{"interface without id", func(m map[string]any) { delete(nic(m), "iface_id") }, `missing required property "iface_id"`},
		{"unknown interface field", func(m map[string]any) { nic(m)["mac"] = "02:fc:00:00:00:01" }, `"mac" is not in the definition`},
		{"mac as number", func(m map[string]any) { nic(m)["guest_mac"] = 2.0 }, "want a string"},
		{"mac with dashes", func(m map[string]any) { nic(m)["guest_mac"] = "02-fc-00-00-00-01" }, "Firecracker cannot parse it"},
		{"mac short field", func(m map[string]any) { nic(m)["guest_mac"] = "02:fc:0:00:00:01" }, "Firecracker cannot parse it"},
		{"mac too long", func(m map[string]any) { nic(m)["guest_mac"] = "aa:aa:aa:aa:aa:aa:aa" }, "Firecracker cannot parse it"},
		{"mac not hex", func(m map[string]any) { nic(m)["guest_mac"] = "aa:aa:aa:aa:aa:ax" }, "Firecracker cannot parse it"},
		{"tap name too long", func(m map[string]any) { nic(m)["host_dev_name"] = "tap-0123456789ab" }, "longer than a network interface name"},
		{"interfaces not an array", func(m map[string]any) { m["network-interfaces"] = nic(m) }, "want an array"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := good()
			if errs := validateConfigFile(t, defs, m); len(errs) > 0 {
				t.Fatalf("baseline rejected: %v", errs)
			}
			tc.mutate(m)
			errs := validateConfigFile(t, defs, m)
			if !slices.ContainsFunc(errs, func(e string) bool { return strings.Contains(e, tc.want) }) {
				t.Errorf("errors %q do not mention %q", errs, tc.want)
			}
		})
	}
}

func testSpec(vcpus, mem int) backend.Spec {
	return backend.Spec{ExecutionID: "0b5e4c1c-8e0f-4f4e-9d7a-2f0b1c2d3e4f", VCPUs: vcpus, MemoryMiB: mem, StateDir: "/var/lib/aleph/vm/executions/x"}
}

// testNetwork is a network as the pool prepares it for a VM.
func testNetwork() *backend.Network {
	return &backend.Network{
		TapName:  "fc-0b5e4c1c",
		GuestMAC: "02:fc:0a:00:00:02",
		Address:  netip.MustParsePrefix("172.16.4.2/24"),
		Gateway:  netip.MustParseAddr("172.16.4.1"),
		DNS:      []netip.Addr{netip.MustParseAddr("9.9.9.9")},
	}
}

func testDrives() []vmimage.Drive {
	return vmimage.GuestDrives(&vmimage.Prepared{
		Runtime: vmimage.Image{Path: "/cache/runtime.squashfs", FSType: vmimage.FSSquashfs, ReadOnly: true},
		Code:    &vmimage.Image{Path: "/cache/code.squashfs", FSType: vmimage.FSSquashfs, ReadOnly: true},
		Volumes: []vmimage.VolumeImage{
			{Image: vmimage.Image{Path: "/state/eph.ext4", FSType: vmimage.FSExt4, Temporary: true}, Mount: "/var/cache"},
			{Image: vmimage.Image{Path: "/persist/db.ext4", FSType: vmimage.FSExt4}, Mount: "/var/lib/db"},
		},
	}, nil)
}

func mustConfig(t *testing.T, spec backend.Spec, drives []vmimage.Drive) *VMConfig {
	t.Helper()
	cfg, err := BuildConfig(spec, drives, ConfigParams{KernelPath: "/vmlinux", InitrdPath: "/initrd", VsockPath: "/v.sock", LogPath: "/firecracker.log"})
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// fixtureSpec turns a PROGRAM fixture into the spec the pool would build,
// with made-up host paths (nothing is read).
func fixtureSpec(t *testing.T, prog *message.ProgramContent) (backend.Spec, *vmimage.Prepared) {
	t.Helper()
	spec := backend.Spec{
		ExecutionID: "6f1c2e8a-0d7b-4c55-a1e3-9b8f7d6c5a4b", ProgramHash: "prog",
		VCPUs: prog.Resources.VCPUs, MemoryMiB: prog.Resources.Memory,
		StateDir: "/var/lib/aleph/vm/executions/6f1c2e8a",
		Internet: prog.Environment.Internet,
	}
	if spec.Internet {
		spec.Network = testNetwork()
	}
	prep := &vmimage.Prepared{
		Runtime: vmimage.Image{Path: "/cache/runtime/" + prog.Runtime.Ref, FSType: vmimage.FSSquashfs, ReadOnly: true},
		Code:    &vmimage.Image{Path: "/cache/vm-images/" + prog.Code.Ref + ".squashfs", FSType: vmimage.FSSquashfs, ReadOnly: true},
	}
	for n, v := range prog.Volumes {
		vi := vmimage.VolumeImage{Mount: v.Mount, Kind: v.Kind()}
		switch v.Kind() {
		case message.VolumeImmutable:
			vi.Image = vmimage.Image{Path: "/cache/volumes/" + v.Ref, FSType: vmimage.FSSquashfs, ReadOnly: true}
		case message.VolumeEphemeral:
			vi.Image = vmimage.Image{Path: fmt.Sprintf("%s/volumes/ephemeral-%d.ext4", spec.StateDir, n), FSType: vmimage.FSExt4, Temporary: true}
		case message.VolumePersistent:
			vi.Image = vmimage.Image{Path: "/var/lib/aleph/vm/volumes/persistent/" + v.Name + ".ext4", FSType: vmimage.FSExt4}
		}
		prep.Volumes = append(prep.Volumes, vi)
	}
	if prog.Data != nil {
		prep.Data = &vmimage.VolumeImage{Image: vmimage.Image{Path: "/cache/vm-images/data.squashfs", FSType: vmimage.FSSquashfs, ReadOnly: true}, Mount: prog.Data.Mount}
	}
	return spec, prep
}

// TestFixtureConfigsValidate generates the configuration of every PROGRAM
// fixture, jailed and not, and validates it against Firecracker v1.0.0's
// definitions.
func TestFixtureConfigsValidate(t *testing.T) {
	defs := loadDefinitions(t)
	files, _ := filepath.Glob("../../message/testdata/aleph-messages/*.json")
	programs, networked := 0, 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		msg, err := message.ParseUnverified(b)
		if err != nil || msg.Type != message.TypeProgram {
			continue
		}
		prog, err := msg.Program()
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		programs++
		if prog.Environment.Internet {
			networked++
		}
		for _, jailed := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/jailed=%v", filepath.Base(f), jailed), func(t *testing.T) {
				spec, prep := fixtureSpec(t, prog)
				opts := Options{UseJailer: jailed, KernelPath: "/opt/vm/vmlinux", InitrdPath: "/opt/vm/initramfs.cpio.gz", JailerUID: 990, JailerGID: 990, CgroupVersion: 1}.withDefaults()
				plan, _ := validPlan(t, defs, opts, spec, vmimage.GuestDrives(prep, nil))

				// What the issue asks of it, beyond the schema.
				mc := plan.Config.MachineConfig
				if mc.VCPUCount != prog.Resources.VCPUs || mc.MemSizeMiB != prog.Resources.Memory {
					t.Errorf("machine-config %+v, message asks %d vCPUs, %d MiB", mc, prog.Resources.VCPUs, prog.Resources.Memory)
				}
				root := plan.Config.Drives[0]
				if root.DriveID != "rootfs" || !root.IsRootDevice || !root.IsReadOnly {
					t.Errorf("first drive is not the read-only root runtime: %+v", root)
				}
				wantDrives := 2 + len(prog.Volumes)
				if prog.Data != nil {
					wantDrives++
				}
				if len(plan.Config.Drives) != wantDrives {
					t.Errorf("%d drives, want %d", len(plan.Config.Drives), wantDrives)
				}
				wantNICs := []NetworkInterface{}
				if prog.Environment.Internet {
					wantNICs = []NetworkInterface{{IfaceID: "eth0", HostDevName: spec.Network.TapName, GuestMAC: spec.Network.GuestMAC}}
				}
				if !reflect.DeepEqual(plan.Config.NetworkInterfaces, wantNICs) {
					t.Errorf("network-interfaces %+v, want %+v", plan.Config.NetworkInterfaces, wantNICs)
				}
				if plan.Config.Vsock == nil || plan.Config.Vsock.GuestCID != GuestCID {
					t.Errorf("vsock = %+v", plan.Config.Vsock)
				}
				bootArgs := plan.Config.BootSource.BootArgs
				for _, a := range strings.Fields(BaseBootArgs) {
					if !slices.Contains(strings.Fields(bootArgs), a) {
						t.Errorf("boot args %q lack %q", bootArgs, a)
					}
				}
				inJail := func(p string) bool {
					return strings.HasPrefix(p, "/") && !strings.Contains(p, "/cache/") && !strings.Contains(p, "/var/lib/")
				}
				for _, d := range plan.Config.Drives {
					if jailed != inJail(d.PathOnHost) {
						t.Errorf("jailed=%v but drive path %s", jailed, d.PathOnHost)
					}
				}
			})
		}
	}
	if programs < 3 {
		t.Fatalf("only %d PROGRAM fixtures found", programs)
	}
	if networked == 0 || networked == programs {
		t.Fatalf("%d of %d PROGRAM fixtures have internet: both kinds are needed", networked, programs)
	}
}

// TestActionBodyValidates checks the stop request against the spec.
func TestActionBodyValidates(t *testing.T) {
	defs := loadDefinitions(t)
	if errs := defs.validate("InstanceActionInfo", decode(t, InstanceAction{ActionType: ActionSendCtrlAltDel})); len(errs) > 0 {
		t.Fatal(errs)
	}
}

// TestNetworkConfigValidates checks a configuration with a network against
// definitions.NetworkInterface (and Firecracker's parse rules), jailed and
// not: the interface is the same either way, since the tap is on the host
// and Firecracker names it, not a path.
func TestNetworkConfigValidates(t *testing.T) {
	defs := loadDefinitions(t)
	for _, jailed := range []bool{true, false} {
		spec := testSpec(1, 128)
		spec.Network = testNetwork()
		opts := Options{UseJailer: jailed, KernelPath: "/opt/vm/vmlinux", JailerUID: 990, JailerGID: 990, CgroupVersion: 2}.withDefaults()
		_, doc := validPlan(t, defs, opts, spec, testDrives())
		nics, _ := doc["network-interfaces"].([]any)
		if len(nics) != 1 {
			t.Fatalf("jailed=%v: network-interfaces = %v", jailed, doc["network-interfaces"])
		}
		if errs := defs.validate("NetworkInterface", nics[0]); len(errs) > 0 {
			t.Errorf("interface rejected: %v", errs)
		}
		want := map[string]any{"iface_id": "eth0", "host_dev_name": "fc-0b5e4c1c", "guest_mac": "02:fc:0a:00:00:02"}
		if !reflect.DeepEqual(nics[0], want) {
			t.Errorf("jailed=%v: interface %v, want %v", jailed, nics[0], want)
		}
	}
}
