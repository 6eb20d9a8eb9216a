package message

import (
	"strings"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// FieldError says what is wrong with one field. Field is a dotted path such
// as "content.code.entrypoint" or "volumes[2].mount", so that users can find
// the offending part of their message without reading our code.
type FieldError struct {
	Field   string
	Problem string
}

func (e *FieldError) Error() string { return e.Field + ": " + e.Problem }

// fieldErrors reports every problem at once: a user fixing a message should
// not have to resubmit it once per mistake.
type fieldErrors []error

func (es fieldErrors) Error() string {
	parts := make([]string, len(es))
	for i, e := range es {
		parts[i] = e.Error()
	}
	return strings.Join(parts, "; ")
}

func (es fieldErrors) Unwrap() []error { return es }

// invalid wraps the collected problems as one InvalidInput error, or nil.
func invalid(errs []error) error {
	switch len(errs) {
	case 0:
		return nil
	case 1:
		return errkind.Wrap(errkind.InvalidInput, errs[0])
	default:
		return errkind.Wrap(errkind.InvalidInput, fieldErrors(errs))
	}
}

func fieldErr(field, problem string) error {
	return &FieldError{Field: field, Problem: problem}
}
