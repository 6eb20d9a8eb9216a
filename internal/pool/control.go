package pool

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend/volimage"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/proglog"
)

// What the owner's control API (/control/machine/{ref}/...) asks of the
// pool, beside Stop.

// Running returns the running execution of hash, or nil.
func (p *Pool) Running(hash string) *Execution {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.running[hash]
}

// Logs returns the kept output of a program, or nil when none was kept.
func (p *Pool) Logs(hash string) *proglog.Buffer {
	if p.opts.Logs == nil {
		return nil
	}
	return p.opts.Logs.Get(hash)
}

// Reboot stops the running execution of hash and starts a new one, which
// then stays warm for REUSE_TIMEOUT like any other.
func (p *Pool) Reboot(ctx context.Context, hash string) error {
	if err := p.Stop(ctx, hash); err != nil {
		return err
	}
	e, err := p.Acquire(ctx, hash)
	if err != nil {
		return fmt.Errorf("starting %s again: %w", hash, err)
	}
	e.Release()
	return nil
}

// Expire stops the running execution of hash after d unless a request
// comes first; the request then leaves it warm for REUSE_TIMEOUT as
// usual (aleph-vm's stop_after_timeout, which a request cancels).
func (p *Pool) Expire(hash string, d time.Duration) error {
	e := p.Running(hash)
	if e == nil {
		return errkind.New(errkind.NotFound, "no running execution for %s", hash)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.state != stateRunning {
		return nil // already going
	}
	if e.idle != nil {
		e.idle.Stop()
	}
	e.idle = time.AfterFunc(d, func() {
		e.log.Info("stopping expired execution", "after", d)
		e.stopGracefully(context.Background())
	})
	return nil
}

// Erase stops the running execution of hash and deletes the program's
// persistent volumes (aleph-vm's erase deletes every writable volume of
// the execution). It waits, within ctx, for any other holder of a volume
// to let it go, so no execution keeps writing into a deleted image.
func (p *Pool) Erase(ctx context.Context, hash string) error {
	e := p.Running(hash)
	if e == nil {
		return errkind.New(errkind.NotFound, "no running execution for %s", hash)
	}
	e.stopGracefully(ctx)
	if p.opts.PersistentDir == "" {
		return nil
	}
	var errs []error
	for n, v := range e.prog.Volumes {
		if v.Kind != message.VolumePersistent {
			continue
		}
		path, err := volimage.PersistentPath(p.opts.PersistentDir, hash, n, v.Volume.Name, v.Volume.Mount)
		if err != nil {
			continue // never created either
		}
		// An image still under an earlier version's name is the same
		// volume: erased too.
		failed := false
		for _, img := range append([]string{path}, volimage.LegacyPaths(p.opts.PersistentDir, hash, n, v.Volume.Name, v.Volume.Mount)...) {
			if err := removeImage(ctx, img); err != nil {
				errs = append(errs, err)
				failed = true
			}
		}
		if failed {
			continue
		}
		e.log.Info("erased persistent volume", "mount", v.Volume.Mount)
	}
	return errors.Join(errs...)
}

func removeImage(ctx context.Context, path string) error {
	lock, err := volimage.Acquire(ctx, path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer func() { _ = lock.Release() }()
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("erasing volume: %w", err)
	}
	return nil
}

// ProgramOwner resolves the address of the wallet that owns a program,
// running or not.
func (p *Pool) ProgramOwner(ctx context.Context, hash string) (string, error) {
	prog, err := p.opts.Source.Program(ctx, hash)
	if err != nil {
		return "", err
	}
	return prog.Content.Address, nil
}

// Owner is the address of the wallet that owns the program.
func (e *Execution) Owner() string { return e.prog.Content.Address }

// programLog is the program's kept output, or nil when logs are not kept.
func (e *Execution) programLog() *proglog.Buffer {
	if e.pool.opts.Logs == nil {
		return nil
	}
	return e.pool.opts.Logs.For(e.hash)
}
