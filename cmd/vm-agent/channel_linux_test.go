package main

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The vsock listener of VM mode, over the host's vsock loopback
// (VMADDR_CID_LOCAL) where the kernel has it.
func TestVsockChannel(t *testing.T) {
	const port = 52052
	probe, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Skipf("no AF_VSOCK here: %v", err)
	}
	unix.Close(probe)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	type result struct {
		ch  io.ReadWriteCloser
		err error
	}
	res := make(chan result, 1)
	go func() {
		ch, err := listenVsock(ctx, "52052", testLogger(t))
		res <- result{ch, err}
	}()
	var conn int
	err = pollUntil(ctx, 20*time.Millisecond, func() (bool, error) {
		fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return false, err
		}
		if err := unix.Connect(fd, &unix.SockaddrVM{CID: unix.VMADDR_CID_LOCAL, Port: port}); err != nil {
			unix.Close(fd)
			if errors.Is(err, unix.ECONNRESET) || errors.Is(err, unix.ECONNREFUSED) {
				return false, nil // not listening yet
			}
			return false, err
		}
		conn = fd
		return true, nil
	})
	if err != nil {
		cancel()
		<-res
		t.Skipf("no vsock loopback here: %v", err)
	}
	defer unix.Close(conn)
	r := <-res
	if r.err != nil {
		t.Fatal(r.err)
	}
	defer r.ch.Close()
	if _, err := unix.Write(conn, []byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(r.ch, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("read %q, %v", buf, err)
	}
}

// A host that never comes must not hold the agent forever.
func TestVsockChannelGivesUp(t *testing.T) {
	probe, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Skipf("no AF_VSOCK here: %v", err)
	}
	unix.Close(probe)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err = listenVsock(ctx, "52053", testLogger(t))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("listenVsock = %v, want the deadline", err)
	}
}

func TestKernelHaltSetting(t *testing.T) {
	if haltCommand("poweroff") != unix.LINUX_REBOOT_CMD_POWER_OFF || haltCommand("reboot") != unix.LINUX_REBOOT_CMD_RESTART {
		t.Error("explicit aleph.halt not honoured")
	}
}
