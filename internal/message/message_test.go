package message

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// The fixtures are real messages copied from ../shared/fixtures so that the
// tests run from a fresh checkout.
const fixtureDir = "testdata/aleph-messages"

func readFixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(fixtureDir, name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestFixtures(t *testing.T) {
	tests := []struct {
		file       string
		typ        Type
		program    bool
		entrypoint string
		encoding   Encoding
		memory     int
		volumes    []VolumeKind
	}{
		{"machine.json", TypeProgram, true, "example_fastapi_2:app", EncodingZip, 128,
			[]VolumeKind{VolumeImmutable, VolumeEphemeral, VolumePersistent, VolumePersistent, VolumePersistent}},
		{"machine_named.json", TypeProgram, true, "example_fastapi_2:app", EncodingZip, 128,
			[]VolumeKind{VolumeImmutable, VolumeEphemeral, VolumePersistent, VolumePersistent, VolumePersistent}},
		// Unverified parsing keeps `content`, where these say 128 and 256.
		{"program_message_aleph_vm_0.2.json", TypeProgram, true, "main:app", EncodingSquashfs, 128,
			[]VolumeKind{VolumeImmutable, VolumePersistent}},
		{"program_message_aleph_vm_newest.json", TypeProgram, true, "main:app", EncodingSquashfs, 256,
			[]VolumeKind{VolumeImmutable, VolumePersistent}},
		{"instance_machine.json", TypeInstance, false, "", "", 0, nil},
		{"instance_message_aleph_vm_newest.json", TypeInstance, false, "", "", 0, nil},
		{"forget.json", TypeForget, false, "", "", 0, nil},
	}
	for _, tt := range tests {
		t.Run(tt.file, func(t *testing.T) {
			data := readFixture(t, tt.file)
			// Every fixture has a placeholder hash or no item_content, so
			// the network path refuses it, naming what is missing.
			if _, err := Parse(data); err == nil || !errkind.Is(err, errkind.InvalidInput) {
				t.Errorf("Parse accepted an unverifiable fixture: %v", err)
			} else if !strings.Contains(err.Error(), "item_") {
				t.Errorf("Parse error %q names neither item_hash nor item_content", err)
			}

			m, err := ParseUnverified(data)
			if err != nil {
				t.Fatalf("ParseUnverified: %v", err)
			}
			if m.Type != tt.typ {
				t.Fatalf("type = %q, want %q", m.Type, tt.typ)
			}
			p, err := m.Program()
			if !tt.program {
				if !errkind.Is(err, errkind.Unsupported) {
					t.Fatalf("Program() error = %v, want Unsupported", err)
				}
				want := "not a PROGRAM: /vm serves programs only"
				if !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), string(tt.typ)) {
					t.Errorf("error %q should say it is %s and %q", err, tt.typ, want)
				}
				return
			}
			if err != nil {
				t.Fatalf("Program(): %v", err)
			}
			if err := p.Validate(); err != nil {
				t.Fatalf("Validate(): %v", err)
			}
			if p.Code.Entrypoint != tt.entrypoint || p.Code.Encoding != tt.encoding || p.Resources.Memory != tt.memory {
				t.Errorf("got entrypoint %q encoding %q memory %d", p.Code.Entrypoint, p.Code.Encoding, p.Resources.Memory)
			}
			var kinds []VolumeKind
			for _, v := range p.Volumes {
				kinds = append(kinds, v.Kind())
			}
			if !reflect.DeepEqual(kinds, tt.volumes) {
				t.Errorf("volume kinds = %v, want %v", kinds, tt.volumes)
			}
		})
	}
}

// fixtureContent returns the content of machine.json, the richest program
// fixture, as generic JSON to derive malformed variants from.
func fixtureContent(t testing.TB) map[string]any {
	t.Helper()
	var env struct {
		Content map[string]any `json:"content"`
	}
	if err := json.Unmarshal(readFixture(t, "machine.json"), &env); err != nil {
		t.Fatal(err)
	}
	return env.Content
}

// signedEnvelope wraps content the way the network does: inline, with
// item_hash the sha256 of item_content.
func signedEnvelope(t testing.TB, typ Type, content any) []byte {
	t.Helper()
	item, err := json.Marshal(content)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(item)
	env, err := json.Marshal(map[string]any{
		"type": typ, "item_type": "inline", "item_content": string(item),
		"item_hash": hex.EncodeToString(sum[:]), "sender": "0xabc", "chain": "ETH",
		"_id": map[string]any{"$oid": "x"}, "confirmations": []any{},
	})
	if err != nil {
		t.Fatal(err)
	}
	return env
}

