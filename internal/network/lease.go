package network

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// A lease reserves one subnet of the pool for one execution. It is a file
// named after the subnet's index, created with O_EXCL before anything of
// the network exists and removed after everything is gone: whoever holds
// the file owns the subnet and the links, namespace and rules derived from
// its index, so a crashed supervisor's leftovers can always be found and
// no two executions, live or leftover, ever share a range. Leases live in
// /run: a reboot clears them together with the links they describe.
type lease struct {
	Index     int    `json:"index"`
	Execution string `json:"execution"`
	Kind      string `json:"kind"` // "netns" or "tap"
	OwnerPID  int    `json:"owner_pid"`
	// OwnerStart is the owner's start time (clock ticks since boot, field
	// 22 of /proc/PID/stat), so that a reused pid is not taken for the
	// owner.
	OwnerStart uint64 `json:"owner_start"`
}

type leaseDir string

func (d leaseDir) path(index int) string { return filepath.Join(string(d), strconv.Itoa(index)) }

// take creates the lease of index; it reports false when another holds it.
func (d leaseDir) take(l lease) (bool, error) {
	f, err := os.OpenFile(d.path(l.Index), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("network lease: %w", err)
	}
	defer f.Close()
	if err := json.NewEncoder(f).Encode(l); err != nil {
		// An unreadable lease is still a lease: Sweep clears it by index.
		return true, fmt.Errorf("network lease: %w", err)
	}
	return true, nil
}

func (d leaseDir) drop(index int) error {
	if err := os.Remove(d.path(index)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("network lease: %w", err)
	}
	return nil
}

// list returns every lease by index. A lease that cannot be read (a crash
// while writing it) comes back with only its index set and no owner.
func (d leaseDir) list() (map[int]lease, error) {
	entries, err := os.ReadDir(string(d))
	if err != nil {
		return nil, fmt.Errorf("network leases: %w", err)
	}
	out := map[int]lease{}
	for _, e := range entries {
		idx, err := strconv.Atoi(e.Name())
		if err != nil || idx < 0 {
			continue
		}
		l := lease{Index: idx}
		if b, err := os.ReadFile(d.path(idx)); err == nil {
			_ = json.Unmarshal(b, &l)
			l.Index = idx
		}
		out[idx] = l
	}
	return out, nil
}

// alive tells whether the lease's owner process still runs.
func (l lease) alive() bool {
	if l.OwnerPID <= 0 {
		return false
	}
	start, err := processStart(l.OwnerPID)
	return err == nil && start == l.OwnerStart
}

// processStart reads a process's start time from /proc/PID/stat.
func processStart(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces and parentheses: fields
	// are counted from the last ')'.
	s := string(b)
	end := strings.LastIndexByte(s, ')')
	if end < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	fields := strings.Fields(s[end+1:])
	// fields[0] is field 3 (state); the start time is field 22.
	if len(fields) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	return strconv.ParseUint(fields[19], 10, 64)
}
