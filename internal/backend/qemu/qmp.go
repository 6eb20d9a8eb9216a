package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
)

// qmp is a minimal client of QEMU's machine protocol: enough to start the
// paused VM, learn when the guest opens its channel (VSERPORT_CHANGE) and
// ask QEMU to quit.
type qmp struct {
	conn net.Conn

	cmdMu   sync.Mutex // one command in flight: replies carry no id here
	replies chan qmpReply
	onEvent func(name string, data json.RawMessage)
	closed  chan struct{}
}

type qmpReply struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
}

type qmpMessage struct {
	qmpReply
	Event string          `json:"event"`
	Data  json.RawMessage `json:"data"`
	QMP   json.RawMessage `json:"QMP"` // greeting
}

// dialQMP connects to QEMU's QMP socket, reads the greeting and enters
// command mode. onEvent runs on the reader goroutine for every event.
func dialQMP(ctx context.Context, path string, onEvent func(string, json.RawMessage)) (*qmp, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	q := &qmp{conn: conn, replies: make(chan qmpReply, 1), onEvent: onEvent, closed: make(chan struct{})}
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	r := bufio.NewReader(conn)
	var greeting qmpMessage
	line, err := r.ReadBytes('\n')
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp greeting: %w", err)
	}
	if err := json.Unmarshal(line, &greeting); err != nil || greeting.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("qmp greeting: unexpected %q", line)
	}
	go q.read(r)
	if err := q.execute(ctx, "qmp_capabilities"); err != nil {
		q.close()
		return nil, err
	}
	return q, nil
}

func (q *qmp) read(r *bufio.Reader) {
	defer close(q.closed)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return
		}
		var m qmpMessage
		if err := json.Unmarshal(line, &m); err != nil {
			continue
		}
		if m.Event != "" {
			if q.onEvent != nil {
				q.onEvent(m.Event, m.Data)
			}
			continue
		}
		select {
		case q.replies <- m.qmpReply:
		default: // nobody asked; drop
		}
	}
}

// execute runs one command and waits for its answer.
func (q *qmp) execute(ctx context.Context, command string) error {
	_, err := q.query(ctx, command)
	return err
}

// query runs one command and returns its result.
func (q *qmp) query(ctx context.Context, command string) (json.RawMessage, error) {
	return q.call(ctx, command, nil)
}

// call runs one command with arguments (nil: none) and returns its result.
func (q *qmp) call(ctx context.Context, command string, args any) (json.RawMessage, error) {
	q.cmdMu.Lock()
	defer q.cmdMu.Unlock()
	msg := map[string]any{"execute": command}
	if args != nil {
		msg["arguments"] = args
	}
	b, err := json.Marshal(msg)
	if err != nil {
		return nil, fmt.Errorf("qmp %s: %w", command, err)
	}
	if _, err := q.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("qmp %s: %w", command, err)
	}
	select {
	case rep := <-q.replies:
		if rep.Error != nil {
			return nil, fmt.Errorf("qmp %s: %s: %s", command, rep.Error.Class, rep.Error.Desc)
		}
		return rep.Return, nil
	case <-q.closed:
		// quit closes the connection, sometimes before its answer.
		if command == "quit" {
			return nil, nil
		}
		return nil, fmt.Errorf("qmp %s: %w", command, errors.New("connection closed"))
	case <-ctx.Done():
		return nil, fmt.Errorf("qmp %s: %w", command, ctx.Err())
	}
}

func (q *qmp) close() {
	q.conn.Close()
	<-q.closed
}
