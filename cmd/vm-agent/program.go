package main

import (
	"bufio"
	"bytes"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/tailbuf"
)

//go:embed launcher.py
var launcherSource string

// asgiServerSource is the launcher's standard-library ASGI server, for
// runtimes without uvicorn.
//
//go:embed asgi_server.py
var asgiServerSource string

// startErrorFile, beside the launcher, is where the launcher leaves
// the traceback of a program that could not start.
const startErrorFile = "start-error.txt"

// Where aleph-vm's runtime installs its own Python libraries (its init
// exports PYTHONPATH with it, so programs and their children see it).
const alephLibs = "/opt/aleph/libs"

// programSpec is what the agent's flags decide about how programs run.
type programSpec struct {
	dir       string // the launcher's files (the agent's private socket directory)
	codeDir   string
	python    string
	socket    string // ASGI programs listen here
	apiSocket string // ALEPH_API_UNIX_SOCKET unless the host set it
}

func (a *agent) programSpec() programSpec {
	return programSpec{
		dir:       a.o.socketDir,
		codeDir:   a.o.codeDir,
		python:    a.o.python,
		socket:    a.programSocket(),
		apiSocket: a.apiSocket(),
	}
}

// program is the one process the agent runs, with its process group.
type program struct {
	log     *slog.Logger
	pid     int
	network string // how to reach it: unix or tcp
	address string
	tail    *tailbuf.Buffer

	exited   chan struct{}
	exitDesc string // valid once exited is closed
	output   sync.WaitGroup

	stopOnce sync.Once
	pid1     bool // may kill every other process of the sandbox
}

const basePath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// programEnv is all the program sees: basics, the message's variables and
// the Aleph variables, none of the agent's own environment.
func programEnv(cfg guest.Config, spec programSpec, log *slog.Logger) []string {
	env := map[string]string{
		"PATH": basePath,
		"HOME": "/root",
		"LANG": "C.UTF-8",
	}
	if cfg.Interface == guest.InterfaceASGI {
		// Without it prints sit in Python's buffer and never reach the log
		// of a program that is killed.
		env["PYTHONUNBUFFERED"] = "1"
	}
	env["PYTHONPATH"] = alephLibs
	// The program's own variables come last and win, as in aleph-vm,
	// whose init sets them after its ALEPH_* values.
	for _, vars := range []map[string]string{cfg.AlephEnv, cfg.Variables} {
		for k, v := range vars {
			if k == "" || strings.ContainsAny(k, "=\x00") || strings.Contains(v, "\x00") {
				log.Warn("skipping invalid environment variable", "name", k)
				continue
			}
			env[k] = v
		}
	}
	if _, ok := env["ALEPH_API_UNIX_SOCKET"]; !ok {
		env["ALEPH_API_UNIX_SOCKET"] = spec.apiSocket
	}
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}

