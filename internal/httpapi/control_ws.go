package httpapi

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"time"

	"github.com/coder/websocket"
	"github.com/coder/websocket/wsjson"

	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/proglog"
)

// authWait bounds how long a log stream waits for its credentials
// (upstream waits forever).
const authWait = time.Minute

// wsStatus is the answer to the first message: {"status": "connected"} or
// {"status": "failed", "reason": ...}.
type wsStatus struct {
	Status string `json:"status"`
	Reason string `json:"reason,omitempty"`
}

// wsLine is one log line on the stream, upstream's {"type", "message"}.
type wsLine struct {
	Type    string `json:"type"`
	Message string `json:"message"`
}

// handleStreamLogs is upstream's stream_logs: a websocket whose first
// message carries the credentials ({"auth": {X-SignedPubKey: {...},
// X-SignedOperation: {...}}}), since browsers cannot set headers on one.
// The owner then gets the kept lines and, while the program runs, every
// new one; for a program that is not running the stream ends after the
// kept lines with a "system" message.
func (s *Server) handleStreamLogs(w http.ResponseWriter, r *http.Request) {
	ref := r.PathValue("ref")
	hash, err := message.ParseRef(ref)
	if err != nil {
		writeText(w, http.StatusBadRequest, fmt.Sprintf("Invalid ref: '%s'", ref))
		return
	}
	owner, found, err := s.programOwner(r.Context(), hash)
	if err != nil {
		s.writeError(w, r, err)
		return
	}
	if !found {
		writeText(w, http.StatusNotFound, "No execution found for VM "+hash)
		return
	}
	w = rawWriter(w)
	if origin := r.Header.Get("Origin"); origin != "" {
		w.Header().Set("Access-Control-Allow-Origin", origin)
		w.Header().Set("Access-Control-Allow-Credentials", "true")
	}
	// The stream outlives any per-write deadline of ordinary answers.
	rc := http.NewResponseController(w)
	_ = rc.SetWriteDeadline(time.Time{})
	_ = rc.SetReadDeadline(time.Time{})
	// Credentials travel in the first message, not in cookies, so any
	// page may open the stream (the owner's console is on another origin).
	conn, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true})
	if err != nil {
		s.log.Info("log stream upgrade failed", "program", hash, "err", err)
		return
	}
	defer func() { _ = conn.CloseNow() }()
	ctx := context.WithoutCancel(r.Context())
	if !s.streamAuth(ctx, conn, hash, owner) {
		_ = conn.Close(websocket.StatusPolicyViolation, "authentication failed")
		return
	}
	s.streamLines(ctx, conn, hash)
}

// streamAuth reads and checks the first message, answering it.
func (s *Server) streamAuth(ctx context.Context, conn *websocket.Conn, hash, owner string) bool {
	fail := func(reason string) bool {
		wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		_ = wsjson.Write(wctx, conn, wsStatus{Status: "failed", Reason: reason})
		return false
	}
	actx, cancel := context.WithTimeout(ctx, authWait)
	defer cancel()
	var first map[string]json.RawMessage
	if err := wsjson.Read(actx, conn, &first); err != nil {
		return fail("expected a JSON object: " + err.Error())
	}
	auth, ok := first["auth"]
	if !ok {
		return fail("missing 'auth' key in message")
	}
	wallet, err := s.auth.Message(auth)
	if err != nil {
		return fail(err.Error())
	}
	if !s.mayOperate(ctx, wallet, owner, hash) {
		s.log.Info("log stream refused", "program", hash, "wallet", wallet)
		return fail("unauthorized sender")
	}
	wctx, wcancel := context.WithTimeout(ctx, 10*time.Second)
	defer wcancel()
	return wsjson.Write(wctx, conn, wsStatus{Status: "connected"}) == nil
}

// streamLines sends the program's lines until the client leaves, or, for
// a program that is not running, sends what is kept and closes.
func (s *Server) streamLines(ctx context.Context, conn *websocket.Conn, hash string) {
	buf := s.opts.Control.Logs(hash)
	send := func(l wsLine) error {
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		return wsjson.Write(wctx, conn, l)
	}
	if s.opts.Control.Running(hash) == nil {
		if buf != nil {
			for _, e := range buf.Entries() {
				if send(wsLine{Type: e.Stream, Message: e.Message}) != nil {
					return
				}
			}
		}
		_ = send(wsLine{Type: "system", Message: "VM is not running, past logs sent"})
		_ = conn.Close(websocket.StatusNormalClosure, "")
		return
	}
	if buf == nil {
		// Logs are not kept on this node: nothing will ever come.
		_ = send(wsLine{Type: "system", Message: "logs are not kept on this node"})
		_ = conn.Close(websocket.StatusNormalClosure, "")
		return
	}
	// Anything the client sends now is ignored; CloseRead ends ctx when
	// it closes the connection.
	fctx := conn.CloseRead(ctx)
	s.log.Info("log stream opened", "program", hash)
	err := buf.Follow(fctx, func(e proglog.Entry) error {
		return send(wsLine{Type: e.Stream, Message: e.Message})
	}, func(n uint64) error {
		return send(wsLine{Type: "system", Message: fmt.Sprintf("%d lines dropped: the stream fell behind the program", n)})
	})
	s.log.Info("log stream closed", "program", hash, "err", err)
}

// rawWriter unwraps the writer to net/http's own, so that the upgrade's
// 101 does not arm the per-write deadline of ordinary answers on a
// connection the websocket keeps.
func rawWriter(w http.ResponseWriter) http.ResponseWriter {
	for {
		u, ok := w.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			return w
		}
		w = u.Unwrap()
	}
}