func obj(m map[string]any, key string) map[string]any { return m[key].(map[string]any) }

func volume(m map[string]any, i int) map[string]any {
	return m["volumes"].([]any)[i].(map[string]any)
}

func TestProgramMalformed(t *testing.T) {
	const bad = "not-a-hash"
	tests := []struct {
		name   string
		mutate func(c map[string]any)
		field  string // must appear in the error, with the "content." prefix
	}{
		{"unknown top-level field", func(c map[string]any) { c["foo"] = 1 }, "content.foo: unknown field"},
		{"misspelt entrypoint", func(c map[string]any) { obj(c, "code")["entrpoint"] = "x" }, "content.code.entrpoint: unknown field"},
		{"key of another case", func(c map[string]any) { c["Code"] = c["code"] }, "content.Code: unknown field"},
		{"unknown runtime field", func(c map[string]any) { obj(c, "runtime")["kernel"] = "x" }, "content.runtime.kernel: unknown field"},
		{"unknown data field", func(c map[string]any) { obj(c, "data")["size"] = 1 }, "content.data.size: unknown field"},
		{"unknown export field", func(c map[string]any) { obj(c, "export")["x"] = 1 }, "content.export.x: unknown field"},
		{"unknown trigger", func(c map[string]any) { obj(c, "on")["cron"] = "* * *" }, "content.on.cron: unknown field"},
		{"unknown environment field", func(c map[string]any) { obj(c, "environment")["gpu"] = true }, "content.environment.gpu: unknown field"},
		{"unknown resources field", func(c map[string]any) { obj(c, "resources")["disk"] = 1 }, "content.resources.disk: unknown field"},
		{"unknown volume field", func(c map[string]any) { volume(c, 1)["readonly"] = true }, "content.volumes[1].readonly: unknown field"},
		{"volume mixes variants", func(c map[string]any) { volume(c, 0)["size_mib"] = 5 }, "content.volumes[0].size_mib: not allowed in an immutable volume"},
		{"volume of no variant", func(c map[string]any) { c["volumes"] = []any{map[string]any{"mount": "/x"}} }, "content.volumes[0]: must be immutable"},
		{"wrong type", func(c map[string]any) { c["type"] = "vm-instance" }, "content.type"},
		{"bad code encoding", func(c map[string]any) { obj(c, "code")["encoding"] = "tar" }, "content.code.encoding"},
		{"bad data encoding", func(c map[string]any) { obj(c, "data")["encoding"] = "rar" }, "content.data.encoding"},
		{"missing entrypoint", func(c map[string]any) { delete(obj(c, "code"), "entrypoint") }, "content.code.entrypoint: required"},
		{"missing code", func(c map[string]any) { delete(c, "code") }, "content.code.encoding"},
		{"code is not an object", func(c map[string]any) { c["code"] = "x" }, "content.code: must be an object"},
		{"memory zero", func(c map[string]any) { obj(c, "resources")["memory"] = 0 }, "content.resources.memory: must be between"},
		{"memory too large", func(c map[string]any) { obj(c, "resources")["memory"] = MaxMemoryMiB + 1 }, "content.resources.memory"},
		{"memory as a string", func(c map[string]any) { obj(c, "resources")["memory"] = "128" }, "content.resources.memory: must be an integer"},
		{"memory fractional", func(c map[string]any) { obj(c, "resources")["memory"] = 1.5 }, "content.resources.memory: must be an integer"},
		{"vcpus zero", func(c map[string]any) { obj(c, "resources")["vcpus"] = 0 }, "content.resources.vcpus"},
		{"vcpus too many", func(c map[string]any) { obj(c, "resources")["vcpus"] = MaxVCPUs + 1 }, "content.resources.vcpus"},
		{"seconds negative", func(c map[string]any) { obj(c, "resources")["seconds"] = -1 }, "content.resources.seconds"},
		{"seconds too long", func(c map[string]any) { obj(c, "resources")["seconds"] = MaxSeconds + 1 }, "content.resources.seconds"},
		{"bad published port", func(c map[string]any) {
			obj(c, "resources")["published_ports"] = []any{map[string]any{"protocol": "sctp", "port": 80}}
		}, "content.resources.published_ports[0].protocol"},
		{"malformed code ref", func(c map[string]any) { obj(c, "code")["ref"] = bad }, "content.code.ref"},
		{"uppercase runtime ref", func(c map[string]any) { obj(c, "runtime")["ref"] = strings.ToUpper(fixtureCodeRef) }, "content.runtime.ref"},
		{"missing runtime ref", func(c map[string]any) { delete(obj(c, "runtime"), "ref") }, "content.runtime.ref: required"},
		{"malformed data ref", func(c map[string]any) { obj(c, "data")["ref"] = bad }, "content.data.ref"},
		{"malformed volume ref", func(c map[string]any) { volume(c, 0)["ref"] = bad }, "content.volumes[0].ref"},
		{"relative data mount", func(c map[string]any) { obj(c, "data")["mount"] = "data" }, "content.data.mount: must be an absolute path"},
		{"climbing export mount", func(c map[string]any) { obj(c, "export")["mount"] = "/data/../../etc" }, "content.export.mount"},
		{"relative volume mount", func(c map[string]any) { volume(c, 1)["mount"] = "cache" }, "content.volumes[1].mount"},
		{"ephemeral size zero", func(c map[string]any) { volume(c, 1)["size_mib"] = 0 }, "content.volumes[1].size_mib"},
		{"ephemeral too large", func(c map[string]any) { volume(c, 1)["size_mib"] = MaxEphemeralVolumeMiB + 1 }, "content.volumes[1].size_mib"},
		{"ephemeral false", func(c map[string]any) { volume(c, 1)["ephemeral"] = false }, "content.volumes[1]"},
		{"bad persistence", func(c map[string]any) { volume(c, 2)["persistence"] = "cloud" }, "content.volumes[2].persistence"},
		{"traversing volume name", func(c map[string]any) { volume(c, 2)["name"] = "../../etc" }, "content.volumes[2].name"},
		{"persistent volume named twice", func(c map[string]any) { volume(c, 3)["name"] = volume(c, 2)["name"] }, "content.volumes[3].name: persistent volume"},
		{"persistent names that are one file", func(c map[string]any) {
			volume(c, 2)["name"] = "my.db"
			volume(c, 3)["name"] = "my_db"
		}, "content.volumes[3].name: persistent volume \"my_db\" is already volumes[2] (both are \"my_db\" on the host)"},
		{"persistent size missing", func(c map[string]any) { delete(volume(c, 3), "size_mib") }, "content.volumes[3].size_mib"},
		{"bad variable name", func(c map[string]any) { obj(c, "variables")["A=B"] = "x" }, `content.variables["A=B"]`},
		{"non-string variable", func(c map[string]any) { obj(c, "variables")["N"] = 32 }, "content.variables.N: must be a string"},
		{"volumes not an array", func(c map[string]any) { c["volumes"] = map[string]any{} }, "content.volumes: must be an array"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := fixtureContent(t)
			tt.mutate(c)
			m, err := Parse(signedEnvelope(t, TypeProgram, c))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			_, err = m.Program()
			if err == nil {
				t.Fatalf("Program() accepted the content")
			}
			if !errkind.Is(err, errkind.InvalidInput) {
				t.Errorf("kind = %v, want InvalidInput", errkind.Of(err))
			}
			if !strings.Contains(err.Error(), tt.field) {
				t.Errorf("error %q does not contain %q", err, tt.field)
			}
		})
	}
}

