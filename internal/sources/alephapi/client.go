// Package alephapi is a small client of the Aleph API (API_SERVER): message
// lookup by item hash, use_latest amend resolution of STORE messages, and
// file download from storage or through an IPFS gateway.
//
// Every request has a bounded timeout. Network errors and 5xx answers are
// retried with exponential backoff; 404 is not. When the API cannot be
// reached at all the error wraps ErrUnreachable and has kind Unavailable,
// kept apart from NotFound ("the API answered: no such hash").
package alephapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// Defaults of the client.
const (
	DefaultBaseURL        = "https://official.aleph.cloud"
	DefaultIPFSGateway    = "https://ipfs.aleph.im/ipfs"
	DefaultRequestTimeout = 15 * time.Second
	// DefaultIdleTimeout bounds how long a download may stall without
	// receiving a byte; a large file may take longer than a request
	// timeout in total, so only its header wait and its stalls are bounded.
	DefaultIdleTimeout = 60 * time.Second
	DefaultAttempts    = 4
	DefaultBackoff     = 250 * time.Millisecond
	maxBackoff         = 5 * time.Second
	// maxMessagesBody caps a messages.json answer: a few messages only.
	maxMessagesBody = 16 << 20
)

// ErrUnreachable is wrapped by errors that mean the API (or gateway) could
// not be reached or kept failing with 5xx answers.
var ErrUnreachable = errors.New("aleph API unreachable")

// Client talks to one Aleph API server and one IPFS gateway.
type Client struct {
	base        string
	gateway     string
	http        *http.Client
	timeout     time.Duration
	idleTimeout time.Duration
	attempts    int
	backoff     time.Duration
	log         *slog.Logger
}

// Option configures a Client.
type Option func(*Client)

// WithHTTPClient sets the HTTP client (default: a client without overall
// timeout; timeouts come from the per-request contexts).
func WithHTTPClient(h *http.Client) Option { return func(c *Client) { c.http = h } }

// WithTimeout sets the per-request timeout (messages: whole request;
// downloads: until the response headers).
func WithTimeout(d time.Duration) Option { return func(c *Client) { c.timeout = d } }

// WithIdleTimeout sets how long a download body may stall.
func WithIdleTimeout(d time.Duration) Option { return func(c *Client) { c.idleTimeout = d } }

// WithRetries sets the number of attempts (>= 1) and the first backoff,
// doubled after each failed attempt.
func WithRetries(attempts int, backoff time.Duration) Option {
	return func(c *Client) {
		c.attempts = max(attempts, 1)
		c.backoff = backoff
	}
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(c *Client) { c.log = l } }

// New returns a client of the API at baseURL (e.g. API_SERVER) using the
// IPFS gateway ipfsGateway (files are fetched at GATEWAY/CID). Empty
// arguments select the defaults.
func New(baseURL, ipfsGateway string, opts ...Option) *Client {
	if baseURL == "" {
		baseURL = DefaultBaseURL
	}
	if ipfsGateway == "" {
		ipfsGateway = DefaultIPFSGateway
	}
	c := &Client{
		base:        strings.TrimRight(baseURL, "/"),
		gateway:     strings.TrimRight(ipfsGateway, "/"),
		http:        &http.Client{},
		timeout:     DefaultRequestTimeout,
		idleTimeout: DefaultIdleTimeout,
		attempts:    DefaultAttempts,
		backoff:     DefaultBackoff,
		log:         slog.Default(),
	}
	for _, o := range opts {
		o(c)
	}
	return c
}

// BaseURL returns the API server URL.
func (c *Client) BaseURL() string { return c.base }

// messagesPage is the shape of /api/v0/messages.json.
type messagesPage struct {
	Messages          []json.RawMessage `json:"messages"`
	PaginationPage    int               `json:"pagination_page"`
	PaginationTotal   int               `json:"pagination_total"`
	PaginationPerPage int               `json:"pagination_per_page"`
	PaginationItem    string            `json:"pagination_item"`
}

// GetMessage fetches the message with item hash hash. An empty answer is a
// NotFound error; a message whose inline content does not hash to its
// item_hash is refused (InvalidInput).
func (c *Client) GetMessage(ctx context.Context, hash string) (*message.Message, error) {
	if err := message.ValidateItemHash(hash); err != nil {
		return nil, err
	}
	q := url.Values{"hashes": {hash}}
	msgs, err := c.messages(ctx, q)
	if err != nil {
		return nil, fmt.Errorf("message %s: %w", hash, err)
	}
	for _, m := range msgs {
		if m.ItemHash == hash {
			return m, nil
		}
	}
	return nil, errkind.New(errkind.NotFound, "message %s not found on %s", hash, c.base)
}

