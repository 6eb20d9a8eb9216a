package qemu

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/vmimage"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/tailbuf"
)

// Files of one VM in its state directory.
const (
	guestSocketName = "guest.sock"
	qmpSocketName   = "qmp.sock"
	consoleLogName  = "console.log"
	guestPortID     = "aleph-guest" // QEMU device id, named in VSERPORT_CHANGE
)

// instance is one VM and everything Start created for it.
type instance struct {
	*backend.Process
	b    *Backend
	spec backend.Spec
	log  *slog.Logger

	prepared *vmimage.Prepared
	drives   []vmimage.Drive

	guestSock, qmpSock, consoleLog string
	cid                            uint32 // vhost-vsock guest CID

	qmp      *qmp
	console  *tailbuf.Buffer
	qemuErr  *tailbuf.Buffer // QEMU's own stderr
	booted   time.Time       // when the guest was let run
	portOpen chan struct{}
	portOnce sync.Once

	mu      sync.Mutex
	channel io.Closer
	// codeLoaded: a spare's code drive has been filled (LoadCode).
	codeLoaded bool

	stopper backend.StopOnce
}

func newInstance(b *Backend, spec backend.Spec, log *slog.Logger) *instance {
	return &instance{
		Process:    backend.NewProcess("qemu", "VM", spec.ExecutionID, nil),
		b:          b,
		spec:       spec,
		log:        log,
		guestSock:  filepath.Join(spec.StateDir, guestSocketName),
		qmpSock:    filepath.Join(spec.StateDir, qmpSocketName),
		consoleLog: filepath.Join(spec.StateDir, consoleLogName),
		console:    tailbuf.New(40, 512),
		qemuErr:    tailbuf.New(20, 512),
		portOpen:   make(chan struct{}),
	}
}

var _ backend.GuestConfigurer = (*instance)(nil)

// ConfigureGuest implements backend.GuestConfigurer: it names the code
// and volume drives in the Config the host sends the agent.
func (i *instance) ConfigureGuest(cfg *guest.Config) {
	vmimage.FillGuest(i.configureCode(i.drives), cfg)
}

func (i *instance) prepareImages(ctx context.Context) (backend.Undo, error) {
	if len(i.qmpSock) > maxSocketPath || len(i.guestSock) > maxSocketPath {
		return nil, fmt.Errorf("state directory %s is too long for unix sockets (%d bytes max)", i.spec.StateDir, maxSocketPath)
	}
	p, err := i.b.images.Prepare(ctx, i.spec)
	if err != nil {
		return nil, err
	}
	i.prepared = p
	i.drives = vmimage.GuestDrives(p, nil)
	return i.removeImages, nil
}

func (i *instance) removeImages(context.Context) error {
	err := i.prepared.Cleanup()
	// vmimage puts ephemeral volumes there; only an empty directory goes.
	if err := os.Remove(filepath.Join(i.spec.StateDir, "volumes")); err != nil && !errors.Is(err, os.ErrNotExist) {
		i.log.Debug("volumes directory", "err", err)
	}
	return err
}

