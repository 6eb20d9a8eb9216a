// Package tailbuf keeps the last lines of an output stream, so that a
// failure can be explained with what the process printed just before it.
package tailbuf

import (
	"bytes"
	"strings"
	"sync"
)

// Buffer holds at most Max lines of at most MaxLine bytes each. It is safe
// for concurrent use.
type Buffer struct {
	mu      sync.Mutex
	max     int
	maxLine int
	lines   []string
}

// New returns a buffer of the last maxLines lines, each cut at maxLine bytes.
func New(maxLines, maxLine int) *Buffer { return &Buffer{max: maxLines, maxLine: maxLine} }

// Add records one line (a trailing newline is dropped).
func (t *Buffer) Add(line []byte) {
	s := strings.TrimRight(string(line), "\n")
	if len(s) > t.maxLine {
		s = s[:t.maxLine] + "…"
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lines = append(t.lines, s)
	if len(t.lines) > t.max {
		t.lines = t.lines[len(t.lines)-t.max:]
	}
}

// String returns the kept lines, oldest first.
func (t *Buffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return strings.Join(t.lines, "\n")
}

// Writer returns an io.Writer that splits what it receives into lines and
// adds them to t; a line without its newline yet waits (cut at maxLine).
func (t *Buffer) Writer() *LineWriter { return &LineWriter{t: t} }

// LineWriter feeds a Buffer from a stream. It is not safe for concurrent
// use (one stream, one writer).
type LineWriter struct {
	t       *Buffer
	partial []byte
}

func (w *LineWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			room := w.t.maxLine + 1 - len(w.partial)
			w.partial = append(w.partial, p[:max(0, min(len(p), room))]...)
			break
		}
		w.partial = append(w.partial, p[:min(i, max(0, w.t.maxLine+1-len(w.partial)))]...)
		w.t.Add(w.partial)
		w.partial = w.partial[:0]
		p = p[i+1:]
	}
	return n, nil
}
