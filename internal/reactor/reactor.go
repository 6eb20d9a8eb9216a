// Package reactor acts on the messages the watcher reads from the Aleph
// network, as aleph-vm's reactor and pubsub do:
//   - programs whose on.message filters match a new message are run with
//     it (WATCH_FOR_MESSAGES);
//   - an amend of a ref a running program follows with use_latest stops
//     that execution, so the next request starts it with the new version
//     (WATCH_FOR_UPDATES);
//   - a FORGET of a program stops it and makes it unknown.
//
// Messages on the stream are anyone's: an amend acts only when sent by the
// owner of the ref (or a delegate), a FORGET only when sent by the owner
// of its target (or a delegate) and confirmed by the API, and never on
// the local store (authority.go); deliveries are queued with bounds
// (deliver.go).
package reactor

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/delegation"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/metrics"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/alephapi"
)

// Pool is what the reactor needs of the execution pool (*pool.Pool).
type Pool interface {
	Deliver(ctx context.Context, hash string, event []byte) ([]byte, error)
	Stop(ctx context.Context, hash string) error
	Programs() []*sources.Program
}

// Forgetter makes a message unknown (*sources.Resolver).
type Forgetter interface {
	// Forget makes hash unknown; it refuses (false) a message of the
	// local store.
	Forget(hash string) bool
	// Known returns the message as the node holds it (local store or
	// download cache), without asking the API; local tells the store.
	Known(hash string) (m *message.Message, local bool, err error)
}

// API is what the reactor asks the Aleph API (*alephapi.Client): whether
// a message really exists, and an owner's delegations.
type API interface {
	GetMessage(ctx context.Context, hash string) (*message.Message, error)
	Authorizations(ctx context.Context, address string) ([]alephapi.Authorization, error)
}

// Options configure a Reactor.
type Options struct {
	// Pool may be set later with Use, before the first Handle: the pool
	// is built on the source Observe wraps.
	Pool Pool
	// Forgetter and API are needed to honour FORGETs: without them
	// FORGETs are ignored. Without API, delegates are not recognised.
	Forgetter Forgetter
	API       API
	// Delegations reads and caches owners' delegations; nil: one of the
	// reactor's own over API. Share it with use_latest resolution so that
	// both agree on whose amend counts.
	Delegations *delegation.Checker
	// Messages runs subscribed programs; Updates stops programs whose
	// refs are amended by their owner. Owners' FORGETs are honoured
	// whatever these say.
	Messages bool
	Updates  bool
	// QueueSize, Deliveries and DeliveriesTotal bound on.message
	// deliveries (deliver.go); <= 0 selects the defaults.
	QueueSize       int
	Deliveries      int
	DeliveriesTotal int
	Metrics         *metrics.Metrics // nil: not recorded
	// StopTimeout bounds the wait for in-flight requests of an execution
	// being stopped.
	StopTimeout time.Duration
	Logger      *slog.Logger
}

// Reactor is safe for concurrent use.
type Reactor struct {
	opts Options
	log  *slog.Logger

	mu   sync.Mutex
	subs map[string][]message.Filter // program hash → on.message

	wg sync.WaitGroup

	delegOnce sync.Once
	deleg     *delegation.Checker

	qmu       sync.Mutex
	queues    map[string]*progQueue
	ready     []string // programs with a delivery they may start, in turn
	workers   int
	dropped   int
	dropsBy   map[string]int
	dropTimer bool
}

// New returns a reactor with no subscriptions.
func New(opts Options) *Reactor {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.StopTimeout <= 0 {
		opts.StopTimeout = 30 * time.Second
	}
	if opts.QueueSize <= 0 {
		opts.QueueSize = DefaultQueueSize
	}
	if opts.Deliveries <= 0 {
		opts.Deliveries = DefaultDeliveries
	}
	if opts.DeliveriesTotal <= 0 {
		opts.DeliveriesTotal = DefaultDeliveriesTotal
	}
	return &Reactor{
		opts: opts, log: opts.Logger, subs: map[string][]message.Filter{},
		queues: map[string]*progQueue{}, dropsBy: map[string]int{},
	}
}

// Use sets the pool and the metrics (m may be nil); call it before the
// first Handle.
func (r *Reactor) Use(p Pool, m *metrics.Metrics) {
	r.opts.Pool = p
	r.opts.Metrics = m
}

// Register subscribes program hash to the messages its on.message
// filters match; a program without filters is ignored.
func (r *Reactor) Register(hash string, c *message.ProgramContent) {
	if c == nil || len(c.On.Message) == 0 {
		return
	}
	r.mu.Lock()
	_, known := r.subs[hash]
	r.subs[hash] = c.On.Message
	r.mu.Unlock()
	if !known {
		r.log.Info("reactor: program subscribed to messages", "program", hash, "filters", len(c.On.Message))
	}
}

func (r *Reactor) unregister(hash string) {
	r.mu.Lock()
	delete(r.subs, hash)
	r.mu.Unlock()
}

// Subscribed lists the subscribed programs.
func (r *Reactor) Subscribed() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]string, 0, len(r.subs))
	for h := range r.subs {
		out = append(out, h)
	}
	return out
}