// programCommand builds the command line of the program in cfg.
// writeLauncher puts the launcher in the agent's socket directory. A file
// rather than -c: tracebacks and process listings then name it instead of
// showing "<string>" or the whole source.
func writeLauncher(spec programSpec) (string, error) {
	dir := spec.dir
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("write launcher: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "asgi_server.py"), []byte(asgiServerSource), 0o644); err != nil {
		return "", fmt.Errorf("write launcher: %w", err)
	}
	launcher := filepath.Join(dir, "launcher.py")
	if err := os.WriteFile(launcher, []byte(launcherSource), 0o644); err != nil {
		return "", fmt.Errorf("write launcher: %w", err)
	}
	// One left by an earlier run would be taken for this one's.
	if err := os.Remove(filepath.Join(dir, startErrorFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("write launcher: %w", err)
	}
	return launcher, nil
}

// checkASGIEntrypoint: module:attribute, or with plain code the name of
// the app in the file (aleph-vm's form).
func checkASGIEntrypoint(cfg guest.Config) error {
	module, attr, ok := strings.Cut(cfg.Entrypoint, ":")
	if ok && module != "" && attr != "" {
		return nil
	}
	if !ok && cfg.Encoding == "plain" && pyIdentifier.MatchString(cfg.Entrypoint) {
		return nil
	}
	return fmt.Errorf("ASGI entrypoint %q is not module:attribute", cfg.Entrypoint)
}

var pyIdentifier = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// startError is the traceback the launcher left for a failed start, if any.
func startError(spec programSpec) string {
	b, err := os.ReadFile(filepath.Join(spec.dir, startErrorFile))
	if err != nil {
		return ""
	}
	return string(b)
}

func programCommand(cfg guest.Config, spec programSpec) (cmd *exec.Cmd, network, address string, err error) {
	switch cfg.Interface {
	case guest.InterfaceASGI:
		if err := checkASGIEntrypoint(cfg); err != nil {
			return nil, "", "", err
		}
		launcher, err := writeLauncher(spec)
		if err != nil {
			return nil, "", "", err
		}
		cmd = exec.Command(spec.python, launcher, cfg.Entrypoint, spec.socket, spec.codeDir)
		return cmd, "unix", spec.socket, nil
	case guest.InterfaceExecutable:
		argv, err := executableArgv(spec.codeDir, cfg.Entrypoint)
		if err != nil {
			return nil, "", "", err
		}
		cmd = exec.Command(argv[0], argv[1:]...)
		return cmd, "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(guest.ExecutablePort)), nil
	default:
		return nil, "", "", fmt.Errorf("unknown interface %q", cfg.Interface)
	}
}

// executableArgv resolves an executable entrypoint inside the code
// directory. Archives do not always keep the executable bit, so a script
// without it still runs through the interpreter its #! line names.
func executableArgv(codeDir, entrypoint string) ([]string, error) {
	if !filepath.IsLocal(entrypoint) {
		return nil, fmt.Errorf("entrypoint %q is not a path inside the code directory", entrypoint)
	}
	path := filepath.Join(codeDir, entrypoint)
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("entrypoint: %w", err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("entrypoint %q is not a regular file", entrypoint)
	}
	if st.Mode()&0o111 != 0 {
		return []string{path}, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("entrypoint: %w", err)
	}
	defer f.Close()
	line, _ := bufio.NewReader(io.LimitReader(f, 256)).ReadString('\n')
	interp, ok := strings.CutPrefix(strings.TrimSpace(line), "#!")
	if !ok || strings.TrimSpace(interp) == "" {
		return nil, fmt.Errorf("entrypoint %q is not executable and has no #! line", entrypoint)
	}
	// Like the kernel: the interpreter, then at most one argument.
	name, arg, _ := strings.Cut(strings.TrimSpace(interp), " ")
	argv := []string{name}
	if arg = strings.TrimSpace(arg); arg != "" {
		argv = append(argv, arg)
	}
	return append(argv, path), nil
}

// startProgram starts the program of cfg in its own process group, its
// output forwarded line by line to the agent's stderr.
func startProgram(cfg guest.Config, spec programSpec, r *reaper, log *slog.Logger) (*program, error) {
	if err := os.MkdirAll(filepath.Dir(spec.socket), 0o755); err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	cmd, network, address, err := programCommand(cfg, spec)
	if err != nil {
		return nil, err
	}
	if err := removeStaleSocket(network, address); err != nil {
		return nil, err
	}
	cmd.Dir = spec.codeDir
	cmd.Env = programEnv(cfg, spec, log)
	return launch(cmd, network, address, r, log)
}

// removeStaleSocket: a socket file left by an earlier run would look like
// readiness.
func removeStaleSocket(network, address string) error {
	if network != "unix" {
		return nil
	}
	if err := os.Remove(address); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale socket: %w", err)
	}
	return nil
}