// qemuArgs is QEMU's command line for this VM.
func (i *instance) qemuArgs() []string {
	b := i.b
	vcpus := max(i.spec.VCPUs, 1)
	mem := i.spec.MemoryMiB
	if mem <= 0 {
		mem = DefaultMemoryMiB
	}
	kargs := b.kernelArgs()
	if i.spec.DeferCode {
		kargs = append(kargs, preloadArg)
	}
	args := []string{
		"-M", "microvm,acpi=" + string(b.acpi),
		"-accel", string(b.accel),
		"-m", strconv.Itoa(mem),
		"-smp", strconv.Itoa(vcpus),
		"-nodefaults", "-no-user-config", "-nographic",
		// A guest reboot (what the agent does when it is done, and what a
		// panic does with panic=-1) ends QEMU.
		"-no-reboot",
		// Paused until QMP is connected, so no event is missed.
		"-S",
		"-kernel", b.opts.KernelPath,
		"-initrd", b.opts.InitrdPath,
		"-append", strings.Join(kargs, " "),
		"-qmp", "unix:" + qemuEscape(i.qmpSock) + ",server=on,wait=off",
		// The console is QEMU's stdout, read line by line by the backend.
		"-chardev", "stdio,id=console,signal=off",
		"-serial", "chardev:console",
	}
	if b.accel == AccelKVM {
		args = append(args, "-cpu", "host")
	}
	// virtio-blk disks get vda, vdb, ... in the order of their devices,
	// which is the order vmimage.GuestDrives named them in.
	for _, d := range i.drives {
		ro := "off"
		// A spare's code placeholder stays writable for QEMU: block_resize
		// needs it (see LoadCode). The file is the VM's own copy, and the
		// agent mounts it read-only.
		if d.ReadOnly && (d.Role != vmimage.RoleCode || !i.spec.DeferCode) {
			ro = "on"
		}
		args = append(args,
			"-drive", fmt.Sprintf("id=%s,if=none,file=%s,format=raw,readonly=%s", d.ID, qemuEscape(d.HostPath), ro),
			"-device", "virtio-blk-device,drive="+d.ID)
	}
	if n := i.spec.Network; n != nil {
		// The tap exists already (the host made it, with the gateway
		// address); QEMU only opens it.
		args = append(args,
			"-netdev", "tap,id=net0,ifname="+n.TapName+",script=no,downscript=no",
			"-device", "virtio-net-device,netdev=net0,mac="+n.GuestMAC)
	}
	switch b.channel {
	case ChannelVsock:
		args = append(args, "-device", fmt.Sprintf("vhost-vsock-device,guest-cid=%d", i.cid))
	default:
		args = append(args,
			"-device", "virtio-serial-device,max_ports=2",
			"-chardev", "socket,id=guest,path="+qemuEscape(i.guestSock)+",server=on,wait=off",
			"-device", "virtserialport,id="+guestPortID+",chardev=guest,name="+GuestPortName)
	}
	return args
}

// startQemu starts QEMU, paused. The process outlives Start's ctx: it
// belongs to the instance and ends with Stop.
func (i *instance) startQemu(ctx context.Context) (backend.Undo, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// The undo also serves a failed start, with or without a process.
	return i.endQemu, i.runQemu()
}

func (i *instance) runQemu() error {
	if i.b.channel == ChannelVsock {
		i.cid = randomCID()
	}
	args := i.qemuArgs()
	cmd := exec.Command(i.b.qemu, args...)
	// Its own process group: a Ctrl-C meant for the supervisor must not
	// kill VMs behind Stop's back.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	logFile, err := os.OpenFile(i.consoleLog, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("console log: %w", err)
	}
	i.log.Debug("starting qemu", "args", args)
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return err
	}
	i.Started(cmd)
	out := i.spec.ProgramOutput
	if out == nil {
		out = io.Discard
	}
	var readers sync.WaitGroup
	readers.Add(2)
	// Writes to the log file and the program's output are best effort: a
	// full disk or a gone reader must not stop the console reader, whose
	// tail explains a failed boot.
	go func() {
		defer readers.Done()
		copyLines(stdout, func(line []byte) {
			_, _ = logFile.Write(line)
			i.console.Add(line)
			_, _ = out.Write(line)
		})
	}()
	go func() {
		defer readers.Done()
		copyLines(stderr, func(line []byte) {
			_, _ = logFile.Write(line)
			i.qemuErr.Add(line)
			i.log.Warn("qemu: " + strings.TrimSpace(string(line)))
		})
	}()
	go func() {
		// cmd.Wait closes the pipes: the readers must be done first.
		readers.Wait()
		logFile.Close()
		i.Reap(i.exitDetails)
	}()
	return nil
}

// copyLines hands each line of r (without \r, with \n) to emit.
func copyLines(r io.Reader, emit func([]byte)) {
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			line = bytes.TrimRight(line, "\r\n")
			emit(append(bytes.Clone(line), '\n'))
		}
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			return
		}
	}
}

