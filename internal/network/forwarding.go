package network

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ipForward is the host's IPv4 forwarding switch, global to the host.
var ipForward = "/proc/sys/net/ipv4/ip_forward"

// forwarding records who needs IPv4 forwarding and what it was before a
// supervisor of ours turned it on, in a directory beside the leases:
//
//	saved        the value found before we turned it on (absent: we did not)
//	users/<pid>  one per supervisor with networking, holding its start time
//
// The last supervisor to stop puts the saved value back. A crashed one
// leaves its user file, which names a dead process and is ignored, and
// the saved value, which the next one keeps: forwarding is restored when
// the last live user stops, however many crashes came before.
type forwarding string

func (m *Manager) forwarding() forwarding {
	return forwarding(filepath.Join(filepath.Dir(m.opts.LeaseDir), "forwarding"))
}

// lock serialises the supervisors' changes (flock, released by the kernel
// if the holder dies).
func (f forwarding) lock() (func(), error) {
	if err := os.MkdirAll(filepath.Join(string(f), "users"), 0o700); err != nil {
		return nil, err
	}
	fd, err := os.OpenFile(filepath.Join(string(f), "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(fd.Fd()), unix.LOCK_EX); err != nil {
		fd.Close()
		return nil, err
	}
	return func() { fd.Close() }, nil
}

// enable registers self as a user and turns forwarding on, saving the
// value it had when no earlier run of ours saved one.
func (f forwarding) enable(self lease) error {
	unlock, err := f.lock()
	if err != nil {
		return fmt.Errorf("IPv4 forwarding: %w", err)
	}
	defer unlock()
	user := filepath.Join(string(f), "users", strconv.Itoa(self.OwnerPID))
	if err := os.WriteFile(user, []byte(strconv.FormatUint(self.OwnerStart, 10)), 0o600); err != nil {
		return fmt.Errorf("IPv4 forwarding: %w", err)
	}
	cur, err := os.ReadFile(ipForward)
	if err != nil {
		return fmt.Errorf("IPv4 forwarding: %w", err)
	}
	if strings.TrimSpace(string(cur)) == "1" {
		return nil
	}
	saved := filepath.Join(string(f), "saved")
	if _, err := os.Stat(saved); errors.Is(err, fs.ErrNotExist) {
		if err := os.WriteFile(saved, cur, 0o600); err != nil {
			return fmt.Errorf("IPv4 forwarding: %w", err)
		}
	}
	if err := os.WriteFile(ipForward, []byte("1"), 0o644); err != nil {
		return fmt.Errorf("enabling IPv4 forwarding: %w", err)
	}
	return nil
}

// release unregisters self and, when no other live supervisor uses
// forwarding, puts back the value saved before we turned it on. It
// reports whether it restored one.
func (f forwarding) release(self lease) (bool, error) {
	unlock, err := f.lock()
	if err != nil {
		return false, fmt.Errorf("IPv4 forwarding: %w", err)
	}
	defer unlock()
	users := filepath.Join(string(f), "users")
	if err := os.Remove(filepath.Join(users, strconv.Itoa(self.OwnerPID))); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("IPv4 forwarding: %w", err)
	}
	entries, err := os.ReadDir(users)
	if err != nil {
		return false, fmt.Errorf("IPv4 forwarding: %w", err)
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, _ := os.ReadFile(filepath.Join(users, e.Name()))
		start, _ := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		if (lease{OwnerPID: pid, OwnerStart: start}).alive() {
			return false, nil // another supervisor still forwards
		}
		_ = os.Remove(filepath.Join(users, e.Name())) // a crashed run's
	}
	saved := filepath.Join(string(f), "saved")
	prev, err := os.ReadFile(saved)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil // it was on before us
	}
	if err != nil {
		return false, fmt.Errorf("IPv4 forwarding: %w", err)
	}
	v := strings.TrimSpace(string(prev))
	if v != "0" && v != "1" {
		v = "0"
	}
	if err := os.WriteFile(ipForward, []byte(v), 0o644); err != nil {
		return false, fmt.Errorf("restoring IPv4 forwarding: %w", err)
	}
	return true, os.Remove(saved)
}
