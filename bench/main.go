// Command bench measures the supervisor against a native baseline, side by
// side in one run: the same FastAPI app (a) through vm-supervisor and a
// gVisor sandbox, (b) run directly with uvicorn in a chroot of the same
// runtime image, no sandbox. It prints a table of ratios (b is the
// baseline) and writes the figures as JSON.
//
// Run as root through `make bench` (it needs the binaries and the runtime).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/network"
)

type figures struct {
	ColdStartMs   []float64 `json:"cold_start_ms"`
	ColdMedianMs  float64   `json:"cold_start_median_ms"`
	WarmP50Ms     float64   `json:"warm_p50_ms"`
	WarmP90Ms     float64   `json:"warm_p90_ms"`
	WarmP99Ms     float64   `json:"warm_p99_ms"`
	ThroughputRPS float64   `json:"throughput_rps_c8"`
	// WarmMs are the concurrency-1 latencies, for the chart.
	WarmMs []float64 `json:"warm_ms,omitempty"`
}

type result struct {
	Time    time.Time `json:"time"`
	Host    string    `json:"host"`
	Backend string    `json:"backend"`
	// Supervisor runs with PREWARM (a spare sandbox waits for the
	// program); NoSpare is the same with PREWARM=false, cold starts only,
	// each restoring the snapshot of a warm sandbox the first run left;
	// NoSnapshot has neither spares nor snapshots: every start is fresh.
	Supervisor figures `json:"supervisor"`
	NoSpare    figures `json:"supervisor_no_spare"`
	NoSnapshot figures `json:"supervisor_no_spare_no_snapshot"`
	// The same with environment.internet: each execution gets its own
	// namespace, veth, address and firewall chain.
	Internet        figures `json:"supervisor_internet"`
	InternetNoSpare figures `json:"supervisor_internet_no_spare"`
	// NetworkSetupMs is the host side of one execution's network (lease,
	// namespace, veth, addresses, route, nftables chain), allocate to
	// ready, measured in-process; NetworkReleaseMs its teardown.
	NetworkSetupMs   []float64 `json:"network_setup_ms"`
	NetworkSetupP50  float64   `json:"network_setup_p50_ms"`
	NetworkReleaseMs float64   `json:"network_release_p50_ms"`
	Native           figures   `json:"native"`
	// Floor is the same app under plain uvicorn in a runsc sandbox of the
	// same platform and limits, reached over a host unix socket: gVisor's
	// own cost, without our relay.
	Floor figures `json:"floor"`
	// FloorProxy is the floor behind a bare net/http reverse proxy in its
	// own process (bench/bareproxy.go): what one Go HTTP hop costs here.
	FloorProxy figures `json:"floor_bare_proxy"`
	// FloorSplice is the floor behind a process that only copies bytes
	// between a loopback TCP connection and the floor's socket: the least
	// any relay in a process of its own can cost.
	FloorSplice figures `json:"floor_splice"`
	// Spares: different programs back to back, and a cold start after
	// idling (bench/spares.go).
	Spares sparesFigures `json:"spares"`
	// Density: idle warm programs' memory (bench/density.go).
	Density densityFigures `json:"density"`
}

