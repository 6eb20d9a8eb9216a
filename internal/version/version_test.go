package version

import (
	"os"
	"regexp"
	"runtime/debug"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/pep440"
)

func TestSemverIsARelease(t *testing.T) {
	v, err := pep440.Parse(Semver())
	if err != nil {
		t.Fatal(err)
	}
	if v.Local != "" || v.Pre != "" || v.Dev >= 0 {
		t.Fatalf("VERSION %q is not a plain release", Semver())
	}
	if !regexp.MustCompile(`^\d+\.\d+\.\d+$`).MatchString(Semver()) {
		t.Fatalf("VERSION %q is not MAJOR.MINOR.PATCH", Semver())
	}
	// The file is the only place: it must be what the Makefile reads.
	b, err := os.ReadFile("VERSION")
	if err != nil || string(b) != Semver()+"\n" {
		t.Fatalf("VERSION file %q, %v", b, err)
	}
}

func TestFromBuild(t *testing.T) {
	vcs := func(rev, modified string) *debug.BuildInfo {
		return &debug.BuildInfo{Settings: []debug.BuildSetting{
			{Key: "vcs", Value: "git"}, {Key: "vcs.revision", Value: rev}, {Key: "vcs.modified", Value: modified}}}
	}
	for _, c := range []struct {
		info *debug.BuildInfo
		want string
	}{
		{vcs("7eb5434d1c2a9f0b8e6d5c4b3a29180716253443", "false"), "1.0.0+g7eb5434"},
		{vcs("7eb5434d1c2a9f0b8e6d5c4b3a29180716253443", "true"), "1.0.0+g7eb5434.dirty"},
		{&debug.BuildInfo{}, "1.0.0"},
		{nil, "1.0.0"},
	} {
		got := fromBuild("1.0.0", c.info)
		if got != c.want {
			t.Errorf("fromBuild = %q, want %q", got, c.want)
		}
		v, err := pep440.Parse(got)
		if err != nil {
			t.Fatalf("%q: %v", got, err)
		}
		// aleph-scoring's filter drops nodes below 1.5.1 only if they are
		// older than a release: ours is never "0+…".
		if v.Release[0] == 0 {
			t.Errorf("%q reads as version 0", got)
		}
	}
}

func TestLinkedIn(t *testing.T) {
	defer func(o, c, d string) { override, commit, dirty = o, c, d }(override, commit, dirty)
	override, commit, dirty = "", "7eb5434", "true"
	if got, want := String(), Semver()+"+g7eb5434.dirty"; got != want {
		t.Fatalf("%q, want %q", got, want)
	}
	dirty = ""
	if got, want := String(), Semver()+"+g7eb5434"; got != want {
		t.Fatalf("%q, want %q", got, want)
	}
	override = "1.2.3+deb12"
	if String() != "1.2.3+deb12" {
		t.Fatal(String())
	}
}
