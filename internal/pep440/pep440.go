// Package pep440 reads and compares version numbers the way Python's
// packaging.version does, because /status/check/version compares the
// node's version with a reference given by clients written against
// aleph-vm, and turns `git describe` output into such a version.
package pep440

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// Version is a parsed PEP 440 version. Pre-releases are ordered a < b < rc.
type Version struct {
	Epoch   int
	Release []int
	Pre     string // "", "a", "b" or "rc"
	PreN    int
	Post    int // -1: none
	Dev     int // -1: none
	Local   string
}

// The public grammar of PEP 440 (appendix B), with its accepted spellings.
var pattern = regexp.MustCompile(`(?i)^\s*v?` +
	`(?:(\d+)!)?` + // epoch
	`(\d+(?:\.\d+)*)` + // release
	`(?:[-_.]?(alpha|a|beta|b|preview|pre|c|rc)[-_.]?(\d+)?)?` + // pre
	`(?:(?:-(\d+))|(?:[-_.]?(post|rev|r)[-_.]?(\d+)?))?` + // post
	`(?:[-_.]?(dev)[-_.]?(\d+)?)?` + // dev
	`(?:\+([a-z0-9]+(?:[-_.][a-z0-9]+)*))?` + // local
	`\s*$`)

// InvalidError is a string that is not a version; its text is packaging's.
type InvalidError struct{ Input string }

func (e *InvalidError) Error() string { return fmt.Sprintf("Invalid version: '%s'", e.Input) }

// Parse reads s as packaging.version.Version does.
func Parse(s string) (Version, error) {
	m := pattern.FindStringSubmatch(s)
	if m == nil {
		return Version{}, &InvalidError{Input: s}
	}
	v := Version{Post: -1, Dev: -1}
	if m[1] != "" {
		v.Epoch, _ = strconv.Atoi(m[1])
	}
	for _, part := range strings.Split(m[2], ".") {
		n, err := strconv.Atoi(part)
		if err != nil {
			return Version{}, &InvalidError{Input: s}
		}
		v.Release = append(v.Release, n)
	}
	if m[3] != "" {
		switch strings.ToLower(m[3]) {
		case "alpha", "a":
			v.Pre = "a"
		case "beta", "b":
			v.Pre = "b"
		default:
			v.Pre = "rc"
		}
		v.PreN, _ = strconv.Atoi(m[4])
	}
	switch {
	case m[5] != "":
		v.Post, _ = strconv.Atoi(m[5])
	case m[6] != "":
		v.Post, _ = strconv.Atoi(m[7])
	}
	if m[8] != "" {
		v.Dev, _ = strconv.Atoi(m[9])
	}
	if m[10] != "" {
		v.Local = strings.ToLower(strings.NewReplacer("-", ".", "_", ".").Replace(m[10]))
	}
	return v, nil
}

// String is the normalised form, as str(Version(...)) prints it.
func (v Version) String() string {
	var b strings.Builder
	if v.Epoch != 0 {
		fmt.Fprintf(&b, "%d!", v.Epoch)
	}
	for i, n := range v.Release {
		if i > 0 {
			b.WriteByte('.')
		}
		b.WriteString(strconv.Itoa(n))
	}
	if v.Pre != "" {
		fmt.Fprintf(&b, "%s%d", v.Pre, v.PreN)
	}
	if v.Post >= 0 {
		fmt.Fprintf(&b, ".post%d", v.Post)
	}
	if v.Dev >= 0 {
		fmt.Fprintf(&b, ".dev%d", v.Dev)
	}
	if v.Local != "" {
		b.WriteString("+" + v.Local)
	}
	return b.String()
}

// Compare returns -1, 0 or +1 as v sorts before, with or after w.
func (v Version) Compare(w Version) int {
	if c := cmpInt(v.Epoch, w.Epoch); c != 0 {
		return c
	}
	for i := 0; i < max(len(v.Release), len(w.Release)); i++ {
		if c := cmpInt(at(v.Release, i), at(w.Release, i)); c != 0 {
			return c
		}
	}
	if c := cmpInt(v.preKey(), w.preKey()); c != 0 {
		return c
	}
	if v.Pre != "" && v.Pre == w.Pre {
		if c := cmpInt(v.PreN, w.PreN); c != 0 {
			return c
		}
	}
	if c := cmpInt(v.Post, w.Post); c != 0 {
		return c
	}
	// No dev segment sorts after any dev release.
	if c := cmpInt(devKey(v.Dev), devKey(w.Dev)); c != 0 {
		return c
	}
	return compareLocal(v.Local, w.Local)
}

