package main

import (
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"sync"

	"golang.org/x/sys/unix"
)

// ensureLoopbackUp brings "lo" up: executables listen on 127.0.0.1, and a
// fresh network namespace (or a VM's init) starts with lo down. Best
// effort: gVisor's netstack already has it up.
func ensureLoopbackUp(log *slog.Logger) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		log.Debug("loopback: socket", "err", err)
		return
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		log.Debug("loopback: get flags", "err", err)
		return
	}
	flags := ifr.Uint16()
	if flags&unix.IFF_UP != 0 {
		return
	}
	ifr.SetUint16(flags | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		log.Warn("loopback: cannot bring it up", "err", err)
		return
	}
	log.Debug("loopback brought up")
}

// reaper collects every exited child when the agent is PID 1 (gVisor makes
// the container's process PID 1): orphans of the program are re-parented to
// it and would otherwise stay zombies. The program's own exit status is
// handed to whoever started it.
type reaper struct {
	log     *slog.Logger
	mu      sync.Mutex
	waiters map[int]chan unix.WaitStatus
}

func newReaper(log *slog.Logger) *reaper {
	r := &reaper{log: log, waiters: map[int]chan unix.WaitStatus{}}
	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, unix.SIGCHLD)
	go func() {
		for range sigs {
			r.reap()
		}
	}()
	return r
}

// start starts cmd and registers it under the lock, so a child that exits
// at once is not reaped before anyone waits for it.
func (r *reaper) start(cmd *exec.Cmd) (<-chan unix.WaitStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	ch := make(chan unix.WaitStatus, 1)
	r.waiters[cmd.Process.Pid] = ch
	return ch, nil
}

func (r *reaper) reap() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
		r.mu.Lock()
		if ch, ok := r.waiters[pid]; ok {
			ch <- ws
			delete(r.waiters, pid)
		}
		r.mu.Unlock()
	}
}
