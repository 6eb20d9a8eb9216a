package errkind

import (
	"context"
	"errors"
	"net/http"
	"syscall"
)

// HTTPStatus is the one place where error kinds become HTTP status codes,
// for the public API and the guest API alike.
func HTTPStatus(err error) int {
	var maxBytes *http.MaxBytesError
	switch {
	case errors.As(err, &maxBytes):
		return http.StatusRequestEntityTooLarge
	case errors.Is(err, context.DeadlineExceeded) && Of(err) == Unknown:
		return http.StatusGatewayTimeout
	case errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT):
		// The node's disk, not the request, is at fault.
		return http.StatusInsufficientStorage
	}
	switch Of(err) {
	case InvalidInput, Unsupported, ResourceMissing:
		return http.StatusBadRequest
	case NotFound:
		return http.StatusNotFound
	case Unauthorized:
		return http.StatusUnauthorized
	case Forbidden:
		return http.StatusForbidden
	case Conflict:
		return http.StatusConflict
	case TooLarge:
		return http.StatusRequestEntityTooLarge
	case Unavailable, NoBackend, NoCapacity, ShuttingDown:
		return http.StatusServiceUnavailable
	case Timeout:
		return http.StatusGatewayTimeout
	case RateLimited:
		return http.StatusTooManyRequests
	case BadGateway, Upstream:
		return http.StatusBadGateway
	case ProgramFailed:
		// aleph-vm's status for a program whose start-up raised.
		return http.StatusInternalServerError
	}
	return http.StatusInternalServerError
}
