package reactor

import (
	"context"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/delegation"
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
// The delegations are read and cached by internal/delegation, shared
// with use_latest resolution so that an amend that stops a program is
// the one its restart runs.

const apiTimeout = 20 * time.Second

// Permits reports whether authorization a lets m's sender send m for the
// address that granted it (delegation.Permits).
func Permits(a alephapi.Authorization, m *message.Message) bool { return delegation.Permits(a, m) }

func sameAddress(a, b string) bool { return delegation.SameAddress(a, b) }

func ownerOf(m *message.Message) string { return delegation.OwnerOf(m) }

// delegations is the checker the reactor reads delegations through:
// Options.Delegations, else one of its own over Options.API.
func (r *Reactor) delegations() *delegation.Checker {
	r.delegOnce.Do(func() {
		switch {
		case r.opts.Delegations != nil:
			r.deleg = r.opts.Delegations
		case r.opts.API != nil:
			r.deleg = delegation.New(r.opts.API, 0)
		}
	})
	return r.deleg
}

// mayActFor reports whether m may act on something owner owns (sent by
// sender, when not empty): m is sent by owner or sender, or by a
// delegate of owner acting for it.
func (r *Reactor) mayActFor(ctx context.Context, m *message.Message, owner, sender string) bool {
	if sameAddress(m.Sender, owner) || sameAddress(m.Sender, sender) {
		return true
	}
	ok, err := r.delegations().MaySend(ctx, m, owner)
	if err != nil {
		r.log.Warn("reactor: reading the owner's delegations", "owner", owner, "item_hash", m.ItemHash, "err", err)
		return false
	}
	return ok
}