// amendPage is how many amends LatestAmend looks at: the newest few, so
// that one the caller refuses (a delegate whose delegation was revoked)
// does not hide an older one it accepts.
const amendPage = 20

// LatestAmend returns the newest STORE message that amends ref
// (content.ref == ref) for owner, the one that wins under use_latest.
// Amends are asked for by owner (content.address), as aleph-vm does, so
// that an amend sent by a delegate of owner counts; accept, when not nil,
// decides which senders may amend for owner (the owner, or a delegate its
// security aggregate allows: delegation.Checker.MaySend) and its error
// fails the lookup. A nil accept takes only amends sent by owner.
// NotFound when there is no amend: the caller then keeps ref itself.
func (c *Client) LatestAmend(ctx context.Context, ref, owner string, accept func(*message.Message) (bool, error)) (*message.Message, error) {
	if err := message.ValidateItemHash(ref); err != nil {
		return nil, err
	}
	q := url.Values{
		"msgType":    {string(message.TypeStore)},
		"refs":       {ref},
		"sort_order": {"-1"},
		"pagination": {strconv.Itoa(amendPage)},
	}
	if owner != "" {
		q.Set("owners", owner)
	}
	msgs, err := c.messages(ctx, q)
	if err != nil {
		return nil, fmt.Errorf("latest amend of %s: %w", ref, err)
	}
	var found []*message.Message
	for _, m := range msgs {
		// The API filters already; checking again keeps a misbehaving
		// server from substituting someone else's file.
		if m.Type != message.TypeStore {
			continue
		}
		sc, err := m.Store()
		if err != nil || sc.Ref != ref {
			continue
		}
		if owner != "" && !sameOwner(sc.Address, owner) && !sameOwner(m.Sender, owner) {
			continue
		}
		found = append(found, m)
	}
	sort.SliceStable(found, func(i, j int) bool { return found[i].Time > found[j].Time })
	for _, m := range found {
		ok := owner == "" || sameOwner(m.Sender, owner)
		if !ok && accept != nil {
			if ok, err = accept(m); err != nil {
				return nil, fmt.Errorf("latest amend of %s: amend %s by %s: %w", ref, m.ItemHash, m.Sender, err)
			}
		}
		if ok {
			return m, nil
		}
	}
	return nil, errkind.New(errkind.NotFound, "no amend of %s by %s", ref, owner)
}

// sameOwner compares addresses: Ethereum's ignoring case, others exactly.
func sameOwner(a, b string) bool {
	if strings.HasPrefix(a, "0x") && strings.HasPrefix(b, "0x") {
		return strings.EqualFold(a, b)
	}
	return a == b
}

func (c *Client) messages(ctx context.Context, q url.Values) ([]*message.Message, error) {
	u := c.base + "/api/v0/messages.json?" + q.Encode()
	var page messagesPage
	err := c.do(ctx, u, func(ctx context.Context, resp *http.Response) error {
		dec := json.NewDecoder(io.LimitReader(resp.Body, maxMessagesBody))
		if err := dec.Decode(&page); err != nil {
			return errkind.Wrap(errkind.Upstream, fmt.Errorf("decoding %s: %w", redact(u), err))
		}
		return nil
	}, true)
	if err != nil {
		return nil, err
	}
	out := make([]*message.Message, 0, len(page.Messages))
	for i, raw := range page.Messages {
		m, err := message.Parse(raw)
		if err != nil {
			return nil, fmt.Errorf("message %d of %s: %w", i, redact(u), err)
		}
		out = append(out, m)
	}
	return out, nil
}

// Download opens the file a STORE message points at: /api/v0/storage/raw/H
// for item_type storage, GATEWAY/CID for ipfs. The caller reads and closes
// the body; the request is bounded by the timeout until the headers arrive
// and by the idle timeout afterwards.
func (c *Client) Download(ctx context.Context, store *message.StoreContent) (io.ReadCloser, error) {
	if store == nil {
		return nil, errkind.New(errkind.InvalidInput, "download: no STORE content")
	}
	if err := message.ValidateItemHash(store.ItemHash); err != nil {
		return nil, err
	}
	var u string
	switch store.ItemType {
	case "storage":
		u = c.base + "/api/v0/storage/raw/" + url.PathEscape(store.ItemHash)
	case "ipfs":
		u = c.gateway + "/" + url.PathEscape(store.ItemHash)
	default:
		return nil, errkind.New(errkind.InvalidInput, "download %s: unsupported item_type %q", store.ItemHash, store.ItemType)
	}
	var body io.ReadCloser
	err := c.do(ctx, u, func(reqCtx context.Context, resp *http.Response) error {
		body = resp.Body
		return nil
	}, false)
	if err != nil {
		return nil, fmt.Errorf("file %s: %w", store.ItemHash, err)
	}
	return body, nil
}

