package sources

import (
	"errors"
	"os"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// Forget makes hash unknown from now on, as the network does after a
// FORGET message: Message and Program answer NotFound (the Aleph API then
// answers 404 for it too, so after a restart it stays gone unless the
// operator's store holds it), and the copy in the download cache is
// removed. Files already cached are kept: they are addressed by content
// and may serve other messages.
func (r *Resolver) Forget(hash string) {
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
}

func (r *Resolver) forgottenErr(hash string) error {
	r.forgottenMu.Lock()
	defer r.forgottenMu.Unlock()
	if r.forgotten[hash] {
		return errkind.New(errkind.NotFound, "message %s was forgotten", hash)
	}
	return nil
}
