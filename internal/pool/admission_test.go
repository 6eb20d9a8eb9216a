package pool

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
)

func programWith(hash string, memory, vcpus int) *sources.Program {
	c := &message.ProgramContent{}
	c.Resources.Memory, c.Resources.VCPUs = memory, vcpus
	return &sources.Program{Hash: hash, Content: c}
}

// running puts an execution that serves (without a sandbox: admission only
// looks at reservations and idleness) into the pool.
func running(p *Pool, prog *sources.Program, lastUsed time.Time, inFlight int) *Execution {
	e := newExecution(p, prog)
	e.state, e.lastUsed, e.inFlight = stateRunning, lastUsed, inFlight
	p.mu.Lock()
	p.all[e] = struct{}{}
	p.running[prog.Hash] = e
	p.stopped.Add(1)
	p.mu.Unlock()
	return e
}

func TestAdmission(t *testing.T) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx := context.Background()
	now := time.Now()

	t.Run("never fits", func(t *testing.T) {
		p := New(Options{Capacity: Capacity{MemoryMiB: 1024, VCPUs: 8}, Logger: quiet, CapacityWait: 100 * time.Millisecond})
		for _, prog := range []*sources.Program{programWith("huge", message.MaxMemoryMiB, 1), programWith("wide", 128, 256)} {
			err := p.admit(ctx, newExecution(p, prog))
			if errkind.Of(err) != errkind.NoCapacity || !strings.Contains(err.Error(), "Insufficient capacity") {
				t.Errorf("%s: admit = %v, want NoCapacity", prog.Hash, err)
			}
		}
	})

	t.Run("evicts the least recently used idle execution", func(t *testing.T) {
		p := New(Options{Capacity: Capacity{MemoryMiB: 384, VCPUs: 8}, Logger: quiet, CapacityWait: 100 * time.Millisecond})
		older := running(p, programWith("older", 128, 1), now.Add(-time.Hour), 0)
		newer := running(p, programWith("newer", 128, 1), now.Add(-time.Minute), 0)
		busy := running(p, programWith("busy", 128, 1), now.Add(-2*time.Hour), 1)
		if err := p.admit(ctx, newExecution(p, programWith("next", 128, 1))); err != nil {
			t.Fatalf("admit: %v", err)
		}
		if !older.WaitDied(time.Second) {
			t.Error("the least recently used idle execution was not evicted")
		}
		if newer.WaitDied(0) || busy.WaitDied(0) {
			t.Error("an execution was evicted that did not need to be (or had a request in flight)")
		}
	})

	t.Run("full of busy executions", func(t *testing.T) {
		p := New(Options{Capacity: Capacity{MemoryMiB: 256, VCPUs: 8}, Logger: quiet, CapacityWait: 100 * time.Millisecond})
		running(p, programWith("a", 128, 1), now, 1)
		running(p, programWith("b", 128, 1), now, 2)
		err := p.admit(ctx, newExecution(p, programWith("c", 128, 1)))
		if errkind.Of(err) != errkind.NoCapacity || !strings.Contains(err.Error(), "memory: required 128 MiB, committed 256 MiB") {
			t.Errorf("admit = %v, want NoCapacity naming memory", err)
		}
	})

	t.Run("vCPUs and MAX_EXECUTIONS", func(t *testing.T) {
		p := New(Options{Capacity: Capacity{MemoryMiB: 1 << 20, VCPUs: 3}, MaxExecutions: 2, Logger: quiet, CapacityWait: 100 * time.Millisecond})
		running(p, programWith("a", 128, 2), now, 1)
		if err := p.admit(ctx, newExecution(p, programWith("b", 128, 2))); !strings.Contains(err.Error(), "vCPUs: required 2, committed 2, capacity 3") {
			t.Errorf("admit = %v, want a vCPU shortfall", err)
		}
		if err := p.admit(ctx, newExecution(p, programWith("c", 128, 1))); err != nil {
			t.Fatalf("admit within capacity: %v", err)
		}
		if err := p.admit(ctx, newExecution(p, programWith("d", 1, 0))); !strings.Contains(err.Error(), "executions: 2 running, limit 2") {
			t.Errorf("admit = %v, want the execution limit", err)
		}
	})

	t.Run("waits for a request to end", func(t *testing.T) {
		p := New(Options{Capacity: Capacity{MemoryMiB: 128, VCPUs: 8}, Logger: quiet, CapacityWait: 5 * time.Second})
		busy := running(p, programWith("busy", 128, 1), now, 1)
		time.AfterFunc(100*time.Millisecond, busy.Release)
		if err := p.admit(ctx, newExecution(p, programWith("next", 128, 1))); err != nil {
			t.Fatalf("admit after the busy execution idled: %v", err)
		}
		if !busy.WaitDied(time.Second) {
			t.Error("the execution that idled was not evicted")
		}
	})
}