// do GETs u with retries. handle is called with a 200 response. When
// whole is true the request timeout covers handle (the body is read in
// it); otherwise it covers the wait for headers only and the body stays
// open, guarded by the idle timeout, until the caller closes it.
func (c *Client) do(ctx context.Context, u string, handle func(context.Context, *http.Response) error, whole bool) error {
	backoff := c.backoff
	var lastErr error
	for attempt := 1; attempt <= c.attempts; attempt++ {
		if attempt > 1 {
			c.log.Debug("aleph api: retrying", "url", redact(u), "attempt", attempt, "after", backoff, "err", lastErr)
			t := time.NewTimer(backoff)
			select {
			case <-ctx.Done():
				t.Stop()
				return ctx.Err()
			case <-t.C:
			}
			backoff = min(backoff*2, maxBackoff)
		}
		retry, err := c.once(ctx, u, handle, whole)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		lastErr = err
		if !retry {
			return err
		}
	}
	return lastErr
}

func (c *Client) once(ctx context.Context, u string, handle func(context.Context, *http.Response) error, whole bool) (retry bool, err error) {
	reqCtx, cancel := context.WithCancel(ctx)
	timer := time.AfterFunc(c.timeout, cancel)
	keepOpen := false
	defer func() {
		if !keepOpen {
			timer.Stop()
			cancel()
		}
	}()

	req, err := http.NewRequestWithContext(reqCtx, http.MethodGet, u, nil)
	if err != nil {
		return false, errkind.Wrap(errkind.InvalidInput, err)
	}
	req.Header.Set("Accept", "application/json, */*")
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return false, ctx.Err()
		}
		if reqCtx.Err() != nil {
			return true, errkind.Wrap(errkind.Unavailable, fmt.Errorf("%w: GET %s: no answer within %s", ErrUnreachable, redact(u), c.timeout))
		}
		return true, errkind.Wrap(errkind.Unavailable, fmt.Errorf("%w: GET %s: %w", ErrUnreachable, redact(u), unwrapURLError(err)))
	}
	switch {
	case resp.StatusCode == http.StatusOK:
	case resp.StatusCode == http.StatusNotFound:
		drain(resp.Body)
		return false, errkind.New(errkind.NotFound, "GET %s: 404 not found", redact(u))
	case resp.StatusCode >= 500:
		drain(resp.Body)
		return true, errkind.Wrap(errkind.Unavailable, fmt.Errorf("%w: GET %s: %s", ErrUnreachable, redact(u), resp.Status))
	default:
		drain(resp.Body)
		return false, errkind.New(errkind.Upstream, "GET %s: unexpected answer %s", redact(u), resp.Status)
	}

	if whole {
		defer resp.Body.Close()
		if err := handle(reqCtx, resp); err != nil {
			if ctx.Err() == nil && reqCtx.Err() != nil {
				return true, errkind.Wrap(errkind.Unavailable, fmt.Errorf("%w: GET %s: timed out after %s", ErrUnreachable, redact(u), c.timeout))
			}
			return false, err
		}
		return false, nil
	}
	// Streaming: headers arrived in time; from now on only stalls count.
	if !timer.Stop() {
		// The timeout fired just as the headers came.
		resp.Body.Close()
		return true, errkind.Wrap(errkind.Unavailable, fmt.Errorf("%w: GET %s: timed out after %s", ErrUnreachable, redact(u), c.timeout))
	}
	keepOpen = true
	resp.Body = newIdleBody(resp.Body, c.idleTimeout, cancel)
	if err := handle(reqCtx, resp); err != nil {
		resp.Body.Close()
		return false, err
	}
	return false, nil
}

// idleBody cancels the request when no byte arrives for idle, and releases
// the request context on Close.
type idleBody struct {
	rc     io.ReadCloser
	idle   time.Duration
	timer  *time.Timer
	cancel context.CancelFunc
}

func newIdleBody(rc io.ReadCloser, idle time.Duration, cancel context.CancelFunc) *idleBody {
	return &idleBody{rc: rc, idle: idle, timer: time.AfterFunc(idle, cancel), cancel: cancel}
}

