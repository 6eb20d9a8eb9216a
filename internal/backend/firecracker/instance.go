package firecracker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/vmimage"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// instance is one micro-VM and everything Start created for it. Fields
// set by the start steps double as the record of what cleanup undoes.
type instance struct {
	b    *Backend
	spec backend.Spec
	log  *slog.Logger

	images  *vmimage.Prepared
	drives  []vmimage.Drive
	p       *Plan
	laidOut bool // files of p exist and must be removed

	cmd       *exec.Cmd
	stderr    *tailBuffer
	outputEnd chan struct{}
	done      chan struct{}

	mu           sync.Mutex
	exitErr      error
	stopping     bool
	channelTaken bool

	stopper backend.StopOnce
}

var (
	_ backend.Instance        = (*instance)(nil)
	_ backend.GuestConfigurer = (*instance)(nil)
)

func newInstance(b *Backend, spec backend.Spec, log *slog.Logger) *instance {
	return &instance{b: b, spec: spec, log: log, done: make(chan struct{})}
}

func (i *instance) prepareImages(ctx context.Context) error {
	imgs, err := i.b.opts.preparer().Prepare(ctx, i.spec)
	if err != nil {
		return err
	}
	i.images = imgs
	i.drives = vmimage.GuestDrives(imgs, nil)
	return nil
}

func (i *instance) plan(context.Context) error {
	p, err := BuildPlan(i.b.opts, i.spec, i.drives)
	if err != nil {
		return err
	}
	i.p = p
	return nil
}

// layOut writes the configuration and, under the jailer, builds the
// chroot the jailer will enter.
func (i *instance) layOut(ctx context.Context) error {
	p, o := i.p, i.b.opts
	i.laidOut = true
	if !p.Jailed {
		if err := os.MkdirAll(i.spec.StateDir, 0o700); err != nil {
			return err
		}
		if err := createEmpty(p.LogPath, -1, -1); err != nil {
			return err
		}
		return os.WriteFile(p.ConfigFile, p.ConfigJSON, 0o600)
	}
	if _, err := os.Lstat(p.JailDir); err == nil {
		// Execution ids are unique: this is a leftover of a crash.
		i.log.Warn("removing leftover jail", "dir", p.JailDir)
		if err := os.RemoveAll(p.JailDir); err != nil {
			return err
		}
	}
	if err := os.MkdirAll(p.ChrootDir, 0o755); err != nil {
		return err
	}
	uid, gid := o.JailerUID, o.JailerGID
	for _, f := range p.Files {
		if err := ctx.Err(); err != nil {
			return err
		}
		linked, err := placeFile(p.ChrootDir, f, uid, gid)
		if err != nil {
			return err
		}
		i.log.Debug("placed in jail", "file", f.Dest, "hard_link", linked)
	}
	run := filepath.Join(p.ChrootDir, filepath.Dir(JailAPISocket))
	if err := os.MkdirAll(run, 0o750); err != nil {
		return err
	}
	if err := os.Chown(run, uid, gid); err != nil {
		return err
	}
	// Firecracker opens its log without creating it.
	if err := createEmpty(p.LogPath, uid, gid); err != nil {
		return err
	}
	return os.WriteFile(p.ConfigFile, p.ConfigJSON, 0o644)
}

func createEmpty(path string, uid, gid int) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if uid >= 0 {
		return os.Chown(path, uid, gid)
	}
	return nil
}

// startProcess starts the VMM. It outlives Start's ctx: it is bound to
// the instance and ends with Stop.
func (i *instance) startProcess(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	argv := i.p.Command
	cmd := exec.Command(argv[0], argv[1:]...)
	out := i.spec.ProgramOutput
	if out == nil {
		out = io.Discard
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	i.stderr = &tailBuffer{max: 8 << 10}
	cmd.Stderr = i.stderr
	// Own process group: a Ctrl-C meant for the supervisor must not kill
	// VMs, and Stop can signal the group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	i.log.Debug("starting firecracker", "argv", argv)
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("%s: %w", argv[0], err)
	}
	i.cmd = cmd
	i.outputEnd = make(chan struct{})
	go func() {
		defer close(i.outputEnd)
		// The serial console ends lines with CRLF.
		_, _ = io.Copy(&crStripper{w: out}, stdout)
	}()
	go i.wait()
	return nil
}