// launch starts cmd in its own process group and follows it.
func launch(cmd *exec.Cmd, network, address string, r *reaper, log *slog.Logger) (*program, error) {
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Its own group, so stop reaches whatever it spawned.
		Setpgid: true,
		// Should the agent die, the program must not outlive it.
		Pdeathsig: syscall.SIGKILL,
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = outW, errW

	p := &program{
		log:     log,
		network: network,
		address: address,
		tail:    tailbuf.New(30, 1024),
		exited:  make(chan struct{}),
		pid1:    r != nil,
	}
	var reaped <-chan unix.WaitStatus
	if r != nil {
		reaped, err = r.start(cmd)
	} else {
		err = cmd.Start()
	}
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		return nil, fmt.Errorf("start program: %w", err)
	}
	p.pid = cmd.Process.Pid
	log.Info("program started", "pid", p.pid, "cmd", cmd.Args[0])

	p.output.Add(2)
	go p.forward(outR)
	go p.forward(errR)
	go func() {
		var desc string
		if reaped != nil {
			desc = describeWaitStatus(<-reaped)
			// The reaper already waited; Release only frees the handle.
			_ = cmd.Process.Release()
		} else {
			err := cmd.Wait()
			var exitErr *exec.ExitError
			switch {
			case err == nil:
				desc = "exit status 0"
			case errors.As(err, &exitErr):
				desc = exitErr.String()
			default:
				desc = err.Error()
			}
		}
		// Give the last lines (a traceback, usually) a moment to arrive,
		// but do not wait for descendants that inherited the pipes.
		drained := make(chan struct{})
		go func() { p.output.Wait(); close(drained) }()
		select {
		case <-drained:
		case <-time.After(time.Second):
		}
		p.exitDesc = desc
		close(p.exited)
	}()
	return p, nil
}

func describeWaitStatus(ws unix.WaitStatus) string {
	switch {
	case ws.Exited():
		return fmt.Sprintf("exit status %d", ws.ExitStatus())
	case ws.Signaled():
		return "killed by signal " + ws.Signal().String()
	default:
		return fmt.Sprintf("wait status %#x", uint32(ws))
	}
}

// forward copies one output pipe to the agent's stderr, a line per write
// so lines from both pipes and the agent's log never interleave mid-line.
func (p *program) forward(r *os.File) {
	defer p.output.Done()
	defer r.Close()
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			if line[len(line)-1] != '\n' {
				line = append(bytes.Clone(line), '\n')
			}
			os.Stderr.Write(line)
			p.tail.Add(line)
		}
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			return
		}
	}
}

// describeExit is the exit status and the last output lines, for the host.
func (p *program) describeExit() string {
	return withTail(p.exitDesc, p.tail)
}

func withTail(msg string, t *tailbuf.Buffer) string {
	if lines := t.String(); lines != "" {
		return msg + "\n" + lines
	}
	return msg
}

// waitReady waits until the program accepts connections, it exits, or the
// timeout passes.
func (p *program) waitReady(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	tick := time.NewTicker(25 * time.Millisecond)
	defer tick.Stop()
	for {
		c, err := d.DialContext(ctx, p.network, p.address)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-p.exited:
			return errors.New(withTail("program exited before it was ready: "+p.exitDesc, p.tail))
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return errors.New(withTail(fmt.Sprintf("program did not listen on %s within %s", p.address, timeout), p.tail))
			}
			return ctx.Err()
		case <-tick.C:
		}
	}
}

// dial connects to the program, retrying for a while when it is not
// listening: an executable may (re)bind its port after we saw it ready.
func (p *program) dial(ctx context.Context) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, p.network, p.address)
		if err == nil {
			return c, nil
		}
		if !isNotListening(err) {
			return nil, err
		}
		select {
		case <-p.exited:
			return nil, fmt.Errorf("program exited: %s", p.exitDesc)
		case <-ctx.Done():
			return nil, err
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// stop ends the program: SIGTERM to its group (uvicorn then runs the
// lifespan shutdown), SIGKILL after timeout, and as PID 1 SIGKILL to every
// other process so nothing a program spawned (even in another group)
// survives it. Safe to call more than once.
func (p *program) stop(timeout time.Duration) {
	p.stopOnce.Do(func() {
		if err := unix.Kill(-p.pid, unix.SIGTERM); err != nil && !errors.Is(err, unix.ESRCH) {
			p.log.Warn("SIGTERM program", "err", err)
		}
		select {
		case <-p.exited:
		case <-time.After(timeout):
			p.log.Warn("program did not stop in time; killing it", "timeout", timeout)
		}
		// ESRCH: the group already ended, as it should after SIGTERM.
		_ = unix.Kill(-p.pid, unix.SIGKILL)
		if p.pid1 {
			// kill(-1) from PID 1 spares only PID 1 itself; ESRCH again
			// when nothing else is left.
			_ = unix.Kill(-1, unix.SIGKILL)
		}
		select {
		case <-p.exited:
			p.log.Info("program stopped", "status", p.exitDesc)
		case <-time.After(5 * time.Second):
			p.log.Error("program still not reaped after SIGKILL")
		}
	})
}
