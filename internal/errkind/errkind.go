// Package errkind classifies errors by what went wrong, so that the HTTP
// layer can map them to status codes in one place (containerd's errdefs
// style). Packages wrap their errors with a kind; callers test with Is/Of.
package errkind

import (
	"errors"
	"fmt"
)

// Kind says what class of failure an error belongs to.
type Kind int

// Kinds, with the HTTP status each usually maps to (see HTTPStatus);
// Unknown is an error nobody classified.
const (
	Unknown         Kind = iota
	InvalidInput         // malformed request or message: 400
	NotFound             // unknown hash or route: 404
	Unavailable          // code/runtime/API unreachable or missing: 400/503 per context
	NoBackend            // no sandbox backend can run here: 503
	NoCapacity           // pool full: 503
	Timeout              // program did not answer in time: 504
	BadGateway           // sandbox or program crashed / no answer: 502
	TooLarge             // body or archive above limit: 413
	Forbidden            // not allowed: 403
	Unauthorized         // missing/invalid credentials: 401
	Conflict             // state conflict: 409
	Unsupported          // message kind recognised but not served here (INSTANCE on /vm): 400
	Upstream             // remote API answered an error: 502
	ResourceMissing      // a ref of the program (code, runtime, volume) cannot be obtained: 400
	ProgramFailed        // the program's own code failed to start (traceback for the client): 500
	ShuttingDown         // the supervisor is draining before it stops: 503
	RateLimited          // too many requests of this kind for now: 429
)

var names = map[Kind]string{
	Unknown: "unknown", InvalidInput: "invalid input", NotFound: "not found",
	Unavailable: "unavailable", NoBackend: "no backend", NoCapacity: "no capacity",
	Timeout: "timeout", BadGateway: "bad gateway", TooLarge: "too large",
	Forbidden: "forbidden", Unauthorized: "unauthorized", Conflict: "conflict",
	Unsupported: "unsupported", Upstream: "upstream error", ResourceMissing: "resource missing",
	ProgramFailed: "program failed", ShuttingDown: "shutting down", RateLimited: "rate limited",
}

func (k Kind) String() string { return names[k] }

type kindError struct {
	kind Kind
	err  error
}

func (e *kindError) Error() string { return e.err.Error() }
func (e *kindError) Unwrap() error { return e.err }

// New returns an error of kind k with a formatted message.
func New(k Kind, format string, args ...any) error {
	return &kindError{kind: k, err: fmt.Errorf(format, args...)}
}

// Wrap tags err with kind k. A nil err stays nil.
func Wrap(k Kind, err error) error {
	if err == nil {
		return nil
	}
	return &kindError{kind: k, err: err}
}

// Of returns the outermost kind found in err's chain, or Unknown.
func Of(err error) Kind {
	var ke *kindError
	if errors.As(err, &ke) {
		return ke.kind
	}
	return Unknown
}

// Is reports whether err carries kind k anywhere in its chain.
func Is(err error, k Kind) bool {
	for err != nil {
		var ke *kindError
		if !errors.As(err, &ke) {
			return false
		}
		if ke.kind == k {
			return true
		}
		err = ke.err
	}
	return false
}
