package gvisor

import (
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestCheckpointRestoreRemapsStdio pins the runsc behaviour a snapshot
// restore of our sandboxes would rest on (docs/snapshots.md): a sandbox
// checkpointed while its process is blocked reading stdin comes back,
// from the same bundle, with its stdin and stdout on the restoring runsc's
// own pipes, so the guest channel works again without any host-side
// re-plumbing. It logs checkpoint and restore times on this host.
func TestCheckpointRestoreRemapsStdio(t *testing.T) {
	env := newEnv(t, "/bin/cat")
	spec := env.spec(t)
	inst := env.start(t, spec).(*instance)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	ch, err := inst.Channel(ctx)
	if err != nil {
		t.Fatal(err)
	}
	echo(t, ch, ch, "before\n")

	img := filepath.Join(t.TempDir(), "image")
	t0 := time.Now()
	if out, err := env.b.runscCmd(ctx, "checkpoint", "--image-path", img, inst.id).CombinedOutput(); err != nil {
		t.Fatalf("runsc checkpoint: %v: %s", err, out)
	}
	t.Logf("checkpoint: %v", time.Since(t0).Round(time.Millisecond))
	select {
	case <-inst.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("sandbox still runs after its checkpoint")
	}

	id := inst.id + "-restored"
	inR, inW, _ := os.Pipe()
	outR, outW, _ := os.Pipe()
	defer inW.Close()
	defer outR.Close()
	cmd := exec.Command(env.b.runsc, "--root", env.rootDir, "--platform", DefaultPlatform, "--network", "none",
		"--overlay2", "root:memory,size=32m", "restore", "--image-path", img, "--bundle", inst.bundleDir, id)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = inR, outW, testWriter{t}
	t0 = time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	inR.Close()
	outW.Close()
	defer func() {
		_ = env.b.runscCmd(context.Background(), "kill", id, "KILL").Run()
		_ = cmd.Wait()
		if out, err := env.b.runscCmd(context.Background(), "delete", "--force", id).CombinedOutput(); err != nil {
			t.Errorf("runsc delete: %v: %s", err, out)
		}
	}()
	echo(t, inW, outR, "after\n")
	t.Logf("restore to first echo: %v", time.Since(t0).Round(time.Millisecond))
}

// echo writes msg and expects it back.
func echo(t *testing.T, w io.Writer, r io.Reader, msg string) {
	t.Helper()
	if _, err := io.WriteString(w, msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	got := make([]byte, len(msg))
	done := make(chan error, 1)
	go func() { _, err := io.ReadFull(r, got); done <- err }()
	select {
	case err := <-done:
		if err != nil || string(got) != msg {
			t.Fatalf("echo of %q: got %q, %v", strings.TrimSpace(msg), got, err)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("no echo of %q", strings.TrimSpace(msg))
	}
}
