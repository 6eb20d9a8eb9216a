package firecracker

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend/vmimage"
)

// TestSparePlanValidates lays out a spare as Start would (images planned by
// vmimage, nothing created) and checks it against Firecracker v1.0.0's
// definitions: an empty code drive that can be swapped later, the
// preload flag on the command line, and the adopt request's body.
func TestSparePlanValidates(t *testing.T) {
	defs := loadDefinitions(t)
	for _, jailed := range []bool{true, false} {
		spec := testSpec(1, 128)
		spec.RuntimePath, spec.DeferCode = "/cache/runtime.squashfs", true
		prep, err := vmimage.NewPreparer(vmimage.Options{CacheDir: "/cache/vm-images"}).Plan(context.Background(), spec)
		if err != nil {
			t.Fatal(err)
		}
		drives := vmimage.GuestDrives(prep, nil)
		opts := Options{UseJailer: jailed, KernelPath: "/opt/vm/vmlinux", InitrdPath: "/opt/vm/initrd", JailerUID: 990, JailerGID: 990, CgroupVersion: 2}.withDefaults()
		plan, _ := validPlan(t, defs, opts, spec, drives)
		if args := plan.Config.BootSource.BootArgs; !strings.Contains(args, PreloadArg) {
			t.Errorf("jailed=%v: boot args %q lack %s", jailed, args, PreloadArg)
		}
		placeholder := filepath.Join(spec.StateDir, vmimage.PlaceholderName)
		code := plan.Config.Drives[1]
		wantPath := placeholder
		if jailed {
			wantPath = JailDrivesDir + "/code"
			if f := plan.Files[len(plan.Files)-1]; f.Source != placeholder || f.Dest != wantPath || f.Writable || !f.Temporary {
				t.Errorf("placeholder placed as %+v", f)
			}
		}
		if len(plan.Config.Drives) != 2 || code.DriveID != "code" || code.PathOnHost != wantPath || !code.IsReadOnly || code.IsRootDevice {
			t.Errorf("jailed=%v: drives %+v, want the runtime and a read-only code placeholder at %s", jailed, plan.Config.Drives, wantPath)
		}

		// Adoption: the body of PATCH /drives/code, and what is placed.
		file, patch := CodeSwap(plan, "/cache/vm-images/abc.zip.squashfs")
		if errs := defs.validate("PartialDrive", decode(t, patch)); len(errs) > 0 {
			t.Errorf("jailed=%v: PATCH body rejected: %v", jailed, errs)
		}
		if patch.DriveID != code.DriveID {
			t.Errorf("PATCH names drive %q, the config %q", patch.DriveID, code.DriveID)
		}
		switch {
		case jailed && (file == nil || file.Dest != patch.PathOnHost || file.Source != "/cache/vm-images/abc.zip.squashfs" || file.Writable):
			t.Errorf("jailed: placed %+v for PATCH %+v", file, patch)
		case jailed:
			if err := checkJailDest(file.Dest, opts.FirecrackerPath); err != nil {
				t.Error(err)
			}
		case file != nil || patch.PathOnHost != "/cache/vm-images/abc.zip.squashfs":
			t.Errorf("not jailed: placed %+v, PATCH %+v", file, patch)
		}
	}
}

// TestPatchDriveRequest sends the adopt request to a server on a unix
// socket standing in for Firecracker's API, as the spec describes it:
// PATCH /drives/{drive_id}, 204 on success, a fault_message otherwise.
func TestPatchDriveRequest(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "api.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	type seen struct {
		method, path, ctype string
		body                map[string]any
	}
	got := make(chan seen, 2)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		var body map[string]any
		_ = json.Unmarshal(b, &body)
		got <- seen{r.Method, r.URL.Path, r.Header.Get("Content-Type"), body}
		if body["path_on_host"] == "/missing" {
			w.WriteHeader(http.StatusBadRequest)
			_, _ = io.WriteString(w, `{"fault_message":"Unable to patch the block device: No such file or directory"}`)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })

	ctx := context.Background()
	if err := PatchDrive(ctx, sock, PartialDrive{DriveID: "code", PathOnHost: "/drives/code-loaded"}); err != nil {
		t.Fatal(err)
	}
	s := <-got
	want := map[string]any{"drive_id": "code", "path_on_host": "/drives/code-loaded"}
	if s.method != http.MethodPatch || s.path != "/drives/code" || s.ctype != "application/json" ||
		s.body["drive_id"] != want["drive_id"] || s.body["path_on_host"] != want["path_on_host"] || len(s.body) != 2 {
		t.Errorf("request %+v, want PATCH /drives/code with %v", s, want)
	}
	err = PatchDrive(ctx, sock, PartialDrive{DriveID: "code", PathOnHost: "/missing"})
	<-got
	if err == nil || !strings.Contains(err.Error(), "No such file") {
		t.Errorf("a refused PATCH gave %v, want Firecracker's fault message", err)
	}
}
