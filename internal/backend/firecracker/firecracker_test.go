package firecracker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// fakeVMMEnv makes the test binary act as a stand-in for Firecracker (see
// TestMain). It is NOT Firecracker: it reads the same arguments and config
// file, serves the hybrid-vsock handshake with an echo "guest" on port 52
// and PUT /actions on the API socket, so that Start, Channel and Stop can
// run end to end on hosts where Firecracker cannot.
const fakeVMMEnv = "FIRECRACKER_TEST_FAKE_VMM"

func TestMain(m *testing.M) {
	if mode := os.Getenv(fakeVMMEnv); mode != "" {
		os.Exit(fakeVMM(mode))
	}
	if arg := os.Getenv(tapAttachEnv); arg != "" {
		os.Exit(tapAttach(arg))
	}
	os.Exit(m.Run())
}

func fakeVMM(mode string) int {
	var apiSock, configFile string
	for i, a := range os.Args {
		switch a {
		case "--api-sock":
			apiSock = os.Args[i+1]
		case "--config-file":
			configFile = os.Args[i+1]
		}
	}
	b, err := os.ReadFile(configFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake vmm:", err)
		return 1
	}
	var cfg VMConfig
	if err := json.Unmarshal(b, &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "fake vmm: bad config:", err)
		return 1
	}
	if mode == "crash" {
		fmt.Fprintln(os.Stderr, "Error: fake VMM refuses to boot")
		return 3
	}
	fmt.Print("[    0.000000] Linux version fake\r\nagent: ready\r\n")
	vl, err := net.Listen("unix", cfg.Vsock.UDSPath)
	if err != nil {
		return 1
	}
	go func() {
		for {
			c, err := vl.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				line, err := readConnect(c)
				if err != nil || line != "CONNECT 52" {
					return
				}
				if _, err := c.Write([]byte("OK 1073741824\n")); err != nil {
					return
				}
				_, _ = io.Copy(c, c) // echo until the test hangs up

			}()
		}
	}()
	stop := make(chan struct{})
	var once sync.Once
	al, err := net.Listen("unix", apiSock)
	if err != nil {
		return 1
	}
	actions := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var a InstanceAction
		if err := json.NewDecoder(r.Body).Decode(&a); err != nil || r.Method != http.MethodPut || r.URL.Path != "/actions" || a.ActionType != ActionSendCtrlAltDel {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		w.WriteHeader(http.StatusNoContent)
		if mode != "stubborn" {
			once.Do(func() { close(stop) })
		}
	})
	go func() { _ = http.Serve(al, actions) }() // ends when the process exits
	<-stop
	time.Sleep(50 * time.Millisecond)
	return 0
}

// writeFile writes a test fixture; a failure here is the test's setup failing.
func writeFile(t *testing.T, path, data string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), mode); err != nil {
		t.Fatal(err)
	}
}

// fakeKernel returns an ELF file (the test binary) to stand for vmlinux.
func fakeKernel(t *testing.T) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return exe
}

