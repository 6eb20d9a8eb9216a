package main

import (
	"context"
	"encoding/json"
	"log/slog"
	"path/filepath"

	"github.com/aleph-vm-go/vm-supervisor/internal/allocations"
	"github.com/aleph-vm-go/vm-supervisor/internal/config"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/alephapi"
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

// allocationSigners resolves who may sign the scheduler's requests
// (AUTHORIZED_ALLOCATION_SIGNERS, else the settings aggregate of
// SETTINGS_AGGREGATE_ADDRESS on API_SERVER, else
// DEFAULT_ALLOCATION_SIGNERS) and says so once in the log, with the
// deprecation of the legacy token when it is still on.
func allocationSigners(s *config.Settings, log *slog.Logger) *allocations.Signers {
	api := alephapi.New(s.APIServer, s.IPFSGateway, alephapi.WithLogger(log))
	signers := &allocations.Signers{
		Local:   s.AuthorizedAllocationSigners,
		Default: s.DefaultAllocationSigners,
		Aggregate: func(ctx context.Context) (map[string]json.RawMessage, error) {
			return api.SettingsAggregate(ctx, s.SettingsAggregateAddress)
		},
		Log: log,
	}
	signers.LogConfig(s.AllocationTokenHash != "")
	return signers
}
