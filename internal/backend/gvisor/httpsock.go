package gvisor

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// The direct HTTP path. An ASGI program's server listens on a unix socket
// in httpSocketDir, which is a host directory bound into the sandbox;
// runsc's --host-uds=create lets the sandbox bind a socket there that the
// host can connect to. The supervisor then reaches the program without
// the agent and the guest channel, whose system calls through gVisor's
// kernel were most of the relay's cost. Only "create": programs still
// cannot connect to sockets of the host.
//
// The program can write into that directory, so the host side trusts
// nothing in it:
//   - it is a tiny tmpfs of its own (a few inodes, one page), so filling
//     it costs the host nothing;
//   - it is opened once, before the sandbox starts, with O_PATH|O_NOFOLLOW,
//     and each connection looks the socket up relative to that descriptor
//     without following a symbolic link, checks that it is a socket on
//     that very tmpfs (not a FIFO, a link or anything else), and connects
//     through /proc/self/fd to the inode it checked, so no rename between
//     check and connect can redirect it.
const (
	httpSocketDir  = "/run/aleph-http"
	httpSocketName = "asgi.sock"
	// httpSocketTmpfs bounds what a program can leave there.
	httpSocketTmpfs = "size=64k,nr_inodes=16,mode=0755"
)

// httpSocket is the host side of the direct path of one sandbox.
type httpSocket struct {
	hostDir string
	dir     *os.File // O_PATH descriptor of hostDir's tmpfs root
	dev     uint64   // its device: a socket elsewhere is not ours
}

// prepareHTTPSocket mounts the socket directory's tmpfs, opens it and plans
// its bind mount; the undo closes and unmounts it (after runsc is gone).
func (i *instance) prepareHTTPSocket(context.Context) (backend.Undo, error) {
	if len(i.b.opts.Command) != 0 {
		return nil, nil // no agent, no program socket
	}
	dir := filepath.Join(i.spec.StateDir, "http")
	if err := os.Mkdir(dir, 0o700); err != nil {
		return nil, fmt.Errorf("HTTP socket directory: %w", err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, httpSocketTmpfs); err != nil {
		os.Remove(dir)
		return nil, fmt.Errorf("HTTP socket directory: %w", err)
	}
	undo := func(context.Context) error {
		if err := unmountRetry(dir); err != nil {
			return backend.InUse(err)
		}
		return os.Remove(dir)
	}
	f, err := os.OpenFile(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return undo, fmt.Errorf("HTTP socket directory: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return undo, fmt.Errorf("HTTP socket directory: %w", err)
	}
	i.http = &httpSocket{hostDir: dir, dir: f, dev: st.Dev}
	i.mounts = append(i.mounts, mountPlan{spec: specs.Mount{
		Destination: httpSocketDir, Type: "bind", Source: dir,
		Options: []string{"rbind", "rw", "nosuid", "nodev", "noexec"},
	}})
	return func(ctx context.Context) error {
		f.Close() // a dial racing with it gets os.ErrClosed
		return undo(ctx)
	}, nil
}

// DialHTTP implements backend.DirectDialer.
func (i *instance) DialHTTP(ctx context.Context) (net.Conn, error) {
	if i.http == nil {
		return nil, errors.New("gvisor: sandbox has no HTTP socket")
	}
	return i.http.dial(ctx)
}

// errNotOurSocket is a program's HTTP socket replaced by something else.
var errNotOurSocket = errkind.New(errkind.BadGateway, "the program's HTTP socket is not a socket of its sandbox")

func (h *httpSocket) dial(ctx context.Context) (net.Conn, error) {
	rc, err := h.dir.SyscallConn()
	if err != nil {
		return nil, err
	}
	fd := -1
	var openErr error
	// Control keeps the directory's descriptor from being closed (and its
	// number reused) while openat uses it.
	if err := rc.Control(func(dfd uintptr) {
		fd, openErr = unix.Openat(int(dfd), httpSocketName, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	}); err != nil {
		return nil, err
	}
	if openErr != nil {
		return nil, fmt.Errorf("program's HTTP socket: %w", openErr)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("program's HTTP socket: %w", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK || st.Dev != h.dev {
		return nil, errNotOurSocket
	}
	// The magic link resolves to the inode just checked, whatever the
	// directory holds by now; it is also short, whatever StateDir's length.
	var d net.Dialer
	return d.DialContext(ctx, "unix", "/proc/self/fd/"+strconv.Itoa(fd))
}
