package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// benchFloor serves the same app with plain uvicorn inside a runsc sandbox
// with the supervisor's platform, overlay, and CPU and memory limits, but
// none of our relay: no agent, no yamux, no supervisor proxy. uvicorn
// listens on a unix socket in a host directory bind-mounted into the
// sandbox (runsc --host-uds=create lets the sandbox bind it), and the
// client connects to that socket directly. It is the floor our relay adds
// to.
func benchFloor(ctx context.Context, root string, behindProxy, behindSplice *figures) (figures, error) {
	var f figures
	dir, err := os.MkdirTemp("", "bench-floor-")
	if err != nil {
		return f, err
	}
	defer os.RemoveAll(dir)
	sockDir, bundle, state := filepath.Join(dir, "sock"), filepath.Join(dir, "bundle"), filepath.Join(dir, "runsc")
	for _, d := range []string{sockDir, bundle, state} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return f, err
		}
	}
	for _, d := range []string{"run/floor", "opt/code"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			return f, err
		}
	}
	sock := filepath.Join(sockDir, "app.sock")
	id := fmt.Sprintf("bench-floor-%d", os.Getpid())

	// As the supervisor's sandboxes for a program of default resources:
	// 128 MiB, one vCPU (CPU quota), the same namespaces.
	mem := int64(128 << 20)
	period, quota := uint64(100_000), int64(100_000)
	spec := &specs.Spec{
		Version: specs.Version,
		Process: &specs.Process{
			Args: []string{"python3", "-m", "uvicorn", "--app-dir", "/opt/code",
				"--uds", "/run/floor/app.sock", "--log-level", "warning", "main:app"},
			Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
				"HOME=/root", "LANG=C.UTF-8"},
			Cwd: "/",
		},
		Root:     &specs.Root{Path: root},
		Hostname: "floor",
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "mode=755"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"ro"}},
			{Destination: "/run/floor", Type: "bind", Source: sockDir, Options: []string{"rbind", "rw"}},
		},
		Linux: &specs.Linux{
			Resources: &specs.LinuxResources{
				Memory: &specs.LinuxMemory{Limit: &mem},
				CPU:    &specs.LinuxCPU{Quota: &quota, Period: &period},
			},
			CgroupsPath: "/aleph-vm-bench/" + id,
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace}, {Type: specs.NetworkNamespace}, {Type: specs.IPCNamespace},
				{Type: specs.UTSNamespace}, {Type: specs.MountNamespace},
			},
		},
	}
	b, _ := json.MarshalIndent(spec, "", "  ")
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), b, 0o600); err != nil {
		return f, err
	}

	runsc := filepath.Join(*binDir, "runsc")
	cmd := exec.Command(runsc, "--root", state, "--platform", *platform, "--network", "none",
		"--host-uds", "create", "--overlay2", "root:memory,size=64m",
		"run", "--bundle", bundle, id)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return f, err
	}
	defer func() {
		_ = exec.Command(runsc, "--root", state, "kill", id, "KILL").Run()
		_ = cmd.Wait()
		_ = exec.Command(runsc, "--root", state, "delete", "--force", id).Run()
	}()

	client := newClient(func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	})
	t0 := time.Now()
	if err := waitOKWith(ctx, client, "http://floor/", 120*time.Second); err != nil {
		return f, err
	}
	f.ColdStartMs = []float64{ms(time.Since(t0))}
	f.ColdMedianMs = f.ColdStartMs[0]
	fmt.Fprintf(os.Stderr, "   cold start: %.0f ms\n", f.ColdMedianMs)
	if err := measureWarm(ctx, client, "http://floor/", &f); err != nil {
		return f, err
	}
	fmt.Fprintln(os.Stderr, "== floor behind a bare Go reverse proxy")
	var err2 error
	if *behindProxy, err2 = measureBareProxy(ctx, sock, false); err2 != nil {
		return f, err2
	}
	fmt.Fprintln(os.Stderr, "== floor behind a byte splice")
	*behindSplice, err2 = measureBareProxy(ctx, sock, true)
	return f, err2
}

// newClient is the one client configuration every row uses; only how it
// dials differs (TCP for native and the supervisor, the floor's unix
// socket).
func newClient(dial func(ctx context.Context, network, addr string) (net.Conn, error)) *http.Client {
	t := &http.Transport{MaxIdleConnsPerHost: 16, DisableCompression: true}
	if dial != nil {
		t.DialContext = dial
	}
	return &http.Client{Timeout: 60 * time.Second, Transport: t}
}
