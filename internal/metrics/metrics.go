// Package metrics holds the supervisor's Prometheus metrics: their
// definitions, a registry of their own (never the global default, so
// tests and libraries cannot add to it), and the /metrics handler. The
// pool and the HTTP server record into a *Metrics; every method is safe on
// a nil *Metrics, so code built without metrics records nothing.
//
// Labels are bounded on purpose: states, spare/fresh, status classes and
// error kinds, never program hashes or execution ids, so a node's series
// count does not grow with the programs it has run.
package metrics

import (
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

const namespace = "aleph_vm"

// Snapshot is the pool's state at scrape time.
type Snapshot struct {
	// Executions counts executions by state ("booting", "running",
	// "stopping"): every sandbox the node has committed to, spares apart.
	Executions map[string]int
	// ExecutionMemoryBytes and SpareMemoryBytes sum the memory the
	// sandboxes of executions and of idle spares hold now.
	ExecutionMemoryBytes uint64
	SpareMemoryBytes     uint64
	// CPUSeconds is the CPU time executions have used, those that ended
	// included: it only grows.
	CPUSeconds float64
}

// ExecutionStates are the values of the executions gauge's state label,
// always all present so a state at zero still has a series.
var ExecutionStates = []string{"booting", "running", "stopping"}

// Metrics is safe for concurrent use; a nil *Metrics records nothing.
type Metrics struct {
	reg *prometheus.Registry

	coldStart   *prometheus.HistogramVec
	requests    *prometheus.HistogramVec
	errors      *prometheus.CounterVec
	spareHits   prometheus.Counter
	spareMisses prometheus.Counter
	msgDrops    prometheus.Counter

	mu       sync.Mutex
	snapshot func() Snapshot
}

// New makes the metrics and their registry, with the Go runtime's and
// this process's collectors.
func New() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		coldStart: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "cold_start_seconds",
			Help: "Time from a program's first request to its sandbox serving, by whether a pre-warmed spare was used (source=spare) or a fresh sandbox started (source=fresh).",
			// From a spare under gVisor (~0.15 s) to QEMU under emulation (~35 s).
			Buckets: []float64{0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 40, 60},
		}, []string{"source"}),
		requests: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "request_duration_seconds",
			Help:    "Latency of requests to programs (/vm/{ref} and program hosts), cold starts included, by status class of the answer (outcome=2xx...5xx). Websocket sessions are not counted.",
			Buckets: []float64{0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"outcome"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "errors_total",
			Help: "Errors answered to clients, by kind (internal/errkind names; body_too_slow for 408).",
		}, []string{"kind"}),
		spareHits: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "spare_hits_total",
			Help: "Cold starts that adopted a pre-warmed spare sandbox.",
		}),
		spareMisses: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "spare_misses_total",
			Help: "Cold starts that started a fresh sandbox while spares are enabled (no spare ready, the program did not fit one, or adopting it failed).",
		}),
		msgDrops: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "message_deliveries_dropped_total",
			Help: "on.message deliveries dropped because the program's queue (MESSAGE_QUEUE_SIZE) or the node's was full.",
		}),
	}
	m.reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.coldStart, m.requests, m.errors, m.spareHits, m.spareMisses, m.msgDrops,
		&poolCollector{m: m},
	)
	return m
}

// Handler serves the registry in Prometheus's exposition formats.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// Registry is what Handler serves, for tests that gather directly.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// ObservePool sets where scrapes read the pool's state from.
func (m *Metrics) ObservePool(snapshot func() Snapshot) {
	if m == nil {
		return
	}
	m.mu.Lock()
	m.snapshot = snapshot
	m.mu.Unlock()
}

// ColdStart records a successful start of a program's sandbox.
func (m *Metrics) ColdStart(fromSpare bool, d time.Duration) {
	if m == nil {
		return
	}
	source := "fresh"
	if fromSpare {
		source = "spare"
	}
	m.coldStart.WithLabelValues(source).Observe(d.Seconds())
}

// SpareHit counts a cold start served by a spare.
func (m *Metrics) SpareHit() {
	if m != nil {
		m.spareHits.Inc()
	}
}

// SpareMiss counts a cold start that had to start a fresh sandbox while
// spares are enabled.
func (m *Metrics) SpareMiss() {
	if m != nil {
		m.spareMisses.Inc()
	}
}

// MessageDeliveryDropped counts one on.message delivery dropped for a
// full queue.
func (m *Metrics) MessageDeliveryDropped() {
	if m != nil {
		m.msgDrops.Inc()
	}
}

// Request records one answered request to a program.
func (m *Metrics) Request(status int, d time.Duration) {
	if m == nil {
		return
	}
	m.requests.WithLabelValues(StatusClass(status)).Observe(d.Seconds())
}

// Error counts one error answered to a client.
func (m *Metrics) Error(kind string) {
	if m != nil {
		m.errors.WithLabelValues(kind).Inc()
	}
}

// StatusClass is "2xx" for 200 to 299, and so on.
func StatusClass(status int) string {
	if status < 100 || status > 599 {
		return "other"
	}
	return strconv.Itoa(status/100) + "xx"
}

// poolCollector reads the pool when scraped, so that gauges are never
// stale and the pool keeps no metric state of its own.
type poolCollector struct{ m *Metrics }

var (
	executionsDesc = prometheus.NewDesc(namespace+"_executions",
		"Executions by state (booting: admitted and starting; running: serving; stopping: draining and tearing down).",
		[]string{"state"}, nil)
	memoryDesc = prometheus.NewDesc(namespace+"_sandbox_memory_bytes",
		"Memory held now by sandboxes, summed over the node, for executions (kind=execution) and idle pre-warmed spares (kind=spare): the cgroup's working set under gVisor, the VMM's resident memory for VMs.",
		[]string{"kind"}, nil)
	cpuDesc = prometheus.NewDesc(namespace+"_sandbox_cpu_seconds_total",
		"CPU time used by the sandboxes of executions, those that ended included (host processes: gVisor's Sentry and gofer, or the VMM).",
		nil, nil)
)

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- executionsDesc
	ch <- memoryDesc
	ch <- cpuDesc
}

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	c.m.mu.Lock()
	snapshot := c.m.snapshot
	c.m.mu.Unlock()
	var s Snapshot
	if snapshot != nil {
		s = snapshot()
	}
	for _, state := range ExecutionStates {
		ch <- prometheus.MustNewConstMetric(executionsDesc, prometheus.GaugeValue, float64(s.Executions[state]), state)
	}
	ch <- prometheus.MustNewConstMetric(memoryDesc, prometheus.GaugeValue, float64(s.ExecutionMemoryBytes), "execution")
	ch <- prometheus.MustNewConstMetric(memoryDesc, prometheus.GaugeValue, float64(s.SpareMemoryBytes), "spare")
	ch <- prometheus.MustNewConstMetric(cpuDesc, prometheus.CounterValue, s.CPUSeconds)
}
