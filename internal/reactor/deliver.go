package reactor

import (
	"context"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// Deliveries of on.message events go through a queue per program: at most
// QueueSize wait for one program and Deliveries run for it at once, and a
// fixed number of workers (DeliveriesTotal) serve every program in turn,
// so a flood of matching messages costs bounded goroutines, connections
// and memory; what does not fit is dropped, counted in the metrics and
// logged once per dropLogEvery.

// Defaults of the queue's options (config: MESSAGE_QUEUE_SIZE,
// MESSAGE_DELIVERIES, MESSAGE_DELIVERIES_TOTAL).
const (
	DefaultQueueSize       = 64
	DefaultDeliveries      = 4
	DefaultDeliveriesTotal = 16
	// maxQueuedPrograms bounds the programs with deliveries waiting; a
	// delivery for one more is dropped.
	maxQueuedPrograms = 1024
	dropLogEvery      = 5 * time.Second
	maxDropPrograms   = 64 // programs named in one drop report
)

type delivery struct {
	event    []byte // shared by every program the message runs
	itemHash string
}

type progQueue struct {
	pending []delivery
	running int
	ready   bool // listed in Reactor.ready
}

// enqueue queues one delivery for program hash, or drops it.
func (r *Reactor) enqueue(ctx context.Context, hash string, d delivery) {
	r.qmu.Lock()
	defer r.qmu.Unlock()
	q := r.queues[hash]
	if q == nil {
		if len(r.queues) >= maxQueuedPrograms {
			r.drop(hash)
			return
		}
		q = &progQueue{}
		r.queues[hash] = q
	}
	if len(q.pending) >= r.opts.QueueSize {
		r.drop(hash)
		return
	}
	q.pending = append(q.pending, d)
	r.markReady(hash, q)
	if r.workers < r.opts.DeliveriesTotal && len(r.ready) > 0 {
		r.workers++
		r.wg.Go(func() { r.work(ctx) })
	}
}

// markReady lists q for the workers if it has work it may start now.
// r.qmu is held.
func (r *Reactor) markReady(hash string, q *progQueue) {
	if !q.ready && len(q.pending) > 0 && q.running < r.opts.Deliveries {
		q.ready = true
		r.ready = append(r.ready, hash)
	}
}

// work runs deliveries, one program after the other, until none is ready.
func (r *Reactor) work(ctx context.Context) {
	for {
		r.qmu.Lock()
		if len(r.ready) == 0 || ctx.Err() != nil {
			r.workers--
			r.qmu.Unlock()
			return
		}
		hash := r.ready[0]
		r.ready[0] = ""
		r.ready = r.ready[1:]
		q := r.queues[hash]
		q.ready = false
		d := q.pending[0]
		q.pending[0] = delivery{}
		q.pending = q.pending[1:]
		q.running++
		r.markReady(hash, q) // the next one may start beside it
		r.qmu.Unlock()

		r.deliver(ctx, hash, d)

		r.qmu.Lock()
		q.running--
		if q.running == 0 && len(q.pending) == 0 {
			delete(r.queues, hash)
		} else {
			r.markReady(hash, q)
		}
		r.qmu.Unlock()
	}
}

func (r *Reactor) deliver(ctx context.Context, hash string, d delivery) {
	log := r.log.With("program", hash, "item_hash", d.itemHash)
	log.Debug("reactor: running program on message")
	result, err := r.opts.Pool.Deliver(ctx, hash, d.event)
	if err != nil {
		if errkind.Is(err, errkind.NotFound) {
			// Forgotten, or never published: nothing to run any more.
			log.Info("reactor: subscribed program is unknown: unsubscribing it", "err", err)
			r.unregister(hash)
			return
		}
		log.Warn("reactor: program failed on message", "err", err)
		return
	}
	log.Info("reactor: program ran on message", "result", string(result))
}

// drop counts a delivery that did not fit; r.qmu is held.
func (r *Reactor) drop(hash string) {
	r.opts.Metrics.MessageDeliveryDropped()
	r.dropped++
	if _, ok := r.dropsBy[hash]; ok || len(r.dropsBy) < maxDropPrograms {
		r.dropsBy[hash]++
	}
	if !r.dropTimer {
		r.dropTimer = true
		time.AfterFunc(dropLogEvery, r.reportDrops)
	}
}

// reportDrops logs the deliveries dropped since the last report, once.
func (r *Reactor) reportDrops() {
	r.qmu.Lock()
	n, by := r.dropped, r.dropsBy
	r.dropped, r.dropsBy, r.dropTimer = 0, map[string]int{}, false
	r.qmu.Unlock()
	if n == 0 {
		return
	}
	r.log.Warn("reactor: message deliveries dropped: queues full", "dropped", n, "programs", by,
		"queue_size", r.opts.QueueSize, "deliveries", r.opts.Deliveries, "deliveries_total", r.opts.DeliveriesTotal)
}
