package httpapi

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"io"
	"net/http"
	"strings"

	"github.com/aleph-vm-go/vm-supervisor/internal/allocations"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// Allocations applies the scheduler's allocations (*allocations.Manager).
type Allocations interface {
	Update(ctx context.Context, a allocations.Allocation) (allocations.Result, error)
}

// maxAllocationBody bounds an allocation body: a list of hashes, as
// aiohttp's default client_max_size bounds it upstream.
const maxAllocationBody = 1 << 20

// handleAllocations is aleph-vm's update_allocations: authenticated by
// the token whose sha256 is ALLOCATION_TOKEN_HASH, it answers 200 when
// every program runs, 207 when some failed, 503 when all failed.
func (s *Server) handleAllocations(w http.ResponseWriter, r *http.Request) {
	if !s.allocationAuthorized(r) {
		s.writeError(w, r, errkind.New(errkind.Unauthorized, "Authentication token received is invalid"))
		return
	}
	if s.opts.Allocations == nil {
		s.writeError(w, r, errkind.New(errkind.Unavailable, "allocations are not enabled on this node"))
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxAllocationBody))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			err = errkind.Wrap(errkind.TooLarge, err)
		}
		s.writeError(w, r, err)
		return
	}
	a, invalid := allocations.Parse(body)
	if len(invalid) > 0 {
		writeJSON(w, http.StatusBadRequest, invalid)
		return
	}
	res, err := s.opts.Allocations.Update(r.Context(), a)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	code := http.StatusOK
	switch {
	case len(res.Failing) > 0 && len(res.Successful) == 0:
		code = http.StatusServiceUnavailable
	case len(res.Failing) > 0:
		code = http.StatusMultiStatus
	}
	writeJSON(w, code, res)
}

// allocationAuthorized checks X-Auth-Signature against the configured
// sha256. Upstream's newer Aleph-EIP191-V1 scheme is not implemented: a
// request with an Authorization header is refused, as upstream refuses
// one it cannot verify (no fallback to the token).
func (s *Server) allocationAuthorized(r *http.Request) bool {
	if r.Header.Get("Authorization") != "" {
		return false
	}
	token := r.Header.Get("X-Auth-Signature")
	want := strings.ToLower(s.opts.AllocationTokenHash)
	if token == "" || want == "" {
		return false
	}
	sum := sha256.Sum256([]byte(token))
	got := hex.EncodeToString(sum[:])
	return subtle.ConstantTimeCompare([]byte(got), []byte(want)) == 1
}