func TestProgramFreeFormAndDefaults(t *testing.T) {
	c := fixtureContent(t)
	c["metadata"] = map[string]any{"anything": map[string]any{"nested": []any{1, "x"}}}
	obj(c, "on")["message"] = []any{map[string]any{"whatever": map[string]any{"deep": true}}}
	c["requirements"] = map[string]any{"cpu": map[string]any{"architecture": "x86_64"}, "future": 1}
	c["payment"] = map[string]any{"chain": "ETH", "type": "hold"}
	c["authorized_keys"] = []any{"ssh-ed25519 AAAA"}
	delete(c, "resources")
	delete(obj(c, "runtime"), "use_latest")
	delete(volume(c, 0), "use_latest")
	volume(c, 2)["parent"] = map[string]any{"ref": fixtureCodeRef}

	m, err := Parse(signedEnvelope(t, TypeProgram, c))
	if err != nil {
		t.Fatal(err)
	}
	p, err := m.Program()
	if err != nil {
		t.Fatalf("Program(): %v", err)
	}
	want := Resources{VCPUs: DefaultVCPUs, Memory: DefaultMemory, Seconds: DefaultSeconds}
	if !reflect.DeepEqual(p.Resources, want) {
		t.Errorf("resources = %+v, want defaults %+v", p.Resources, want)
	}
	// The schema's use_latest defaults: true for runtime, immutable volumes
	// and parents; false for code.
	if !p.Runtime.UseLatest || !p.Volumes[0].UseLatest || !p.Volumes[2].Parent.UseLatest || p.Code.UseLatest {
		t.Errorf("use_latest defaults wrong: runtime %v volume %v parent %v code %v",
			p.Runtime.UseLatest, p.Volumes[0].UseLatest, p.Volumes[2].Parent.UseLatest, p.Code.UseLatest)
	}

	var zero ProgramContent
	zero.ApplyDefaults()
	if !reflect.DeepEqual(zero.Resources, want) || zero.Type != ProgramType {
		t.Errorf("ApplyDefaults gave %+v", zero)
	}
}

