package reactor

import (
	"context"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/alephapi"
)

// Status polling: what the message stream missed (a FORGET sent while
// the websocket was down for longer than its catch-up reaches, say) is
// noticed from the API's status of each running program's message, as
// aleph-vm's payment monitor does (orchestrator/tasks.py check_payment):
// every PAYMENT_MONITOR_INTERVAL each running program's status is read
// from /api/v0/messages/{hash}; forgotten, rejected or removed three
// polls in a row stops and forgets it (one odd answer of a lagging API
// node does not). A failed read changes nothing. Programs of the local
// store are not the API's to judge and are not asked about. With
// WATCH_FOR_UPDATES, the same poll also looks for an amend the stream
// missed: a program whose use_latest ref has a newer amend (by the owner
// or a delegate, as use_latest picks it) than the one it runs is stopped,
// and its next start runs the amend.

// StatusConfirmations is upstream's STOP_AFTER_CONFIRMATIONS.
const StatusConfirmations = 3

// DefaultStatusInterval is upstream's PAYMENT_MONITOR_INTERVAL.
const DefaultStatusInterval = 60 * time.Second

// StatusAPI reads a message's status and the latest amend of a ref
// (*alephapi.Client).
type StatusAPI interface {
	MessageStatus(ctx context.Context, hash string) (string, error)
	LatestAmend(ctx context.Context, ref, owner string, accept func(*message.Message) (bool, error)) (*message.Message, error)
}

func terminal(status string) bool {
	switch status {
	case alephapi.StatusForgotten, alephapi.StatusRejected, alephapi.StatusRemoved:
		return true
	}
	return false
}

// PollStatus checks the running programs' statuses every interval until
// ctx ends. Without a Forgetter or an API that reads statuses it returns
// at once.
func (r *Reactor) PollStatus(ctx context.Context, interval time.Duration) {
	api, ok := r.opts.API.(StatusAPI)
	if !ok || r.opts.Forgetter == nil {
		return
	}
	if interval <= 0 {
		interval = DefaultStatusInterval
	}
	strikes := map[string]int{}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		r.checkStatuses(ctx, api, strikes)
	}
}

// checkStatuses is one poll; strikes counts each program's terminal
// answers in a row.
func (r *Reactor) checkStatuses(ctx context.Context, api StatusAPI, strikes map[string]int) {
	running := map[string]bool{}
	for _, p := range r.opts.Pool.Programs() {
		running[p.Hash] = true
	}
	for h := range strikes {
		if !running[h] {
			delete(strikes, h)
		}
	}
	for h := range running {
		if _, local, _ := r.opts.Forgetter.Known(h); local {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, apiTimeout)
		status, err := api.MessageStatus(cctx, h)
		cancel()
		if err != nil {
			r.log.Debug("reactor: reading a running program's status", "program", h, "err", err)
			continue
		}
		if !terminal(status) {
			delete(strikes, h)
			if r.opts.Updates {
				r.checkAmends(ctx, api, h)
			}
			continue
		}
		strikes[h]++
		if strikes[h] < StatusConfirmations {
			r.log.Info("reactor: running program's message has a terminal status", "program", h, "status", status,
				"confirmations", strikes[h], "needed", StatusConfirmations)
			continue
		}
		delete(strikes, h)
		r.log.Info("reactor: stopping a program whose message the API says is "+status, "program", h, "confirmations", StatusConfirmations)
		r.opts.Forgetter.Forget(h)
		r.unregister(h)
		r.stop(ctx, h)
	}
}

// checkAmends stops the running program hash when one of the refs it
// follows has another latest amend than the one it runs.
func (r *Reactor) checkAmends(ctx context.Context, api StatusAPI, hash string) {
	var prog *sources.Program
	for _, p := range r.opts.Pool.Programs() {
		if p.Hash == hash {
			prog = p
		}
	}
	if prog == nil {
		return
	}
	for ref, f := range followedRefs(prog) {
		if f.current == "" {
			continue
		}
		accept := func(m *message.Message) (bool, error) { return r.delegations().MaySend(ctx, m, f.owner) }
		cctx, cancel := context.WithTimeout(ctx, apiTimeout)
		latest, err := api.LatestAmend(cctx, ref, f.owner, accept)
		cancel()
		current := ref
		switch {
		case err == nil:
			current = latest.ItemHash
		case errkind.Is(err, errkind.NotFound):
		default:
			r.log.Debug("reactor: reading the latest amend of a followed ref", "program", hash, "ref", ref, "err", err)
			continue
		}
		if current != f.current {
			r.log.Info("reactor: a ref of a running program was amended (seen by polling): stopping it",
				"program", hash, "ref", ref, "runs", f.current, "latest", current)
			r.stop(ctx, hash)
			return
		}
	}
}
