// Package delegation answers who may act for an address: the address
// itself, or an address it lists in the "authorizations" of its
// "security" aggregate. One Checker reads and caches the aggregates for
// the reactor (FORGETs, amends), use_latest resolution (which amend
// wins) and the owner's control API (who may stop a program), so the
// three agree.
//
// Two rules, each upstream's:
//   - MaySend is pyaleph's (aleph/permissions.py): a message acts for its
//     content.address when sent by it, or by a delegate whose optional
//     chain, channels, types, post_types and aggregate_keys allow it.
//   - MayOperate is aleph-vm's operator rule (views/operator.py
//     check_owner_permissions): the wallet is the owner, or a delegate of
//     the owner whose types are empty or name INSTANCE; chains and
//     channels are not looked at. A failed aggregate read refuses.
package delegation

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

// DefaultTTL is upstream's CACHE_TTL_SECURITY_AGGREGATE.
const DefaultTTL = 120 * time.Second

const (
	maxEntries = 1024
	apiTimeout = 20 * time.Second
)

// Source reads an address's delegations (*alephapi.Client).
type Source interface {
	Authorizations(ctx context.Context, address string) ([]alephapi.Authorization, error)
}

// Checker reads delegations through a Source and keeps each address's
// for a TTL: a flood of requests or messages naming one owner costs one
// API call per period. Safe for concurrent use; a nil *Checker knows no
// delegations (only owners act).
type Checker struct {
	src Source
	ttl time.Duration

	mu      sync.Mutex
	entries map[string]entry
}

type entry struct {
	auths []alephapi.Authorization
	until time.Time
}

// New returns a checker over src; ttl <= 0 means DefaultTTL.
func New(src Source, ttl time.Duration) *Checker {
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	return &Checker{src: src, ttl: ttl, entries: map[string]entry{}}
}

// SameAddress compares addresses: Ethereum's (0x…) ignoring case, as
// their checksum casing is optional; other chains' (Solana's base58)
// exactly.
func SameAddress(a, b string) bool {
	if a == "" || b == "" {
		return false
	}
	if strings.HasPrefix(a, "0x") && strings.HasPrefix(b, "0x") {
		return strings.EqualFold(a, b)
	}
	return a == b
}

// OwnerOf is the address a message acts for: its content.address, else
// its sender.
func OwnerOf(m *message.Message) string {
	var c struct {
		Address string `json:"address"`
	}
	if json.Unmarshal(m.Content, &c) == nil && c.Address != "" {
		return c.Address
	}
	return m.Sender
}

// Permits reports whether authorization a lets m's sender send m for the
// address that granted it (pyaleph's check_sender_authorization).
func Permits(a alephapi.Authorization, m *message.Message) bool {
	if !SameAddress(a.Address, m.Sender) {
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

// MaySend reports whether m may act for owner: sent by owner, or by a
// delegate of owner that sends it for owner (content.address) with what
// the delegation allows. An error is a failed aggregate read.
func (c *Checker) MaySend(ctx context.Context, m *message.Message, owner string) (bool, error) {
	if SameAddress(m.Sender, owner) {
		return true, nil
	}
	if c == nil || owner == "" || !SameAddress(OwnerOf(m), owner) {
		return false, nil
	}
	auths, err := c.Authorizations(ctx, owner)
	if err != nil {
		return false, err
	}
	for _, a := range auths {
		if Permits(a, m) {
			return true, nil
		}
	}
	return false, nil
}

// operatorType is the message type an operator delegation must name when
// it names types: upstream checks MessageType.instance for programs and
// instances alike.
const operatorType = "INSTANCE"

// MayOperate reports whether wallet may operate (stop, reboot, erase,
// read the logs of) a program owned by owner. An error is a failed
// aggregate read; upstream refuses then, and so should the caller.
func (c *Checker) MayOperate(ctx context.Context, wallet, owner string) (bool, error) {
	if wallet == "" || owner == "" {
		return false, nil
	}
	if strings.EqualFold(wallet, owner) {
		return true, nil
	}
	if c == nil {
		return false, nil
	}
	auths, err := c.Authorizations(ctx, owner)
	if err != nil {
		return false, err
	}
	for _, a := range auths {
		if len(a.Types) > 0 && !slices.Contains(a.Types, operatorType) {
			continue
		}
		if a.Address != "" && strings.EqualFold(a.Address, wallet) {
			return true, nil
		}
	}
	return false, nil
}

// Authorizations returns owner's delegations, from the cache while fresh.
func (c *Checker) Authorizations(ctx context.Context, owner string) ([]alephapi.Authorization, error) {
	key := owner
	if strings.HasPrefix(owner, "0x") {
		key = strings.ToLower(owner)
	}
	now := time.Now()
	c.mu.Lock()
	if e, ok := c.entries[key]; ok && now.Before(e.until) {
		c.mu.Unlock()
		return e.auths, nil
	}
	c.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, apiTimeout)
	defer cancel()
	auths, err := c.src.Authorizations(ctx, owner)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.entries) >= maxEntries {
		for k, e := range c.entries {
			if now.After(e.until) || len(c.entries) >= maxEntries {
				delete(c.entries, k)
			}
		}
	}
	c.entries[key] = entry{auths: auths, until: now.Add(c.ttl)}
	return auths, nil
}
