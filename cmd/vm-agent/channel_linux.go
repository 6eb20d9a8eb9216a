package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// virtioPortsDir lists virtio-serial ports with the name the VMM gave them
// (QEMU's virtserialport name=...), which is stabler than the vportNpM
// numbering.
const virtioPortsDir = "/sys/class/virtio-ports"

// openSerial opens a virtio-serial port, named either by its device path
// or by its port name, once the device exists and the host end is
// connected.
func openSerial(ctx context.Context, port string, log *slog.Logger) (io.ReadWriteCloser, error) {
	if port == "" {
		return nil, errors.New("serial channel: no port given (serial:NAME or serial:/dev/PATH)")
	}
	var path string
	err := pollUntil(ctx, 10*time.Millisecond, func() (bool, error) {
		if strings.HasPrefix(port, "/") {
			path = port
		} else {
			path = findPortByName(port)
		}
		if path == "" {
			return false, nil
		}
		_, err := os.Stat(path)
		return err == nil, nil
	})
	if err != nil {
		return nil, fmt.Errorf("serial channel %s: waiting for the device: %w", port, err)
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("serial channel: open %s: %w", path, err)
	}
	// hvc consoles are ttys: without raw mode the line discipline would
	// echo and rewrite bytes of the multiplexer. vport devices are not.
	if t, err := unix.IoctlGetTermios(fd, unix.TCGETS); err == nil {
		makeRaw(t)
		if err := unix.IoctlSetTermios(fd, unix.TCSETS, t); err != nil {
			unix.Close(fd)
			return nil, fmt.Errorf("serial channel: raw mode on %s: %w", path, err)
		}
	}
	// A port whose host end is not connected reads as end-of-file, which
	// the multiplexer would take for the host going away: wait until
	// poll stops reporting a hang-up.
	log.Info("waiting for the host on the serial channel", "device", path)
	err = pollUntil(ctx, 20*time.Millisecond, func() (bool, error) {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLOUT}}
		if _, err := unix.Poll(fds, 0); err != nil && !errors.Is(err, unix.EINTR) {
			return false, err
		}
		return fds[0].Revents&unix.POLLHUP == 0, nil
	})
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("serial channel %s: waiting for the host: %w", path, err)
	}
	// Non-blocking, so os.File reads through the poller and Close ends a
	// pending read.
	return newFileChannel(os.NewFile(uintptr(fd), path)), nil
}

// findPortByName returns /dev/<port> for the virtio port named name.
func findPortByName(name string) string {
	entries, err := os.ReadDir(virtioPortsDir)
	if err != nil {
		return ""
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(virtioPortsDir, e.Name(), "name"))
		if err == nil && strings.TrimSpace(string(b)) == name {
			return "/dev/" + e.Name()
		}
	}
	return ""
}

// makeRaw is cfmakeraw(3): a transparent 8-bit byte stream.
func makeRaw(t *unix.Termios) {
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	t.Oflag &^= unix.OPOST
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag &^= unix.CSIZE | unix.PARENB
	t.Cflag |= unix.CS8
	t.Cc[unix.VMIN] = 1
	t.Cc[unix.VTIME] = 0
}

// listenVsock accepts the host's one connection on an AF_VSOCK port
// (Firecracker's hybrid vsock and vhost-vsock both connect to the guest).
func listenVsock(ctx context.Context, portArg string, log *slog.Logger) (io.ReadWriteCloser, error) {
	port, err := strconv.ParseUint(portArg, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("vsock channel: bad port %q", portArg)
	}
	var lfd int
	// The transport module may still be probing the device.
	err = pollUntil(ctx, 20*time.Millisecond, func() (bool, error) {
		fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return false, nil
		}
		if err := unix.Bind(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: uint32(port)}); err != nil {
			unix.Close(fd)
			return false, nil
		}
		lfd = fd
		return true, nil
	})
	if err != nil {
		return nil, fmt.Errorf("vsock channel: bind port %d: %w", port, err)
	}
	if err := unix.Listen(lfd, 1); err != nil {
		unix.Close(lfd)
		return nil, fmt.Errorf("vsock channel: listen: %w", err)
	}
	// Through the poller, so that ctx can end the wait for the host.
	if err := unix.SetNonblock(lfd, true); err != nil {
		unix.Close(lfd)
		return nil, err
	}
	lf := os.NewFile(uintptr(lfd), "vsock-listener")
	defer lf.Close()
	rc, err := lf.SyscallConn()
	if err != nil {
		return nil, err
	}
	// A deadline in the past wakes the accept below; if it cannot be set,
	// the listener is closed on return anyway.
	stop := context.AfterFunc(ctx, func() { _ = lf.SetReadDeadline(time.Now()) })
	defer stop()
	log.Info("waiting for the host on vsock", "port", port)
	var nfd int
	var aerr error
	err = rc.Read(func(fd uintptr) bool {
		nfd, _, aerr = unix.Accept4(int(fd), unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK)
		return !errors.Is(aerr, unix.EAGAIN)
	})
	if err == nil {
		err = aerr
	}
	if err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, fmt.Errorf("vsock channel: accept: %w", err)
	}
	return newFileChannel(os.NewFile(uintptr(nfd), "vsock")), nil
}

// fileChannel is a channel on one read-write descriptor.
type fileChannel struct {
	f    *os.File
	once sync.Once
	err  error
}

func newFileChannel(f *os.File) *fileChannel { return &fileChannel{f: f} }

func (c *fileChannel) Read(p []byte) (int, error)  { return c.f.Read(p) }
func (c *fileChannel) Write(p []byte) (int, error) { return c.f.Write(p) }
func (c *fileChannel) Close() error {
	c.once.Do(func() { c.err = c.f.Close() })
	return c.err
}

// pollUntil calls check every interval until it reports done, fails, or
// ctx ends.
func pollUntil(ctx context.Context, interval time.Duration, check func() (bool, error)) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		done, err := check()
		if err != nil {
			return err
		}
		if done {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}
