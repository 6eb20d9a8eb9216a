package backend

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// Process is the host process behind one sandbox (runsc, QEMU,
// Firecracker) and what every backend's Instance tells about it: Done,
// Err, Usage, and the one-time hand-out of the channel. Embedded in an
// instance, it provides those three methods of Instance.
type Process struct {
	backend string // in errors: "qemu: channel already taken"
	kind    string // in exit errors: "VM <id> exited by itself"
	id      string
	sample  func() (Usage, bool)
	done    chan struct{}
	undo    UndoStack

	mu      sync.Mutex
	cmd     *exec.Cmd
	exitErr error
	halt    error
	stop    bool
	taken   bool
	reaped  bool // its pid may name another process now
	usage   Usage
}

// NewProcess returns the lifecycle of one sandbox process, not started
// yet. kind names it in exit errors ("sandbox", "VM"). sample reads its
// usage while it runs; nil reads /proc of the process (ProcUsage).
func NewProcess(backendName, kind, id string, sample func() (Usage, bool)) *Process {
	p := &Process{backend: backendName, kind: kind, id: id, sample: sample, done: make(chan struct{})}
	if p.sample == nil {
		p.sample = p.procSample
	}
	return p
}

// sampleEvery is how often a running process's usage is read, so that a
// process that dies leaves recent figures behind.
const sampleEvery = 2 * time.Second

// Started records the started cmd and begins sampling its usage. The
// backend then calls Reap, in a goroutine of its own, once whatever reads
// the process's pipes no longer needs them.
func (p *Process) Started(cmd *exec.Cmd) {
	p.mu.Lock()
	p.cmd = cmd
	p.mu.Unlock()
	go func() {
		t := time.NewTicker(sampleEvery)
		defer t.Stop()
		for {
			p.refresh()
			select {
			case <-p.done:
				return
			case <-t.C:
			}
		}
	}()
}

// Reap waits for the process and records how it ended: nothing when Stop
// ended it; otherwise an errkind.BadGateway error, "<kind> <id> exited by
// itself: <exit status>" or, when Halt gave one, "<kind> <id>: <reason>",
// followed by what details returns (the process's last words; nil for
// none). details runs after the exit and may call Halt.
func (p *Process) Reap(details func() string) {
	werr := p.cmd.Wait()
	ps := p.cmd.ProcessState
	p.mu.Lock()
	p.reaped = true
	p.mu.Unlock()
	p.refresh()
	p.mu.Lock()
	if ps != nil {
		p.usage = p.usage.Max(rusageOf(ps))
	}
	stopping := p.stop
	p.mu.Unlock()
	if stopping {
		close(p.done)
		return
	}
	extra := ""
	if details != nil {
		extra = details()
	}
	p.mu.Lock()
	if p.halt != nil {
		p.exitErr = fmt.Errorf("%s %s: %w%s", p.kind, p.id, p.halt, extra)
	} else {
		p.exitErr = fmt.Errorf("%s %s exited by itself: %s%s", p.kind, p.id, DescribeExit(werr, ps), extra)
	}
	p.exitErr = errkind.Wrap(errkind.BadGateway, p.exitErr)
	p.mu.Unlock()
	close(p.done)
}

// Halt records why the backend itself ends the process (an exceeded
// memory limit, a guest its VMM paused): its exit error then says that
// rather than an exit status. The first reason stays. It tells whether
// this was the first.
func (p *Process) Halt(reason error) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.halt != nil {
		return false
	}
	p.halt = reason
	return true
}

// Halted returns the reason given to Halt, if any.
func (p *Process) Halted() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.halt
}

// Stopping marks the process as being stopped on purpose: its end is then
// no error, and no channel is handed out any more. It takes a last usage
// sample, should the process have to be killed.
func (p *Process) Stopping() {
	p.refresh()
	p.mu.Lock()
	p.stop = true
	p.mu.Unlock()
}

// IsStopping tells whether Stopping was called.
func (p *Process) IsStopping() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stop
}

// TakeChannel guards Instance.Channel: the channel is handed out once,
// and not while stopping.
func (p *Process) TakeChannel() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.taken:
		return fmt.Errorf("%s: channel already taken", p.backend)
	case p.stop:
		return fmt.Errorf("%s: %s is stopping", p.backend, p.kind)
	}
	p.taken = true
	return nil
}

// Pid is the process's id, 0 before Started.
func (p *Process) Pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.cmd.Process == nil {
		return 0
	}
	return p.cmd.Process.Pid
}

// KillGroup sends sig to the process's group (backends start their
// process in a group of its own). A process already gone is no error.
func (p *Process) KillGroup(sig syscall.Signal) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.reaped || p.cmd == nil || p.cmd.Process == nil {
		return
	}
	_ = syscall.Kill(-p.cmd.Process.Pid, sig) // ESRCH: it exited meanwhile
}

// Undos is the stack of the start's undos, which Stop unwinds.
func (p *Process) Undos() *UndoStack { return &p.undo }

// Done implements Instance.
func (p *Process) Done() <-chan struct{} { return p.done }

