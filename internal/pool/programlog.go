package pool

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/aleph-vm-go/vm-supervisor/internal/proglog"
)

// Defaults for LogLimits fields left at zero.
const (
	DefaultLogBytesPerSecond = 16 << 10
	DefaultLogBurstBytes     = 256 << 10
	DefaultLogMaxBytes       = 8 << 20
	// maxLogLine is where a line is cut: a program printing megabytes
	// without a newline still makes bounded records.
	maxLogLine = 4 << 10
	// dropNoticeEvery spaces the "output dropped" notices.
	dropNoticeEvery = 10 * time.Second
)

// LogLimits bound what one execution's output may put into the
// supervisor's log: a sustained rate with a burst, and a total over the
// execution's life. Output past them is counted and dropped, never
// buffered.
type LogLimits struct {
	BytesPerSecond int
	BurstBytes     int
	MaxBytes       int64
}

func (l LogLimits) withDefaults() LogLimits {
	if l.BytesPerSecond <= 0 {
		l.BytesPerSecond = DefaultLogBytesPerSecond
	}
	if l.BurstBytes <= 0 {
		l.BurstBytes = DefaultLogBurstBytes
	}
	if l.MaxBytes <= 0 {
		l.MaxBytes = DefaultLogMaxBytes
	}
	return l
}

// lineLogger turns the guest's output into one log record per line,
// tagged with the program hash by the logger it wraps, within LogLimits.
type lineLogger struct {
	mu      sync.Mutex
	log     *slog.Logger
	sink    *proglog.Buffer // the owner's copy (nil: none), outside the rate limits
	buf     bytes.Buffer
	limiter *rate.Limiter
	left    int64 // bytes the execution may still log

	dropped      int64 // bytes dropped since the last notice
	lastNotice   time.Time
	quotaNoticed bool
}

func newLineLogger(l *slog.Logger, lim LogLimits) *lineLogger {
	lim = lim.withDefaults()
	return &lineLogger{
		log:     l,
		limiter: rate.NewLimiter(rate.Limit(lim.BytesPerSecond), lim.BurstBytes),
		left:    lim.MaxBytes,
	}
}

// setLogger retags later lines, for a spare that became an execution.
func (w *lineLogger) setLogger(l *slog.Logger) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.log = l
}

// setSink sends later lines to a program's log as well.
func (w *lineLogger) setSink(b *proglog.Buffer) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.sink = b
}

func (w *lineLogger) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	written := len(p)
	for len(p) > 0 {
		// Only the current line is buffered, and never past maxLogLine.
		nl := bytes.IndexByte(p, '\n')
		chunk := p
		if nl >= 0 {
			chunk = p[:nl]
		}
		room := maxLogLine - w.buf.Len()
		if len(chunk) >= room {
			// A line longer than maxLogLine goes out in pieces.
			w.buf.Write(chunk[:room])
			w.emit()
			p = p[room:]
			continue
		}
		w.buf.Write(chunk)
		if nl < 0 {
			break
		}
		w.emit()
		p = p[nl+1:]
	}
	return written, nil
}

// emit logs the buffered line if the limits allow it.
func (w *lineLogger) emit() {
	line := strings.TrimRight(w.buf.String(), "\r")
	w.buf.Reset()
	if w.sink != nil {
		// Bounded by the buffer itself, so not rate-limited: the owner
		// sees the latest lines even when the supervisor's log drops them.
		w.sink.Append(proglog.Stdout, line)
	}
	msg := "guest: " + line
	n := len(msg)
	now := time.Now()
	switch {
	case w.left < int64(n):
		w.dropped += int64(n)
		if !w.quotaNoticed {
			w.quotaNoticed = true
			w.log.Warn("program output limit reached; further output is not logged")
		}
		return
	case !w.limiter.AllowN(now, n):
		w.dropped += int64(n)
		w.noticeDrops(now)
		return
	}
	w.left -= int64(n)
	w.noticeDrops(now)
	w.log.Info(msg)
}

func (w *lineLogger) noticeDrops(now time.Time) {
	if w.dropped == 0 || now.Sub(w.lastNotice) < dropNoticeEvery {
		return
	}
	w.log.Warn(fmt.Sprintf("program output over the log rate: %d bytes not logged", w.dropped))
	w.dropped, w.lastNotice = 0, now
}

var _ io.Writer = (*lineLogger)(nil)
