package errkind

import (
	"fmt"
	"io/fs"
	"net/http"
	"syscall"
	"testing"
)

func TestHTTPStatus(t *testing.T) {
	full := &fs.PathError{Op: "write", Path: "/var/cache/x", Err: syscall.ENOSPC}
	for _, c := range []struct {
		err  error
		want int
	}{
		{New(InvalidInput, "bad"), http.StatusBadRequest},
		{New(NoCapacity, "full"), http.StatusServiceUnavailable},
		{fmt.Errorf("extracting code: %w", full), http.StatusInsufficientStorage},
		{Wrap(BadGateway, fmt.Errorf("starting: %w", full)), http.StatusInsufficientStorage},
		{fmt.Errorf("plain"), http.StatusInternalServerError},
		// A program's own start failure outranks the wrapping of the pool.
		{fmt.Errorf("connect: %w", Wrap(ProgramFailed, fmt.Errorf("import error"))), http.StatusInternalServerError},
		{Wrap(ProgramFailed, Wrap(BadGateway, fmt.Errorf("x"))), http.StatusInternalServerError},
	} {
		if got := HTTPStatus(c.err); got != c.want {
			t.Errorf("HTTPStatus(%v) = %d, want %d", c.err, got, c.want)
		}
	}
}
