// Package reactor acts on the messages the watcher reads from the Aleph
// network, as aleph-vm's reactor and pubsub do:
//   - programs whose on.message filters match a new message are run with
//     it (WATCH_FOR_MESSAGES);
//   - an amend of a ref a running program follows with use_latest stops
//     that execution, so the next request starts it with the new version
//     (WATCH_FOR_UPDATES);
//   - a FORGET of a program stops it and makes it unknown.
package reactor

import (
	"context"
	"encoding/json"
	"log/slog"
	"sync"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
)

// Pool is what the reactor needs of the execution pool (*pool.Pool).
type Pool interface {
	Deliver(ctx context.Context, hash string, event []byte) ([]byte, error)
	Stop(ctx context.Context, hash string) error
	Programs() []*sources.Program
}

// Forgetter makes a message unknown (*sources.Resolver).
type Forgetter interface {
	Forget(hash string)
}

// Options configure a Reactor.
type Options struct {
	// Pool may be set later with Use, before the first Handle: the pool
	// is built on the source Observe wraps.
	Pool      Pool
	Forgetter Forgetter // optional
	// Messages runs subscribed programs; Updates stops programs whose
	// refs are amended. FORGETs are always honoured.
	Messages bool
	Updates  bool
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
}

// New returns a reactor with no subscriptions.
func New(opts Options) *Reactor {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.StopTimeout <= 0 {
		opts.StopTimeout = 30 * time.Second
	}
	return &Reactor{opts: opts, log: opts.Logger, subs: map[string][]message.Filter{}}
}

// Use sets the pool; call it before the first Handle.
func (r *Reactor) Use(p Pool) { r.opts.Pool = p }

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

// Wait waits for the program runs Handle started.
func (r *Reactor) Wait() { r.wg.Wait() }

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
		r.wg.Go(func() {
			log := r.log.With("program", hash, "item_hash", m.ItemHash)
			log.Info("reactor: running program on message")
			result, err := r.opts.Pool.Deliver(ctx, hash, event)
			if err != nil {
				log.Warn("reactor: program failed on message", "err", err)
				return
			}
			log.Info("reactor: program ran on message", "result", string(result))
		})
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

// followed lists the refs of a program that follow amends (use_latest).
// aleph-vm watches every ref of a warm program; one not followed
// cannot change what runs, so stopping for it would only cost a cold
// start.
func followed(c *message.ProgramContent) map[string]bool {
	out := map[string]bool{}
	add := func(ref string, latest bool) {
		if ref != "" && latest {
			out[ref] = true
		}
	}
	add(c.Code.Ref, c.Code.UseLatest)
	add(c.Runtime.Ref, c.Runtime.UseLatest)
	if c.Data != nil {
		add(c.Data.Ref, c.Data.UseLatest)
	}
	for _, v := range c.Volumes {
		if v.Kind() == message.VolumeImmutable {
			add(v.Ref, v.UseLatest)
		}
	}
	return out
}

func (r *Reactor) stopAmended(ctx context.Context, m *message.Message) {
	keys := refKeys(m)
	for _, p := range r.opts.Pool.Programs() {
		refs := followed(p.Content)
		for _, k := range keys {
			if refs[k] {
				r.log.Info("reactor: a ref of a running program was amended: stopping it", "program", p.Hash, "ref", k, "amend", m.ItemHash)
				r.stop(ctx, p.Hash)
				break
			}
		}
	}
}

func (r *Reactor) forget(ctx context.Context, m *message.Message) {
	var c struct {
		Hashes []string `json:"hashes"`
	}
	if err := json.Unmarshal(m.Content, &c); err != nil {
		r.log.Warn("reactor: unreadable FORGET", "item_hash", m.ItemHash, "err", err)
		return
	}
	for _, h := range c.Hashes {
		if r.opts.Forgetter != nil {
			r.opts.Forgetter.Forget(h)
		}
		r.unregister(h)
		for _, p := range r.opts.Pool.Programs() {
			if p.Hash == h {
				r.log.Info("reactor: program forgotten: stopping it", "program", h, "forget", m.ItemHash)
				r.stop(ctx, h)
			}
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
