// Package mountinfo reads this process's mount table.
package mountinfo

import (
	"bufio"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Points lists mount points from /proc/self/mountinfo.
func Points() (map[string]struct{}, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]struct{}{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 {
			out[unescape(fields[4])] = struct{}{}
		}
	}
	return out, sc.Err()
}

// unescape undoes the octal escapes (\040 for space, ...) the
// kernel uses in mountinfo.
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Under lists the mount points at or below dir, deepest first, so they
// can be unmounted in that order.
func Under(dir string) ([]string, error) {
	mps, err := Points()
	if err != nil {
		return nil, err
	}
	dir = filepath.Clean(dir)
	var out []string
	for mp := range mps {
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	sort.Slice(out, func(i, j int) bool { return len(out[i]) > len(out[j]) })
	return out, nil
}

// DetachUnder lazily unmounts everything at or below dir (every stacked
// mount too): what a crashed process left there.
func DetachUnder(dir string) error {
	mps, err := Under(dir)
	if err != nil {
		return err
	}
	for _, mp := range mps {
		// Each unmount uncovers the mount stacked below, until none is left.
		for {
			if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
				break
			}
		}
	}
	return nil
}
