package backend

import (
	"context"
	"fmt"
	"log/slog"
	"time"
)

// Step is one named step of a backend's start-up, in the manner of
// firecracker-go-sdk's handlers: a start reads as the list of its steps.
type Step struct {
	Name string
	Run  func(context.Context) error
}

// RunSteps runs steps in order. When one fails, undo removes whatever the
// earlier steps made (with a bounded context of its own, since the
// caller's may be the reason for the failure) and the error names the
// step, prefixed by the backend's name.
func RunSteps(ctx context.Context, log *slog.Logger, backendName string, steps []Step, undo func(context.Context) error) error {
	for _, s := range steps {
		began := time.Now()
		if err := s.Run(ctx); err != nil {
			undoCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			if uerr := undo(undoCtx); uerr != nil {
				log.Error("cleanup after failed start", "step", s.Name, "err", uerr)
			}
			cancel()
			return fmt.Errorf("%s: %s: %w", backendName, s.Name, err)
		}
		log.Debug("start step done", "step", s.Name, "took", time.Since(began).Round(time.Millisecond))
	}
	return nil
}