func TestParseEnvelope(t *testing.T) {
	content := fixtureContent(t)
	good := signedEnvelope(t, TypeProgram, content)
	var env map[string]any
	if err := json.Unmarshal(good, &env); err != nil {
		t.Fatal(err)
	}
	edit := func(f func(map[string]any)) []byte {
		e := make(map[string]any, len(env))
		for k, v := range env {
			e[k] = v
		}
		f(e)
		b, _ := json.Marshal(e)
		return b
	}

	tests := []struct {
		name  string
		data  []byte
		opts  ParseOptions
		field string // "" means the message parses
	}{
		{"valid", good, ParseOptions{}, ""},
		{"expected hash matches", good, ParseOptions{ExpectedHash: env["item_hash"].(string)}, ""},
		{"expected hash differs", good, ParseOptions{ExpectedHash: fixtureCodeRef}, "item_hash: is"},
		{"hash mismatch", edit(func(e map[string]any) { e["item_hash"] = fixtureCodeRef }), ParseOptions{}, "item_hash"},
		{"hash mismatch tolerated when unverified", edit(func(e map[string]any) { e["item_hash"] = fixtureCodeRef }), ParseOptions{AllowUnverified: true}, ""},
		{"content tampered", edit(func(e map[string]any) {
			e["item_content"] = strings.Replace(e["item_content"].(string), "128", "256", 1)
		}), ParseOptions{}, "item_hash"},
		{"placeholder hash", edit(func(e map[string]any) { e["item_hash"] = "fake-hash" }), ParseOptions{}, "item_hash"},
		{"missing type", edit(func(e map[string]any) { delete(e, "type") }), ParseOptions{}, "type: required"},
		{"unknown type", edit(func(e map[string]any) { e["type"] = "EXEC" }), ParseOptions{}, "type: unknown"},
		{"bad item_type", edit(func(e map[string]any) { e["item_type"] = "http" }), ParseOptions{}, "item_type"},
		{"item_content on storage", edit(func(e map[string]any) { e["item_type"] = "storage" }), ParseOptions{}, "item_content: only allowed"},
		{"inline without item_content", edit(func(e map[string]any) { delete(e, "item_content"); e["content"] = content }), ParseOptions{}, "item_content: required"},
		{"item_content not an object", edit(func(e map[string]any) {
			e["item_content"] = "[1]"
			delete(e, "item_hash")
		}), ParseOptions{}, "item_content: must be a JSON object"},
		{"no content at all", edit(func(e map[string]any) { delete(e, "item_content"); e["item_type"] = "storage" }), ParseOptions{}, "content: missing"},
		{"type is a number", edit(func(e map[string]any) { e["type"] = 3 }), ParseOptions{}, "type: must be a string"},
		{"hash_type", edit(func(e map[string]any) { e["hash_type"] = "md5" }), ParseOptions{}, "hash_type"},
		{"not JSON", []byte("{"), ParseOptions{}, "message"},
		{"not an object", []byte("[]"), ParseOptions{}, "message"},
		{"empty", nil, ParseOptions{}, "message"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := tt.opts.Parse(tt.data)
			if tt.field == "" {
				if err != nil {
					t.Fatalf("Parse: %v", err)
				}
				if m.ItemHash == "" || len(m.Content) == 0 {
					t.Errorf("parsed message lacks hash or content: %+v", m)
				}
				return
			}
			if err == nil {
				t.Fatalf("Parse accepted it")
			}
			if !errkind.Is(err, errkind.InvalidInput) || !strings.Contains(err.Error(), tt.field) {
				t.Errorf("error %q (kind %v) should be InvalidInput naming %q", err, errkind.Of(err), tt.field)
			}
		})
	}
}