func (b *idleBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	if n > 0 {
		b.timer.Reset(b.idle)
	}
	if err != nil && err != io.EOF {
		err = errkind.Wrap(errkind.Unavailable, fmt.Errorf("%w: download interrupted: %w", ErrUnreachable, err))
	}
	return n, err
}

func (b *idleBody) Close() error {
	b.timer.Stop()
	err := b.rc.Close()
	b.cancel()
	return err
}

func drain(rc io.ReadCloser) {
	_, _ = io.Copy(io.Discard, io.LimitReader(rc, 64<<10))
	rc.Close()
}

// unwrapURLError drops the *url.Error layer, whose text repeats the URL.
func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// redact removes credentials from a URL for logs and errors.
func redact(u string) string {
	p, err := url.Parse(u)
	if err != nil {
		return u
	}
	return p.Redacted()
}

// Authorization is one entry of an address's "security" aggregate: an
// address allowed to send messages on its behalf, as pyaleph reads it
// (aleph/permissions.py). Empty lists and an empty chain restrict
// nothing.
type Authorization struct {
	Address       string   `json:"address"`
	Chain         string   `json:"chain,omitempty"`
	Channels      []string `json:"channels,omitempty"`
	Types         []string `json:"types,omitempty"`
	PostTypes     []string `json:"post_types,omitempty"`
	AggregateKeys []string `json:"aggregate_keys,omitempty"`
}

// maxAggregateBody caps an aggregates answer.
const maxAggregateBody = 1 << 20

// Authorizations returns the delegations address granted in its
// "security" aggregate (/api/v0/aggregates/ADDRESS.json?keys=security).
// An address without that aggregate (404) has none: nil, nil.
func (c *Client) Authorizations(ctx context.Context, address string) ([]Authorization, error) {
	if address == "" || strings.ContainsAny(address, "/?#%") {
		return nil, errkind.New(errkind.InvalidInput, "authorizations: invalid address %q", address)
	}
	u := c.base + "/api/v0/aggregates/" + url.PathEscape(address) + ".json?" + url.Values{"keys": {"security"}}.Encode()
	var page struct {
		Data struct {
			Security struct {
				Authorizations []json.RawMessage `json:"authorizations"`
			} `json:"security"`
		} `json:"data"`
	}
	err := c.do(ctx, u, func(ctx context.Context, resp *http.Response) error {
		if err := json.NewDecoder(io.LimitReader(resp.Body, maxAggregateBody)).Decode(&page); err != nil {
			return errkind.Wrap(errkind.Upstream, fmt.Errorf("decoding %s: %w", redact(u), err))
		}
		return nil
	}, true)
	if errkind.Is(err, errkind.NotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("authorizations of %s: %w", address, err)
	}
	// An entry that is not an object of the expected shape is skipped,
	// as upstream's operator check skips what is not a dict: one bad
	// entry does not void the owner's other delegations.
	var out []Authorization
	for _, raw := range page.Data.Security.Authorizations {
		var a Authorization
		if json.Unmarshal(raw, &a) == nil && a.Address != "" {
			out = append(out, a)
		}
	}
	return out, nil
}

// Message statuses of /api/v0/messages/{hash} that mean the message no
// longer holds (aleph-vm's _TERMINAL_STATUSES).
const (
	StatusForgotten = "forgotten"
	StatusRejected  = "rejected"
	StatusRemoved   = "removed"
)

// maxStatusBody caps a /messages/{hash} answer (the message rides along).
const maxStatusBody = 4 << 20

// MessageStatus returns the status the API gives the message hash
// ("processed", "pending", "forgotten", "rejected", "removed", ...), read
// from /api/v0/messages/{hash} as aleph-vm's get_message_status does.
// An unknown message is a NotFound error.
func (c *Client) MessageStatus(ctx context.Context, hash string) (string, error) {
	if err := message.ValidateItemHash(hash); err != nil {
		return "", err
	}
	u := c.base + "/api/v0/messages/" + hash
	var page struct {
		Status string `json:"status"`
	}
	err := c.do(ctx, u, func(ctx context.Context, resp *http.Response) error {
		if err := json.NewDecoder(io.LimitReader(resp.Body, maxStatusBody)).Decode(&page); err != nil {
			return errkind.Wrap(errkind.Upstream, fmt.Errorf("decoding %s: %w", redact(u), err))
		}
		return nil
	}, true)
	if err != nil {
		return "", fmt.Errorf("status of message %s: %w", hash, err)
	}
	if page.Status == "" {
		return "", errkind.New(errkind.Upstream, "status of message %s: no status in the answer", hash)
	}
	return page.Status, nil
}
