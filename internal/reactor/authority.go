package reactor

import (
	"context"
	"encoding/json"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/alephapi"
)

// Who may act on a message (FORGET it, amend a ref it follows).
//
// Reading of pyaleph (aleph/permissions.py check_sender_authorization and
// handlers/content/forget.py): a message acts for its content.address;
// its sender is that address, or an address the owner lists in the
// "authorizations" of its "security" aggregate, whose optional chain,
// channels, types (and post_types, aggregate_keys) restrict what it may
// send. pyaleph also refuses a FORGET whose sender is not the target's
// sender. Here a FORGET or an amend acts when its sender is the target's
// owner (content.address, else sender), the target's sender, or a
// delegate of the owner that acts for the owner (content.address) with
// the message's type allowed. FORGETs are in addition confirmed by the
// API (reactor.go), so the network's own, stricter, check applies too.

// authTTL is how long an owner's authorizations are reused: a flood of
// foreign messages naming one program costs one API call per period.
const (
	authTTL      = 30 * time.Second
	maxAuthCache = 1024
	apiTimeout   = 20 * time.Second
)

// sameAddress compares addresses: Ethereum's (0x…) ignoring case, as
// their checksum casing is optional; other chains' exactly.
func sameAddress(a, b string) bool {
	if a == "" || b == "" {
		return false
	}
	if strings.HasPrefix(a, "0x") && strings.HasPrefix(b, "0x") {
		return strings.EqualFold(a, b)
	}
	return a == b
}

// ownerOf is the address a message belongs to: its content.address, else
// its sender.
func ownerOf(m *message.Message) string {
	var c struct {
		Address string `json:"address"`
	}
	if json.Unmarshal(m.Content, &c) == nil && c.Address != "" {
		return c.Address
	}
	return m.Sender
}

// Permits reports whether authorization a lets m's sender send m for the
// address that granted it.
func Permits(a alephapi.Authorization, m *message.Message) bool {
	if !sameAddress(a.Address, m.Sender) {
		return false
	}
	if a.Chain != "" && a.Chain != m.Chain {
		return false
	}
	if len(a.Channels) > 0 && !slices.Contains(a.Channels, m.Channel) {
		return false
	}
	if len(a.Types) > 0 && !slices.Contains(a.Types, string(m.Type)) {
		return false
	}
	var c struct {
		Type string `json:"type"`
		Key  string `json:"key"`
	}
	_ = json.Unmarshal(m.Content, &c)
	if m.Type == message.TypePost && len(a.PostTypes) > 0 && !slices.Contains(a.PostTypes, c.Type) {
		return false
	}
	if m.Type == message.TypeAggregate && len(a.AggregateKeys) > 0 && !slices.Contains(a.AggregateKeys, c.Key) {
		return false
	}
	return true
}

type authEntry struct {
	auths []alephapi.Authorization
	until time.Time
}

type authCache struct {
	mu      sync.Mutex
	entries map[string]authEntry
}

// mayActFor reports whether m may act on something owner owns (sent by
// sender, when not empty): m is sent by owner or sender, or by a
// delegate of owner acting for it.
func (r *Reactor) mayActFor(ctx context.Context, m *message.Message, owner, sender string) bool {
	if sameAddress(m.Sender, owner) || sameAddress(m.Sender, sender) {
		return true
	}
	if r.opts.API == nil || owner == "" || !sameAddress(ownerOf(m), owner) {
		return false
	}
	auths, err := r.authorizations(ctx, owner)
	if err != nil {
		r.log.Warn("reactor: reading the owner's delegations", "owner", owner, "item_hash", m.ItemHash, "err", err)
		return false
	}
	for _, a := range auths {
		if Permits(a, m) {
			return true
		}
	}
	return false
}

func (r *Reactor) authorizations(ctx context.Context, owner string) ([]alephapi.Authorization, error) {
	key := strings.ToLower(owner)
	if !strings.HasPrefix(owner, "0x") {
		key = owner
	}
	c := &r.auths
	now := time.Now()
	c.mu.Lock()
	if e, ok := c.entries[key]; ok && now.Before(e.until) {
		c.mu.Unlock()
		return e.auths, nil
	}
	c.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	auths, err := r.opts.API.Authorizations(ctx, owner)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.entries == nil {
		c.entries = map[string]authEntry{}
	}
	if len(c.entries) >= maxAuthCache {
		for k, e := range c.entries {
			if now.After(e.until) || len(c.entries) >= maxAuthCache {
				delete(c.entries, k)
			}
		}
	}
	c.entries[key] = authEntry{auths: auths, until: now.Add(authTTL)}
	return auths, nil
}
