package main

import (
	"log/slog"
	"path/filepath"

	"github.com/aleph-vm-go/vm-supervisor/internal/allocations"
	"github.com/aleph-vm-go/vm-supervisor/internal/config"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
)

// startAllocations brings back the allocation saved by an earlier run:
// its programs start in the background while the service comes up.
func startAllocations(s *config.Settings, p *pool.Pool, log *slog.Logger) *allocations.Manager {
	m := allocations.New(allocations.Options{
		Pool: p, StatePath: filepath.Join(s.ExecutionRoot, allocations.StateFile), Logger: log,
	})
	if err := m.Restore(); err != nil {
		log.Error("allocated programs not restored", "err", err)
	}
	return m
}