// A verified message takes its content from item_content, the bytes the
// hash covers, even when the API sends a different `content` alongside.
func TestParsePrefersHashedContent(t *testing.T) {
	var env map[string]any
	if err := json.Unmarshal(readFixture(t, "program_message_aleph_vm_newest.json"), &env); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(env["item_content"].(string)))
	env["item_hash"] = hex.EncodeToString(sum[:])
	data, _ := json.Marshal(env)

	m, err := Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	p, err := m.Program()
	if err != nil {
		t.Fatal(err)
	}
	if p.Resources.Memory != 128 { // `content` says 256, item_content 128
		t.Errorf("memory = %d, want 128 from item_content", p.Resources.Memory)
	}
}

func TestInlineMessage(t *testing.T) {
	at := time.Unix(1700000000, 500_000_000)
	store := StoreContent{Address: "0xabc", Time: 1, ItemType: ItemStorage, ItemHash: fixtureCodeRef}
	sm, err := InlineMessage(TypeStore, store, "0xabc", at)
	if err != nil {
		t.Fatal(err)
	}

	prog := ProgramContent{
		Address: "0xabc",
		Code:    CodeContent{Encoding: EncodingZip, Entrypoint: "main:app", Ref: sm.ItemHash},
		Runtime: RuntimeContent{Ref: docCIDv1, UseLatest: true, Comment: "<debian> & python"},
		On:      Triggers{HTTP: true},
		Variables: map[string]string{
			"GREETING": "hi",
		},
		Volumes: []Volume{
			{Mount: "/opt/lib", Ref: docCIDv0},
			{Mount: "/cache", Ephemeral: true, SizeMiB: 10},
			{Mount: "/var/lib/db", Name: "db", Persistence: "host", SizeMiB: 100, Parent: &ParentVolume{Ref: fixtureCodeRef, UseLatest: true}},
		},
	}
	prog.ApplyDefaults()
	if err := prog.Validate(); err != nil {
		t.Fatal(err)
	}
	pm, err := InlineMessage(TypeProgram, prog, "0xabc", at)
	if err != nil {
		t.Fatal(err)
	}
	if pm.Time != 1700000000.5 || pm.ItemType != ItemInline {
		t.Errorf("envelope: time %v item_type %q", pm.Time, pm.ItemType)
	}

	// Through the wire and back, on the verified path.
	wire, err := json.Marshal(pm)
	if err != nil {
		t.Fatal(err)
	}
	m, err := ParseOptions{ExpectedHash: pm.ItemHash}.Parse(wire)
	if err != nil {
		t.Fatalf("Parse of a built message: %v", err)
	}
	got, err := m.Program()
	if err != nil {
		t.Fatalf("Program of a built message: %v", err)
	}
	if !reflect.DeepEqual(*got, prog) {
		t.Errorf("round trip changed the program:\n got %+v\nwant %+v", *got, prog)
	}
	if !strings.Contains(pm.ItemContent, "<debian> & python") {
		t.Errorf("item_content escaped HTML: %s", pm.ItemContent)
	}

	s, err := sm.Store()
	if err != nil || s.ItemHash != fixtureCodeRef {
		t.Errorf("Store() = %+v, %v", s, err)
	}

	bad := prog
	bad.Code.Entrypoint = ""
	if _, err := InlineMessage(TypeProgram, bad, "0xabc", at); err == nil || !strings.Contains(err.Error(), "content.code.entrypoint") {
		t.Errorf("InlineMessage of an invalid program: %v", err)
	}
	if _, err := InlineMessage(TypeProgram, []int{1}, "0xabc", at); !errkind.Is(err, errkind.InvalidInput) {
		t.Errorf("InlineMessage of a non-object: %v", err)
	}
	if _, err := InlineMessage("NOPE", store, "0xabc", at); !errkind.Is(err, errkind.InvalidInput) {
		t.Errorf("InlineMessage of an unknown type: %v", err)
	}
}

