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
	"github.com/aleph-vm-go/vm-supervisor/internal/ownerauth"
)

// Allocations applies the scheduler's allocations (*allocations.Manager).
type Allocations interface {
	Update(ctx context.Context, a allocations.Allocation) (allocations.Result, error)
}

// maxAllocationBody bounds a legacy-authenticated allocation body: a list
// of hashes, as aiohttp's default client_max_size bounds it upstream
// (bodies of 1 MiB or more are refused, 413).
const maxAllocationBody = 1<<20 - 1

// errAllocationAuth is upstream's answer to every refused authentication
// (allocation_auth.py): unsigned, malformed, stale, misdirected,
// foreign-signed and replayed requests alike, so that the answer tells
// nothing of which check failed.
func errAllocationAuth() error {
	return errkind.New(errkind.Unauthorized, "Authentication token received is invalid")
}

// handleAllocations is aleph-vm's update_allocations: authenticated by an
// Aleph-EIP191-V1 signature of an authorized signer or by the deprecated
// token whose sha256 is ALLOCATION_TOKEN_HASH, it answers 200 when every
// program runs, 207 when some failed, 503 when all failed.
func (s *Server) handleAllocations(w http.ResponseWriter, r *http.Request) {
	body, signed, err := s.authenticateAllocation(r)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	if s.opts.Allocations == nil {
		s.writeError(w, r, errkind.New(errkind.Unavailable, "allocations are not enabled on this node"))
		return
	}
	if !signed {
		body, err = io.ReadAll(http.MaxBytesReader(w, r.Body, maxAllocationBody))
		if err != nil {
			var tooLarge *http.MaxBytesError
			if errors.As(err, &tooLarge) {
				err = errkind.Wrap(errkind.TooLarge, err)
			}
			s.writeError(w, r, err)
			return
		}
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

// authenticateAllocation is upstream's authenticate_api_request. An
// Authorization header, whatever its value, decides: it must be a valid
// Aleph-EIP191-V1 signature, with no fallback to the token (a
// misconfigured scheduler is told so rather than rescued). Without one,
// X-Auth-Signature is checked against ALLOCATION_TOKEN_HASH; its use is
// not logged per request, the deprecation is logged once at start
// (allocations.Signers.LogConfig). A signed request's body is read and
// returned (signed true); the token's is left to the caller.
func (s *Server) authenticateAllocation(r *http.Request) (body []byte, signed bool, err error) {
	if auth := r.Header.Get("Authorization"); auth != "" {
		scheme, _, ok := strings.Cut(auth, " ")
		if !ok || !strings.EqualFold(scheme, ownerauth.AllocationScheme) {
			return nil, false, errAllocationAuth()
		}
		signer, body, err := s.allocAuth.Allocation(r.Context(), r)
		switch {
		case err == nil:
			s.log.Debug("allocation request signed", "signer", signer)
			return body, true, nil
		case errors.Is(err, ownerauth.ErrMalformedAllocationAuth):
			s.log.Warn("Aleph-EIP191-V1 verification failed", "err", err)
			return nil, false, errAllocationAuth()
		case errkind.Is(err, errkind.Unauthorized):
			s.log.Info("Aleph-EIP191-V1 request refused", "err", err)
			return nil, false, errAllocationAuth()
		default:
			return nil, false, err
		}
	}
	if _, ok := r.Header["X-Auth-Signature"]; ok && s.legacyTokenValid(r.Header.Get("X-Auth-Signature")) {
		return nil, false, nil
	}
	return nil, false, errAllocationAuth()
}

// legacyTokenValid checks the deprecated X-Auth-Signature token against
// the configured sha256; an empty token or an empty hash never matches.
func (s *Server) legacyTokenValid(token string) bool {
	want := strings.ToLower(s.opts.AllocationTokenHash)
	if token == "" || want == "" {
		return false
	}
	sum := sha256.Sum256([]byte(token))
	got := hex.EncodeToString(sum[:])
	return subtle.ConstantTimeCompare([]byte(got), []byte(want)) == 1
}
