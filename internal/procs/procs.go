// Package procs finds and ends host processes by what their command line
// mentions: what a crashed supervisor left running (sandbox runtimes and
// VMMs outlive it in their own process groups).
package procs

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// KillMentioning SIGKILLs every process whose command line contains
// needle (arguments are NUL-separated there), and waits up to 5 s until
// they are gone.
func KillMentioning(ctx context.Context, needle string) error {
	pids := Mentioning(needle)
	for _, pid := range pids {
		_ = unix.Kill(pid, unix.SIGKILL) // it may have exited meanwhile
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(pids) > 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("processes %v did not die", pids)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
		pids = Mentioning(needle)
	}
	return nil
}

// Mentioning lists the processes, other than this one, whose command line
// contains needle.
func Mentioning(needle string) []int {
	entries, _ := os.ReadDir("/proc")
	self := os.Getpid()
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, []byte(needle)) {
			out = append(out, pid)
		}
	}
	return out
}