// Handle acts on one message of the stream. Program runs happen in the
// background; Wait waits for them.
func (r *Reactor) Handle(ctx context.Context, m *message.Message) {
	switch m.Type {
	case message.TypeForget:
		r.forget(ctx, m)
	case message.TypeProgram:
		// As aleph-vm: a new program that subscribes is run on later
		// messages.
		if c, err := m.Program(); err == nil {
			r.Register(m.ItemHash, c)
		}
	}
	// Running executions are learnt as they are started (Observe), but a
	// program resolved before the reactor existed is caught here.
	for _, p := range r.opts.Pool.Programs() {
		r.Register(p.Hash, p.Content)
	}
	if r.opts.Updates {
		r.stopAmended(ctx, m)
	}
	if r.opts.Messages {
		r.trigger(ctx, m)
	}
}

// Wait waits for the deliveries and stops Handle started (the queued
// deliveries run first, unless the context given to Handle is done), and
// reports the dropped deliveries not reported yet. Call it once Handle is
// no longer called.
func (r *Reactor) Wait() {
	r.wg.Wait()
	r.reportDrops()
}

func (r *Reactor) trigger(ctx context.Context, m *message.Message) {
	r.mu.Lock()
	var hit []string
	for hash, filters := range r.subs {
		if Matches(filters, m) {
			hit = append(hit, hash)
		}
	}
	r.mu.Unlock()
	if len(hit) == 0 {
		return
	}
	event, err := json.Marshal(eventOf(m))
	if err != nil {
		r.log.Error("reactor: encoding the event", "item_hash", m.ItemHash, "err", err)
		return
	}
	for _, hash := range hit {
		r.enqueue(ctx, hash, delivery{event: event, itemHash: m.ItemHash})
	}
}

// eventOf is the message as a program receives it: the message with its
// decoded content, as aleph-vm hands over model_dump_json().
func eventOf(m *message.Message) any {
	var out map[string]any
	raw, _ := json.Marshal(m)
	_ = json.Unmarshal(raw, &out)
	out["content"] = m.Content
	return out
}

// refKeys are the keys an update to a program is published under in
// aleph-vm's pubsub: the message's own hash and, for a STORE amend, the
// ref it amends.
func refKeys(m *message.Message) []string {
	keys := []string{m.ItemHash}
	var c struct {
		Ref string `json:"ref"`
	}
	if json.Unmarshal(m.Content, &c) == nil && c.Ref != "" {
		keys = append(keys, c.Ref)
	}
	return keys
}

// refOwners maps each ref of a running program that follows amends
// (use_latest) to the address whose amends of it count: the one use_latest
// resolution used (sources.File.Owner), else the program's owner.
// aleph-vm watches every ref of a warm program; one not followed cannot
// change what runs, so stopping for it would only cost a cold start.
func refOwners(p *sources.Program) map[string]string {
	out := map[string]string{}
	for ref, f := range followedRefs(p) {
		out[ref] = f.owner
	}
	return out
}

// followed is a ref a program follows with use_latest: whose amends count
// and the STORE message its execution runs (the ref or an amend of it).
type followed struct {
	owner   string
	current string
}

func followedRefs(p *sources.Program) map[string]followed {
	out := map[string]followed{}
	if p.Content == nil {
		return out
	}
	fallback := p.Content.Address
	if fallback == "" && p.Message != nil {
		fallback = p.Message.Sender
	}
	add := func(ref string, latest bool, f *sources.File) {
		if ref == "" || !latest {
			return
		}
		owner, current := fallback, ""
		if f != nil {
			if f.Owner != "" {
				owner = f.Owner
			}
			current = f.Ref
		}
		out[ref] = followed{owner: owner, current: current}
	}
	c := p.Content
	add(c.Code.Ref, c.Code.UseLatest, &p.Code)
	add(c.Runtime.Ref, c.Runtime.UseLatest, &p.Runtime)
	if c.Data != nil {
		add(c.Data.Ref, c.Data.UseLatest, p.Data)
	}
	for i, v := range c.Volumes {
		if v.Kind() != message.VolumeImmutable {
			continue
		}
		var f *sources.File
		if i < len(p.Volumes) {
			f = p.Volumes[i].File
		}
		add(v.Ref, v.UseLatest, f)
	}
	return out
}

// stopAmended stops the running programs that follow a ref m amends, when
// m's sender may amend it: the ref's owner or a delegate of it. Anyone
// can publish a STORE naming any ref; use_latest would never pick a
// stranger's, so stopping for it would only cost a cold start, on every
// such message.
func (r *Reactor) stopAmended(ctx context.Context, m *message.Message) {
	keys := refKeys(m)
	for _, p := range r.opts.Pool.Programs() {
		owners := refOwners(p)
		for _, k := range keys {
			owner, ok := owners[k]
			if !ok {
				continue
			}
			if !r.mayActFor(ctx, m, owner, "") {
				r.log.Warn("reactor: amend of a followed ref by another address than its owner: ignored",
					"program", p.Hash, "ref", k, "amend", m.ItemHash, "sender", m.Sender, "owner", owner)
				break
			}
			r.log.Info("reactor: a ref of a running program was amended: stopping it", "program", p.Hash, "ref", k, "amend", m.ItemHash)
			r.stop(ctx, p.Hash)
			break
		}
	}
}

