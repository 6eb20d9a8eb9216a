// Package version is the supervisor's own version: the semantic version
// in the file VERSION next to this one (the one place it is written; the
// Makefile and `make deb` read it too), with the commit it was built from
// as a PEP 440 local label: "1.0.0+g7eb5434", "1.0.0+g7eb5434.dirty".
// A clone without tags thus never reads as older than every release.
package version

import (
	_ "embed"
	"runtime/debug"
	"strings"
)

//go:embed VERSION
var semver string

// commit and dirty are set at link time by the Makefile (-X ...commit=
// the abbreviated commit, -X ...dirty=true), as GOFLAGS may turn Go's own
// VCS stamping off; without them, what Go stamped is used.
var commit, dirty string

// override, when set at link time (-ldflags "-X
// github.com/aleph-vm-go/vm-supervisor/internal/version.override=..."),
// replaces the computed version: for packagers building outside git.
var override string

// Semver is the release this tree is, without a commit label.
func Semver() string { return strings.TrimSpace(semver) }

// String is the version this binary reports: Semver plus the commit and
// dirtiness the Makefile linked in, or else that Go stamped into the
// build (go build -buildvcs); a build with neither is just Semver.
func String() string {
	if o := strings.TrimSpace(override); o != "" {
		return o
	}
	if c := strings.TrimSpace(commit); c != "" {
		return withLabel(Semver(), c, dirty == "true")
	}
	info, _ := debug.ReadBuildInfo()
	return fromBuild(Semver(), info)
}

func fromBuild(semver string, info *debug.BuildInfo) string {
	if info == nil {
		return semver
	}
	var revision string
	var modified bool
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			revision = s.Value
		case "vcs.modified":
			modified = s.Value == "true"
		}
	}
	if revision == "" {
		return semver
	}
	return withLabel(semver, revision, modified)
}

// withLabel adds the commit (abbreviated to 7 digits) as a local label.
func withLabel(semver, revision string, modified bool) string {
	if len(revision) > 7 {
		revision = revision[:7]
	}
	label := "g" + strings.ToLower(revision)
	if modified {
		label += ".dirty"
	}
	return semver + "+" + label
}