func TestStore(t *testing.T) {
	tests := []struct {
		name    string
		content map[string]any
		field   string
	}{
		{"storage", map[string]any{"item_type": "storage", "item_hash": fixtureCodeRef, "size": 10, "engine_info": map[string]any{}}, ""},
		{"ipfs v0", map[string]any{"item_type": "ipfs", "item_hash": docCIDv0}, ""},
		{"ipfs v1", map[string]any{"item_type": "ipfs", "item_hash": docCIDv1}, ""},
		{"storage with a CID", map[string]any{"item_type": "storage", "item_hash": docCIDv0}, "content.item_hash"},
		{"ipfs with a digest", map[string]any{"item_type": "ipfs", "item_hash": fixtureCodeRef}, "content.item_hash"},
		{"inline item", map[string]any{"item_type": "inline", "item_hash": fixtureCodeRef}, "content.item_type"},
		{"bad hash", map[string]any{"item_type": "storage", "item_hash": "x"}, "content.item_hash"},
		{"negative size", map[string]any{"item_type": "storage", "item_hash": fixtureCodeRef, "size": -1}, "content.size"},
		{"hash not a string", map[string]any{"item_type": "storage", "item_hash": 5}, "content.item_hash"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m, err := Parse(signedEnvelope(t, TypeStore, tt.content))
			if err != nil {
				t.Fatal(err)
			}
			_, err = m.Store()
			if tt.field == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errkind.Is(err, errkind.InvalidInput) || !strings.Contains(err.Error(), tt.field) {
				t.Errorf("error %v should be InvalidInput naming %q", err, tt.field)
			}
		})
	}

	m, err := Parse(signedEnvelope(t, TypeProgram, fixtureContent(t)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Store(); !errkind.Is(err, errkind.InvalidInput) || !strings.Contains(err.Error(), "not a STORE") {
		t.Errorf("Store() of a PROGRAM: %v", err)
	}
}

func TestVolumeKindAndJSON(t *testing.T) {
	tests := []struct {
		v    Volume
		kind VolumeKind
		json string
	}{
		{Volume{Mount: "/a", Ref: fixtureCodeRef}, VolumeImmutable,
			`{"mount":"/a","ref":"` + fixtureCodeRef + `","use_latest":false}`},
		{Volume{Mount: "/b", Ephemeral: true, SizeMiB: 5}, VolumeEphemeral,
			`{"mount":"/b","ephemeral":true,"size_mib":5}`},
		{Volume{Name: "raw", Persistence: "host", SizeMiB: 5}, VolumePersistent,
			`{"persistence":"host","name":"raw","size_mib":5}`},
		{Volume{Mount: "/c"}, "", `{"mount":"/c"}`},
	}
	for _, tt := range tests {
		if k := tt.v.Kind(); k != tt.kind {
			t.Errorf("Kind(%+v) = %q, want %q", tt.v, k, tt.kind)
		}
		b, err := json.Marshal(tt.v)
		if err != nil || string(b) != tt.json {
			t.Errorf("Marshal(%+v) = %s, %v; want %s", tt.v, b, err, tt.json)
		}
	}
}

func TestFieldErrorsAreInspectable(t *testing.T) {
	p := ProgramContent{Type: "x"}
	err := p.Validate()
	var fe *FieldError
	if !errors.As(err, &fe) || fe.Field != "type" {
		t.Fatalf("first field error = %+v from %v", fe, err)
	}
	for _, f := range []string{"code.encoding", "code.entrypoint", "code.ref", "runtime.ref", "resources.vcpus"} {
		if !strings.Contains(err.Error(), f) {
			t.Errorf("error %q does not name %s", err, f)
		}
	}
}

// TestUnnamedPersistentVolume: aleph-vm accepts a persistent volume
// without a name (it becomes unamed_volume_<i>, mounted at /mnt/<that>
// when it has no mount either).
func TestUnnamedPersistentVolume(t *testing.T) {
	c := fixtureContent(t)
	delete(volume(c, 2), "name")
	delete(volume(c, 2), "mount")
	m, err := Parse(signedEnvelope(t, TypeProgram, c))
	if err != nil {
		t.Fatal(err)
	}
	p, err := m.Program()
	if err != nil {
		t.Fatalf("Program() refused an unnamed persistent volume: %v", err)
	}
	if k := p.Volumes[2].Kind(); k != VolumePersistent {
		t.Fatalf("kind %q", k)
	}
	if got := PersistentVolumeName(2, p.Volumes[2].Name); got != "unamed_volume_2" {
		t.Errorf("file name %q, want unamed_volume_2", got)
	}
	if got := PersistentVolumeMount(2, p.Volumes[2].Name); got != "/mnt/unamed_volume_2" {
		t.Errorf("mount %q, want /mnt/unamed_volume_2", got)
	}
	if got := PersistentVolumeMount(2, "db"); got != "/mnt/db" {
		t.Errorf("mount %q, want /mnt/db", got)
	}
	b, err := json.Marshal(p.Volumes[2])
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), `"name"`) {
		t.Errorf("re-encoded unnamed volume has a name: %s", b)
	}
}
