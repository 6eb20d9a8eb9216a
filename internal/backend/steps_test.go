package backend

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"
)

// fakeStarting is an Instance whose start is a list of recorded steps.
type fakeStarting struct {
	*Process
	steps []Step
}

func (f *fakeStarting) Channel(context.Context) (io.ReadWriteCloser, error) { return nil, nil }
func (f *fakeStarting) Stop(context.Context) error                          { return nil }
func (f *fakeStarting) Steps() []Step                                       { return f.steps }

func TestStartUnwindsInReverse(t *testing.T) {
	var log []string
	step := func(name string, fail, undoErr error) Step {
		return Step{Name: name, Run: func(context.Context) (Undo, error) {
			log = append(log, "do "+name)
			return func(context.Context) error { log = append(log, "undo "+name); return undoErr }, fail
		}}
	}
	for _, tc := range []struct {
		name    string
		steps   []Step
		wantLog []string
		wantErr string
	}{
		{"last step fails part way",
			[]Step{step("a", nil, nil), step("b", nil, nil), step("c", errors.New("boom"), nil)},
			[]string{"do a", "do b", "do c", "undo c", "undo b", "undo a"}, "test: c: boom"},
		{"an undo in use keeps what is below",
			[]Step{step("a", nil, nil), step("b", nil, InUse(errors.New("busy"))), step("c", errors.New("boom"), nil)},
			[]string{"do a", "do b", "do c", "undo c", "undo b"}, "test: c: boom"},
		{"other undo errors go on",
			[]Step{step("a", nil, nil), step("b", nil, errors.New("gone")), step("c", errors.New("boom"), nil)},
			[]string{"do a", "do b", "do c", "undo c", "undo b", "undo a"}, "test: c: boom"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			log = nil
			p := NewProcess("test", "sandbox", "x", nil)
			inst := &fakeStarting{Process: p, steps: tc.steps}
			_, err := Start(context.Background(), "test", Spec{ExecutionID: "x", StateDir: "/nonexistent"}, slog.Default(), inst)
			if err == nil || err.Error() != tc.wantErr {
				t.Errorf("err = %v, want %s", err, tc.wantErr)
			}
			if !slices.Equal(log, tc.wantLog) {
				t.Errorf("ran %v, want %v", log, tc.wantLog)
			}
		})
	}
}

func TestStartChecksSpecFirst(t *testing.T) {
	ran := false
	inst := &fakeStarting{Process: NewProcess("test", "sandbox", "x", nil), steps: []Step{{Name: "a", Run: func(context.Context) (Undo, error) {
		ran = true
		return nil, nil
	}}}}
	_, err := Start(context.Background(), "test", Spec{ExecutionID: "../x", StateDir: "/s"}, slog.Default(), inst)
	if err == nil || ran || !strings.HasPrefix(err.Error(), "test: execution id") {
		t.Errorf("err = %v, step ran: %v", err, ran)
	}
}