var (
	binDir   = flag.String("bin", envOr("ALEPH_TEST_BIN", "bin"), "directory with vm-supervisor and vm-agent")
	runtime  = flag.String("runtime", envOr("ALEPH_TEST_RUNTIME", "runtimes/aleph-debian-12-python/rootfs.squashfs"), "runtime squashfs")
	app      = flag.String("app", "examples/example_fastapi", "program directory (ASGI main:app)")
	colds    = flag.Int("cold", 3, "cold starts per side")
	warmN    = flag.Int("warm", 200, "sequential warm requests per side")
	tputTime = flag.Duration("throughput-time", 5*time.Second, "duration of the concurrency-8 run")
	outDir   = flag.String("out", "bench-results", "directory for the JSON result")
	platform = flag.String("platform", envOr("ALEPH_VM_RUNSC_PLATFORM", "systrap"), "runsc --platform of the floor and the supervisor")
	warmOnly = flag.Bool("warm-only", false, "only the warm rows (native, floor, supervisor with spare): quicker, for relay work")
	profile  = flag.Bool("profile", false, "start the supervisor with --profile and agents with ALEPH_VM_AGENT_PROFILE; keep the profiles in -out")
)

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func main() {
	flag.Parse()
	if *serveBareProxy != "" {
		if err := runBareProxy(*serveBareProxy); err != nil {
			fmt.Fprintln(os.Stderr, "bench: bare proxy:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(context.Background()); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context) error {
	if os.Geteuid() != 0 {
		return errors.New("run as root (sandboxes and chroot need it)")
	}
	res := result{Time: time.Now().UTC(), Backend: "gvisor"}
	res.Host, _ = os.Hostname()

	if *densityOnly {
		d, err := benchDensity(ctx, *densityN)
		if err != nil {
			return err
		}
		res.Density = d
		printTable(os.Stdout, res)
		return nil
	}
	if *sparesOnly {
		fmt.Fprintf(os.Stderr, "== spares: %d different programs back to back, then a cold start after %s idle\n", *backToBackN, *idleFor)
		spares, err := benchSpares(ctx)
		if err != nil {
			return err
		}
		res.Spares = spares
		printTable(os.Stdout, res)
		return nil
	}
	fmt.Fprintln(os.Stderr, "== native baseline: uvicorn in a chroot of the runtime")
	native, err := withRoot(func(root string) (figures, error) { return benchNative(ctx, root) })
	if err != nil {
		return fmt.Errorf("native: %w", err)
	}
	res.Native = native
	fmt.Fprintln(os.Stderr, "== floor: uvicorn in a runsc sandbox, reached over a host unix socket, no relay")
	floor, err := withRoot(func(root string) (figures, error) {
		return benchFloor(ctx, root, &res.FloorProxy, &res.FloorSplice)
	})
	if err != nil {
		return fmt.Errorf("floor: %w", err)
	}
	res.Floor = floor
	if err := benchSupervisors(ctx, &res); err != nil {
		return err
	}
	if !*warmOnly {
		fmt.Fprintf(os.Stderr, "== spares: %d different programs back to back, then a cold start after %s idle\n", *backToBackN, *idleFor)
		if res.Spares, err = benchSpares(ctx); err != nil {
			return fmt.Errorf("spares: %w", err)
		}
		if *densityN > 0 {
			fmt.Fprintf(os.Stderr, "== density: %d idle warm programs\n", *densityN)
			if res.Density, err = benchDensity(ctx, *densityN); err != nil {
				// The other rows are still worth their table.
				fmt.Fprintln(os.Stderr, "bench: density:", err)
			}
		}
		fmt.Fprintln(os.Stderr, "== host side of an execution's network, in-process")
		if err := benchNetworkSetup(ctx, &res); err != nil {
			return fmt.Errorf("network setup: %w", err)
		}
	}

	printTable(os.Stdout, res)
	if err := os.MkdirAll(*outDir, 0o755); err != nil {
		return err
	}
	path := filepath.Join(*outDir, "bench-"+res.Time.Format("20060102-150405")+".json")
	b, _ := json.MarshalIndent(res, "", "  ")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return err
	}
	fmt.Println("JSON:", path)
	chart := strings.TrimSuffix(path, ".json") + ".svg"
	var svgText strings.Builder
	if err := writeChart(&svgText, res); err != nil {
		return err
	}
	if err := os.WriteFile(chart, []byte(svgText.String()), 0o644); err != nil {
		return err
	}
	fmt.Println("chart:", chart)
	return nil
}

// benchSupervisors runs the supervisor rows, each in a supervisor of its
// own. The first run's spares leave a snapshot of a warm sandbox in a
// shared directory; the runs without spares restore it.
func benchSupervisors(ctx context.Context, res *result) error {
	snapshots, err := os.MkdirTemp("", "bench-snapshots-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(snapshots)
	runs := []struct {
		title             string
		prewarm, internet bool
		snapshots         string
		into              *figures
	}{
		{"supervisor: the same app through vm-supervisor (pre-warmed spare)", true, false, snapshots, &res.Supervisor},
		{"supervisor without spares (PREWARM=false), restoring a snapshot of a warm sandbox", false, false, snapshots, &res.NoSpare},
		{"supervisor without spares or snapshots (PREWARM=false, SNAPSHOT_CACHE_MAX_MIB=0)", false, false, "", &res.NoSnapshot},
		{"supervisor, program with internet (pre-warmed spare)", true, true, snapshots, &res.Internet},
		{"supervisor, program with internet, without spares, restoring a snapshot", false, true, snapshots, &res.InternetNoSpare},
	}
	if *warmOnly {
		runs = runs[:1]
	}
	for _, r := range runs {
		fmt.Fprintln(os.Stderr, "== "+r.title)
		f, err := benchSupervisor(ctx, r.prewarm, r.internet, r.snapshots)
		if err != nil {
			return fmt.Errorf("%s: %w", r.title, err)
		}
		*r.into = f
	}
	return nil
}

func printTable(w io.Writer, r result) {
	ratio := func(a, b float64) string {
		if a <= 0 || b <= 0 {
			return "n/a"
		}
		return fmt.Sprintf("%.2fx", a/b)
	}
	// Cold starts: the supervisor against native (the floor's cold start is
	// plain uvicorn in a fresh sandbox, without a spare).
	row := func(name string, sup, nat float64, unit string) {
		if sup <= 0 {
			return
		}
		fmt.Fprintf(w, "| %-28s | %12.1f %-4s | %12.1f %-4s | %8s |\n", name, sup, unit, nat, unit, ratio(sup, nat))
	}
	fmt.Fprintf(w, "\n| %-28s | %17s | %17s | %8s |\n", "cold start", "supervisor", "native (base)", "ratio")
	fmt.Fprintf(w, "|%s|%s|%s|%s|\n", strings.Repeat("-", 30), strings.Repeat("-", 19), strings.Repeat("-", 19), strings.Repeat("-", 10))
	row("cold start, spare (p50)", r.Supervisor.ColdMedianMs, r.Native.ColdMedianMs, "ms")
	row("no spare, snapshot (p50)", r.NoSpare.ColdMedianMs, r.Native.ColdMedianMs, "ms")
	row("no spare, no snapshot (p50)", r.NoSnapshot.ColdMedianMs, r.Native.ColdMedianMs, "ms")
	row("cold, internet, spare (p50)", r.Internet.ColdMedianMs, r.Native.ColdMedianMs, "ms")
	row("internet, no spare, snapshot", r.InternetNoSpare.ColdMedianMs, r.Native.ColdMedianMs, "ms")
	row("floor: uvicorn in runsc", r.Floor.ColdMedianMs, r.Native.ColdMedianMs, "ms")
	row("first burst, 5 programs (p50)", median0(r.Spares.FirstBurstMs), r.Native.ColdMedianMs, "ms")
	row("back-to-back programs (p50)", r.Spares.BackToBackMedianMs, r.Native.ColdMedianMs, "ms")
	row(fmt.Sprintf("spare after %.0f s idle", r.Spares.IdleSeconds), r.Spares.AfterIdleMs, r.Native.ColdMedianMs, "ms")

	// Warm: the three side by side; sup/floor is what our relay adds to
	// gVisor, sup/native what a user sees.
	warm := func(name string, sup, floor, nat float64, unit string) {
		fmt.Fprintf(w, "| %-24s | %9.2f %-4s | %9.2f %-4s | %9.2f %-4s | %9s | %9s |\n",
			name, sup, unit, floor, unit, nat, unit, ratio(sup, floor), ratio(sup, nat))
	}
	// Not in a -spares-only or -density-only run.
	if r.Supervisor.WarmP50Ms > 0 {
		fmt.Fprintf(w, "\n| %-24s | %14s | %14s | %14s | %9s | %9s |\n", "warm", "supervisor", "floor", "native", "sup/floor", "sup/nat")
		fmt.Fprintf(w, "|%s|%s|%s|%s|%s|%s|\n", strings.Repeat("-", 26), strings.Repeat("-", 16), strings.Repeat("-", 16), strings.Repeat("-", 16), strings.Repeat("-", 11), strings.Repeat("-", 11))
		warm("latency p50 (c=1)", r.Supervisor.WarmP50Ms, r.Floor.WarmP50Ms, r.Native.WarmP50Ms, "ms")
		warm("latency p90 (c=1)", r.Supervisor.WarmP90Ms, r.Floor.WarmP90Ms, r.Native.WarmP90Ms, "ms")
		warm("latency p99 (c=1)", r.Supervisor.WarmP99Ms, r.Floor.WarmP99Ms, r.Native.WarmP99Ms, "ms")
		warm("throughput (c=8)", r.Supervisor.ThroughputRPS, r.Floor.ThroughputRPS, r.Native.ThroughputRPS, "rq/s")
		if p := r.FloorProxy; p.WarmP50Ms > 0 {
			fmt.Fprintf(w, "\nfloor behind a bare Go reverse proxy (one net/http hop, no pool, no agent): p50 %.2f ms (%s floor), %.0f rq/s at c=8 (%s floor)\n",
				p.WarmP50Ms, ratio(p.WarmP50Ms, r.Floor.WarmP50Ms), p.ThroughputRPS, ratio(p.ThroughputRPS, r.Floor.ThroughputRPS))
		}
		if p := r.FloorSplice; p.WarmP50Ms > 0 {
			fmt.Fprintf(w, "floor behind a byte splice (TCP to unix socket, io.Copy both ways; the least any relay process costs): p50 %.2f ms (%s floor, %s native), %.0f rq/s at c=8 (%s floor)\n",
				p.WarmP50Ms, ratio(p.WarmP50Ms, r.Floor.WarmP50Ms), ratio(p.WarmP50Ms, r.Native.WarmP50Ms), p.ThroughputRPS, ratio(p.ThroughputRPS, r.Floor.ThroughputRPS))
		}
	}
	if d := r.Density; d.Programs > 0 {
		fmt.Fprintf(w, "\n| %-24s | %14s | %14s | %14s | %14s |\n", "density, idle programs", "cgroup / each", "RSS / each", "PSS / each", "fit in 24 GiB")
		fmt.Fprintf(w, "|%s|%s|%s|%s|%s|\n", strings.Repeat("-", 26), strings.Repeat("-", 16), strings.Repeat("-", 16), strings.Repeat("-", 16), strings.Repeat("-", 16))
		fmt.Fprintf(w, "| %-24s | %10.1f MiB | %10.1f MiB | %10.1f MiB | %14d |\n", fmt.Sprintf("%d warm, idle", d.Programs),
			d.CgroupMiB, d.RSSMiB, d.PSSMiB, d.FitIn24GiB)
	}
	fmt.Fprintln(w)
	if r.NetworkSetupP50 > 0 {
		fmt.Fprintf(w, "network's share of a cold start (p50): %.1f ms host-side set-up (release %.1f ms);\n",
			r.NetworkSetupP50, r.NetworkReleaseMs)
		fmt.Fprintf(w, "internet vs none, no spare (snapshot): %+.0f ms; with spare: %+.0f ms\n\n",
			r.InternetNoSpare.ColdMedianMs-r.NoSpare.ColdMedianMs, r.Internet.ColdMedianMs-r.Supervisor.ColdMedianMs)
	}
}

// --- native baseline -------------------------------------------------

// unmount undoes one of the baseline's mounts; a failure leaves a mount
// behind, which the operator should hear of.
func unmount(path string) {
	if err := syscall.Unmount(path, syscall.MNT_DETACH); err != nil {
		fmt.Fprintf(os.Stderr, "bench: unmount %s: %v\n", path, err)
	}
}

// withRoot runs fn with a private writable root of the runtime image (the
// squashfs under a host overlay) holding the app in /opt/code.
func withRoot(fn func(root string) (figures, error)) (figures, error) {
	var f figures
	dir, err := os.MkdirTemp("", "bench-root-")
	if err != nil {
		return f, err
	}
	defer os.RemoveAll(dir)
	lower, upper, work, root := filepath.Join(dir, "lower"), filepath.Join(dir, "upper"), filepath.Join(dir, "work"), filepath.Join(dir, "root")
	for _, d := range []string{lower, upper, work, root} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return f, err
		}
	}
	if out, err := exec.Command("mount", "-o", "loop,ro", "-t", "squashfs", *runtime, lower).CombinedOutput(); err != nil {
		return f, fmt.Errorf("mounting runtime: %v: %s", err, out)
	}
	defer unmount(lower)
	if err := syscall.Mount("overlay", root, "overlay", 0, "lowerdir="+lower+",upperdir="+upper+",workdir="+work); err != nil {
		return f, fmt.Errorf("overlay: %w", err)
	}
	defer unmount(root)
	if err := os.CopyFS(filepath.Join(root, "opt/code"), os.DirFS(*app)); err != nil {
		return f, err
	}
	return fn(root)
}

func benchNative(ctx context.Context, root string) (figures, error) {
	var f figures
	for _, m := range []string{"dev", "proc"} {
		_ = os.MkdirAll(filepath.Join(root, m), 0o755)
	}
	if err := syscall.Mount("/dev", filepath.Join(root, "dev"), "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
		return f, err
	}
	defer unmount(filepath.Join(root, "dev"))
	if err := syscall.Mount("proc", filepath.Join(root, "proc"), "proc", 0, ""); err != nil {
		return f, err
	}
	defer unmount(filepath.Join(root, "proc"))

	port := freePort()
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	start := func() (*exec.Cmd, error) {
		cmd := exec.Command("chroot", root, "python3", "-m", "uvicorn", "--app-dir", "/opt/code",
			"--host", "127.0.0.1", "--port", fmt.Sprint(port), "--log-level", "warning", "main:app")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		return cmd, cmd.Start()
	}
	stop := func(cmd *exec.Cmd) {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		_ = cmd.Wait()
	}
	for i := range *colds {
		t0 := time.Now()
		cmd, err := start()
		if err != nil {
			return f, err
		}
		if err := waitOK(ctx, base+"/", 60*time.Second); err != nil {
			stop(cmd)
			return f, err
		}
		f.ColdStartMs = append(f.ColdStartMs, ms(time.Since(t0)))
		fmt.Fprintf(os.Stderr, "   cold start %d: %.0f ms\n", i+1, f.ColdStartMs[i])
		if i < *colds-1 {
			stop(cmd)
			continue
		}
		err = measureWarm(ctx, httpClient, base+"/", &f)
		stop(cmd)
		if err != nil {
			return f, err
		}
	}
	f.ColdMedianMs = median(f.ColdStartMs)
	return f, nil
}

// --- through the supervisor -------------------------------------------

// benchSupervisor measures one supervisor run; snapshots, when set, is
// the directory its gVisor backend keeps snapshots of warm sandboxes in,
// shared between runs; empty turns snapshots off.
func benchSupervisor(ctx context.Context, prewarm, internet bool, snapshots string) (figures, error) {
	var f figures
	dir, err := os.MkdirTemp("", "bench-supervisor-")
	if err != nil {
		return f, err
	}
	defer os.RemoveAll(dir)
	port := freePort()
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	env := append(supervisorEnv(dir, port),
		"ALEPH_VM_REUSE_TIMEOUT=1",
		fmt.Sprintf("ALEPH_VM_PREWARM=%v", prewarm),
	)
	if snapshots == "" {
		env = append(env, "ALEPH_VM_SNAPSHOT_CACHE_MAX_MIB=0")
	} else {
		// The backend keeps them in CACHE_ROOT/snapshots.
		if err := os.MkdirAll(filepath.Join(dir, "cache"), 0o755); err != nil {
			return f, err
		}
		if err := os.Symlink(snapshots, filepath.Join(dir, "cache", "snapshots")); err != nil {
			return f, err
		}
	}
	sup := filepath.Join(*binDir, "vm-supervisor")
	cli := func(args ...string) (string, error) {
		cmd := exec.Command(sup, args...)
		cmd.Env = env
		cmd.Stderr = os.Stderr
		out, err := cmd.Output()
		return string(out), err
	}
	if _, err := cli("runtime", "add", *runtime, "--default"); err != nil {
		return f, fmt.Errorf("runtime add: %w", err)
	}
	upload := []string{"program", "upload", *app, "main:app"}
	if internet {
		upload = append(upload, "--internet")
	}
	out, err := cli(upload...)
	if err != nil {
		return f, fmt.Errorf("upload: %w", err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	hash := lines[len(lines)-1]
	url := base + "/vm/" + hash + "/"

	var args []string
	if *profile {
		// The supervisor's CPU profile, and one per agent (see
		// gvisor.Options.AgentProfileDir), kept beside the JSON.
		args = append(args, "--profile")
	}
	cmd := exec.Command(sup, args...)
	cmd.Env = env
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return f, err
	}
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
		if *profile {
			keepProfiles(filepath.Join(dir, "exec"), prewarm, internet)
		}
	}()
	if err := waitOK(ctx, base+"/about/usage/system", 30*time.Second); err != nil {
		return f, err
	}
	// A first, uncounted start fills the caches (code extraction, runtime
	// mount): cold start here means "program cached, nothing running".
	if err := waitOK(ctx, url, 120*time.Second); err != nil {
		return f, err
	}
	for i := range *colds {
		// Each start ends with a record once its sandbox has stopped after
		// REUSE_TIMEOUT; then give a new spare time to finish warming.
		if err := waitRecords(base, i+1, 60*time.Second); err != nil {
			return f, err
		}
		time.Sleep(3 * time.Second)
		t0 := time.Now()
		if err := waitOK(ctx, url, 120*time.Second); err != nil {
			return f, err
		}
		f.ColdStartMs = append(f.ColdStartMs, ms(time.Since(t0)))
		fmt.Fprintf(os.Stderr, "   cold start %d: %.0f ms\n", i+1, f.ColdStartMs[i])
	}
	if !prewarm || internet {
		f.ColdMedianMs = median(f.ColdStartMs)
		return f, nil
	}
	f.ColdMedianMs = median(f.ColdStartMs)
	if err := measureWarm(ctx, httpClient, url, &f); err != nil {
		return f, err
	}
	return f, nil
}

// keepProfiles copies the run's CPU profiles into the output directory.
func keepProfiles(execRoot string, prewarm, internet bool) {
	dest := filepath.Join(*outDir, fmt.Sprintf("profiles-spare=%v-internet=%v", prewarm, internet))
	_ = os.MkdirAll(dest, 0o755)
	_ = exec.Command("cp", "-r", filepath.Join(execRoot, "cpu.pprof"), filepath.Join(execRoot, "agent-profiles"), dest).Run()
	fmt.Fprintln(os.Stderr, "   profiles in", dest)
}

// waitRecords waits until the supervisor has recorded n finished
// executions.
func waitRecords(base string, n int, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		resp, err := httpClient.Get(base + "/about/executions/records")
		if err == nil {
			// aleph-vm's shape: a bare list of records.
			var recs []json.RawMessage
			err = json.NewDecoder(resp.Body).Decode(&recs)
			resp.Body.Close()
			if err == nil && len(recs) >= n {
				return nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("execution %d did not stop after REUSE_TIMEOUT", n)
}

// --- shared measurement -----------------------------------------------

// httpClient reaches native and the supervisor over TCP.
var httpClient = newClient(nil)

func get(c *http.Client, url string) error {
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != 200 {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}

func waitOK(ctx context.Context, url string, limit time.Duration) error {
	return waitOKWith(ctx, httpClient, url, limit)
}

func waitOKWith(ctx context.Context, c *http.Client, url string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		err := get(c, url)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("no answer from %s: %w", url, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// measureWarm fills warm latency (concurrency 1) and throughput
// (concurrency 8); the keep-alive keeps the execution warm throughout.
func measureWarm(ctx context.Context, c *http.Client, url string, f *figures) error {
	// Warm is the steady state: after the last cold start took the spare,
	// a new one imports Python for a second or two.
	if err := get(c, url); err != nil {
		return err
	}
	waitQuiet(20*time.Second, func() { _ = get(c, url) })
	for range 20 { // settle: JIT-free Python, but caches and connections warm up
		if err := get(c, url); err != nil {
			return err
		}
	}
	lat := make([]float64, 0, *warmN)
	for range *warmN {
		t0 := time.Now()
		if err := get(c, url); err != nil {
			return err
		}
		lat = append(lat, ms(time.Since(t0)))
	}
	sort.Float64s(lat)
	f.WarmP50Ms = lat[len(lat)/2]
	f.WarmP90Ms = lat[len(lat)*9/10]
	f.WarmP99Ms = lat[len(lat)*99/100]
	f.WarmMs = lat

	var count atomic.Int64
	var firstErr atomic.Value
	deadline := time.Now().Add(*tputTime)
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				if err := get(c, url); err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
				count.Add(1)
			}
		}()
	}
	wg.Wait()
	if err, _ := firstErr.Load().(error); err != nil {
		return err
	}
	f.ThroughputRPS = float64(count.Load()) / tputTime.Seconds()
	fmt.Fprintf(os.Stderr, "   warm p50 %.2f ms, p90 %.2f ms, p99 %.2f ms, %.0f req/s at c=8\n", f.WarmP50Ms, f.WarmP90Ms, f.WarmP99Ms, f.ThroughputRPS)
	return nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// median0 is median, or 0 without samples.
func median0(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	return median(v)
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

func freePort() int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// benchNetworkSetup times the host side of execution networks with the
// same code the supervisor runs, under names of its own so that it never
// meets a running supervisor's.
func benchNetworkSetup(ctx context.Context, res *result) error {
	leases, err := os.MkdirTemp("", "bench-leases-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(leases)
	m, err := network.New(network.Options{
		Pool:       netip.MustParsePrefix("10.214.0.0/16"),
		PrefixLen:  24,
		Outbound:   "lo",
		LeaseDir:   leases,
		Table:      "aleph_vm_bench",
		LinkPrefix: "bvm",
	})
	if err != nil {
		return err
	}
	if err := m.Setup(ctx); err != nil {
		return err
	}
	defer m.Close()
	var release []float64
	for i := range 30 {
		t0 := time.Now()
		n, err := m.Allocate(ctx, fmt.Sprintf("bench-%d", i), network.Link{Kind: backend.LinkNamespace})
		if err != nil {
			return err
		}
		res.NetworkSetupMs = append(res.NetworkSetupMs, ms(time.Since(t0)))
		t1 := time.Now()
		if err := m.Release(n); err != nil {
			return err
		}
		release = append(release, ms(time.Since(t1)))
	}
	res.NetworkSetupP50 = median(res.NetworkSetupMs)
	res.NetworkReleaseMs = median(release)
	fmt.Fprintf(os.Stderr, "   set-up p50 %.2f ms, release p50 %.2f ms\n", res.NetworkSetupP50, res.NetworkReleaseMs)
	return nil
}