func TestNewErrors(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "firecracker")
	writeFile(t, exe, "#!/bin/sh\n", 0o755)
	vmm := filepath.Join(dir, "vmm")
	writeFile(t, vmm, "#!/bin/sh\n", 0o755)
	notExe := filepath.Join(dir, "jailer-not-exec")
	writeFile(t, notExe, "", 0o644)
	bzImage := filepath.Join(dir, "bzImage")
	writeFile(t, bzImage, "MZ\x00\x00 not an ELF", 0o644)
	kernel := fakeKernel(t)
	ok := Options{KVMPath: "/dev/null", FirecrackerPath: exe, JailerPath: exe, KernelPath: kernel, CacheRoot: dir}
	for _, tc := range []struct {
		name string
		mod  func(o *Options)
		want string
	}{
		{"no kvm", func(o *Options) { o.KVMPath = filepath.Join(dir, "kvm") }, "firecracker backend needs " + filepath.Join(dir, "kvm") + ": not present on this host (use gvisor or qemu)"},
		{"kvm not a device", func(o *Options) { o.KVMPath = exe }, "not a character device"},
		{"missing firecracker", func(o *Options) { o.FirecrackerPath = filepath.Join(dir, "nope") }, "firecracker binary " + filepath.Join(dir, "nope")},
		{"missing jailer", func(o *Options) { o.UseJailer = true; o.JailerPath = filepath.Join(dir, "nope") }, "jailer binary"},
		{"jailer not executable", func(o *Options) { o.UseJailer = true; o.JailerPath = notExe }, "not an executable file"},
		{"exec file name", func(o *Options) { o.UseJailer = true; o.FirecrackerPath = vmm; o.JailerPath = exe }, `name contains "firecracker"`},
		{"no kernel", func(o *Options) { o.KernelPath = "" }, "set LINUX_PATH"},
		{"missing kernel", func(o *Options) { o.KernelPath = filepath.Join(dir, "vmlinux") }, "guest kernel"},
		{"bzImage", func(o *Options) { o.KernelPath = bzImage }, "not an uncompressed ELF vmlinux"},
		{"missing initrd", func(o *Options) { o.InitrdPath = filepath.Join(dir, "initrd") }, "initrd"},
		{"unknown jail user", func(o *Options) { o.UseJailer = true; o.JailUser = "no-such-user-fc" }, "useradd"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := ok
			tc.mod(&o)
			began := time.Now()
			_, err := New(o)
			if time.Since(began) > time.Second {
				t.Errorf("New took %v", time.Since(began))
			}
			if err == nil {
				t.Fatal("New succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %q, want it to contain %q", err, tc.want)
			}
			if errkind.Of(err) != errkind.NoBackend {
				t.Errorf("kind = %v, want NoBackend", errkind.Of(err))
			}
		})
	}
	// The real default on a host without KVM gives the documented message.
	if _, err := os.Stat(DefaultKVMPath); os.IsNotExist(err) {
		_, err := New(Options{})
		if err == nil || !strings.Contains(err.Error(), "firecracker backend needs /dev/kvm: not present on this host (use gvisor or qemu)") {
			t.Errorf("default New: %v", err)
		}
	}
}

// TestInspect plans a program without KVM, binaries, jail user or image
// tools, as `program inspect --hypervisor firecracker` does.
func TestInspect(t *testing.T) {
	dir := t.TempDir()
	spec := testSpec(2, 256)
	spec.ProgramHash = "prog"
	spec.RuntimePath = "/nonexistent/runtime.squashfs"
	spec.CodePath, spec.CodeHash, spec.CodeEncoding, spec.Entrypoint = "/nonexistent/code.zip", "codehash", message.EncodingZip, "main:app"
	spec.Volumes = []backend.Volume{{Mount: "/var/cache", Kind: message.VolumeEphemeral, SizeMiB: 10}}
	p, err := Inspect(context.Background(), Options{UseJailer: true, JailUser: "no-such-user-fc", KernelPath: "/opt/vm/vmlinux", CacheRoot: dir, KVMPath: filepath.Join(dir, "kvm")}, spec)
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Warnings) == 0 || !strings.Contains(p.Warnings[0], "useradd") {
		t.Errorf("warnings = %v", p.Warnings)
	}
	if p.Command[0] != DefaultJailerPath || p.Config.MachineConfig.VCPUCount != 2 || p.Config.MachineConfig.MemSizeMiB != 256 {
		t.Errorf("plan = %s %s", p.Command, p.ConfigJSON)
	}
	if want := filepath.Join(dir, "vm-images", "codehash.zip.squashfs"); p.Drives[1].HostPath != want {
		t.Errorf("code drive %s, want %s", p.Drives[1].HostPath, want)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("Inspect created files: %v", entries)
	}
}

