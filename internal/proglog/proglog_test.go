package proglog_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/proglog"
)

func TestBufferBounds(t *testing.T) {
	r := proglog.NewRegistry(proglog.Limits{MaxLines: 3, MaxBytes: 10, MaxPrograms: 2})
	b := r.For("a")
	for i := range 5 {
		b.Append(proglog.Stdout, fmt.Sprint(i))
	}
	got := b.Entries()
	if len(got) != 3 || got[0].Message != "2" || got[2].Message != "4" || got[2].Seq != 5 {
		t.Fatalf("lines bound: %+v", got)
	}
	b.Append(proglog.Stderr, "abcdefghi") // with "4", the 10 bytes allowed
	got = b.Entries()
	if n := len(got); n != 2 || got[0].Message != "4" || got[1].Stream != proglog.Stderr {
		t.Fatalf("bytes bound: %+v", got)
	}
	b.Append(proglog.Stdout, strings.Repeat("x", 50))
	if got = b.Entries(); len(got) != 1 || len(got[0].Message) != 10 {
		t.Fatalf("a long line is cut to the buffer: %+v", got)
	}
	entries, lost := b.Since(1)
	if lost != 6 || len(entries) != 1 || entries[0].Seq != 7 {
		t.Fatalf("Since(1): lost %d, %d entries", lost, len(entries))
	}
}

func TestRegistryForgetsLeastRecentlyWritten(t *testing.T) {
	r := proglog.NewRegistry(proglog.Limits{MaxPrograms: 2})
	r.For("a").Append(proglog.Stdout, "a")
	time.Sleep(2 * time.Millisecond)
	r.For("b").Append(proglog.Stdout, "b")
	time.Sleep(2 * time.Millisecond)
	r.For("a").Append(proglog.Stdout, "a again")
	r.For("c")
	if r.Get("b") != nil || r.Get("a") == nil || r.Get("c") == nil {
		t.Fatal("b, the least recently written, should be the one forgotten")
	}
}

func TestFollow(t *testing.T) {
	b := proglog.NewRegistry(proglog.Limits{MaxLines: 4}).For("p")
	b.Append(proglog.Stdout, "before")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got := make(chan string, 100)
	var missed uint64
	done := make(chan error, 1)
	go func() {
		done <- b.Follow(ctx, func(e proglog.Entry) error {
			got <- e.Message
			if e.Message == "stop" {
				return errors.New("enough")
			}
			return nil
		}, func(n uint64) error { missed += n; return nil })
	}()
	if m := <-got; m != "before" {
		t.Fatalf("backlog first, got %q", m)
	}
	b.Append(proglog.Stdout, "live")
	if m := <-got; m != "live" {
		t.Fatalf("got %q", m)
	}
	b.Append(proglog.Stdout, "stop")
	if err := <-done; err == nil || err.Error() != "enough" {
		t.Fatalf("Follow returned %v", err)
	}
	if missed != 0 {
		t.Fatalf("missed %d", missed)
	}
}

func TestFollowReportsLostLines(t *testing.T) {
	b := proglog.NewRegistry(proglog.Limits{MaxLines: 2}).For("p")
	for i := range 5 {
		b.Append(proglog.Stdout, fmt.Sprint(i))
	}
	ctx, cancel := context.WithCancel(context.Background())
	var lines []string
	var missed uint64
	err := b.Follow(ctx, func(e proglog.Entry) error {
		lines = append(lines, e.Message)
		if len(lines) == 2 {
			cancel()
		}
		return nil
	}, func(n uint64) error { missed = n; return nil })
	if !errors.Is(err, context.Canceled) || missed != 3 || strings.Join(lines, ",") != "3,4" {
		t.Fatalf("err %v, missed %d, lines %v", err, missed, lines)
	}
}