// Err implements Instance.
func (p *Process) Err() error {
	select {
	case <-p.done:
	default:
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exitErr
}

// Exited tells whether the process has been reaped, without waiting.
func (p *Process) Exited() bool { return p.WaitExit(0) }

// WaitExit waits at most d for the process to be reaped.
func (p *Process) WaitExit(d time.Duration) bool {
	if d <= 0 {
		select {
		case <-p.done:
			return true
		default:
			return false
		}
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-p.done:
		return true
	case <-t.C:
		return false
	}
}

// WaitExitCtx waits for the process to be reaped, or for ctx.
func (p *Process) WaitExitCtx(ctx context.Context) error {
	select {
	case <-p.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Usage implements Instance (see Usage for what each figure means).
func (p *Process) Usage() Usage {
	if !p.Exited() {
		p.refresh()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.usage
}

// refresh takes a sample; figures only grow, so a failed or partial
// reading (a process gone from /proc) never lowers them.
func (p *Process) refresh() {
	if u, ok := p.sample(); ok {
		p.mu.Lock()
		p.usage = p.usage.Max(u)
		p.mu.Unlock()
	}
}

func (p *Process) procSample() (Usage, bool) {
	p.mu.Lock()
	gone := p.reaped || p.cmd == nil || p.cmd.Process == nil
	p.mu.Unlock()
	if gone {
		return Usage{}, false
	}
	return ProcUsage(p.cmd.Process.Pid)
}

// Max is the larger of u and v, counter by counter: the best of two lower
// bounds of the same counters. MemoryBytes, a level, is v's: the later
// reading.
func (u Usage) Max(v Usage) Usage {
	return Usage{
		CPUTimeUser:   max(u.CPUTimeUser, v.CPUTimeUser),
		CPUTimeSystem: max(u.CPUTimeSystem, v.CPUTimeSystem),
		IOReadCount:   max(u.IOReadCount, v.IOReadCount),
		IOWriteCount:  max(u.IOWriteCount, v.IOWriteCount),
		IOReadBytes:   max(u.IOReadBytes, v.IOReadBytes),
		IOWriteBytes:  max(u.IOWriteBytes, v.IOWriteBytes),
		MemoryBytes:   v.MemoryBytes,
	}
}

// rusageOf is what the kernel tells of a reaped process: its CPU time and
// its storage traffic (ru_inblock and ru_oublock count 512-byte units of
// the same read_bytes and write_bytes /proc/<pid>/io shows). It has no
// system call counts.
func rusageOf(ps *os.ProcessState) Usage {
	u := Usage{CPUTimeUser: ps.UserTime(), CPUTimeSystem: ps.SystemTime()}
	if ru, ok := ps.SysUsage().(*syscall.Rusage); ok {
		u.IOReadBytes = uint64(max(ru.Inblock, 0)) * 512
		u.IOWriteBytes = uint64(max(ru.Oublock, 0)) * 512
	}
	return u
}

// clockTicks is USER_HZ, which Linux fixes at 100 for /proc.
const clockTicks = 100

// ProcUsage reads a live process's CPU time (/proc/<pid>/stat), I/O
// (/proc/<pid>/io) and resident memory (/proc/<pid>/statm); ok is false
// when the process is gone.
func ProcUsage(pid int) (u Usage, ok bool) {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return u, false
	}
	// Fields after the command name, which may contain spaces.
	end := bytes.LastIndexByte(stat, ')')
	if end < 0 {
		return u, false
	}
	f := strings.Fields(string(stat[end+1:]))
	if len(f) < 13 {
		return u, false
	}
	// utime and stime are fields 14 and 15, in clock ticks.
	utime, _ := strconv.ParseUint(f[11], 10, 64)
	stime, _ := strconv.ParseUint(f[12], 10, 64)
	u.CPUTimeUser = time.Duration(utime) * time.Second / clockTicks
	u.CPUTimeSystem = time.Duration(stime) * time.Second / clockTicks
	io, err := ProcIO(pid)
	if err == nil {
		u.IOReadCount, u.IOWriteCount = io.IOReadCount, io.IOWriteCount
		u.IOReadBytes, u.IOWriteBytes = io.IOReadBytes, io.IOWriteBytes
	}
	if statm, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/statm"); err == nil {
		if f := strings.Fields(string(statm)); len(f) > 1 {
			pages, _ := strconv.ParseUint(f[1], 10, 64)
			u.MemoryBytes = pages * uint64(os.Getpagesize())
		}
	}
	return u, true
}

// ProcIO reads the I/O figures of a live process from /proc/<pid>/io
// (only its I/O fields are set).
func ProcIO(pid int) (Usage, error) {
	var u Usage
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/io")
	if err != nil {
		return u, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
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
	return u, nil
}

// DescribeExit says how a process ended, from what exec.Cmd.Wait returned.
func DescribeExit(werr error, ps *os.ProcessState) string {
	if ps == nil {
		if werr == nil {
			return "exited"
		}
		return werr.Error()
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		msg := "killed by signal " + ws.Signal().String()
		if ws.Signal() == syscall.SIGKILL {
			msg += " (possibly its memory limit)"
		}
		return msg
	}
	code := ps.ExitCode()
	// runsc (and shells) report a child killed by a signal as 128+signal.
	if code > 128 && code < 128+65 {
		s := syscall.Signal(code - 128)
		msg := fmt.Sprintf("killed by signal %s (exit status %d)", s, code)
		if s == syscall.SIGKILL {
			msg += "; possibly its memory limit"
		}
		return msg
	}
	return fmt.Sprintf("exit status %d", code)
}

// ChannelReady rechecks, once a channel is dialled, that no Stop began
// meanwhile: then c is closed and an error returned.
func (p *Process) ChannelReady(c io.Closer) error {
	if p.IsStopping() {
		_ = c.Close()
		return fmt.Errorf("%s: %s is stopping", p.backend, p.kind)
	}
	return nil
}
