package main

import (
	"context"
	"log/slog"
	"sync"

	"github.com/aleph-vm-go/vm-supervisor/internal/config"
	"github.com/aleph-vm-go/vm-supervisor/internal/delegation"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/metrics"
	"github.com/aleph-vm-go/vm-supervisor/internal/pool"
	"github.com/aleph-vm-go/vm-supervisor/internal/reactor"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/alephapi"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
	"github.com/aleph-vm-go/vm-supervisor/internal/watcher"
)

// newWatchedSource is newSource with the reactor watching the programs it
// resolves (nil when nothing is watched).
func newWatchedSource(s *config.Settings, st *store.Store, deleg *delegation.Checker, log *slog.Logger) (pool.ProgramSource, *reactor.Reactor, error) {
	source, err := newSource(s, st, deleg, log)
	if err != nil {
		return nil, nil, err
	}
	r := newReactor(s, st, source, deleg, log)
	if r != nil {
		source = r.Observe(source)
	}
	return source, r, nil
}

// newReactor returns the reactor to the Aleph message stream, or nil when
// neither WATCH_FOR_MESSAGES nor WATCH_FOR_UPDATES is set or programs do
// not come from the network (fake-data mode). Programs of the local store
// that subscribe to messages are registered now; programs the node starts
// later are registered by the source it wraps (reactor.Observe), and new
// PROGRAM messages as they pass, as in aleph-vm.
func newReactor(s *config.Settings, st *store.Store, source pool.ProgramSource, deleg *delegation.Checker, log *slog.Logger) *reactor.Reactor {
	if (!s.WatchForMessages && !s.WatchForUpdates) || s.FakeDataProgram != "" {
		return nil
	}
	opts := reactor.Options{
		Messages: s.WatchForMessages, Updates: s.WatchForUpdates,
		// FORGETs are confirmed, and delegations read, on the API the
		// stream comes from.
		API: alephapi.New(s.APIServer, s.IPFSGateway, alephapi.WithLogger(log)),
		// Whose amends and FORGETs count: the same cache use_latest reads.
		Delegations:     deleg,
		QueueSize:       s.MessageQueueSize,
		Deliveries:      s.MessageDeliveries,
		DeliveriesTotal: s.MessageDeliveriesTotal,
		Logger:          log,
	}
	if f, ok := source.(reactor.Forgetter); ok {
		opts.Forgetter = f
	}
	r := reactor.New(opts)
	hashes, err := st.Messages()
	if err != nil {
		log.Warn("reactor: listing the local store", "err", err)
	}
	for _, h := range hashes {
		m, err := st.GetMessage(h)
		if err != nil || m.Type != message.TypeProgram {
			continue
		}
		if c, err := m.Program(); err == nil {
			r.Register(h, c)
		}
	}
	return r
}

// startWatching follows the API's message stream until the returned stop
// is called; r may be nil (nothing to do).
func startWatching(ctx context.Context, s *config.Settings, r *reactor.Reactor, p *pool.Pool, m *metrics.Metrics, log *slog.Logger) (stop func()) {
	if r == nil {
		return func() {}
	}
	r.Use(p, m)
	ctx, cancel := context.WithCancel(ctx)
	w := watcher.New(watcher.Options{APIServer: s.APIServer, Handle: r.Handle, Logger: log})
	var wg sync.WaitGroup
	wg.Go(func() { _ = w.Run(ctx) })
	if s.PaymentMonitorInterval > 0 {
		// What the stream missed: the API's status of running programs.
		wg.Go(func() { r.PollStatus(ctx, s.PaymentMonitorInterval) })
	}
	return func() {
		cancel()
		wg.Wait()
		r.Wait()
	}
}
