package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// densityFigures are the memory of idle warm programs.
type densityFigures struct {
	Programs int `json:"programs"`
	// CgroupMiB is the sandboxes' memory cgroups' usage (what the kernel
	// charges them, page cache included), per sandbox.
	CgroupMiB float64 `json:"cgroup_mib_per_sandbox"`
	// RSSMiB and PSSMiB are the host processes of the sandboxes (runsc
	// sandbox and gofer), per sandbox: RSS counts shared pages in full,
	// PSS divides them among their users.
	RSSMiB float64 `json:"rss_mib_per_sandbox"`
	PSSMiB float64 `json:"pss_mib_per_sandbox"`
	// FitIn24GiB is 24 GiB over the larger of cgroup usage and PSS.
	FitIn24GiB int `json:"fit_in_24_gib"`
}

// benchDensity starts N different programs, leaves them idle and warm,
// and measures what each costs the host.
func benchDensity(ctx context.Context, n int) (densityFigures, error) {
	var f densityFigures
	// Without spares (they would be counted as programs) and kept warm.
	// Idle programs use no CPU: the vCPU bound (cores times 4) would
	// evict all but a few.
	s, err := newSupervisor("ALEPH_VM_PREWARM=false", "ALEPH_VM_REUSE_TIMEOUT=3600",
		fmt.Sprintf("ALEPH_VM_VCPU_OVERCOMMIT_FACTOR=%d", n))
	if err != nil {
		return f, err
	}
	defer s.stop()
	hashes, err := s.uploadVariants("density", n)
	if err != nil {
		return f, err
	}
	if err := s.start(ctx); err != nil {
		return f, err
	}
	for i, h := range hashes {
		if _, err := s.coldStart(ctx, h); err != nil {
			return f, fmt.Errorf("program %d of %d: %w", i+1, n, err)
		}
		if (i+1)%10 == 0 {
			fmt.Fprintf(os.Stderr, "   %d programs running\n", i+1)
		}
	}
	time.Sleep(10 * time.Second) // idle: let start-up garbage settle
	ids, err := os.ReadDir(filepath.Join(s.dir, "exec", "executions"))
	if err != nil {
		return f, err
	}
	var cgroup float64
	for _, id := range ids {
		cgroup += cgroupMemoryMiB(id.Name())
	}
	rss, pss, procs := runscMemoryMiB(filepath.Join(s.dir, "exec"))
	if len(ids) == 0 || procs == 0 {
		return f, errNoSandboxes
	}
	f.Programs = len(ids)
	f.CgroupMiB = cgroup / float64(len(ids))
	f.RSSMiB = rss / float64(len(ids))
	f.PSSMiB = pss / float64(len(ids))
	if per := max(f.CgroupMiB, f.PSSMiB); per > 0 {
		f.FitIn24GiB = int(24 * 1024 / per)
	}
	fmt.Fprintf(os.Stderr, "   %d sandboxes (%d host processes): cgroup %.1f MiB, RSS %.1f MiB, PSS %.1f MiB each\n",
		f.Programs, procs, f.CgroupMiB, f.RSSMiB, f.PSSMiB)
	return f, nil
}

// cgroupMemoryMiB reads an execution's memory cgroup (the gVisor
// backend's aleph-vm/<execution id>), v1 or v2.
func cgroupMemoryMiB(id string) float64 {
	for _, p := range []string{
		filepath.Join("/sys/fs/cgroup/memory/aleph-vm", id, "memory.usage_in_bytes"),
		filepath.Join("/sys/fs/cgroup/aleph-vm", id, "memory.current"),
	} {
		if b, err := os.ReadFile(p); err == nil {
			v, _ := strconv.ParseFloat(strings.TrimSpace(string(b)), 64)
			return v / (1 << 20)
		}
	}
	return 0
}

// runscMemoryMiB sums RSS and PSS of the runsc processes of this
// supervisor (their command line names its runsc root), and counts them.
func runscMemoryMiB(execRoot string) (rss, pss float64, procs int) {
	root := filepath.Join(execRoot, "runsc")
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid := e.Name()
		if _, err := strconv.Atoi(pid); err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", pid, "cmdline"))
		if err != nil || !strings.Contains(string(cmdline), root) {
			continue
		}
		r, p := smapsRollup(pid)
		rss += r
		pss += p
		procs++
	}
	return rss, pss, procs
}

// smapsRollup reads a process's Rss and Pss, in MiB.
func smapsRollup(pid string) (rss, pss float64) {
	file, err := os.Open(filepath.Join("/proc", pid, "smaps_rollup"))
	if err != nil {
		return 0, 0
	}
	defer file.Close()
	sc := bufio.NewScanner(file)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		kb, _ := strconv.ParseFloat(fields[1], 64)
		switch fields[0] {
		case "Rss:":
			rss = kb / 1024
		case "Pss:":
			pss = kb / 1024
		}
	}
	return rss, pss
}
