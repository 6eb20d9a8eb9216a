package qemu

import (
	"archive/zip"
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// preloadWatch passes a VM's console on and tells when the launcher has
// finished its imports.
type preloadWatch struct {
	next io.Writer
	once sync.Once
	done chan struct{}
}

func (w *preloadWatch) Write(p []byte) (int, error) {
	if bytes.Contains(p, []byte("launcher: preloaded in")) {
		w.once.Do(func() { close(w.done) })
	}
	return w.next.Write(p)
}

// startSpare starts a spare VM as the pool does (no code, DeferCode),
// opens its guest session and waits until its interpreter is warm.
func startSpare(t testing.TB, be *Backend, out io.Writer) (backend.Instance, *guest.Client) {
	t.Helper()
	spec := fastapiSpec(t)
	spec.CodePath, spec.CodeEncoding, spec.Entrypoint, spec.ProgramHash = "", "", "", ""
	spec.DeferCode = true
	watch := &preloadWatch{next: out, done: make(chan struct{})}
	spec.ProgramOutput = watch
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	inst, err := be.Start(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	ch, err := inst.Channel(ctx)
	if err != nil {
		stopInstance(t, inst)
		t.Fatal(err)
	}
	c, err := guest.Dial(ch, spec.Logger)
	if err != nil {
		stopInstance(t, inst)
		t.Fatal(err)
	}
	select {
	case <-watch.done:
	case <-inst.Done():
		t.Fatalf("the spare VM died while warming: %v", inst.Err())
	case <-ctx.Done():
		stopInstance(t, inst)
		t.Fatal("the spare's interpreter did not finish preloading")
	}
	return inst, c
}

// adopt gives a warm spare the example program and waits for its first
// answer, as the pool's cold start does; it returns how long that took.
func adopt(t testing.TB, inst backend.Instance, c *guest.Client) time.Duration {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
	defer cancel()
	began := time.Now()
	if err := inst.(backend.CodeLoader).LoadCode(ctx, fastapiSpec(t)); err != nil {
		t.Fatalf("LoadCode: %v", err)
	}
	cfg := guest.Config{Interface: guest.InterfaceASGI, Entrypoint: "main:app"}
	inst.(backend.GuestConfigurer).ConfigureGuest(&cfg)
	if cfg.CodeDevice != "/dev/vdb" {
		t.Fatalf("the Config names code device %q, want the spare's /dev/vdb", cfg.CodeDevice)
	}
	if err := c.Start(ctx, cfg); err != nil {
		t.Fatalf("starting the program in the spare: %v", err)
	}
	hc := &http.Client{Timeout: requestTimeout, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return c.DialHTTP(ctx) },
	}}
	if code, body := get(t, hc, "/"); code != http.StatusOK {
		t.Fatalf("GET /: %d %s", code, body)
	}
	return time.Since(began)
}

// A spare VM boots with an empty code drive. Code that codeprep refuses
// leaves it untouched; the program's code then fills the drive, and the
// preloaded interpreter serves it.
func TestSpareTakesItsCodeAfterBoot(t *testing.T) {
	requireQemu(t)
	for _, k := range kernels(t) {
		t.Run(k.name, func(t *testing.T) {
			be := newBackend(t, k)
			inst, c := startSpare(t, be, testWriter{t, "vm: "})
			defer stopInstance(t, inst)
			defer c.Close()

			evil := filepath.Join(t.TempDir(), "evil.zip")
			writeZip(t, evil, "../escape.py")
			bad := fastapiSpec(t)
			bad.CodePath, bad.CodeEncoding, bad.CodeHash = evil, message.EncodingZip, "evil"
			err := inst.(backend.CodeLoader).LoadCode(context.Background(), bad)
			if !errkind.Is(err, errkind.InvalidInput) {
				t.Fatalf("an archive escaping its directory gave %v, want an InvalidInput refusal", err)
			}
			if fi, err := os.Stat(inst.(*instance).prepared.Code.Path); err != nil || fi.Size() != 0 {
				t.Fatalf("the refused code reached the spare's drive: %v, %v", fi, err)
			}
			took := adopt(t, inst, c)
			t.Logf("%s: code loaded into a warm spare VM and first answer in %s", k.name, took.Round(time.Millisecond))
		})
	}
}

func writeZip(t *testing.T, path, name string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	zw := zip.NewWriter(f)
	w, err := zw.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("app = None\n")); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkColdStartWithSpare measures, per kernel, a cold start that
// finds a warm spare VM: code loaded into its drive, Config sent, first
// answer (the spare's own boot and preload are not counted):
//
//	go test -run '^$' -bench ColdStart -benchtime 3x ./internal/backend/qemu
func BenchmarkColdStartWithSpare(b *testing.B) {
	requireQemu(b)
	for _, k := range kernels(b) {
		b.Run(k.name, func(b *testing.B) {
			be := newBackend(b, k)
			quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
			be.log = quiet
			var cold time.Duration
			for n := 0; n < b.N; n++ {
				inst, c := startSpare(b, be, io.Discard)
				cold += adopt(b, inst, c)
				c.Close()
				stopInstance(b, inst)
			}
			b.ReportMetric(float64(cold.Milliseconds())/float64(b.N), "cold-start-ms")
			b.ReportMetric(0, "ns/op")
		})
	}
}
