package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// preloaded is a Python interpreter started before the Config arrives: it
// imports uvicorn and FastAPI while the host is still sending the Config,
// then waits on its stdin for the program to run. Under gVisor's ptrace
// platform those imports are most of a cold start.
type preloaded struct {
	prog  *program
	stdin io.WriteCloser
	// warm is closed once the launcher's imports are done, or it ended
	// before saying so.
	warm chan struct{}
}

// startPreload starts the launcher in preload mode, with no program yet and
// only a base environment: the program's own comes with the Config.
func startPreload(spec programSpec, r *reaper, log *slog.Logger) (*preloaded, error) {
	if err := os.MkdirAll(filepath.Dir(spec.socket), 0o755); err != nil {
		return nil, fmt.Errorf("socket directory: %w", err)
	}
	launcher, err := writeLauncher(spec)
	if err != nil {
		return nil, err
	}
	if err := removeStaleSocket("unix", spec.socket); err != nil {
		return nil, err
	}
	cmd := exec.Command(spec.python, launcher, "--preload", spec.socket, spec.codeDir)
	cmd.Dir = "/"
	// PYTHONPATH as the program will have it: it acts at start-up only.
	cmd.Env = []string{"PATH=" + basePath, "HOME=/root", "LANG=C.UTF-8", "PYTHONUNBUFFERED=1", "PYTHONPATH=" + alephLibs,
		"ALEPH_AGENT_WARM_FD=3"}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	warmR, warmW, err := os.Pipe()
	if err != nil {
		stdin.Close()
		return nil, err
	}
	cmd.ExtraFiles = []*os.File{warmW} // fd 3
	prog, err := launch(cmd, "unix", spec.socket, r, log.With("preload", true))
	warmW.Close()
	if err != nil {
		warmR.Close()
		stdin.Close()
		return nil, err
	}
	p := &preloaded{prog: prog, stdin: stdin, warm: make(chan struct{})}
	go func() {
		// One byte when the imports are done; EOF if the launcher ended
		// first. Either way it no longer warms up.
		_, _ = warmR.Read(make([]byte, 1))
		warmR.Close()
		close(p.warm)
	}()
	return p, nil
}

// preloadJob is what the launcher reads on its stdin.
type preloadJob struct {
	Entrypoint string            `json:"entrypoint"`
	Env        map[string]string `json:"env"`
}

// adopt hands the Config's ASGI program to the preloaded interpreter and
// returns it as the program. It returns nil when the interpreter cannot
// serve this Config (an executable, or it already died); the caller then
// discards it and starts the program the ordinary way.
func (p *preloaded) adopt(cfg guest.Config, spec programSpec, log *slog.Logger) (*program, error) {
	if cfg.Interface != guest.InterfaceASGI {
		return nil, nil
	}
	select {
	case <-p.prog.exited:
		log.Warn("preloaded interpreter died; starting the program afresh", "status", p.prog.describeExit())
		return nil, nil
	default:
	}
	// PYTHON* variables act when the interpreter starts; a program that sets
	// them gets an interpreter of its own.
	for k := range cfg.Variables {
		if strings.HasPrefix(k, "PYTHON") {
			log.Info("program sets " + k + ": not using the preloaded interpreter")
			return nil, nil
		}
	}
	if err := checkASGIEntrypoint(cfg); err != nil {
		return nil, err
	}
	env := map[string]string{}
	for _, kv := range programEnv(cfg, spec, log) {
		k, v, _ := strings.Cut(kv, "=")
		env[k] = v
	}
	line, err := json.Marshal(preloadJob{Entrypoint: cfg.Entrypoint, Env: env})
	if err != nil {
		return nil, err
	}
	if _, err := p.stdin.Write(append(line, '\n')); err != nil {
		if errors.Is(err, os.ErrClosed) {
			return nil, nil
		}
		log.Warn("preloaded interpreter did not take the program; starting it afresh", "err", err)
		return nil, nil
	}
	p.stdin.Close()
	return p.prog, nil
}
