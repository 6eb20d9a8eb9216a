package pep440

import "testing"

func TestFromGitDescribe(t *testing.T) {
	for in, want := range map[string]string{
		"v1.2.3":                   "1.2.3",
		"1.7.2":                    "1.7.2",
		"v1.2.3-4-gabc1234":        "1.2.3.post4+gabc1234",
		"v1.2.3-4-gabc1234-dirty":  "1.2.3.post4+gabc1234.dirty",
		"v1.2.3-dirty":             "1.2.3+dirty",
		"6e54c47":                  "0+g6e54c47",
		"6e54c47-dirty":            "0+g6e54c47.dirty",
		"480731c":                  "0+g480731c", // not 480731rc0
		"1234567":                  "0+g1234567",
		"dev":                      "0+dev",
		"v2.0.0rc1-3-g0123abc":     "2.0.0rc1.post3+g0123abc",
		"release-candidate-2-gabc": "0.post2+release.candidate.gabc",
	} {
		got := FromGitDescribe(in)
		if got != want {
			t.Errorf("FromGitDescribe(%q) = %q, want %q", in, got, want)
		}
		if _, err := Parse(got); err != nil {
			t.Errorf("FromGitDescribe(%q) = %q does not parse: %v", in, got, err)
		}
	}
}

// Orderings from PEP 440's examples and packaging's behaviour.
func TestCompare(t *testing.T) {
	ordered := []string{
		"0+g6e54c47", "0.post2", "1.0.dev1", "1.0a1", "1.0a2.dev3", "1.0a2", "1.0b1", "1.0rc1",
		"1.0", "1.0+local", "1.0.post1.dev2", "1.0.post1", "1.0.1", "1.10", "1!0.1",
	}
	for i := range ordered {
		for j := range ordered {
			a, err := Parse(ordered[i])
			if err != nil {
				t.Fatal(err)
			}
			b, _ := Parse(ordered[j])
			want := cmpInt(i, j)
			if got := a.Compare(b); got != want {
				t.Errorf("Compare(%s, %s) = %d, want %d", ordered[i], ordered[j], got, want)
			}
		}
	}
	a, _ := Parse("1.0.0")
	b, _ := Parse("1.0")
	if a.Compare(b) != 0 {
		t.Error("1.0.0 != 1.0")
	}
}

func TestParseNormalises(t *testing.T) {
	for in, want := range map[string]string{
		"v1.0": "1.0", "1.0-1": "1.0.post1", "1.0RC2": "1.0rc2", "1.0.alpha.3": "1.0a3",
		"1.0-dev": "1.0.dev0", "1.0+Ubuntu-1": "1.0+ubuntu.1",
	} {
		v, err := Parse(in)
		if err != nil || v.String() != want {
			t.Errorf("Parse(%q) = %q, %v; want %q", in, v, err, want)
		}
	}
	for _, bad := range []string{"", "abc", "1.0-gabc", "1..0", "1.0+", "version-unavailable"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		} else if want := "Invalid version: '" + bad + "'"; err.Error() != want {
			t.Errorf("error %q, want %q", err, want)
		}
	}
}

func TestNormalize(t *testing.T) {
	for in, want := range map[string]string{
		"1.0.0+g7eb5434":       "1.0.0+g7eb5434",
		"1.0.0+g7eb5434.dirty": "1.0.0+g7eb5434.dirty",
		"v1.0.0":               "1.0.0",
		"v1.2.3-4-gabc1234":    "1.2.3.post4+gabc1234",
		"480731c":              "0+g480731c",
		"6e54c47-dirty":        "0+g6e54c47.dirty",
		"1.0.0+G7EB5434-Dirty": "1.0.0+g7eb5434.dirty",
	} {
		if got := Normalize(in); got != want {
			t.Errorf("Normalize(%q) = %q, want %q", in, got, want)
		}
	}
}
