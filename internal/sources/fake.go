package sources

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

// DefaultFakeEntrypoint is the entrypoint of the fake-data program when
// none is given, that of aleph-vm's examples/example_fastapi.
const DefaultFakeEntrypoint = "main:app"

// fakeData is aleph-vm's FAKE_DATA_PROGRAM mode: every hash maps to one
// program directory, packed on the fly so that edits show up at the next
// cold start.
type fakeData struct {
	dir        string
	entrypoint string
	store      *store.Store

	mu sync.Mutex // one packing at a time
}

// NewFakeData returns a resolver in fake-data mode: any program hash
// resolves to the program in dir (entrypoint "" means main:app), zipped
// on the fly into the store (content-addressed, so an unchanged directory
// is stored once), with the defaults of aleph-vm's fake program message
// and the store's default runtime. No network is used.
func NewFakeData(dir, entrypoint string, st *store.Store, opts ...Option) (*Resolver, error) {
	if entrypoint == "" {
		entrypoint = DefaultFakeEntrypoint
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, errkind.Wrap(errkind.InvalidInput, fmt.Errorf("fake data program: %w", err))
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return nil, errkind.Wrap(errkind.InvalidInput, fmt.Errorf("fake data program: %w", err))
	}
	if !fi.IsDir() {
		return nil, errkind.New(errkind.InvalidInput, "fake data program %s is not a directory", dir)
	}
	if err := store.ValidateEntrypoint(entrypoint, abs, true, message.EncodingZip); err != nil {
		return nil, fmt.Errorf("fake data program: %w", err)
	}
	r := New(st, nil, nil, Limits{}, opts...)
	r.fake = &fakeData{dir: abs, entrypoint: entrypoint, store: st}
	return r, nil
}

// message packs the directory and builds the program message.
func (f *fakeData) message(ctx context.Context, hash string) (*message.Message, error) {
	if err := message.ValidateItemHash(hash); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	codeHash, _, err := f.store.PackFile(ctx, f.dir, message.EncodingZip)
	if err != nil {
		return nil, errkind.Wrap(errkind.ResourceMissing, fmt.Errorf("fake data program %s: %w", f.dir, err))
	}
	codeMsg, err := f.store.AddStoreMessage(codeHash, map[string]any{"name": filepath.Base(f.dir)})
	if err != nil {
		return nil, err
	}
	runtimeRef, err := f.store.DefaultRuntime()
	if err != nil {
		return nil, fmt.Errorf("fake data program: %w", err)
	}
	persistent := false
	content := message.ProgramContent{
		Type:       message.ProgramType,
		Address:    f.store.Address(),
		AllowAmend: false,
		Code: message.CodeContent{
			Encoding: message.EncodingZip, Entrypoint: f.entrypoint, Ref: codeMsg.ItemHash,
		},
		Runtime: message.RuntimeContent{Ref: runtimeRef, Comment: "default runtime of the local store"},
		On:      message.Triggers{HTTP: true, Persistent: &persistent},
		// Those of aleph-vm's fake program message.
		Environment: message.Environment{Reproducible: true, Internet: true, AlephAPI: true, SharedCache: false},
		Resources:   message.Resources{VCPUs: 1, Memory: 128, Seconds: 30},
		Variables:   map[string]string{"VM_CUSTOM_NUMBER": "32"},
		Metadata:    map[string]any{"name": filepath.Base(f.dir), "fake_data": true},
	}
	return message.InlineMessage(message.TypeProgram, content, f.store.Address(), epochTime)
}

func (f *fakeData) program(ctx context.Context, r *Resolver, hash string) (*Program, error) {
	m, err := f.message(ctx, hash)
	if err != nil {
		return nil, err
	}
	return r.resolveProgram(ctx, hash, m)
}

// epochTime stamps the fake program message: a fixed time keeps its hash
// a function of the directory's content.
var epochTime = time.Unix(0, 0)
