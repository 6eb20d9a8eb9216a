package sources

import (
	"archive/zip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/delegation"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/alephapi"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/cache"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

const owner = "0x9319Ad3B7A8E0eE24f2E639c40D8eD124C5520Ba"

func sum(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// fakeAPI is an in-test Aleph API server speaking the real response shapes.
type fakeAPI struct {
	t         *testing.T
	mu        sync.Mutex
	messages  map[string]json.RawMessage   // item hash → envelope
	amends    map[string][]json.RawMessage // ref → amending STORE messages
	files     map[string][]byte            // storage hash → bytes
	security  map[string]string            // address → its security aggregate's authorizations (JSON)
	downloads atomic.Int32
	msgCalls  atomic.Int32
	srv       *httptest.Server
}

func newFakeAPI(t *testing.T) *fakeAPI {
	a := &fakeAPI{t: t, messages: map[string]json.RawMessage{}, amends: map[string][]json.RawMessage{}, files: map[string][]byte{}}
	a.srv = httptest.NewServer(http.HandlerFunc(a.serve))
	t.Cleanup(a.srv.Close)
	return a
}

func (a *fakeAPI) serve(w http.ResponseWriter, r *http.Request) {
	a.mu.Lock()
	defer a.mu.Unlock()
	switch {
	case r.URL.Path == "/api/v0/messages.json":
		a.msgCalls.Add(1)
		q := r.URL.Query()
		var msgs []json.RawMessage
		if h := q.Get("hashes"); h != "" {
			if m, ok := a.messages[h]; ok {
				msgs = append(msgs, m)
			}
		} else if ref := q.Get("refs"); ref != "" {
			if q.Get("msgType") != "STORE" || q.Get("owners") == "" || q.Get("sort_order") != "-1" {
				a.t.Errorf("amend query %s", r.URL.RawQuery)
			}
			msgs = a.amends[ref]
		}
		if msgs == nil {
			msgs = []json.RawMessage{}
		}
		// A failed write is the client's failure, which the test sees.
		_ = json.NewEncoder(w).Encode(map[string]any{
			"messages": msgs, "pagination_page": 1, "pagination_total": len(msgs),
			"pagination_per_page": 20, "pagination_item": "messages",
		})
	case strings.HasPrefix(r.URL.Path, "/api/v0/aggregates/"):
		auths, ok := a.security[strings.TrimSuffix(strings.TrimPrefix(r.URL.Path, "/api/v0/aggregates/"), ".json")]
		if !ok {
			http.NotFound(w, r)
			return
		}
		_, _ = fmt.Fprintf(w, `{"data":{"security":{"authorizations":%s}}}`, auths)
	case strings.HasPrefix(r.URL.Path, "/api/v0/storage/raw/"):
		a.downloads.Add(1)
		b, ok := a.files[strings.TrimPrefix(r.URL.Path, "/api/v0/storage/raw/")]
		if !ok {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write(b) // as above: the client sees a short body
	default:
		http.NotFound(w, r)
	}
}

// envelope wraps an inline message the way the API serves it.
func envelope(t *testing.T, m *message.Message) json.RawMessage {
	t.Helper()
	b, err := json.Marshal(map[string]any{
		"_id": map[string]string{"$oid": "6080402d7f44efefd611dc1e"}, "chain": "ETH",
		"item_hash": m.ItemHash, "sender": m.Sender, "type": m.Type, "channel": "TEST",
		"confirmed": true, "content": json.RawMessage(m.ItemContent), "item_content": m.ItemContent,
		"item_type": "inline", "signature": "0x37", "size": len(m.ItemContent), "time": m.Time,
		"confirmations": []any{},
	})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// addFile publishes content as a storage file with a STORE message and
// returns the message's item hash (the ref).
func (a *fakeAPI) addFile(content []byte, at time.Time, amends string) string {
	a.t.Helper()
	return a.addFileBy(owner, content, at, amends)
}

// addFileBy is addFile sent by sender for owner (a delegate's amend).
func (a *fakeAPI) addFileBy(sender string, content []byte, at time.Time, amends string) string {
	a.t.Helper()
	h := sum(content)
	m, err := message.InlineMessage(message.TypeStore, message.StoreContent{
		Address: owner, Time: float64(at.Unix()), ItemType: "storage", ItemHash: h, Ref: amends,
	}, sender, at)
	if err != nil {
		a.t.Fatal(err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.files[h] = content
	if amends != "" {
		a.amends[amends] = append([]json.RawMessage{envelope(a.t, m)}, a.amends[amends]...)
	} else {
		a.messages[m.ItemHash] = envelope(a.t, m)
	}
	return m.ItemHash
}

func (a *fakeAPI) addProgram(c message.ProgramContent) string {
	a.t.Helper()
	m, err := message.InlineMessage(message.TypeProgram, c, owner, time.Unix(1700000000, 0))
	if err != nil {
		a.t.Fatal(err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.messages[m.ItemHash] = envelope(a.t, m)
	return m.ItemHash
}

func programContent(codeRef, runtimeRef string) message.ProgramContent {
	return message.ProgramContent{
		Type: "vm-function", Address: owner, Time: 1700000000,
		Code:        message.CodeContent{Encoding: message.EncodingZip, Entrypoint: "main:app", Ref: codeRef},
		Runtime:     message.RuntimeContent{Ref: runtimeRef, Comment: "test runtime"},
		On:          message.Triggers{HTTP: true},
		Environment: message.Environment{AlephAPI: true},
		Resources:   message.Resources{VCPUs: 1, Memory: 128, Seconds: 30},
	}
}

type env struct {
	api   *fakeAPI
	store *store.Store
	cache *cache.Cache
	r     *Resolver
}

func newEnv(t *testing.T, limits Limits) *env {
	t.Helper()
	a := newFakeAPI(t)
	st, err := store.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	c, err := cache.Open(filepath.Join(t.TempDir(), "cache"))
	if err != nil {
		t.Fatal(err)
	}
	client := alephapi.New(a.srv.URL, a.srv.URL+"/ipfs", alephapi.WithRetries(2, time.Millisecond))
	return &env{api: a, store: st, cache: c, r: New(st, client, c, limits)}
}

func TestProgramFromAPI(t *testing.T) {
	e := newEnv(t, DefaultLimits())
	ctx := context.Background()
	code, runtime, data, venv := []byte("zip bytes"), []byte("runtime bytes"), []byte("data bytes"), []byte("hsqs: a squashfs venv")
	codeRef := e.api.addFile(code, time.Unix(1700000000, 0), "")
	runtimeRef := e.api.addFile(runtime, time.Unix(1700000000, 0), "")
	dataRef := e.api.addFile(data, time.Unix(1700000000, 0), "")
	venvRef := e.api.addFile(venv, time.Unix(1700000000, 0), "")
	c := programContent(codeRef, runtimeRef)
	c.Data = &message.DataContent{Encoding: message.EncodingZip, Mount: "/data", Ref: dataRef}
	c.Volumes = []message.Volume{
		{Mount: "/opt/venv", Ref: venvRef},
		{Mount: "/var/cache", Ephemeral: true, SizeMiB: 5},
		{Mount: "/var/lib/example", Name: "data", Persistence: "host", SizeMiB: 5},
	}
	hash := e.api.addProgram(c)

	p, err := e.r.Program(ctx, hash)
	if err != nil {
		t.Fatal(err)
	}
	files := []struct {
		name    string
		f       *File
		ref     string
		content []byte
		kind    string
	}{
		{"code", &p.Code, codeRef, code, "code"},
		{"runtime", &p.Runtime, runtimeRef, runtime, "runtime"},
		{"data", p.Data, dataRef, data, "data"},
		{"volume", p.Volumes[0].File, venvRef, venv, "volume"},
	}
	for _, f := range files {
		if f.f == nil {
			t.Fatalf("%s not resolved", f.name)
		}
		if f.f.Ref != f.ref || f.f.Hash != sum(f.content) {
			t.Errorf("%s: %+v", f.name, f.f)
		}
		if want := filepath.Join(e.cache.Root(), f.kind, sum(f.content)); f.f.Path != want {
			t.Errorf("%s path %s, want %s", f.name, f.f.Path, want)
		}
		if b, _ := os.ReadFile(f.f.Path); string(b) != string(f.content) {
			t.Errorf("%s content %q", f.name, b)
		}
	}
	if p.Volumes[0].File.Encoding != message.EncodingSquashfs {
		t.Errorf("squashfs volume resolved as %q", p.Volumes[0].File.Encoding)
	}
	if p.Volumes[1].Kind != message.VolumeEphemeral || p.Volumes[1].File != nil ||
		p.Volumes[2].Kind != message.VolumePersistent || p.Volumes[2].File != nil {
		t.Errorf("volumes %+v", p.Volumes)
	}

	// Second resolution: messages and files come from the cache.
	downloads, calls := e.api.downloads.Load(), e.api.msgCalls.Load()
	if _, err := e.r.Program(ctx, hash); err != nil {
		t.Fatal(err)
	}
	if e.api.downloads.Load() != downloads || e.api.msgCalls.Load() != calls {
		t.Errorf("second resolution hit the API: %d downloads, %d message calls more",
			e.api.downloads.Load()-downloads, e.api.msgCalls.Load()-calls)
	}
	// ... even with the API gone.
	e.api.srv.Close()
	if _, err := e.r.Program(ctx, hash); err != nil {
		t.Fatalf("resolution from cache with the API down: %v", err)
	}
}

// programErrorCase is one way resolving a program fails: setup returns
// the program's hash and the ref the error must name (wantText's %s).
type programErrorCase struct {
	name      string
	setup     func(e *env) (hash string, ref string)
	limits    Limits
	wantKinds []errkind.Kind
	wantText  string
}

func programErrorCases() []programErrorCase {
	return []programErrorCase{
		{
			name: "unknown program",
			setup: func(e *env) (string, string) {
				return sum([]byte("nobody")), ""
			},
			wantKinds: []errkind.Kind{errkind.NotFound},
		},
		{
			name: "code STORE message unknown",
			setup: func(e *env) (string, string) {
				missing := sum([]byte("missing store message"))
				return e.api.addProgram(programContent(missing, e.api.addFile([]byte("rt"), time.Unix(1, 0), ""))), missing
			},
			wantKinds: []errkind.Kind{errkind.ResourceMissing, errkind.NotFound},
			wantText:  "code ref %s: STORE message not found",
		},
		{
			name: "code file missing on the API",
			setup: func(e *env) (string, string) {
				ref := e.api.addFile([]byte("code"), time.Unix(1, 0), "")
				e.api.mu.Lock()
				delete(e.api.files, sum([]byte("code")))
				e.api.mu.Unlock()
				return e.api.addProgram(programContent(ref, e.api.addFile([]byte("rt"), time.Unix(1, 0), ""))), ref
			},
			wantKinds: []errkind.Kind{errkind.ResourceMissing, errkind.NotFound},
			wantText:  "code ref %s: file",
		},
		{
			name: "runtime too large",
			setup: func(e *env) (string, string) {
				ref := e.api.addFile([]byte(strings.Repeat("r", 2000)), time.Unix(1, 0), "")
				return e.api.addProgram(programContent(e.api.addFile([]byte("code"), time.Unix(1, 0), ""), ref)), ref
			},
			limits:    Limits{Program: 1000, Runtime: 1000},
			wantKinds: []errkind.Kind{errkind.ResourceMissing, errkind.TooLarge},
			wantText:  "runtime ref %s",
		},
		{
			name: "file content does not match its hash",
			setup: func(e *env) (string, string) {
				ref := e.api.addFile([]byte("code"), time.Unix(1, 0), "")
				e.api.mu.Lock()
				e.api.files[sum([]byte("code"))] = []byte("evil")
				e.api.mu.Unlock()
				return e.api.addProgram(programContent(ref, e.api.addFile([]byte("rt"), time.Unix(1, 0), ""))), ref
			},
			wantKinds: []errkind.Kind{errkind.ResourceMissing, errkind.InvalidInput},
			wantText:  "code ref %s",
		},
		{
			name: "ref is not a STORE message",
			setup: func(e *env) (string, string) {
				rt := e.api.addFile([]byte("rt"), time.Unix(1, 0), "")
				other := e.api.addProgram(programContent(e.api.addFile([]byte("code"), time.Unix(1, 0), ""), rt))
				return e.api.addProgram(programContent(other, rt)), other
			},
			wantKinds: []errkind.Kind{errkind.ResourceMissing},
			wantText:  "code ref %s",
		},
		{
			name: "a STORE message is not a program",
			setup: func(e *env) (string, string) {
				return e.api.addFile([]byte("code"), time.Unix(1, 0), ""), ""
			},
			wantKinds: []errkind.Kind{errkind.Unsupported},
		},
		{
			name: "malformed hash",
			setup: func(e *env) (string, string) {
				return "not-a-hash", ""
			},
			wantKinds: []errkind.Kind{errkind.InvalidInput},
		},
	}
}

func TestProgramErrors(t *testing.T) {
	for _, tt := range programErrorCases() {
		t.Run(tt.name, func(t *testing.T) {
			limits := tt.limits
			if limits == (Limits{}) {
				limits = DefaultLimits()
			}
			e := newEnv(t, limits)
			hash, ref := tt.setup(e)
			_, err := e.r.Program(context.Background(), hash)
			if err == nil {
				t.Fatal("Program succeeded")
			}
			if errkind.Of(err) != tt.wantKinds[0] {
				t.Errorf("error %q has kind %v, want %v", err, errkind.Of(err), tt.wantKinds[0])
			}
			for _, k := range tt.wantKinds[1:] {
				if !errkind.Is(err, k) {
					t.Errorf("error %q does not carry %v", err, k)
				}
			}
			if tt.wantText != "" {
				if want := strings.ReplaceAll(tt.wantText, "%s", ref); !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not contain %q", err, want)
				}
			}
		})
	}
}

func TestUseLatest(t *testing.T) {
	e := newEnv(t, DefaultLimits())
	orig := e.api.addFile([]byte("v1"), time.Unix(1700000000, 0), "")
	e.api.addFile([]byte("v2"), time.Unix(1700000100, 0), orig)
	e.api.addFile([]byte("v3"), time.Unix(1700000200, 0), orig)
	rt := e.api.addFile([]byte("rt"), time.Unix(1, 0), "")
	c := programContent(orig, rt)
	c.Code.UseLatest = true
	p, err := e.r.Program(context.Background(), e.api.addProgram(c))
	if err != nil {
		t.Fatal(err)
	}
	if p.Code.Hash != sum([]byte("v3")) || p.Code.Ref == orig {
		t.Fatalf("use_latest resolved to %+v, want the newest amend (v3)", p.Code)
	}
	// Without amends the original stands.
	c = programContent(rt, rt)
	c.Code.UseLatest = true
	p, err = e.r.Program(context.Background(), e.api.addProgram(c))
	if err != nil {
		t.Fatal(err)
	}
	if p.Code.Ref != rt {
		t.Fatalf("no amend: got %+v", p.Code)
	}
}

// TestUseLatestDelegate: the newest amend of a use_latest ref wins when
// its sender is the owner or a delegate the owner's security aggregate
// allows (what pyaleph accepts, and what the reactor stops a program
// for); a delegate allowed only other message types does not count.
func TestUseLatestDelegate(t *testing.T) {
	const delegate = "0x2222222222222222222222222222222222222222"
	for _, c := range []struct {
		name  string
		auths string
		want  string
	}{
		{name: "delegate allowed STORE", auths: `[{"address":"` + delegate + `","types":["STORE"]}]`, want: "v3 by the delegate"},
		{name: "delegate allowed POST only", auths: `[{"address":"` + delegate + `","types":["POST"]}]`, want: "v2 by the owner"},
		{name: "no delegation", auths: `[]`, want: "v2 by the owner"},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t, DefaultLimits())
			e.api.security = map[string]string{owner: c.auths}
			client := alephapi.New(e.api.srv.URL, e.api.srv.URL+"/ipfs", alephapi.WithRetries(2, time.Millisecond))
			r := New(e.store, client, e.cache, DefaultLimits(), WithDelegations(delegation.New(client, 0)))
			orig := e.api.addFile([]byte("v1"), time.Unix(1700000000, 0), "")
			e.api.addFile([]byte("v2 by the owner"), time.Unix(1700000100, 0), orig)
			e.api.addFileBy(delegate, []byte("v3 by the delegate"), time.Unix(1700000200, 0), orig)
			rt := e.api.addFile([]byte("rt"), time.Unix(1, 0), "")
			pc := programContent(orig, rt)
			pc.Code.UseLatest = true
			p, err := r.Program(context.Background(), e.api.addProgram(pc))
			if err != nil {
				t.Fatal(err)
			}
			if p.Code.Hash != sum([]byte(c.want)) {
				t.Fatalf("use_latest resolved to %s, want %q (%s)", p.Code.Hash, c.want, sum([]byte(c.want)))
			}
		})
	}
}

func TestAPIUnreachable(t *testing.T) {
	e := newEnv(t, DefaultLimits())
	ctx := context.Background()
	// A local program whose runtime only the (unreachable) API knows.
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "main.py"), []byte("app = 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	remoteRuntime := sum([]byte("remote runtime"))
	res, err := e.store.UploadProgram(ctx, store.UploadOptions{Path: dir, Entrypoint: "main:app", RuntimeRef: remoteRuntime})
	if err != nil {
		t.Fatal(err)
	}
	e.api.srv.Close()

	if _, err := e.r.Message(ctx, sum([]byte("x"))); !errkind.Is(err, errkind.Unavailable) || !errors.Is(err, alephapi.ErrUnreachable) {
		t.Fatalf("Message with API down: %v", err)
	}
	_, err = e.r.Program(ctx, res.ProgramHash)
	if errkind.Of(err) != errkind.ResourceMissing || !errkind.Is(err, errkind.Unavailable) ||
		!strings.Contains(err.Error(), "runtime ref "+remoteRuntime) {
		t.Fatalf("Program with API down: %v (kind %v)", err, errkind.Of(err))
	}
}

func TestOffline(t *testing.T) {
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	r := New(st, nil, nil, DefaultLimits())
	if !r.Offline() {
		t.Fatal("resolver without API is not offline")
	}
	if _, err := r.Program(context.Background(), sum([]byte("x"))); !errkind.Is(err, errkind.NotFound) {
		t.Fatalf("offline unknown hash: %v", err)
	}
}

func TestFakeData(t *testing.T) {
	ctx := context.Background()
	st, err := store.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "main.py"), []byte("app = 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	if _, err := NewFakeData(filepath.Join(dir, "nope"), "", st); !errkind.Is(err, errkind.InvalidInput) {
		t.Fatalf("missing dir: %v", err)
	}
	if _, err := NewFakeData(dir, "other:app", st); !errkind.Is(err, errkind.InvalidInput) {
		t.Fatalf("bad entrypoint: %v", err)
	}
	r, err := NewFakeData(dir, "", st)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Program(ctx, sum([]byte("a"))); !errkind.Is(err, errkind.ResourceMissing) || !strings.Contains(err.Error(), "make runtime") {
		t.Fatalf("fake data without runtime: %v", err)
	}
	img := filepath.Join(t.TempDir(), "rootfs.squashfs")
	if err := os.WriteFile(img, []byte("rt"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := st.AddRuntime(ctx, img, "rt", true); err != nil {
		t.Fatal(err)
	}

	a, err := r.Program(ctx, sum([]byte("a")))
	if err != nil {
		t.Fatal(err)
	}
	b, err := r.Program(ctx, sum([]byte("b")))
	if err != nil {
		t.Fatal(err)
	}
	if a.Hash != sum([]byte("a")) || b.Code.Hash != a.Code.Hash || a.Content.Code.Entrypoint != "main:app" {
		t.Fatalf("fake programs differ: %+v / %+v", a.Code, b.Code)
	}
	if a.Content.Resources.Memory != 128 || a.Content.Resources.Seconds != 30 || a.Content.Variables["VM_CUSTOM_NUMBER"] != "32" {
		t.Errorf("fake defaults %+v", a.Content)
	}
	zr, err := zip.OpenReader(a.Code.Path)
	if err != nil {
		t.Fatal(err)
	}
	zr.Close()

	// Editing the directory shows up at the next resolution.
	if err := os.WriteFile(filepath.Join(dir, "main.py"), []byte("app = 2\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	c, err := r.Program(ctx, sum([]byte("a")))
	if err != nil {
		t.Fatal(err)
	}
	if c.Code.Hash == a.Code.Hash {
		t.Error("edit of the fake-data program not picked up")
	}
	if _, err := r.Program(ctx, "bad"); !errkind.Is(err, errkind.InvalidInput) {
		t.Errorf("malformed hash in fake mode: %v", err)
	}
}

// An unknown hash is asked of the API once; for NotFoundTTL the same
// NotFound answers without another call.
func TestUnknownHashRemembered(t *testing.T) {
	e := newEnv(t, DefaultLimits())
	hash := sum([]byte("nobody at all"))
	_, err1 := e.r.Program(context.Background(), hash)
	calls := e.api.msgCalls.Load()
	_, err2 := e.r.Program(context.Background(), hash)
	if !errkind.Is(err1, errkind.NotFound) || !errkind.Is(err2, errkind.NotFound) {
		t.Fatalf("want NotFound twice, got %v / %v", err1, err2)
	}
	if err1.Error() != err2.Error() {
		t.Errorf("different answers: %q / %q", err1, err2)
	}
	if calls != 1 || e.api.msgCalls.Load() != calls {
		t.Errorf("API calls: %d after the first request, %d after the second; want 1, 1", calls, e.api.msgCalls.Load())
	}
}

// Immutable volumes carry no encoding in the message: the resolver tells
// squashfs from zip by their first bytes, and refuses anything else
// before a backend would mount it.
func TestImmutableVolumeEncoding(t *testing.T) {
	e := newEnv(t, DefaultLimits())
	ctx := context.Background()
	codeRef := e.api.addFile([]byte("code"), time.Unix(1700000000, 0), "")
	runtimeRef := e.api.addFile([]byte("runtime"), time.Unix(1700000000, 0), "")
	for _, tc := range []struct {
		name    string
		content []byte
		want    message.Encoding
	}{
		{"squashfs", []byte("hsqs\x00\x01rest of an image"), message.EncodingSquashfs},
		{"zip", []byte("PK\x03\x04rest of an archive"), message.EncodingZip},
		{"empty zip", []byte("PK\x05\x06" + strings.Repeat("\x00", 18)), message.EncodingZip},
		{"ext4 image", append(make([]byte, 1080), 0x53, 0xef), ""},
		{"too short", []byte("PK"), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ref := e.api.addFile(tc.content, time.Unix(1700000000, 0), "")
			c := programContent(codeRef, runtimeRef)
			c.Volumes = []message.Volume{{Mount: "/opt/lib", Ref: ref}}
			p, err := e.r.Program(ctx, e.api.addProgram(c))
			if tc.want == "" {
				if !errkind.Is(err, errkind.InvalidInput) || !strings.Contains(err.Error(), "volume /opt/lib ref "+ref) {
					t.Fatalf("got %v, want an InvalidInput error naming the volume", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := p.Volumes[0].File.Encoding; got != tc.want {
				t.Errorf("encoding %q, want %q", got, tc.want)
			}
		})
	}
}

// TestPersistentVolumeParent: a persistent volume's parent ref is
// resolved like any STORE file (downloaded into the cache, hash-checked)
// and given as the volume's File; bytes that do not match the hash are
// refused.
func TestPersistentVolumeParent(t *testing.T) {
	e := newEnv(t, DefaultLimits())
	ctx := context.Background()
	image := []byte("an ext4 image")
	codeRef := e.api.addFile([]byte("zip bytes"), time.Unix(1700000000, 0), "")
	runtimeRef := e.api.addFile([]byte("runtime bytes"), time.Unix(1700000000, 0), "")
	parentRef := e.api.addFile(image, time.Unix(1700000000, 0), "")
	c := programContent(codeRef, runtimeRef)
	c.Volumes = []message.Volume{
		{Mount: "/var/lib/db", Name: "db", Persistence: "host", SizeMiB: 5, Parent: &message.ParentVolume{Ref: parentRef}},
	}
	p, err := e.r.Program(ctx, e.api.addProgram(c))
	if err != nil {
		t.Fatal(err)
	}
	f := p.Volumes[0].File
	if p.Volumes[0].Kind != message.VolumePersistent || f == nil || f.Ref != parentRef || f.Hash != sum(image) {
		t.Fatalf("parent resolved as %+v", f)
	}
	if b, _ := os.ReadFile(f.Path); string(b) != string(image) {
		t.Errorf("parent content %q", b)
	}

	other := []byte("another image")
	otherRef := e.api.addFile(other, time.Unix(1700000000, 0), "")
	e.api.mu.Lock()
	e.api.files[sum(other)] = []byte("tampered bytes")
	e.api.mu.Unlock()
	c.Volumes[0].Parent.Ref = otherRef
	_, err = e.r.Program(ctx, e.api.addProgram(c))
	if err == nil {
		t.Fatal("a parent whose bytes do not match its hash was accepted")
	}
	if !strings.Contains(err.Error(), "volume /var/lib/db parent") || !errkind.Is(err, errkind.InvalidInput) && !errkind.Is(err, errkind.ResourceMissing) {
		t.Errorf("tampered parent: %v (%v)", err, errkind.Of(err))
	}
	t.Logf("tampered parent: %v", err)
}