// wait reaps the VMM and records why it ended.
func (i *instance) wait() {
	// Output first: Wait closes the pipe, which could cut the last lines.
	<-i.outputEnd
	werr := i.cmd.Wait()
	i.mu.Lock()
	if !i.stopping {
		i.exitErr = errkind.Wrap(errkind.BadGateway, fmt.Errorf("firecracker %s exited by itself: %s%s",
			i.spec.ExecutionID, describeExit(werr, i.cmd.ProcessState), i.diagnostics()))
	}
	i.mu.Unlock()
	close(i.done)
}

// diagnostics returns the ends of the VMM's stderr and log, for errors.
func (i *instance) diagnostics() string {
	var parts []string
	if s := strings.TrimSpace(i.stderr.String()); s != "" {
		parts = append(parts, "stderr: "+lastLines(s, 5))
	}
	if b, err := os.ReadFile(i.p.LogPath); err == nil {
		if s := strings.TrimSpace(string(b)); s != "" {
			parts = append(parts, "log: "+lastLines(s, 5))
		}
	}
	if len(parts) == 0 {
		return ""
	}
	return "; " + strings.Join(parts, "; ")
}

func lastLines(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

func describeExit(werr error, ps *os.ProcessState) string {
	if ps == nil {
		return fmt.Sprint(werr)
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		msg := "killed by signal " + ws.Signal().String()
		if ws.Signal() == syscall.SIGKILL {
			msg += " (possibly its memory limit)"
		}
		return msg
	}
	return fmt.Sprintf("exit status %d", ps.ExitCode())
}

// ConfigureGuest implements backend.GuestConfigurer.
func (i *instance) ConfigureGuest(cfg *guest.Config) {
	vmimage.FillGuest(i.drives, cfg)
}

// Channel implements backend.Instance: a hybrid-vsock connection to the
// agent's port, retried while the guest boots, until ctx ends or the VMM
// exits.
func (i *instance) Channel(ctx context.Context) (io.ReadWriteCloser, error) {
	i.mu.Lock()
	switch {
	case i.channelTaken:
		i.mu.Unlock()
		return nil, errors.New("firecracker: channel already taken")
	case i.stopping:
		i.mu.Unlock()
		return nil, errors.New("firecracker: VM is stopping")
	}
	i.channelTaken = true
	i.mu.Unlock()

	dctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-i.done:
			cancel()
		case <-dctx.Done():
		}
	}()
	conn, err := DialVsock(dctx, i.p.VsockPath, GuestVsockPort)
	if err != nil {
		select {
		case <-i.done:
			if e := i.Err(); e != nil {
				return nil, fmt.Errorf("firecracker: guest unreachable: %w", e)
			}
			return nil, errkind.New(errkind.BadGateway, "firecracker: VM ended before its agent answered")
		default:
		}
		if ctx.Err() != nil {
			return nil, errkind.Wrap(errkind.Timeout, fmt.Errorf("firecracker: guest agent not reachable: %w", err))
		}
		return nil, err
	}
	return conn, nil
}

// Done implements backend.Instance.
func (i *instance) Done() <-chan struct{} { return i.done }

// Err implements backend.Instance.
func (i *instance) Err() error {
	select {
	case <-i.done:
	default:
		return nil
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.exitErr
}

// Usage implements backend.Instance: the VMM's rusage once it has ended,
// /proc figures while it runs (its vCPU threads are the guest's CPU time).
func (i *instance) Usage() backend.Usage {
	if i.cmd == nil {
		return backend.Usage{}
	}
	select {
	case <-i.done:
		return usageOfState(i.cmd.ProcessState)
	default:
		return procUsage(i.cmd.Process.Pid)
	}
}

func usageOfState(ps *os.ProcessState) backend.Usage {
	if ps == nil {
		return backend.Usage{}
	}
	u := backend.Usage{CPUTimeUser: ps.UserTime(), CPUTimeSystem: ps.SystemTime()}
	if ru, ok := ps.SysUsage().(*syscall.Rusage); ok {
		u.IOReadCount, u.IOWriteCount = uint64(ru.Inblock), uint64(ru.Oublock)
		u.IOReadBytes, u.IOWriteBytes = uint64(ru.Inblock)*512, uint64(ru.Oublock)*512
	}
	return u
}

// clockTicks is USER_HZ, which Linux fixes at 100 for /proc on x86.
const clockTicks = 100

func procUsage(pid int) backend.Usage {
	var u backend.Usage
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
		// Fields after the command name, which may contain spaces.
		if k := bytes.LastIndexByte(b, ')'); k > 0 {
			f := strings.Fields(string(b[k+1:]))
			if len(f) > 12 {
				ut, _ := strconv.ParseInt(f[11], 10, 64)
				st, _ := strconv.ParseInt(f[12], 10, 64)
				u.CPUTimeUser = time.Duration(ut) * time.Second / clockTicks
				u.CPUTimeSystem = time.Duration(st) * time.Second / clockTicks
			}
		}
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid)); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			k, v, ok := strings.Cut(line, ": ")
			if !ok {
				continue
			}
			n, _ := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
			switch k {
			case "syscr":
				u.IOReadCount = n
			case "syscw":
				u.IOWriteCount = n
			case "read_bytes":
				u.IOReadBytes = n
			case "write_bytes":
				u.IOWriteBytes = n
			}
		}
	}
	return u
}

