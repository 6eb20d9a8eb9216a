package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// The hold handshake lets the host checkpoint a warm sandbox (runsc
// checkpoint) and restore it many times, each restore then serving a
// guest session of its own. A checkpoint can only be restored cleanly if
// no session state is inside it: a host that restores opens a new yamux
// session, which must not meet the old one's streams and windows. So the
// agent warms the interpreter first, before any session exists, and says
// so with one raw line on stdout; the host checkpoints it there. After a
// restore the agent is still blocked reading stdin, now the restoring
// host's pipe, and the host's line releases it into the ordinary serve.
//
// Both ends of the handshake are read and written with blocking system
// calls on purpose: a read pending in the runtime's poller would be
// restored against an epoll registration of the old descriptor, while a
// plain read(2) blocked in gVisor's kernel resumes on the remapped one
// (what TestCheckpointRestoreRemapsStdio in the gVisor backend pins).
func (a *agent) holdWarm() error {
	pre, err := startPreload(a.programSpec(), a.reaper, a.log)
	if err != nil {
		return fmt.Errorf("hold: preload: %w", err)
	}
	<-pre.warm
	select {
	case <-pre.prog.exited:
		return fmt.Errorf("hold: the preloaded interpreter ended: %s", pre.prog.describeExit())
	default:
	}
	a.held = pre
	if _, err := os.Stdout.Write([]byte(guest.HoldReadyLine)); err != nil {
		return fmt.Errorf("hold: %w", err)
	}
	// Byte by byte: what follows the line is the host's session, which
	// must be left for the multiplexer.
	var b [1]byte
	for {
		n, err := os.Stdin.Read(b[:])
		if n == 1 && b[0] == '\n' {
			break
		}
		if err != nil {
			return fmt.Errorf("hold: waiting for the host: %w", err)
		}
		if n == 0 {
			return errors.New("hold: waiting for the host: empty read")
		}
	}
	a.log.Debug("released from hold")
	return nil
}
