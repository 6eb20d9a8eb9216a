package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

var (
	backToBackN = flag.Int("back-to-back", 5, "different programs started back to back, per round")
	idleFor     = flag.Duration("idle", 60*time.Second, "idle time before the cold start measured after idling")
	densityN    = flag.Int("density", 50, "idle warm programs for the density row (0: skip)")
	densityOnly = flag.Bool("density-only", false, "only the density row")
	sparesOnly  = flag.Bool("spares-only", false, "only the back-to-back and after-idle rows")
	verbose     = flag.Bool("v", false, "the supervisors log at info level (which spare served which start)")
)

// sparesFigures are the cold starts of many different programs of one
// shape, which a single spare cannot serve.
type sparesFigures struct {
	// FirstBurstMs: the first back-to-back round, before the shape had
	// any demand but the default spare.
	FirstBurstMs []float64 `json:"first_burst_ms"`
	// BackToBackMs: the next round, the spares sized from the first.
	BackToBackMs       []float64 `json:"back_to_back_ms"`
	BackToBackMedianMs float64   `json:"back_to_back_median_ms"`
	// AfterIdleMs: one cold start after IdleSeconds without requests.
	AfterIdleMs float64 `json:"cold_after_idle_ms"`
	IdleSeconds float64 `json:"idle_seconds"`
}

// supervisorEnv is what every bench supervisor runs with: its own
// directories and port, gVisor on the bench's platform, and an Aleph API
// that is not there (programs come from the local store), so nothing
// watches its message stream.
func supervisorEnv(dir string, port int) []string {
	return append(os.Environ(),
		"ALEPH_VM_EXECUTION_ROOT="+filepath.Join(dir, "exec"),
		"ALEPH_VM_CACHE_ROOT="+filepath.Join(dir, "cache"),
		fmt.Sprintf("ALEPH_VM_SUPERVISOR_PORT=%d", port),
		"ALEPH_VM_HYPERVISOR=gvisor",
		"ALEPH_VM_API_SERVER=http://127.0.0.1:9",
		"ALEPH_VM_WATCH_FOR_MESSAGES=false",
		"ALEPH_VM_WATCH_FOR_UPDATES=false",
		"ALEPH_VM_RUNSC_PLATFORM="+*platform,
	)
}

// supervisor is one vm-supervisor run of the bench, in a directory of its
// own, with the runtime added as default.
type supervisor struct {
	dir, base string
	env       []string
	cmd       *exec.Cmd
}

func newSupervisor(extraEnv ...string) (*supervisor, error) {
	dir, err := os.MkdirTemp("", "bench-supervisor-")
	if err != nil {
		return nil, err
	}
	port := freePort()
	s := &supervisor{dir: dir, base: fmt.Sprintf("http://127.0.0.1:%d", port)}
	s.env = append(supervisorEnv(dir, port), extraEnv...)
	if _, err := s.cli("runtime", "add", *runtime, "--default"); err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("runtime add: %w", err)
	}
	return s, nil
}

func (s *supervisor) cli(args ...string) (string, error) {
	cmd := exec.Command(filepath.Join(*binDir, "vm-supervisor"), args...)
	cmd.Env = s.env
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	return string(out), err
}

// uploadVariants uploads n copies of the app that differ by a comment,
// so that each is a program of its own (its own hash and code).
func (s *supervisor) uploadVariants(prefix string, n int) ([]string, error) {
	var hashes []string
	for i := range n {
		dir := filepath.Join(s.dir, "variants", fmt.Sprintf("%s-%d", prefix, i))
		if err := os.CopyFS(dir, os.DirFS(*app)); err != nil {
			return nil, err
		}
		f, err := os.OpenFile(filepath.Join(dir, "main.py"), os.O_APPEND|os.O_WRONLY, 0)
		if err != nil {
			return nil, err
		}
		_, err = fmt.Fprintf(f, "\n# bench variant %s-%d\n", prefix, i)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, err
		}
		out, err := s.cli("program", "upload", dir, "main:app")
		if err != nil {
			return nil, fmt.Errorf("upload: %w", err)
		}
		lines := strings.Split(strings.TrimSpace(out), "\n")
		hashes = append(hashes, lines[len(lines)-1])
	}
	return hashes, nil
}

func (s *supervisor) start(ctx context.Context) error {
	var args []string
	if *verbose {
		args = append(args, "-v")
	}
	s.cmd = exec.Command(filepath.Join(*binDir, "vm-supervisor"), args...)
	s.cmd.Env = s.env
	s.cmd.Stderr = os.Stderr
	if err := s.cmd.Start(); err != nil {
		return err
	}
	return waitOK(ctx, s.base+"/about/usage/system", 30*time.Second)
}

func (s *supervisor) stop() {
	if s.cmd != nil && s.cmd.Process != nil {
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		_ = s.cmd.Wait()
	}
	_ = os.RemoveAll(s.dir)
}

// coldStart times the first request of a program that is not running.
func (s *supervisor) coldStart(ctx context.Context, hash string) (float64, error) {
	t0 := time.Now()
	if err := waitOK(ctx, s.base+"/vm/"+hash+"/", 120*time.Second); err != nil {
		return 0, err
	}
	return ms(time.Since(t0)), nil
}

// benchSpares measures back-to-back cold starts of different programs and
// a cold start after idling, with spares on.
func benchSpares(ctx context.Context) (sparesFigures, error) {
	var f sparesFigures
	s, err := newSupervisor("ALEPH_VM_PREWARM=true", "ALEPH_VM_REUSE_TIMEOUT=2")
	if err != nil {
		return f, err
	}
	defer s.stop()
	hashes, err := s.uploadVariants("b2b", 2*(*backToBackN)+2)
	if err != nil {
		return f, err
	}
	if err := s.start(ctx); err != nil {
		return f, err
	}
	// The first program fills the caches (runtime mount, code extraction
	// paths); then the default spare has time to be ready.
	if _, err := s.coldStart(ctx, hashes[0]); err != nil {
		return f, err
	}
	time.Sleep(5 * time.Second)
	round := func(name string, hs []string) ([]float64, error) {
		var out []float64
		for i, h := range hs {
			d, err := s.coldStart(ctx, h)
			if err != nil {
				return nil, err
			}
			out = append(out, d)
			fmt.Fprintf(os.Stderr, "   %s %d: %.0f ms\n", name, i+1, d)
		}
		return out, nil
	}
	n := *backToBackN
	if f.FirstBurstMs, err = round("first burst, cold start", hashes[1:1+n]); err != nil {
		return f, err
	}
	// The spares the burst's demand asks for are made, a few at a time.
	time.Sleep(time.Duration(n)*1500*time.Millisecond + 3*time.Second)
	if f.BackToBackMs, err = round("back-to-back cold start", hashes[1+n:1+2*n]); err != nil {
		return f, err
	}
	f.BackToBackMedianMs = median(f.BackToBackMs)
	fmt.Fprintf(os.Stderr, "   idle for %s\n", *idleFor)
	select {
	case <-time.After(*idleFor):
	case <-ctx.Done():
		return f, ctx.Err()
	}
	if f.AfterIdleMs, err = s.coldStart(ctx, hashes[len(hashes)-1]); err != nil {
		return f, err
	}
	f.IdleSeconds = idleFor.Seconds()
	fmt.Fprintf(os.Stderr, "   cold start after %s idle: %.0f ms\n", *idleFor, f.AfterIdleMs)
	return f, nil
}

// errNoSandboxes: the density run found nothing to measure.
var errNoSandboxes = errors.New("no sandbox found to measure")
