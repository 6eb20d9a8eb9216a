package pooltest

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

// Store is a real local store with a default runtime (a few bytes: the
// fake backend never mounts it), and the resolver the pool uses on it.
type Store struct {
	Store    *store.Store
	Resolver *sources.Resolver
	dir      string
}

// NewStore makes a store under a test directory.
func NewStore(t testing.TB) *Store {
	t.Helper()
	dir := t.TempDir()
	quiet := slog.New(slog.DiscardHandler)
	st, err := store.Open(filepath.Join(dir, "store"), store.WithLogger(quiet))
	if err != nil {
		t.Fatal(err)
	}
	rt := filepath.Join(dir, "runtime.squashfs")
	if err := os.WriteFile(rt, []byte("a runtime the fake backend never mounts"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := st.AddRuntime(context.Background(), rt, "test runtime", true); err != nil {
		t.Fatal(err)
	}
	return &Store{
		Store:    st,
		Resolver: sources.New(st, nil, nil, sources.DefaultLimits(), sources.WithLogger(quiet)),
		dir:      dir,
	}
}

// Program uploads a one-file ASGI program named name (its source differs
// by name, so every name is its own hash) with o's resources, and returns
// its item hash. o.Path and o.Entrypoint are set here.
func (s *Store) Program(t testing.TB, name string, o store.UploadOptions) string {
	t.Helper()
	src := filepath.Join(s.dir, "programs", name, "main.py")
	if err := os.MkdirAll(filepath.Dir(src), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(src, fmt.Appendf(nil, "# %s\napp = None\n", name), 0o644); err != nil {
		t.Fatal(err)
	}
	o.Path, o.Entrypoint = src, "main:app"
	res, err := s.Store.UploadProgram(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	return res.ProgramHash
}

// SpareRuntime is the default runtime as the pool's spares want it (what
// cmd/vm-supervisor wires from the same store).
func (s *Store) SpareRuntime(context.Context) (sources.File, error) {
	ref, err := s.Store.DefaultRuntime()
	if err != nil {
		return sources.File{}, err
	}
	msg, err := s.Store.GetMessage(ref)
	if err != nil {
		return sources.File{}, err
	}
	content, err := msg.Store()
	if err != nil {
		return sources.File{}, err
	}
	path, err := s.Store.FilePath(content.ItemHash)
	if err != nil {
		return sources.File{}, err
	}
	return sources.File{Ref: ref, Hash: content.ItemHash, Path: path, Encoding: message.EncodingSquashfs}, nil
}