// connectQMP waits for QEMU's QMP socket and connects.
func (i *instance) connectQMP(ctx context.Context) (backend.Undo, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		q, err := dialQMP(ctx, i.qmpSock, i.onEvent)
		if err == nil {
			i.qmp = q
			return func(context.Context) error { q.close(); return nil }, nil
		}
		select {
		case <-i.Done():
			return nil, i.startFailure("QEMU exited at start-up")
		case <-ctx.Done():
			return nil, fmt.Errorf("%w (last error: %v)", ctx.Err(), err)
		case <-tick.C:
		}
	}
}

func (i *instance) onEvent(name string, data json.RawMessage) {
	if name == "STOP" {
		// Runs off the QMP reader, which must stay free to read the answer.
		go i.checkPaused()
	}
	if name != "VSERPORT_CHANGE" {
		i.log.Debug("qmp event", "event", name, "data", string(data))
		return
	}
	var ev struct {
		ID   string `json:"id"`
		Open bool   `json:"open"`
	}
	if json.Unmarshal(data, &ev) == nil && ev.ID == guestPortID && ev.Open {
		i.portOnce.Do(func() { close(i.portOpen) })
	}
}

// checkPaused ends a VM that QEMU paused by itself: nothing here pauses
// VMs, and QEMU does so on a guest it cannot run (a KVM internal error,
// measured with the paravirtual kvm-pvm), which would otherwise sit there
// until the host's timeouts.
func (i *instance) checkPaused() {
	select {
	case <-i.Done():
		return
	case <-time.After(time.Second): // a shutdown stops the VM too, then exits
	}
	if i.IsStopping() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	res, err := i.qmp.query(ctx, "query-status")
	if err != nil {
		return
	}
	var st struct {
		Status string `json:"status"`
	}
	if json.Unmarshal(res, &st) != nil || st.Status == "running" {
		return
	}
	i.Halt(errors.New("QEMU stopped the guest (status " + st.Status + ")"))
	i.log.Error("VM paused by QEMU; killing it", "status", st.Status)
	i.KillGroup(syscall.SIGKILL)
}

// boot lets the paused guest run.
func (i *instance) boot(ctx context.Context) (backend.Undo, error) {
	i.booted = time.Now()
	if err := i.qmp.execute(ctx, "cont"); err != nil {
		return nil, err
	}
	i.log.Debug("guest running", "accel", i.b.accel, "acpi", i.b.acpi)
	return nil, nil
}

// startFailure describes why QEMU ended, with its last words.
func (i *instance) startFailure(what string) error {
	<-i.Done()
	msg := what
	if r := i.Halted(); r != nil {
		msg += ": " + r.Error()
	}
	if t := i.qemuErr.String(); t != "" {
		msg += ": " + t
	}
	if t := i.console.String(); t != "" {
		msg += "\nconsole:\n" + t
	}
	return errkind.Wrap(errkind.BadGateway, errors.New(msg))
}

// Channel implements backend.Instance. It returns once the agent in the
// guest has opened its end, so that the multiplexer's keep-alives never
// run against a guest that is still booting.
func (i *instance) Channel(ctx context.Context) (io.ReadWriteCloser, error) {
	if err := i.TakeChannel(); err != nil {
		return nil, err
	}

	var ch io.ReadWriteCloser
	var err error
	if i.b.channel == ChannelVsock {
		ch, err = i.dialVsock(ctx)
	} else {
		ch, err = i.dialSerial(ctx)
	}
	if err != nil {
		return nil, err
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	if err := i.ChannelReady(ch); err != nil {
		return nil, err
	}
	i.channel = ch
	i.log.Info("guest agent reachable", "boot", time.Since(i.booted).Round(time.Millisecond), "accel", i.b.accel)
	return ch, nil
}

func (i *instance) dialSerial(ctx context.Context) (io.ReadWriteCloser, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", i.guestSock)
	if err != nil {
		return nil, fmt.Errorf("qemu: guest channel: %w", err)
	}
	select {
	case <-i.portOpen:
		return conn, nil
	case <-i.Done():
		conn.Close()
		return nil, fmt.Errorf("qemu: guest channel: %w", i.startFailure("the VM ended before its agent came up"))
	case <-ctx.Done():
		conn.Close()
		return nil, fmt.Errorf("qemu: waiting %s for the guest agent: %w%s", time.Since(i.booted).Round(time.Second), ctx.Err(), i.consoleTail())
	}
}

// dialVsock connects to the agent's vsock port, retrying while it boots.
func (i *instance) dialVsock(ctx context.Context) (io.ReadWriteCloser, error) {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		f, err := connectVsock(i.cid, GuestVsockPort)
		if err == nil {
			return f, nil
		}
		select {
		case <-i.Done():
			return nil, fmt.Errorf("qemu: guest channel: %w", i.startFailure("the VM ended before its agent came up"))
		case <-ctx.Done():
			return nil, fmt.Errorf("qemu: waiting for the guest agent on vsock %d:%d: %w (last error: %v)%s",
				i.cid, GuestVsockPort, ctx.Err(), err, i.consoleTail())
		case <-tick.C:
		}
	}
}

