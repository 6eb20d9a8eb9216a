// Package watcher follows the Aleph API's message stream, the websocket
// /api/ws0/messages that aleph-vm reads to trigger programs and to notice
// amends. It reconnects forever with exponential backoff and jitter, and
// after a disconnect asks for the messages it may have missed (startDate
// of the newest message seen), dropping the ones it already handed over.
package watcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/coder/websocket"

	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// Defaults of Options; the backoff bounds are aleph-vm's (0.1 s doubling
// to 8 s), the heartbeat its aiohttp heartbeat.
const (
	DefaultMinBackoff = 100 * time.Millisecond
	DefaultMaxBackoff = 8 * time.Second
	DefaultHeartbeat  = 30 * time.Second
	// maxFrame bounds one message frame: inline contents are capped well
	// below this by the network.
	maxFrame = 4 << 20
	// dedupeSize bounds the remembered item hashes.
	dedupeSize = 8192
)

// Handler receives each new message, in stream order, one at a time. It
// should not block for long: the stream is not read meanwhile.
type Handler func(ctx context.Context, m *message.Message)

// Options configure a Watcher.
type Options struct {
	// APIServer is the Aleph API base URL (API_SERVER).
	APIServer string
	// Since is where the first connection starts (zero: now).
	Since      time.Time
	MinBackoff time.Duration
	MaxBackoff time.Duration
	// Heartbeat is the ping interval; a ping unanswered within half of
	// it drops the connection.
	Heartbeat  time.Duration
	HTTPClient *http.Client
	Handle     Handler
	Logger     *slog.Logger
	// Connected, if set, is called each time a connection is established
	// (tests and metrics).
	Connected func(startDate int64)
}

// Watcher follows the message stream. Run it once.
type Watcher struct {
	opts  Options
	since float64 // newest message time seen, or the start
	seen  *recent
}

// New returns a watcher; call Run.
func New(opts Options) *Watcher {
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = DefaultMinBackoff
	}
	if opts.MaxBackoff < opts.MinBackoff {
		opts.MaxBackoff = max(DefaultMaxBackoff, opts.MinBackoff)
	}
	if opts.Heartbeat <= 0 {
		opts.Heartbeat = DefaultHeartbeat
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Since.IsZero() {
		opts.Since = time.Now()
	}
	return &Watcher{
		opts:  opts,
		since: float64(opts.Since.UnixNano()) / 1e9,
		seen:  newRecent(dedupeSize),
	}
}

// StreamURL is the websocket URL for messages since startDate (Unix
// seconds), as aleph-vm builds it.
func StreamURL(apiServer string, startDate int64) (string, error) {
	u, err := url.Parse(strings.TrimRight(apiServer, "/") + "/api/ws0/messages")
	if err != nil {
		return "", fmt.Errorf("API server URL: %w", err)
	}
	switch u.Scheme {
	case "http":
		u.Scheme = "ws"
	case "https":
		u.Scheme = "wss"
	}
	u.RawQuery = url.Values{"startDate": {strconv.FormatInt(startDate, 10)}}.Encode()
	return u.String(), nil
}

// Run follows the stream until ctx ends; it returns ctx's error.
func (w *Watcher) Run(ctx context.Context) error {
	log := w.opts.Logger
	delay := w.opts.MinBackoff
	for {
		start := time.Now()
		got, err := w.session(ctx)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		// A connection that delivered something or stayed up a while was
		// healthy: the next failure starts the backoff afresh.
		if got > 0 || time.Since(start) > w.opts.MaxBackoff {
			delay = w.opts.MinBackoff
		}
		wait := jitter(delay)
		log.Warn("watcher: message stream disconnected, reconnecting", "err", err, "in", wait.Round(time.Millisecond))
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		delay = min(delay*2, w.opts.MaxBackoff)
	}
}

