package gvisor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
)

// cgroupRoot is where the cgroup hierarchies are mounted. runsc places a
// container with an absolute cgroupsPath relative to each hierarchy's root.
const cgroupRoot = "/sys/fs/cgroup"

// cgroup names one container's cgroup, e.g. "aleph-vm/<id>", in every
// hierarchy (cgroup v1) or in the unified one (v2).
type cgroup struct {
	rel string
	v1  bool
}

func newCgroup(parent, id string) cgroup {
	_, err := os.Stat(filepath.Join(cgroupRoot, "memory"))
	return cgroup{rel: filepath.Join(parent, id), v1: err == nil}
}

// prepare creates, on cgroup v1, the memory cgroup (and the accounting
// ones when they are hierarchies of their own) before runsc starts, with
// the memory limit set by us. runsc then joins them without owning them,
// so they outlive the sandbox: the OOM-kill count and the final CPU and IO
// figures stay readable after it died, until cleanup removes them. The
// cpu and pids controllers stay runsc's, which sets their limits.
func (c cgroup) prepare(memLimit int64) error {
	if !c.v1 {
		return nil
	}
	controllers := []string{"memory"}
	for _, ctl := range []string{"cpuacct", "blkio"} {
		// A co-mounted hierarchy (cpu,cpuacct) would take the cpu limit
		// away from runsc; leave those to it.
		if resolved, err := filepath.EvalSymlinks(filepath.Join(cgroupRoot, ctl)); err == nil && filepath.Base(resolved) == ctl {
			controllers = append(controllers, ctl)
		}
	}
	for _, ctl := range controllers {
		if err := os.MkdirAll(c.dir(ctl), 0o755); err != nil {
			return fmt.Errorf("cgroup %s: %w", ctl, err)
		}
	}
	limit := filepath.Join(c.dir("memory"), "memory.limit_in_bytes")
	if err := os.WriteFile(limit, []byte(strconv.FormatInt(memLimit, 10)), 0); err != nil {
		return fmt.Errorf("cgroup memory limit: %w", err)
	}
	return nil
}

// ociPath is the linux.cgroupsPath of the OCI spec.
func (c cgroup) ociPath() string { return "/" + c.rel }

func (c cgroup) dir(controller string) string {
	if !c.v1 {
		return filepath.Join(cgroupRoot, c.rel)
	}
	return filepath.Join(cgroupRoot, controller, c.rel)
}

// existingDirs lists the container's cgroup directories still present in
// any hierarchy (including named ones such as name=systemd in hybrid mode).
func (c cgroup) existingDirs() []string {
	var out []string
	candidates := []string{filepath.Join(cgroupRoot, c.rel)}
	if entries, err := os.ReadDir(cgroupRoot); err == nil {
		for _, e := range entries {
			if e.IsDir() {
				candidates = append(candidates, filepath.Join(cgroupRoot, e.Name(), c.rel))
			}
		}
	}
	for _, d := range candidates {
		if fi, err := os.Stat(d); err == nil && fi.IsDir() {
			out = append(out, d)
		}
	}
	return out
}