func connectVsock(cid, port uint32) (*os.File, error) {
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	if err := unix.Connect(fd, &unix.SockaddrVM{CID: cid, Port: port}); err != nil {
		unix.Close(fd)
		return nil, err
	}
	// Non-blocking: os.File then uses the poller and Close ends reads.
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, err
	}
	return os.NewFile(uintptr(fd), "vsock"), nil
}

// randomCID picks a guest CID: 0-2 are reserved, and a random one keeps
// concurrent VMs (and other supervisors' VMs) apart without bookkeeping.
func randomCID() uint32 {
	var b [4]byte
	rand.Read(b[:])
	return 3 + binary.LittleEndian.Uint32(b[:])%(1<<30)
}

func (i *instance) consoleTail() string {
	if t := i.console.String(); t != "" {
		return "\nconsole:\n" + t
	}
	return ""
}

// exitDetails are QEMU's last words and the console's, for an exit
// error.
func (i *instance) exitDetails() string {
	msg := ""
	if t := i.qemuErr.String(); t != "" {
		msg += "\nqemu: " + t
	}
	return msg + i.consoleTail()
}

// Stop implements backend.Instance (see backend.StopOnce).
func (i *instance) Stop(ctx context.Context) error { return i.stopper.Do(ctx, i.stop) }

// stop ends the VM, gently first: with the channel closed the agent stops
// the program, syncs, unmounts and reboots, which ends QEMU; then QMP
// quit. The undo stack does the rest (endQemu: SIGTERM, SIGKILL).
func (i *instance) stop(ctx context.Context) error {
	i.Stopping()
	i.mu.Lock()
	ch := i.channel
	i.mu.Unlock()
	if ch != nil {
		ch.Close()
		if !i.WaitExit(i.b.opts.StopGrace) {
			i.log.Warn("guest did not power off after its channel closed", "grace", i.b.opts.StopGrace)
		}
	}
	if !i.Exited() && i.qmp != nil {
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		if err := i.qmp.execute(qctx, "quit"); err != nil {
			i.log.Debug("qmp quit", "err", err)
		}
		cancel()
		i.WaitExit(5 * time.Second)
	}
	return backend.StopThenUnwind(ctx, i.log, i.Undos())
}

// endQemu is the undo of startQemu: QEMU is terminated if it still runs,
// and its files go.
func (i *instance) endQemu(context.Context) error {
	if i.Pid() > 0 && !i.Exited() {
		i.Stopping()
		i.log.Warn("QEMU still running; terminating it")
		i.KillGroup(syscall.SIGTERM)
		if !i.WaitExit(5 * time.Second) {
			i.KillGroup(syscall.SIGKILL)
			<-i.Done()
		}
	}
	var errs []error
	for _, p := range []string{i.guestSock, i.qmpSock, i.consoleLog} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Steps implements backend.Starting.
func (i *instance) Steps() []backend.Step {
	return []backend.Step{
		{Name: "prepare images", Run: i.prepareImages},
		{Name: "start VMM", Run: i.startQemu},
		{Name: "connect qmp", Run: i.connectQMP},
		{Name: "boot", Run: i.boot},
	}
}
