package httpapi

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/metrics"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool/pooltest"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

// scrape GETs /metrics on the node's host and parses it with
// Prometheus's own text parser.
func scrape(t *testing.T, l *live) map[string]*dto.MetricFamily {
	t.Helper()
	a := l.do(t, "GET", "/metrics", nil)
	if a.code != 200 || !strings.HasPrefix(a.header.Get("Content-Type"), "text/plain") {
		t.Fatalf("/metrics: %d %q %q", a.code, a.header.Get("Content-Type"), a.body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(a.body))
	if err != nil {
		t.Fatalf("/metrics does not parse: %v\n%s", err, a.body)
	}
	return fams
}

// sample finds the series of family name whose labels include labels
// (name=value pairs) and returns its value: a counter's or gauge's
// value, a histogram's count.
func sample(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	t.Helper()
	fam := fams[name]
	if fam == nil {
		t.Fatalf("no metric %s", name)
	}
next:
	for _, m := range fam.GetMetric() {
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, lp := range m.GetLabel() {
				if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch fam.GetType() {
		case dto.MetricType_COUNTER:
			return m.GetCounter().GetValue()
		case dto.MetricType_GAUGE:
			return m.GetGauge().GetValue()
		case dto.MetricType_HISTOGRAM:
			return float64(m.GetHistogram().GetSampleCount())
		}
		t.Fatalf("%s: unexpected type %v", name, fam.GetType())
	}
	return 0 // a label value not seen yet: no series
}

// /metrics parses with Prometheus's text parser and its counters move
// with traffic: spare hits and misses, cold starts by source, request
// latencies by outcome, errors by kind, executions by state, and the
// sandboxes' memory and CPU.
func TestMetricsMoveWithTraffic(t *testing.T) {
	st := pooltest.NewStore(t)
	m := metrics.New()
	fails := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(500) })
	big := store.UploadOptions{MemoryMiB: 256} // does not fit the spares
	l := startLiveOn(t, st, map[string]program{
		"a":   {},
		"big": {upload: big},
		// Another shape than big, so that no spare learnt from big fits it.
		"fail": {upload: store.UploadOptions{MemoryMiB: 512}, agent: pooltest.Agent{Handler: fails}},
	}, func(o *pool.Options) {
		o.SpareRuntime, o.Metrics = st.SpareRuntime, m
	}, func(o *Options) { o.Metrics = m })
	// The spare reports memory once it is the pool's idle spare.
	var spare *pooltest.Sandbox
	waitFor(t, "a spare sandbox", func() bool {
		for _, s := range l.b.Sandboxes() {
			if s.Spec.DeferCode {
				spare = s
				return true
			}
		}
		return false
	})
	spare.SetUsage(backend.Usage{MemoryBytes: 1 << 20})
	waitFor(t, "the spare's memory in /metrics", func() bool {
		return sample(t, scrape(t, l), "aleph_vm_sandbox_memory_bytes", "kind", "spare") == 1<<20
	})

	before := scrape(t, l)
	for _, name := range []string{"aleph_vm_spare_hits_total", "aleph_vm_spare_misses_total", "aleph_vm_sandbox_cpu_seconds_total"} {
		if v := sample(t, before, name); v != 0 {
			t.Errorf("%s = %v before any traffic", name, v)
		}
	}
	for _, name := range []string{"go_goroutines", "process_start_time_seconds", "aleph_vm_executions", "aleph_vm_sandbox_memory_bytes"} {
		if before[name] == nil {
			t.Errorf("no %s", name)
		}
	}

	for _, c := range []struct {
		path string
		code int
	}{
		{"/vm/" + l.hashes["a"] + "/", 200}, // cold, in the spare
		{"/vm/" + l.hashes["a"] + "/", 200}, // warm
		{"/vm/" + l.hashes["big"] + "/", 200},
		{"/vm/" + l.hashes["fail"] + "/", 500},
		{"/vm/" + strings.Repeat("0", 64) + "/", 404},
	} {
		if a := l.do(t, "GET", c.path, nil); a.code != c.code {
			t.Fatalf("GET %s: %d %q, want %d", c.path, a.code, a.body, c.code)
		}
	}
	// A program's own /metrics, on its host, is the program's.
	req, _ := http.NewRequest("GET", l.url+"/metrics", nil)
	req.Host = message.Base32Label(l.hashes["a"]) + ".node.example"
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.Header.Get("Aleph-Program-ItemHash") != l.hashes["a"] {
		t.Errorf("a program host's /metrics did not reach the program: %v", err)
	} else {
		resp.Body.Close()
	}
	for _, s := range l.b.Sandboxes() {
		if s.Config().ProgramHash == l.hashes["a"] {
			s.SetUsage(backend.Usage{MemoryBytes: 100 << 20, CPUTimeUser: time.Second, CPUTimeSystem: 500 * time.Millisecond})
		}
	}

	after := scrape(t, l)
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"aleph_vm_spare_hits_total", nil, 1},
		{"aleph_vm_spare_misses_total", nil, 2},
		{"aleph_vm_cold_start_seconds", []string{"source", "spare"}, 1},
		{"aleph_vm_cold_start_seconds", []string{"source", "fresh"}, 2},
		{"aleph_vm_request_duration_seconds", []string{"outcome", "2xx"}, 4}, // the program host's included
		{"aleph_vm_request_duration_seconds", []string{"outcome", "5xx"}, 1},
		{"aleph_vm_request_duration_seconds", []string{"outcome", "4xx"}, 1},
		{"aleph_vm_errors_total", []string{"kind", "not_found"}, 1},
		{"aleph_vm_executions", []string{"state", "running"}, 3},
		{"aleph_vm_executions", []string{"state", "booting"}, 0},
		{"aleph_vm_sandbox_memory_bytes", []string{"kind", "execution"}, 100 << 20},
		{"aleph_vm_sandbox_cpu_seconds_total", nil, 1.5},
	} {
		if got := sample(t, after, c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}

	// An execution that ends keeps its CPU time in the counter.
	if err := l.pool.Stop(context.Background(), l.hashes["a"]); err != nil {
		t.Fatal(err)
	}
	stopped := scrape(t, l)
	if got := sample(t, stopped, "aleph_vm_sandbox_cpu_seconds_total"); got != 1.5 {
		t.Errorf("CPU seconds after the execution stopped = %v, want 1.5", got)
	}
	if got := sample(t, stopped, "aleph_vm_executions", "state", "running"); got != 2 {
		t.Errorf("running executions after a stop = %v, want 2", got)
	}
	if got := sample(t, stopped, "aleph_vm_sandbox_memory_bytes", "kind", "execution"); got != 0 {
		t.Errorf("execution memory after the stop = %v, want 0", got)
	}
}

// Without metrics there is no /metrics route: the node's host answers 404.
func TestNoMetricsRouteWithoutMetrics(t *testing.T) {
	l := startLive(t, map[string]program{}, nil)
	if a := l.do(t, "GET", "/metrics", nil); a.code != 404 {
		t.Errorf("/metrics without metrics: %d %q", a.code, a.body)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
