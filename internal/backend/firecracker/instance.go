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
	"strings"
	"syscall"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/vmimage"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/tailbuf"
)

// instance is one micro-VM and everything Start created for it.
type instance struct {
	*backend.Process
	b    *Backend
	spec backend.Spec
	log  *slog.Logger

	images *vmimage.Prepared
	drives []vmimage.Drive
	p      *Plan

	stderr *tailbuf.Buffer // the VMM's last words

	stopper backend.StopOnce
	spare   spareState
}

var (
	_ backend.Instance        = (*instance)(nil)
	_ backend.GuestConfigurer = (*instance)(nil)
)

func newInstance(b *Backend, spec backend.Spec, log *slog.Logger) *instance {
	return &instance{
		Process: backend.NewProcess("firecracker", "VM", spec.ExecutionID, nil),
		b:       b, spec: spec, log: log,
		stderr: tailbuf.New(5, 512),
	}
}

func (i *instance) prepareImages(ctx context.Context) (backend.Undo, error) {
	imgs, err := i.b.opts.preparer().Prepare(ctx, i.spec)
	if err != nil {
		return nil, err
	}
	i.images = imgs
	i.drives = vmimage.GuestDrives(imgs, nil)
	return func(context.Context) error { return imgs.Cleanup() }, nil
}

func (i *instance) plan(context.Context) (backend.Undo, error) {
	p, err := BuildPlan(i.b.opts, i.spec, i.drives)
	if err != nil {
		return nil, err
	}
	i.p = p
	return nil, nil
}

// layOut writes the configuration and, under the jailer, builds the
// chroot the jailer will enter. Its undo removes them, also after a
// failure part way.
func (i *instance) layOut(ctx context.Context) (backend.Undo, error) {
	return i.removeLayout, i.writeLayout(ctx)
}

func (i *instance) writeLayout(ctx context.Context) error {
	p, o := i.p, i.b.opts
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
func (i *instance) startProcess(ctx context.Context) (backend.Undo, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	argv := i.p.Command
	cmd := exec.Command(argv[0], argv[1:]...)
	out := i.spec.ProgramOutput
	if out == nil {
		out = io.Discard
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = i.stderr.Writer()
	// Own process group: a Ctrl-C meant for the supervisor must not kill
	// VMs, and Stop can signal the group.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	i.log.Debug("starting firecracker", "argv", argv)
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	i.Started(cmd)
	go func() {
		// The serial console ends lines with CRLF. Output first: Wait
		// closes the pipe, which could cut the last lines.
		_, _ = io.Copy(&crStripper{w: out}, stdout)
		i.Reap(i.diagnostics)
	}()
	return i.kill, nil
}

// kill is the undo of startProcess: the VMM is killed if it still runs.
func (i *instance) kill(context.Context) error {
	if i.Exited() {
		return nil
	}
	i.Stopping()
	i.log.Debug("VM did not stop in time; killing it")
	i.KillGroup(syscall.SIGKILL)
	if !i.WaitExit(10 * time.Second) {
		return backend.InUse(errors.New("VMM did not die after SIGKILL"))
	}
	return nil
}

// diagnostics returns the ends of the VMM's stderr and log, for errors.
func (i *instance) diagnostics() string {
	var parts []string
	if s := strings.TrimSpace(i.stderr.String()); s != "" {
		parts = append(parts, "stderr: "+strings.ReplaceAll(s, "\n", " | "))
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

// Channel implements backend.Instance: a hybrid-vsock connection to the
// agent's port, retried while the guest boots, until ctx ends or the VMM
// exits.
func (i *instance) Channel(ctx context.Context) (io.ReadWriteCloser, error) {
	if err := i.TakeChannel(); err != nil {
		return nil, err
	}

	dctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-i.Done():
			cancel()
		case <-dctx.Done():
		}
	}()
	conn, err := DialVsock(dctx, i.p.VsockPath, GuestVsockPort)
	if err != nil {
		select {
		case <-i.Done():
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

// Stop implements backend.Instance (see backend.StopOnce).
func (i *instance) Stop(ctx context.Context) error { return i.stopper.Do(ctx, i.stop) }

// stop asks the guest to power off (Ctrl-Alt-Del); the undo stack does
// the rest (kill: SIGKILL after StopGrace).
func (i *instance) stop(ctx context.Context) error {
	i.Stopping()
	if !i.Exited() {
		actx, cancel := context.WithTimeout(ctx, time.Second)
		if err := SendAction(actx, i.p.APISocket, ActionSendCtrlAltDel); err != nil {
			i.log.Debug("graceful stop request failed", "err", err)
		}
		cancel()
		i.WaitExit(i.b.opts.StopGrace)
	}
	return backend.StopThenUnwind(ctx, i.log, i.Undos())
}

// removeLayout is the undo of layOut; the VMM is gone (or never started).
func (i *instance) removeLayout(context.Context) error {
	if i.p.Jailed {
		err := os.RemoveAll(i.p.JailDir)
		removeCgroups(i.b.opts, i.p.ID)
		return err
	}
	var errs []error
	files := []string{i.p.ConfigFile, i.p.APISocket, i.p.VsockPath, i.p.LogPath}
	// Guest-initiated vsock connections use <uds_path>_<port>.
	more, _ := filepath.Glob(i.p.VsockPath + "_*")
	for _, f := range append(files, more...) {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
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

// Steps implements backend.Starting.
func (i *instance) Steps() []backend.Step {
	return []backend.Step{
		{Name: "check tap", Run: i.checkNetwork},
		{Name: "prepare images", Run: i.prepareImages},
		{Name: "plan", Run: i.plan},
		{Name: "lay out files", Run: i.layOut},
		{Name: "start VMM", Run: i.startProcess},
	}
}
