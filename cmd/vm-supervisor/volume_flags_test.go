package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

func TestParseVolumeFlag(t *testing.T) {
	for _, tc := range []struct {
		kind  message.VolumeKind
		value string
		want  store.UploadVolume
	}{
		{message.VolumeImmutable, "mount=/opt/lib,path=./lib", store.UploadVolume{Kind: message.VolumeImmutable, Mount: "/opt/lib", Path: "./lib"}},
		{message.VolumeImmutable, "ref=" + strings.Repeat("a", 64) + ",mount=/v,use_latest=true",
			store.UploadVolume{Kind: message.VolumeImmutable, Mount: "/v", Ref: strings.Repeat("a", 64), UseLatest: true}},
		{message.VolumePersistent, "mount=/var/lib/db,name=db,size_mib=64", store.UploadVolume{Kind: message.VolumePersistent, Mount: "/var/lib/db", Name: "db", SizeMiB: 64}},
		{message.VolumeEphemeral, " mount=/tmp/x, size_mib=8", store.UploadVolume{Kind: message.VolumeEphemeral, Mount: "/tmp/x", SizeMiB: 8}},
	} {
		got, err := parseVolumeFlag(tc.kind, tc.value)
		if err != nil {
			t.Errorf("%s %q: %v", tc.kind, tc.value, err)
			continue
		}
		if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s %q = %+v, want %+v", tc.kind, tc.value, got, tc.want)
		}
	}
}

func TestParseVolumeFlagErrors(t *testing.T) {
	for _, tc := range []struct {
		kind  message.VolumeKind
		value string
		want  string
	}{
		{message.VolumeEphemeral, "", "empty value"},
		{message.VolumeEphemeral, "mount=/x,size=8", `unknown key "size" (known: mount, size_mib)`},
		{message.VolumeEphemeral, "size_mib=8", "missing mount="},
		{message.VolumeEphemeral, "mount=x,size_mib=8", `mount "x" must be an absolute path`},
		{message.VolumeEphemeral, "mount=/x", "missing size_mib="},
		{message.VolumeEphemeral, "mount=/x,size_mib=0", "size_mib must be a positive integer"},
		{message.VolumeEphemeral, "mount=/x,size_mib=-3", "size_mib must be a positive integer"},
		{message.VolumeEphemeral, "mount=/x,size_mib=1.5", "size_mib must be a positive integer"},
		{message.VolumeEphemeral, "mount=/x,size_mib=8,mount=/y", "mount given twice"},
		{message.VolumeEphemeral, "mount=/x,size_mib", `"size_mib" is not key=value`},
		{message.VolumeEphemeral, "mount=,size_mib=8", "mount has no value"},
		{message.VolumePersistent, "mount=/x,size_mib=8", "missing name="},
		{message.VolumePersistent, "mount=/x,name=db", "missing size_mib="},
		{message.VolumePersistent, "mount=/x,name=db,size_mib=8,ref=abc", `unknown key "ref"`},
		{message.VolumeImmutable, "mount=/x", "either ref=ITEM_HASH or path=DIR"},
		{message.VolumeImmutable, "mount=/x,ref=a,path=b", "either ref=ITEM_HASH or path=DIR"},
		{message.VolumeImmutable, "mount=/x,path=b,use_latest=true", "use_latest applies to ref="},
		{message.VolumeImmutable, "mount=/x,ref=a,use_latest=maybe", "use_latest must be true or false"},
		{message.VolumeImmutable, "mount=/x,ref=a,size_mib=3", `unknown key "size_mib"`},
	} {
		_, err := parseVolumeFlag(tc.kind, tc.value)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s %q: %v, want an error containing %q", tc.kind, tc.value, err, tc.want)
		}
	}
}

// Nested mounts come after their parent whatever the flags' order.
func TestParseVolumeFlagsOrder(t *testing.T) {
	got, err := parseVolumeFlags(
		[]string{"mount=/srv/app/static,path=s"},
		[]string{"mount=/srv/app,name=app,size_mib=4"},
		[]string{"mount=/cache,size_mib=4"},
	)
	if err != nil {
		t.Fatal(err)
	}
	var mounts []string
	for _, v := range got {
		mounts = append(mounts, v.Mount)
	}
	if want := []string{"/cache", "/srv/app", "/srv/app/static"}; !reflect.DeepEqual(mounts, want) {
		t.Errorf("order %v, want %v", mounts, want)
	}
}

// The command refuses bad volume flags with exit code 2 and one line that
// names the flag, before touching the store; --help documents them.
func TestProgramUploadVolumeFlags(t *testing.T) {
	st, err := store.Open(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "rootfs.squashfs")
	if err := os.WriteFile(img, []byte("runtime"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := st.AddRuntime(context.Background(), img, "test", true); err != nil {
		t.Fatal(err)
	}
	code := t.TempDir()
	if err := os.WriteFile(filepath.Join(code, "main.py"), []byte("app = None\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) (int, string, string) {
		var out, errb bytes.Buffer
		rc := cmdProgramUpload(context.Background(), st, args, &out, &errb, "http://127.0.0.1:4020")
		return rc, out.String(), errb.String()
	}

	rc, out, _ := run("--help")
	for _, want := range []string{"--immutable-volume", "--persistent-volume", "--ephemeral-volume", "--data", "size_mib=", "path=DIR", "ref=HASH"} {
		if rc != 0 || !strings.Contains(out, want) {
			t.Errorf("help (rc %d) lacks %q:\n%s", rc, want, out)
		}
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--ephemeral-volume", "mount=/x,size_mib=zero"}, "--ephemeral-volume \"mount=/x,size_mib=zero\": size_mib must be a positive integer"},
		{[]string{"--persistent-volume", "mount=data,name=d,size_mib=1"}, "must be an absolute path"},
		{[]string{"--immutable-volume", "mount=/v,ref=" + strings.Repeat("ab", 32)}, "no such STORE message in the local store"},
		{[]string{"--immutable-volume", "mount=/v,colour=red"}, `unknown key "colour"`},
		{[]string{"--data-mount", "/d"}, "--data-mount needs --data DIR"},
		{[]string{"--data", filepath.Join(code, "main.py")}, "is not a directory"},
	} {
		rc, _, stderr := run(append([]string{code, "main:app"}, tc.args...)...)
		if rc != 2 || !strings.Contains(stderr, tc.want) || strings.Count(strings.TrimSpace(stderr), "\n") > 0 {
			t.Errorf("%v: rc %d, stderr %q, want 2 and one line containing %q", tc.args, rc, stderr, tc.want)
		}
	}
}
