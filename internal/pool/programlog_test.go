package pool

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
)

// countingHandler records what reached the log, as the operator's journal
// would receive it.
type countingHandler struct {
	mu       sync.Mutex
	bytes    int
	records  int
	longest  int
	warnings []string
}

func (h *countingHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countingHandler) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *countingHandler) WithGroup(string) slog.Handler            { return h }
func (h *countingHandler) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if r.Level >= slog.LevelWarn {
		h.warnings = append(h.warnings, r.Message)
		return nil
	}
	h.records++
	h.bytes += len(r.Message)
	h.longest = max(h.longest, len(r.Message))
	return nil
}

// A program flooding its output (the attack: 100 MiB became 116 MiB of
// supervisor log in 8.5 s) gets at most its per-execution budget logged.
// mustLog writes p as the program's output would be: a lineLogger
// accepts all of it, whatever it keeps.
func mustLog(t *testing.T, w *lineLogger, p []byte) {
	t.Helper()
	if n, err := w.Write(p); n != len(p) || err != nil {
		t.Fatalf("Write: %d, %v; want %d, nil", n, err, len(p))
	}
}

func TestProgramOutputFloodIsBounded(t *testing.T) {
	h := &countingHandler{}
	lim := LogLimits{BytesPerSecond: 1 << 30, BurstBytes: 1 << 30, MaxBytes: 1 << 20}
	w := newLineLogger(slog.New(h), lim)
	line := []byte(strings.Repeat("x", 1023) + "\n")
	chunk := bytes.Repeat(line, 64) // 64 KiB per write
	for range 100 << 20 / len(chunk) {
		if n, err := w.Write(chunk); n != len(chunk) || err != nil {
			t.Fatalf("Write = %d, %v", n, err)
		}
	}
	if h.bytes > int(lim.MaxBytes) {
		t.Errorf("logged %d bytes of 100 MiB, budget %d", h.bytes, lim.MaxBytes)
	}
	if h.bytes < int(lim.MaxBytes)/2 {
		t.Errorf("logged only %d bytes: the budget is not used", h.bytes)
	}
	if len(h.warnings) != 1 || !strings.Contains(h.warnings[0], "limit reached") {
		t.Errorf("want one notice that the limit was reached, got %q", h.warnings)
	}
}

func TestProgramOutputRateLimited(t *testing.T) {
	h := &countingHandler{}
	w := newLineLogger(slog.New(h), LogLimits{BytesPerSecond: 1, BurstBytes: 10 * len("guest: "+strings.Repeat("y", 100)), MaxBytes: 1 << 30})
	for range 1000 {
		mustLog(t, w, []byte(strings.Repeat("y", 100)+"\n"))
	}
	if h.records < 10 || h.records > 11 {
		t.Errorf("%d lines logged, want the burst of 10", h.records)
	}
}

// Output without newlines is cut into bounded records instead of being
// buffered without end.
func TestProgramOutputLongLinesAreCut(t *testing.T) {
	h := &countingHandler{}
	w := newLineLogger(slog.New(h), LogLimits{BytesPerSecond: 1 << 30, BurstBytes: 1 << 30, MaxBytes: 1 << 30})
	big := bytes.Repeat([]byte("z"), 10*maxLogLine+5)
	mustLog(t, w, big[:7])
	mustLog(t, w, big[7:])
	if h.longest > len("guest: ")+maxLogLine {
		t.Errorf("a record of %d bytes", h.longest)
	}
	if h.records != 10 {
		t.Errorf("%d records for 10 full pieces, want 10 (the rest waits for its newline)", h.records)
	}
	mustLog(t, w, []byte("\n"))
	if h.records != 11 {
		t.Errorf("the tail of the line was not logged at its newline")
	}
}
