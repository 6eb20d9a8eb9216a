package pool

import (
	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/metrics"
)

// stateNames are the executions gauge's states (metrics.ExecutionStates).
var stateNames = map[state]string{stateBooting: "booting", stateRunning: "running", stateStopping: "stopping"}

// metricsSnapshot is the pool's state for a scrape. Sandbox figures are
// node-wide sums: per-execution series would be labelled by program
// hash, and their number would grow with every program the node ever ran.
func (p *Pool) metricsSnapshot() metrics.Snapshot {
	s := metrics.Snapshot{Executions: map[string]int{}}
	var execs, spares []backend.Instance
	p.mu.Lock()
	for e := range p.all {
		e.mu.Lock()
		if name, ok := stateNames[e.state]; ok {
			s.Executions[name]++
		}
		// e.instance is written by the start before it sets started under
		// e.mu: once started is seen, reading it is safe.
		if !e.started.IsZero() && e.instance != nil {
			execs = append(execs, e.instance)
		}
		e.mu.Unlock()
	}
	for _, st := range p.shapes {
		for _, sp := range st.idle {
			spares = append(spares, sp.inst)
		}
	}
	// Read with the list, so an execution is counted either here or in
	// cpuDone, never both.
	cpu := p.cpuDone
	p.mu.Unlock()

	// Usage reads /proc or the cgroup: outside the pool's lock.
	for _, inst := range execs {
		u := inst.Usage()
		s.ExecutionMemoryBytes += u.MemoryBytes
		cpu += (u.CPUTimeUser + u.CPUTimeSystem).Seconds()
	}
	for _, inst := range spares {
		s.SpareMemoryBytes += inst.Usage().MemoryBytes
	}
	s.CPUSeconds = cpu
	return s
}