// jitter spreads reconnects of many nodes: a delay in [d/2, d].
func jitter(d time.Duration) time.Duration {
	half := d / 2
	return half + rand.N(d-half+1)
}

// session runs one connection and returns how many new messages it
// delivered and why it ended.
func (w *Watcher) session(ctx context.Context) (int, error) {
	startDate := int64(math.Floor(w.since))
	u, err := StreamURL(w.opts.APIServer, startDate)
	if err != nil {
		return 0, err
	}
	dialCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	c, _, err := websocket.Dial(dialCtx, u, &websocket.DialOptions{HTTPClient: w.opts.HTTPClient})
	cancel()
	if err != nil {
		return 0, fmt.Errorf("connecting to %s: %w", redact(u), err)
	}
	defer func() { _ = c.CloseNow() }()
	c.SetReadLimit(maxFrame)
	w.opts.Logger.Info("watcher: connected to the message stream", "url", redact(u))
	if w.opts.Connected != nil {
		w.opts.Connected(startDate)
	}

	ctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	go w.heartbeat(ctx, c, stop)

	delivered := 0
	for {
		typ, data, err := c.Read(ctx)
		if err != nil {
			if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) {
				err = cause
			}
			return delivered, err
		}
		if typ != websocket.MessageText {
			continue
		}
		if w.deliver(ctx, data) {
			delivered++
		}
	}
}

var errNoPong = errors.New("no answer to the heartbeat ping")

func (w *Watcher) heartbeat(ctx context.Context, c *websocket.Conn, stop context.CancelCauseFunc) {
	t := time.NewTicker(w.opts.Heartbeat)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, w.opts.Heartbeat/2)
		err := c.Ping(pctx)
		cancel()
		if err != nil && ctx.Err() == nil {
			stop(fmt.Errorf("%w: %w", errNoPong, err))
			return
		}
	}
}

// deliver parses one frame and hands a new message over; it reports
// whether it did.
func (w *Watcher) deliver(ctx context.Context, data []byte) bool {
	log := w.opts.Logger
	var head struct {
		ItemHash     string          `json:"item_hash"`
		ItemType     string          `json:"item_type"`
		Confirmation json.RawMessage `json:"confirmation"`
	}
	if err := json.Unmarshal(data, &head); err != nil {
		log.Warn("watcher: frame is not a JSON object", "err", err)
		return false
	}
	// The stream also carries chain confirmations of known messages:
	// they have no content and are not messages.
	if head.ItemType == "" {
		log.Debug("watcher: skipping a frame that is not a message", "item_hash", head.ItemHash)
		return false
	}
	m, err := message.Parse(data)
	if err != nil {
		log.Warn("watcher: invalid message", "item_hash", head.ItemHash, "err", err)
		return false
	}
	if !w.seen.add(m.ItemHash) {
		return false
	}
	if m.Time > w.since && m.Time < float64(time.Now().Add(time.Hour).Unix()) {
		// A message dated far in the future would make later catch-ups
		// skip everything before it.
		w.since = m.Time
	}
	if w.opts.Handle != nil {
		w.opts.Handle(ctx, m)
	}
	return true
}

func redact(u string) string {
	p, err := url.Parse(u)
	if err != nil {
		return "<invalid URL>"
	}
	return p.Redacted()
}

// recent remembers the last n item hashes handed over, so a catch-up that
// overlaps what was seen delivers nothing twice.
type recent struct {
	set  map[string]struct{}
	ring []string
	next int
}

func newRecent(n int) *recent {
	return &recent{set: make(map[string]struct{}, n), ring: make([]string, n)}
}

// add reports whether h is new.
func (r *recent) add(h string) bool {
	if _, ok := r.set[h]; ok {
		return false
	}
	if old := r.ring[r.next]; old != "" {
		delete(r.set, old)
	}
	r.ring[r.next] = h
	r.next = (r.next + 1) % len(r.ring)
	r.set[h] = struct{}{}
	return true
}
