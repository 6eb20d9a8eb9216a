package sources

import (
	"errors"
	"fmt"
	"os"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// Forget makes hash unknown from now on, as the network does after a
// FORGET message: Message and Program answer NotFound (the Aleph API then
// answers 404 for it too, so after a restart it stays gone unless the
// operator's store holds it), and the copy in the download cache is
// removed. Files already cached are kept: they are addressed by content
// and may serve other messages.
//
// A message of the local store is the operator's and is never forgotten:
// Forget then does nothing and returns false. Whether the FORGET may act
// at all (its sender, the API's confirmation) is the caller's decision.
func (r *Resolver) Forget(hash string) bool {
	if r.Local(hash) {
		r.log.Warn("sources: a FORGET names a message of the local store: kept", "hash", hash)
		return false
	}
	r.forgottenMu.Lock()
	if r.forgotten == nil {
		r.forgotten = map[string]bool{}
	}
	r.forgotten[hash] = true
	r.forgottenMu.Unlock()
	if r.cache != nil {
		if err := r.cache.Remove("message", hash); err != nil && !errors.Is(err, os.ErrNotExist) {
			r.log.Warn("sources: removing a forgotten message from the cache", "hash", hash, "err", err)
		}
	}
	return true
}

// Local reports whether the local store holds the message hash.
func (r *Resolver) Local(hash string) bool {
	if r.store == nil {
		return false
	}
	_, err := r.store.GetMessage(hash)
	return err == nil
}

// Known returns the message hash as this node holds it, from the local
// store (local is then true) or the download cache, without asking the
// API: a FORGET's targets are checked against what the node runs, and a
// FORGET naming hashes the node never saw costs no API call. NotFound
// when the node does not hold it.
func (r *Resolver) Known(hash string) (m *message.Message, local bool, err error) {
	if err := message.ValidateItemHash(hash); err != nil {
		return nil, false, err
	}
	if r.store != nil {
		if m, err := r.store.GetMessage(hash); err == nil {
			return m, true, nil
		}
	}
	if r.cache == nil {
		return nil, false, errkind.New(errkind.NotFound, "message %s is not held here", hash)
	}
	path, err := r.cache.Path("message", hash)
	if err != nil {
		return nil, false, err
	}
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, false, errkind.New(errkind.NotFound, "message %s is not held here", hash)
	}
	if err != nil {
		return nil, false, err
	}
	m, err = message.ParseOptions{ExpectedHash: hash}.Parse(data)
	if err != nil {
		return nil, false, fmt.Errorf("cached message %s: %w", hash, err)
	}
	return m, false, nil
}

func (r *Resolver) forgottenErr(hash string) error {
	r.forgottenMu.Lock()
	defer r.forgottenMu.Unlock()
	if r.forgotten[hash] {
		return errkind.New(errkind.NotFound, "message %s was forgotten", hash)
	}
	return nil
}
