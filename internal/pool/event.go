package pool

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
)

// EventTokenVar and EventTokenHeader carry an execution's event token:
// the agent hands the variable to the launcher, which takes it out of the
// program's environment and turns a request bearing the header into an
// ASGI "aleph.message" event (cmd/vm-agent/launcher.py). Events ride the
// ordinary HTTP streams, so neither the agent nor the guest protocol
// needed a new path; the token keeps outside clients from forging one.
const (
	EventTokenVar    = "_ALEPH_EVENT_TOKEN"
	EventTokenHeader = "Aleph-Event-Token"
)

// maxEventResult bounds what is kept of a program's answer to an event.
const maxEventResult = 64 << 10

func newEventToken() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b) // never fails (crypto/rand panics instead)
	return hex.EncodeToString(b)
}

// Deliver runs the program hash with an Aleph message, as aleph-vm's
// run_code_on_event does for programs whose on.message filters match: the
// program is started if it is not running, receives the message as an
// ASGI event of type "aleph.message" (receive() answers {"type":
// "aleph.message", "body": <the message JSON as a str>}), and stays warm
// for REUSE_TIMEOUT afterwards. It returns what the program sent back (the
// "body" of its first send, JSON-encoded) or the program's traceback as a
// ProgramFailed error. Only ASGI programs take events: aleph-vm's runtime
// has no way to hand one to an executable either.
func (p *Pool) Deliver(ctx context.Context, hash string, event []byte) ([]byte, error) {
	e, err := p.Acquire(ctx, hash)
	if err != nil {
		return nil, err
	}
	defer e.Release()
	if iface := programInterface(e.prog.Content.Code); iface != guest.InterfaceASGI {
		return nil, errkind.New(errkind.Unsupported, "program %s is an executable: only ASGI programs receive messages", hash)
	}
	ctx, cancel := context.WithTimeout(ctx, e.RequestTimeout())
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://program/", bytes.NewReader(event))
	if err != nil {
		return nil, err
	}
	req.Header.Set(EventTokenHeader, e.eventToken)
	req.Header.Set("Content-Type", "application/json")
	resp, err := e.Transport().RoundTrip(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, errkind.Wrap(errkind.Timeout, fmt.Errorf("program %s did not take the message within %s: %w", hash, e.RequestTimeout(), err))
		}
		return nil, errkind.Wrap(errkind.BadGateway, fmt.Errorf("delivering a message to %s: %w", hash, err))
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxEventResult))
	if err != nil {
		return nil, errkind.Wrap(errkind.BadGateway, fmt.Errorf("reading %s's answer to a message: %w", hash, err))
	}
	if resp.StatusCode != http.StatusOK {
		return body, errkind.Wrap(errkind.ProgramFailed, fmt.Errorf("program %s failed on a message (%d): %s", hash, resp.StatusCode, body))
	}
	return body, nil
}

// Programs returns the programs of the running executions.
func (p *Pool) Programs() []*sources.Program {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]*sources.Program, 0, len(p.running))
	for _, e := range p.running {
		out = append(out, e.prog)
	}
	return out
}