func TestSendAction(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var got string
	api := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got = r.Method + " " + r.URL.Path + " " + string(b)
		if strings.Contains(string(b), "Bad") {
			w.WriteHeader(http.StatusBadRequest)
			_, _ = w.Write([]byte(`{"fault_message":"unknown action"}`))
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	go func() { _ = http.Serve(l, api) }() // ends when l is closed
	if err := SendAction(context.Background(), sock, ActionSendCtrlAltDel); err != nil {
		t.Fatal(err)
	}
	if got != `PUT /actions {"action_type":"SendCtrlAltDel"}` {
		t.Errorf("request = %q", got)
	}
	if err := SendAction(context.Background(), sock, "Bad"); err == nil || !strings.Contains(err.Error(), "unknown action") {
		t.Errorf("error answer: %v", err)
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// fakeSetup returns a backend whose "firecracker" is the fake VMM, and a
// spec with a runtime and code, in a directory of its own (not
// t.TempDir: its path holds the test's name).
func fakeSetup(t *testing.T) (*Backend, backend.Spec) {
	t.Helper()
	dir, err := os.MkdirTemp("", "fct")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	runtime := filepath.Join(dir, "rt.squashfs")
	writeFile(t, runtime, "rt", 0o644)
	code := filepath.Join(dir, "code.squashfs")
	writeFile(t, code, "code", 0o644)
	b, err := New(Options{
		KVMPath: "/dev/null", FirecrackerPath: fakeKernel(t), KernelPath: fakeKernel(t),
		CacheRoot: filepath.Join(dir, "cache"), StopGrace: 500 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	spec := testSpec(1, 128)
	spec.StateDir = filepath.Join(dir, "state")
	spec.RuntimePath, spec.CodePath, spec.CodeEncoding = runtime, code, message.EncodingSquashfs
	return b, spec
}

// startFake starts an instance whose "firecracker" is the fake VMM.
func startFake(t *testing.T, mode string) (*instance, *syncBuffer, backend.Spec) {
	t.Helper()
	t.Setenv(fakeVMMEnv, mode)
	b, spec := fakeSetup(t)
	out := &syncBuffer{}
	spec.ProgramOutput = out
	inst, err := b.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	return inst.(*instance), out, spec
}

// TestLifecycleWithFakeVMM runs Start, Channel, ConfigureGuest and Stop
// against the fake VMM (no jailer). Firecracker itself is not involved.
func TestLifecycleWithFakeVMM(t *testing.T) {
	for _, mode := range []string{"polite", "stubborn"} {
		t.Run(mode, func(t *testing.T) {
			inst, out, spec := startFake(t, mode)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			ch, err := inst.Channel(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := ch.Write([]byte("ping")); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 4)
			if _, err := io.ReadFull(ch, buf); err != nil || string(buf) != "ping" {
				t.Fatalf("echo = %q, %v", buf, err)
			}
			if _, err := inst.Channel(ctx); err == nil {
				t.Error("second Channel succeeded")
			}
			var cfg guest.Config
			inst.ConfigureGuest(&cfg)
			if cfg.CodeDevice != "/dev/vdb" {
				t.Errorf("CodeDevice = %q", cfg.CodeDevice)
			}
			if inst.Usage() == (backend.Usage{}) {
				t.Log("no usage yet (process too young)")
			}
			ch.Close()
			if err := inst.Stop(ctx); err != nil {
				t.Fatal(err)
			}
			if err := inst.Err(); err != nil {
				t.Errorf("Err after Stop = %v", err)
			}
			if !strings.Contains(out.String(), "agent: ready\n") || strings.Contains(out.String(), "\r") {
				t.Errorf("console output = %q", out.String())
			}
			if entries, _ := os.ReadDir(spec.StateDir); len(entries) != 0 {
				var names []string
				for _, e := range entries {
					names = append(names, e.Name())
				}
				t.Errorf("state dir not clean: %v", names)
			}
			if err := inst.Stop(ctx); err != nil {
				t.Errorf("second Stop: %v", err)
			}
		})
	}
}

// TestEarlyExitFailsChannel: a VMM that dies at boot makes Channel fail
// at once with its stderr, instead of waiting for the timeout.
func TestEarlyExitFailsChannel(t *testing.T) {
	inst, _, _ := startFake(t, "crash")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	began := time.Now()
	_, err := inst.Channel(ctx)
	if err == nil {
		t.Fatal("Channel succeeded")
	}
	if time.Since(began) > 5*time.Second {
		t.Errorf("Channel took %v after the VMM died", time.Since(began))
	}
	if !strings.Contains(err.Error(), "fake VMM refuses to boot") || errkind.Of(err) != errkind.BadGateway {
		t.Errorf("err = %v (%v)", err, errkind.Of(err))
	}
	<-inst.Done()
	if inst.Err() == nil {
		t.Error("Err is nil after a crash")
	}
	if err := inst.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

var _ backend.GuestConfigurer = (*instance)(nil)