// maxForgetTargets bounds the hashes of one FORGET looked at.
const maxForgetTargets = 256

func forgetHashes(m *message.Message) ([]string, error) {
	var c struct {
		Hashes []string `json:"hashes"`
	}
	if err := json.Unmarshal(m.Content, &c); err != nil {
		return nil, err
	}
	if len(c.Hashes) > maxForgetTargets {
		c.Hashes = c.Hashes[:maxForgetTargets]
	}
	return c.Hashes, nil
}

type forgetTarget struct {
	hash string
	msg  *message.Message
}

// forget acts on a FORGET: each target this node holds (a running
// program, or a message in the download cache) is forgotten and stopped
// when the FORGET's sender may forget it (its owner or sender, or a
// delegate of the owner) and the API confirms the FORGET exists. The
// local store's messages are never forgotten.
func (r *Reactor) forget(ctx context.Context, m *message.Message) {
	if r.opts.Forgetter == nil {
		return
	}
	hashes, err := forgetHashes(m)
	if err != nil {
		r.log.Warn("reactor: unreadable FORGET", "item_hash", m.ItemHash, "err", err)
		return
	}
	running := map[string]*message.Message{}
	for _, p := range r.opts.Pool.Programs() {
		running[p.Hash] = p.Message
	}
	var targets []forgetTarget
	for _, h := range hashes {
		target, local, err := r.opts.Forgetter.Known(h)
		if local {
			r.log.Warn("reactor: FORGET of a program of the local store: ignored", "program", h, "forget", m.ItemHash, "sender", m.Sender)
			continue
		}
		if err != nil {
			target = running[h]
		}
		if target == nil {
			continue // not held here: nothing to forget
		}
		if !r.mayActFor(ctx, m, ownerOf(target), target.Sender) {
			r.log.Warn("reactor: FORGET by another address than the owner: ignored",
				"target", h, "forget", m.ItemHash, "sender", m.Sender, "owner", ownerOf(target))
			continue
		}
		targets = append(targets, forgetTarget{hash: h, msg: target})
	}
	if len(targets) == 0 {
		return
	}
	// The stream is not enough: only a FORGET the API serves counts, and
	// it is the API's copy that is read.
	if r.opts.API == nil {
		r.log.Warn("reactor: FORGET not confirmed (no Aleph API): ignored", "forget", m.ItemHash)
		return
	}
	cctx, cancel := context.WithTimeout(ctx, apiTimeout)
	confirmed, err := r.opts.API.GetMessage(cctx, m.ItemHash)
	cancel()
	if err == nil && confirmed.Type != message.TypeForget {
		err = errWrongType
	}
	if err != nil {
		r.log.Warn("reactor: FORGET not confirmed by the Aleph API: ignored", "forget", m.ItemHash, "err", err)
		return
	}
	confirmedHashes, err := forgetHashes(confirmed)
	if err != nil {
		r.log.Warn("reactor: unreadable FORGET from the API", "item_hash", m.ItemHash, "err", err)
		return
	}
	for _, t := range targets {
		if !slices.Contains(confirmedHashes, t.hash) || !r.mayActFor(ctx, confirmed, ownerOf(t.msg), t.msg.Sender) {
			continue
		}
		if !r.opts.Forgetter.Forget(t.hash) {
			continue
		}
		r.unregister(t.hash)
		if _, ok := running[t.hash]; ok {
			r.log.Info("reactor: program forgotten by its owner: stopping it", "program", t.hash, "forget", m.ItemHash, "sender", confirmed.Sender)
			r.stop(ctx, t.hash)
		} else {
			r.log.Info("reactor: message forgotten by its owner", "target", t.hash, "forget", m.ItemHash, "sender", confirmed.Sender)
		}
	}
}

func (r *Reactor) stop(ctx context.Context, hash string) {
	r.wg.Go(func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.opts.StopTimeout)
		defer cancel()
		if err := r.opts.Pool.Stop(ctx, hash); err != nil {
			r.log.Debug("reactor: stop", "program", hash, "err", err)
		}
	})
}

var errWrongType = errors.New("the API's message of that hash is not a FORGET")

// Observe wraps the pool's program source so that every program the node
// starts, for a request or an event, is subscribed if it has on.message
// filters.
func (r *Reactor) Observe(src ProgramSource) ProgramSource {
	return observed{src: src, r: r}
}

// ProgramSource is pool.ProgramSource.
type ProgramSource interface {
	Program(ctx context.Context, hash string) (*sources.Program, error)
}

type observed struct {
	src ProgramSource
	r   *Reactor
}

func (o observed) Program(ctx context.Context, hash string) (*sources.Program, error) {
	p, err := o.src.Program(ctx, hash)
	if err == nil {
		o.r.Register(hash, p.Content)
	}
	return p, err
}
