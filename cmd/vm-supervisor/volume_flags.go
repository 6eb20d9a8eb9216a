package main

import (
	"fmt"
	"path"
	"slices"
	"strconv"
	"strings"

	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources/store"
)

// volumeKeys are the keys each volume flag takes, in aleph-message's
// field names (mount, ref, use_latest, name, size_mib), plus path=DIR for
// an immutable volume packed from a local directory.
var volumeKeys = map[message.VolumeKind][]string{
	message.VolumeImmutable:  {"mount", "ref", "path", "use_latest"},
	message.VolumePersistent: {"mount", "name", "size_mib"},
	message.VolumeEphemeral:  {"mount", "size_mib"},
}

// volumeFlagHelp is the part of `program upload --help` about volumes.
const volumeFlagHelp = `
Volumes (each flag may be repeated; values are comma-separated key=value):
  --immutable-volume mount=/opt/lib,path=DIR     DIR packed as squashfs and stored
  --immutable-volume mount=/opt/lib,ref=HASH     a STORE message in the local store
                                                 (squashfs image or zip archive);
                                                 add use_latest=true to follow amends
  --persistent-volume mount=/var/lib/app,name=db,size_mib=64
                                                 kept across runs on this node
  --ephemeral-volume mount=/var/cache/app,size_mib=32
                                                 empty at every start
  --data DIR [--data-mount /data]                DIR packed as zip, read-only at /data
Immutable volumes and data are read-only in the program; mounts are absolute
paths. Paths containing ',' cannot be given.
`

// parseVolumeFlag parses the value of one --<kind>-volume flag.
func parseVolumeFlag(kind message.VolumeKind, value string) (store.UploadVolume, error) {
	flag := "--" + string(kind) + "-volume"
	allowed := volumeKeys[kind]
	v := store.UploadVolume{Kind: kind}
	seen := map[string]bool{}
	if strings.TrimSpace(value) == "" {
		return v, fmt.Errorf("%s: empty value, expected %s", flag, example(kind))
	}
	for _, kv := range strings.Split(value, ",") {
		key, val, ok := strings.Cut(kv, "=")
		key = strings.TrimSpace(key)
		switch {
		case !ok:
			return v, fmt.Errorf("%s %q: %q is not key=value (expected %s)", flag, value, kv, example(kind))
		case !slices.Contains(allowed, key):
			return v, fmt.Errorf("%s %q: unknown key %q (known: %s)", flag, value, key, strings.Join(allowed, ", "))
		case seen[key]:
			return v, fmt.Errorf("%s %q: %s given twice", flag, value, key)
		case val == "":
			return v, fmt.Errorf("%s %q: %s has no value", flag, value, key)
		}
		seen[key] = true
		switch key {
		case "mount":
			v.Mount = val
		case "ref":
			v.Ref = val
		case "path":
			v.Path = val
		case "name":
			v.Name = val
		case "use_latest":
			b, err := strconv.ParseBool(val)
			if err != nil {
				return v, fmt.Errorf("%s %q: use_latest must be true or false, got %q", flag, value, val)
			}
			v.UseLatest = b
		case "size_mib":
			n, err := strconv.Atoi(val)
			if err != nil || n <= 0 {
				return v, fmt.Errorf("%s %q: size_mib must be a positive integer (MiB), got %q", flag, value, val)
			}
			v.SizeMiB = n
		}
	}
	if !seen["mount"] {
		return v, fmt.Errorf("%s %q: missing mount=/absolute/path", flag, value)
	}
	if !strings.HasPrefix(v.Mount, "/") {
		return v, fmt.Errorf("%s %q: mount %q must be an absolute path", flag, value, v.Mount)
	}
	switch kind {
	case message.VolumeImmutable:
		if seen["ref"] == seen["path"] {
			return v, fmt.Errorf("%s %q: give either ref=ITEM_HASH or path=DIR", flag, value)
		}
		if seen["path"] && seen["use_latest"] {
			return v, fmt.Errorf("%s %q: use_latest applies to ref=, not to path=", flag, value)
		}
	case message.VolumePersistent:
		for _, k := range []string{"name", "size_mib"} {
			if !seen[k] {
				return v, fmt.Errorf("%s %q: missing %s= (expected %s)", flag, value, k, example(kind))
			}
		}
	case message.VolumeEphemeral:
		if !seen["size_mib"] {
			return v, fmt.Errorf("%s %q: missing size_mib= (expected %s)", flag, value, example(kind))
		}
	}
	return v, nil
}

func example(kind message.VolumeKind) string {
	switch kind {
	case message.VolumeImmutable:
		return "mount=/opt/lib,path=DIR or mount=/opt/lib,ref=ITEM_HASH"
	case message.VolumePersistent:
		return "mount=/var/lib/app,name=NAME,size_mib=N"
	default:
		return "mount=/var/cache/app,size_mib=N"
	}
}

// parseVolumeFlags parses every volume flag; the volumes are ordered by
// the depth of their mount (shallow first), else immutable, persistent,
// ephemeral, each in the order given.
func parseVolumeFlags(immutable, persistent, ephemeral []string) ([]store.UploadVolume, error) {
	var out []store.UploadVolume
	for _, group := range []struct {
		kind   message.VolumeKind
		values []string
	}{
		{message.VolumeImmutable, immutable},
		{message.VolumePersistent, persistent},
		{message.VolumeEphemeral, ephemeral},
	} {
		for _, val := range group.values {
			v, err := parseVolumeFlag(group.kind, val)
			if err != nil {
				return nil, err
			}
			out = append(out, v)
		}
	}
	// Backends mount in list order: a volume inside another's mount must
	// come after it.
	slices.SortStableFunc(out, func(a, b store.UploadVolume) int {
		return strings.Count(path.Clean(a.Mount), "/") - strings.Count(path.Clean(b.Mount), "/")
	})
	return out, nil
}