// preKey orders the pre-release phases; a bare dev release (1.0.dev1)
// sorts before 1.0a1, and a final release after every pre-release.
func (v Version) preKey() int {
	switch {
	case v.Pre == "" && v.Post < 0 && v.Dev >= 0:
		return -1
	case v.Pre == "a":
		return 1
	case v.Pre == "b":
		return 2
	case v.Pre == "rc":
		return 3
	}
	return 4
}

func devKey(d int) int {
	if d < 0 {
		return int(^uint(0) >> 1)
	}
	return d
}

// compareLocal follows PEP 440: no label sorts first; numeric parts
// sort after alphanumeric ones and compare as numbers.
func compareLocal(a, b string) int {
	if a == b {
		return 0
	}
	if a == "" {
		return -1
	}
	if b == "" {
		return 1
	}
	pa, pb := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; i < min(len(pa), len(pb)); i++ {
		na, ea := strconv.Atoi(pa[i])
		nb, eb := strconv.Atoi(pb[i])
		switch {
		case ea == nil && eb == nil:
			if c := cmpInt(na, nb); c != 0 {
				return c
			}
		case ea == nil:
			return 1
		case eb == nil:
			return -1
		default:
			if c := strings.Compare(pa[i], pb[i]); c != 0 {
				return c
			}
		}
	}
	return cmpInt(len(pa), len(pb))
}

func at(s []int, i int) int {
	if i < len(s) {
		return s[i]
	}
	return 0
}

func cmpInt(a, b int) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

var describe = regexp.MustCompile(`^(.*?)(?:-(\d+)-g([0-9a-f]+))?(-dirty)?$`)

// FromGitDescribe turns `git describe --tags --always --dirty` output into
// a PEP 440 version: "v1.2.3" → "1.2.3", "v1.2.3-4-gabc1234-dirty" →
// "1.2.3.post4+gabc1234.dirty" (commits after a release are post-releases
// of it, the commit is the local label), and an untagged "abc1234" →
// "0+gabc1234". Anything else that is not a version becomes "0+<label>",
// so that the result always parses.
func FromGitDescribe(s string) string {
	s = strings.TrimSpace(s)
	m := describe.FindStringSubmatch(s)
	tag, distance, commit, dirty := m[1], m[2], m[3], m[4] != ""
	var local []string
	v, err := Parse(tag)
	// An abbreviated commit can also read as a version ("480731c" is
	// 480731rc0), so a bare commit is never taken for a tag.
	if err != nil || v.Local != "" || isCommit(tag) {
		// An untagged commit, or a tag that is no version: keep it as a
		// label of version 0.
		v = Version{Release: []int{0}, Post: -1, Dev: -1}
		if label := localLabel(tag); label != "" {
			if isHex(tag) {
				label = "g" + label
			}
			local = append(local, label)
		}
	}
	if distance != "" {
		n, _ := strconv.Atoi(distance)
		if v.Post < 0 {
			v.Post = n
		} else {
			v.Post += n
		}
		local = append(local, "g"+commit)
	}
	if dirty {
		local = append(local, "dirty")
	}
	v.Local = strings.Join(local, ".")
	return v.String()
}

var nonLabel = regexp.MustCompile(`[^a-z0-9]+`)

func localLabel(s string) string {
	return strings.Trim(nonLabel.ReplaceAllString(strings.ToLower(s), "."), ".")
}

// isCommit reports whether s looks like what `git describe --always`
// prints without a tag: an abbreviated commit of 7 or more hex digits.
func isCommit(s string) bool { return len(s) >= 7 && isHex(s) }

func isHex(s string) bool {
	if len(s) < 4 {
		return false
	}
	for _, c := range s {
		if !strings.ContainsRune("0123456789abcdef", c) {
			return false
		}
	}
	return true
}

// Normalize returns s in PEP 440's normal form when it is already a
// version ("1.0.0+g7eb5434.dirty", what internal/version gives), and
// FromGitDescribe(s) otherwise (an abbreviated commit is never taken for
// a version).
func Normalize(s string) string {
	s = strings.TrimSpace(s)
	if v, err := Parse(s); err == nil && !isCommit(s) {
		return v.String()
	}
	return FromGitDescribe(s)
}