// A program asking for a 10-year request budget gets the node's cap.
func TestRequestTimeoutIsCapped(t *testing.T) {
	p := New(Options{MaxRequestTimeout: 600 * time.Second, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	prog := programWith("slow", 128, 1)
	prog.Content.Resources.Seconds = message.MaxSeconds
	if got := newExecution(p, prog).RequestTimeout(); got != 600*time.Second {
		t.Errorf("RequestTimeout = %s, want the 600 s cap", got)
	}
	prog.Content.Resources.Seconds = 30
	if got := newExecution(p, prog).RequestTimeout(); got != 30*time.Second {
		t.Errorf("RequestTimeout = %s, want the program's 30 s", got)
	}
}

// Finding 5 of issue 20: one program the size of the node evicted every
// idle program and held the node for its whole request.
func TestAdmissionShare(t *testing.T) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx := context.Background()
	now := time.Now()
	capacity := Capacity{MemoryMiB: 4096, VCPUs: 8, MaxShare: 0.25}

	t.Run("above its share: refused at once, nobody evicted", func(t *testing.T) {
		p := New(Options{Capacity: capacity, Logger: quiet, CapacityWait: 100 * time.Millisecond})
		idle := running(p, programWith("idle", 128, 1), now.Add(-time.Hour), 0)
		for _, prog := range []*sources.Program{programWith("wide", 128, 8), programWith("fat", 2048, 1)} {
			err := p.admit(ctx, newExecution(p, prog))
			if errkind.Of(err) != errkind.NoCapacity || !strings.Contains(err.Error(), "MAX_EXECUTION_SHARE") {
				t.Errorf("%s: admit = %v, want NoCapacity naming MAX_EXECUTION_SHARE", prog.Hash, err)
			}
		}
		if idle.WaitDied(100 * time.Millisecond) {
			t.Error("an idle execution was evicted for a program above its share")
		}
	})

	t.Run("within its share: admitted", func(t *testing.T) {
		p := New(Options{Capacity: capacity, Logger: quiet, CapacityWait: 100 * time.Millisecond})
		if err := p.admit(ctx, newExecution(p, programWith("quarter", 1024, 2))); err != nil {
			t.Fatalf("admit = %v", err)
		}
	})

	t.Run("kept programs may exceed it", func(t *testing.T) {
		p := New(Options{Capacity: capacity, Logger: quiet, CapacityWait: 100 * time.Millisecond})
		p.keptMu.Lock()
		p.kept["allocated"] = true
		p.keptMu.Unlock()
		if err := p.admit(ctx, newExecution(p, programWith("allocated", 2048, 8))); err != nil {
			t.Fatalf("admit = %v", err)
		}
	})

	t.Run("never below a default program", func(t *testing.T) {
		p := New(Options{Capacity: Capacity{MemoryMiB: 256, VCPUs: 2, MaxShare: 0.1}, Logger: quiet, CapacityWait: 100 * time.Millisecond})
		if err := p.admit(ctx, newExecution(p, programWith("small", 128, 1))); err != nil {
			t.Fatalf("admit = %v", err)
		}
	})
}

// Under honest load, a node full of busy executions made every new start
// evict all idle executions before it was refused anyway; each evicted
// program then came back as a cold start and was refused in turn.
func TestAdmissionEvictsOnlyWhenThatMakesRoom(t *testing.T) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	ctx := context.Background()
	now := time.Now()
	p := New(Options{Capacity: Capacity{MemoryMiB: 1 << 20, VCPUs: 8}, Logger: quiet, CapacityWait: 100 * time.Millisecond})
	for i := range 8 {
		running(p, programWith(fmt.Sprint("busy", i), 128, 1), now, 1)
	}
	idle := running(p, programWith("idle", 128, 1), now.Add(-time.Hour), 0)
	// 9 vCPUs committed on 8: evicting "idle" (1) leaves 8, still no
	// room for one more.
	err := p.admit(ctx, newExecution(p, programWith("new", 128, 1)))
	if errkind.Of(err) != errkind.NoCapacity {
		t.Fatalf("admit = %v, want NoCapacity", err)
	}
	if idle.WaitDied(100 * time.Millisecond) {
		t.Error("an idle execution was evicted although that could not make room")
	}
}

func TestAdmissionVolumeCap(t *testing.T) {
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	p := New(Options{Capacity: Capacity{MemoryMiB: 4096, VCPUs: 8, MaxVolumeMiB: 4096}, Logger: quiet, CapacityWait: 100 * time.Millisecond})
	prog := programWith("volumes", 128, 1)
	vol := func(size int) sources.ResolvedVolume {
		var v sources.ResolvedVolume
		v.Kind = message.VolumePersistent
		v.Volume.Mount, v.Volume.SizeMiB = "/data", size
		return v
	}
	prog.Volumes = []sources.ResolvedVolume{vol(2 << 20)}
	err := p.admit(context.Background(), newExecution(p, prog))
	if errkind.HTTPStatus(err) != 400 || !strings.Contains(err.Error(), "MAX_VOLUME_SIZE_MIB") {
		t.Errorf("2 TiB volume: admit = %v (status %d), want 400 naming MAX_VOLUME_SIZE_MIB", err, errkind.HTTPStatus(err))
	}
	prog.Volumes = []sources.ResolvedVolume{vol(4096)}
	if err := p.admit(context.Background(), newExecution(p, prog)); err != nil {
		t.Errorf("volume at the cap: admit = %v", err)
	}
}