// Stop implements backend.Instance (see backend.StopOnce).
func (i *instance) Stop(ctx context.Context) error { return i.stopper.Do(ctx, i.stop) }

func (i *instance) stop(ctx context.Context) error {
	i.mu.Lock()
	i.stopping = true
	i.mu.Unlock()

	if !i.waitDone(0) {
		actx, cancel := context.WithTimeout(ctx, time.Second)
		if err := SendAction(actx, i.p.APISocket, ActionSendCtrlAltDel); err != nil {
			i.log.Debug("graceful stop request failed", "err", err)
		}
		cancel()
		if !i.waitDone(i.b.opts.StopGrace) {
			i.log.Debug("VM did not stop in time; killing it")
			_ = syscall.Kill(-i.cmd.Process.Pid, syscall.SIGKILL)
			if !i.waitDone(10 * time.Second) {
				return fmt.Errorf("firecracker %s: VMM did not die after SIGKILL", i.spec.ExecutionID)
			}
		}
	}
	err := i.cleanup()
	if err != nil {
		i.log.Error("stop", "err", err)
	} else {
		i.log.Debug("VM stopped")
	}
	return err
}

func (i *instance) waitDone(d time.Duration) bool {
	if d <= 0 {
		select {
		case <-i.done:
			return true
		default:
			return false
		}
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-i.done:
		return true
	case <-t.C:
		return false
	}
}

// cleanup removes what the start steps created; only called once the VMM
// is gone (or never started).
func (i *instance) cleanup() error {
	var errs []error
	if i.p != nil && i.laidOut {
		if i.p.Jailed {
			if err := os.RemoveAll(i.p.JailDir); err != nil {
				errs = append(errs, err)
			}
			removeCgroups(i.b.opts, i.p.ID)
		} else {
			files := []string{i.p.ConfigFile, i.p.APISocket, i.p.VsockPath, i.p.LogPath}
			// Guest-initiated vsock connections use <uds_path>_<port>.
			more, _ := filepath.Glob(i.p.VsockPath + "_*")
			for _, f := range append(files, more...) {
				if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
					errs = append(errs, err)
				}
			}
		}
		i.laidOut = false
	}
	if err := i.images.Cleanup(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// removeCgroups removes the per-VM cgroups the jailer created, once
// empty: <controller mount>/<parent>/<id> under v1, <root>/<parent>/<id>
// under v2. Best effort: a cgroup still busy is left for the host's tools.
func removeCgroups(o Options, id string) {
	parent := o.ParentCgroup
	if parent == "" {
		parent = filepath.Base(o.FirecrackerPath)
	}
	var dirs []string
	if o.CgroupVersion == 2 {
		dirs = []string{filepath.Join("/sys/fs/cgroup", parent, id)}
	} else {
		dirs, _ = filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", parent, id))
	}
	for _, d := range dirs {
		_ = syscall.Rmdir(d)
	}
}

// tailBuffer keeps the last max bytes written.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if len(t.buf) > t.max {
		t.buf = append(t.buf[:0], t.buf[len(t.buf)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.buf)
}

// crStripper drops carriage returns.
type crStripper struct{ w io.Writer }

func (c *crStripper) Write(p []byte) (int, error) {
	if bytes.IndexByte(p, '\r') < 0 {
		return c.w.Write(p)
	}
	if _, err := c.w.Write(bytes.ReplaceAll(p, []byte{'\r'}, nil)); err != nil {
		return 0, err
	}
	return len(p), nil
}
