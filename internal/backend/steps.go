package backend

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// Undo removes what one start step made.
type Undo func(context.Context) error

// Step is one named step of a backend's start-up, in the manner of
// firecracker-go-sdk's handlers: a start reads as the list of its steps.
// Run returns the undo of what it made (nil when there is nothing to
// undo). A step that fails part way may return an undo for the part it
// did; it runs with the others.
type Step struct {
	Name string
	Run  func(context.Context) (Undo, error)
}

// UndoStack holds the undos of the steps that ran, for Stop (or a failed
// start) to run in reverse. The zero value is ready to use.
type UndoStack struct {
	mu    sync.Mutex
	names []string
	undos []Undo
}

func (s *UndoStack) push(name string, u Undo) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.names = append(s.names, name)
	s.undos = append(s.undos, u)
}

// Unwind runs the undos, last first, and joins their errors. An error
// marked InUse stops it: what the earlier steps made may still be in use
// by what could not be undone, so it stays in place (and on the stack).
func (s *UndoStack) Unwind(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for n := len(s.undos) - 1; n >= 0; n-- {
		err := s.undos[n](ctx)
		if err == nil {
			continue
		}
		errs = append(errs, fmt.Errorf("undoing %s: %w", s.names[n], err))
		var inUse inUseError
		if errors.As(err, &inUse) {
			s.names, s.undos = s.names[:n], s.undos[:n]
			errs = append(errs, fmt.Errorf("left in place: %v", s.names))
			return errors.Join(errs...)
		}
	}
	s.names, s.undos = nil, nil
	return errors.Join(errs...)
}

type inUseError struct{ error }

func (e inUseError) Unwrap() error { return e.error }

// InUse marks the error of an undo after which what the earlier steps
// made may still be in use (a mount that stays pins the trees bound below
// it; a VMM that did not die holds its images): Unwind stops there.
func InUse(err error) error {
	if err == nil {
		return nil
	}
	return inUseError{err}
}

// undoTimeout bounds the undo of a failed start, which cannot use the
// caller's context: its end may be the reason for the failure.
const undoTimeout = 30 * time.Second

// Starting is an instance not started yet: its start steps, and the
// stack their undos go on (Process has it).
type Starting interface {
	Instance
	Steps() []Step
	Undos() *UndoStack
}

// Start is every backend's Start: it checks spec, then runs inst's steps
// in order, pushing their undos on its stack. When a step fails it
// unwinds the stack and returns the step's error, named once by the step
// and once by the backend ("qemu: start VMM: …"): steps name neither.
func Start(ctx context.Context, backendName string, spec Spec, log *slog.Logger, inst Starting) (Instance, error) {
	if err := spec.Check(); err != nil {
		return nil, fmt.Errorf("%s: %w", backendName, err)
	}
	stack := inst.Undos()
	for _, s := range inst.Steps() {
		began := time.Now()
		undo, err := s.Run(ctx)
		if undo != nil {
			stack.push(s.Name, undo)
		}
		if err != nil {
			undoCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
			if uerr := stack.Unwind(undoCtx); uerr != nil {
				log.Error("cleanup after failed start", "step", s.Name, "err", uerr)
			}
			cancel()
			return nil, fmt.Errorf("%s: %s: %w", backendName, s.Name, err)
		}
		log.Debug("start step done", "step", s.Name, "took", time.Since(began).Round(time.Millisecond))
	}
	return inst, nil
}

// StopThenUnwind is every backend's Stop after its own way of ending the
// process: the undo stack of the start, then the log line.
func StopThenUnwind(ctx context.Context, log *slog.Logger, stack *UndoStack) error {
	err := stack.Unwind(ctx)
	if err != nil {
		log.Error("stop", "err", err)
	} else {
		log.Debug("sandbox stopped")
	}
	return err
}
