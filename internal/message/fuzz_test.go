package message

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func seedFixtures(f *testing.F) {
	files, err := filepath.Glob(filepath.Join(fixtureDir, "*.json"))
	if err != nil || len(files) == 0 {
		f.Fatalf("no fixtures in %s: %v", fixtureDir, err)
	}
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
}

// FuzzParse checks that no input makes parsing panic, and that a program
// which passes validation survives being rebuilt as an inline message
// unchanged: what the local store writes must read back the same.
func FuzzParse(f *testing.F) {
	seedFixtures(f)
	f.Add(signedEnvelope(f, TypeProgram, fixtureContent(f)))
	f.Add(signedEnvelope(f, TypeStore, map[string]any{"item_type": "storage", "item_hash": fixtureCodeRef}))
	f.Add([]byte(`{"type":"PROGRAM","item_type":"inline","content":{"volumes":[{"ref":null}]}}`))

	f.Fuzz(func(t *testing.T, data []byte) {
		for _, opts := range []ParseOptions{{}, {AllowUnverified: true}} {
			m, err := opts.Parse(data)
			if err != nil {
				if m != nil {
					t.Fatalf("Parse returned a message and an error: %v", err)
				}
				continue
			}
			_, _ = m.Store()
			p, err := m.Program()
			if err != nil {
				continue
			}
			if err := p.Validate(); err != nil {
				t.Fatalf("Program() returned content that fails Validate: %v", err)
			}
			rebuilt, err := InlineMessage(TypeProgram, p, m.Sender, time.Unix(0, 0))
			if err != nil {
				t.Fatalf("valid program cannot be rebuilt: %v", err)
			}
			again, err := rebuilt.Program()
			if err != nil {
				t.Fatalf("rebuilt program does not parse: %v", err)
			}
			a, _ := json.Marshal(p)
			b, _ := json.Marshal(again)
			if !bytes.Equal(a, b) {
				t.Fatalf("program changed through a rebuild:\n%s\n%s", a, b)
			}
		}
	})
}

// FuzzParseRef checks that ref parsing never panics, that what it accepts
// is canonical (parsing it again changes nothing) and an item hash, and
// that sha256 refs survive the Host-label round trip.
func FuzzParseRef(f *testing.F) {
	for _, s := range []string{
		fixtureCodeRef, strings.ToUpper(fixtureCodeRef), " " + fixtureCodeRef + " ",
		docCIDv0, docCIDv1, helloCIDv1, "B" + strings.ToUpper(docCIDv1[1:]),
		"fake-hash-fake-hash-fake-hash-fake-hash-fake-hash-fake-hash-hash",
		"", "Qm", "b", "bafy", "not-a-hash",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ref, err := ParseRef(s)
		_ = IsItemHash(s)
		_, _ = HashFromBase32Label(s)
		_ = Base32Label(s)
		if err != nil {
			if ref != "" {
				t.Fatalf("ParseRef(%q) returned %q with error %v", s, ref, err)
			}
			return
		}
		if !IsItemHash(ref) {
			t.Fatalf("ParseRef(%q) = %q, which is not an item hash", s, ref)
		}
		again, err := ParseRef(ref)
		if err != nil || again != ref {
			t.Fatalf("ParseRef is not idempotent: %q -> %q -> %q, %v", s, ref, again, err)
		}
		if label := Base32Label(ref); label != "" {
			if back, ok := HashFromBase32Label(label); !ok || back != ref {
				t.Fatalf("label round trip of %q gave %q, %v", ref, back, ok)
			}
		}
	})
}