// remove deletes what runsc left behind (it normally removes its cgroups
// itself, but not when it was killed half-way). Only empty cgroups can go,
// so a short retry covers processes that are still being reaped.
func (c cgroup) remove(ctx context.Context) error {
	var errs []error
	for _, d := range c.existingDirs() {
		var err error
		for i := 0; i < 20; i++ {
			if err = unix.Rmdir(d); err == nil || errors.Is(err, unix.ENOENT) {
				err = nil
				break
			}
			if !errors.Is(err, unix.EBUSY) {
				break
			}
			select {
			case <-ctx.Done():
			case <-time.After(50 * time.Millisecond):
			}
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// usage reads the CPU time and memory of the whole sandbox; ok is false
// when the cgroup is gone (the sandbox exited) or unreadable.
func (c cgroup) usage() (u backend.Usage, ok bool) {
	u.MemoryBytes = c.workingSet()
	if c.v1 {
		user, err1 := readUint(filepath.Join(c.dir("cpuacct"), "cpuacct.usage_user"))
		sys, err2 := readUint(filepath.Join(c.dir("cpuacct"), "cpuacct.usage_sys"))
		if err1 != nil || err2 != nil {
			return u, false
		}
		u.CPUTimeUser = time.Duration(user)
		u.CPUTimeSystem = time.Duration(sys)
		return u, true
	}
	stat, err := os.ReadFile(filepath.Join(c.dir(""), "cpu.stat"))
	if err != nil {
		return u, false
	}
	kv := keyValues(string(stat))
	u.CPUTimeUser = time.Duration(kv["user_usec"]) * time.Microsecond
	u.CPUTimeSystem = time.Duration(kv["system_usec"]) * time.Microsecond
	return u, true
}

// workingSet is the memory cgroup's usage less its inactive file cache,
// which the kernel reclaims first (what the kubelet and cAdvisor call the
// working set); 0 when unreadable.
func (c cgroup) workingSet() uint64 {
	usageFile, inactiveKey := "memory.current", "inactive_file"
	if c.v1 {
		usageFile, inactiveKey = "memory.usage_in_bytes", "total_inactive_file"
	}
	usage, err := readUint(filepath.Join(c.dir("memory"), usageFile))
	if err != nil {
		return 0
	}
	stat, err := os.ReadFile(filepath.Join(c.dir("memory"), "memory.stat"))
	if err != nil {
		return usage
	}
	inactive := keyValues(string(stat))[inactiveKey]
	if inactive > usage {
		return 0
	}
	return usage - inactive
}

// pids lists the processes in the sandbox's cgroup.
func (c cgroup) pids() []int {
	controller := ""
	if c.v1 {
		controller = "cpuacct"
	}
	b, err := os.ReadFile(filepath.Join(c.dir(controller), "cgroup.procs"))
	if err != nil {
		return nil
	}
	var pids []int
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

func keyValues(s string) map[string]uint64 {
	out := map[string]uint64{}
	f := strings.Fields(s)
	for i := 0; i+1 < len(f); i += 2 {
		if n, err := strconv.ParseUint(f[i+1], 10, 64); err == nil {
			out[f[i]] = n
		}
	}
	return out
}

func readUint(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
}

// oomKills returns the number of OOM kills recorded in the memory cgroup.
func (c cgroup) oomKills() (uint64, error) {
	name := "memory.events"
	if c.v1 {
		name = "memory.oom_control"
	}
	b, err := os.ReadFile(filepath.Join(c.dir("memory"), name))
	if err != nil {
		return 0, err
	}
	return keyValues(string(b))["oom_kill"], nil
}

// watchOOM reports through onOOM when the kernel OOM-kills inside the
// container's memory cgroup. runsc removes the cgroup as soon as the
// sandbox is gone, so counters cannot be read afterwards: on cgroup v1 we
// get an eventfd notification at the moment of the kill instead; on v2 we
// poll memory.events. It returns when the cgroup disappears or ctx ends.
func (c cgroup) watchOOM(ctx context.Context, log *slog.Logger, onOOM func()) {
	memDir := c.dir("memory")
	// runsc creates the cgroup while it sets the sandbox up; wait for it.
	for {
		if _, err := os.Stat(memDir); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
	if c.v1 {
		err := c.watchOOMv1(ctx, log, onOOM)
		if err == nil {
			return
		}
		log.Debug("no OOM notification; polling", "err", err)
	}
	var seen uint64
	for {
		n, err := c.oomKills()
		if err != nil {
			return
		}
		if n > seen {
			seen = n
			onOOM()
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// watchOOMv1 registers an eventfd on memory.oom_control, which the kernel
// signals on every OOM in the cgroup (and when the cgroup is removed;
// reading oom_kill tells the two apart). It also watches for thrashing:
// with the memory limit reached by memory that cannot be reclaimed, the
// kernel can keep evicting the Sentry's own code pages for minutes
// instead of OOM-killing (observed with a tmpfs hog), so a sandbox pinned
// at its limit for thrashAfter counts as out of memory too.
func (c cgroup) watchOOMv1(ctx context.Context, log *slog.Logger, onOOM func()) error {
	memDir := c.dir("memory")
	ctl, err := os.Open(filepath.Join(memDir, "memory.oom_control"))
	if err != nil {
		return err
	}
	defer ctl.Close()
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return err
	}
	// Non-blocking, so that the runtime poller lets Close interrupt Read.
	ev := os.NewFile(uintptr(efd), "oom-eventfd")
	defer ev.Close()
	reg := fmt.Sprintf("%d %d", efd, ctl.Fd())
	if err := os.WriteFile(filepath.Join(memDir, "cgroup.event_control"), []byte(reg), 0); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { ev.Close() })
	defer stop()
	go c.watchThrash(ctx, log, onOOM)

	var seen uint64
	buf := make([]byte, 8)
	for {
		if _, err := ev.Read(buf); err != nil {
			return nil
		}
		n, err := c.oomKills()
		log.Debug("memory cgroup event", "oom_kills", n, "err", err)
		if err != nil {
			return nil // cgroup removed: the sandbox is gone
		}
		if n > seen {
			seen = n
			onOOM()
		}
	}
}

const (
	thrashPoll  = 500 * time.Millisecond
	thrashAfter = 5 * time.Second
)

// watchThrash calls onThrash once when unreclaimable memory (rss + shmem,
// which holds the Sentry's guest memory) stays at 90% of the limit or
// more while allocations keep failing, for thrashAfter.
func (c cgroup) watchThrash(ctx context.Context, log *slog.Logger, onThrash func()) {
	memDir := c.dir("memory")
	var since time.Time
	lastFail, _ := readUint(filepath.Join(memDir, "memory.failcnt"))
	t := time.NewTicker(thrashPoll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		limit, err1 := readUint(filepath.Join(memDir, "memory.limit_in_bytes"))
		fail, err2 := readUint(filepath.Join(memDir, "memory.failcnt"))
		stat, err3 := os.ReadFile(filepath.Join(memDir, "memory.stat"))
		if err1 != nil || err2 != nil || err3 != nil {
			return
		}
		kv := keyValues(string(stat))
		pinned := kv["total_rss"] + kv["total_shmem"]
		if fail > lastFail && pinned >= limit/10*9 {
			if since.IsZero() {
				since = time.Now()
			} else if time.Since(since) >= thrashAfter {
				log.Warn("sandbox thrashing at its memory limit", "pinned_bytes", pinned, "limit_bytes", limit)
				onThrash()
				return
			}
		} else {
			since = time.Time{}
		}
		lastFail = fail
	}
}

// cgroupMarkers is the directory, under runsc's --root, where each sandbox
// of this supervisor names its cgroups while they may exist: the one way
// to tell ours from those of another supervisor sharing the parent.
func cgroupMarkers(rootDir string) string { return filepath.Join(rootDir, "cgroups") }

func markCgroup(rootDir, id string) error {
	dir := cgroupMarkers(rootDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("cgroup marker: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, id), nil, 0o600); err != nil {
		return fmt.Errorf("cgroup marker: %w", err)
	}
	return nil
}

func unmarkCgroup(rootDir, id string) error {
	if err := os.Remove(filepath.Join(cgroupMarkers(rootDir), id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("cgroup marker: %w", err)
	}
	return nil
}

// reapCgroups removes the cgroups, in every hierarchy, of the sandboxes
// an earlier run marked, whether or not runsc still lists them. Call it
// once their processes are gone.
func (b *Backend) reapCgroups(ctx context.Context) error {
	entries, err := os.ReadDir(cgroupMarkers(b.opts.RootDir))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("gvisor: cgroup markers: %w", err)
	}
	var errs []error
	for _, e := range entries {
		id := e.Name()
		if !containerIDPattern.MatchString(id) {
			continue
		}
		cg := newCgroup(b.opts.CgroupParent, id)
		if dirs := cg.existingDirs(); len(dirs) > 0 {
			b.log.Warn("removing cgroups an earlier run left", "id", id, "dirs", len(dirs))
		}
		if err := cg.remove(ctx); err != nil {
			errs = append(errs, fmt.Errorf("gvisor: %w", err))
			continue
		}
		if err := unmarkCgroup(b.opts.RootDir, id); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
