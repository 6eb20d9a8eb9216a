package store

import (
	"context"
	"fmt"
	"os"
	"path"
	"strings"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// DefaultDataMount is where the data archive appears when no mount is
// given: aleph-vm's guest always unpacks it into /data.
const DefaultDataMount = "/data"

// UploadVolume is one volume of an uploaded program, in the message's
// terms (aleph-message's ImmutableVolume, EphemeralVolume,
// PersistentVolume).
type UploadVolume struct {
	Kind  message.VolumeKind
	Mount string
	// Immutable: Ref is the item hash of a STORE message in the local
	// store; or Path, a directory packed as squashfs and stored.
	Ref       string
	Path      string
	UseLatest bool
	// Persistent: the volume's name (its image is
	// PERSISTENT_VOLUMES_DIR/<program hash>/<name>.ext4 on the node).
	Name string
	// Ephemeral and persistent: the size in MiB.
	SizeMiB int
}

// UploadData is the program's data archive: a directory packed as zip
// (aleph-vm's guests unzip it) and mounted read-only at Mount.
type UploadData struct {
	Path  string
	Mount string // DefaultDataMount when empty
}

// uploadVolumes stores what the volumes and the data archive need and
// returns their message sections. Volumes are checked before anything is
// packed, so that bad input writes nothing.
func (s *Store) uploadVolumes(ctx context.Context, vols []UploadVolume, data *UploadData, at time.Time, progress func(string, ...any)) ([]message.Volume, *message.DataContent, error) {
	names := map[string]bool{}
	for i, v := range vols {
		if err := s.checkVolume(v); err != nil {
			return nil, nil, fmt.Errorf("volume %d (%s): %w", i+1, v.Mount, err)
		}
		if v.Kind == message.VolumePersistent {
			if names[v.Name] {
				return nil, nil, invalidf("volume %d (%s): persistent volume %q is named twice (it would be one image)", i+1, v.Mount, v.Name)
			}
			names[v.Name] = true
		}
	}
	if data != nil {
		if data.Mount == "" {
			data.Mount = DefaultDataMount
		}
		if err := checkMount(data.Mount); err != nil {
			return nil, nil, fmt.Errorf("data: %w", err)
		}
		if err := checkDir(data.Path); err != nil {
			return nil, nil, fmt.Errorf("data: %w", err)
		}
	}

	var out []message.Volume
	for _, v := range vols {
		mv := message.Volume{Mount: v.Mount}
		switch v.Kind {
		case message.VolumeImmutable:
			mv.Ref, mv.UseLatest = v.Ref, v.UseLatest
			if v.Path != "" {
				progress("packing volume %s (squashfs)", v.Path)
				ref, size, err := s.packAndStore(ctx, v.Path, message.EncodingSquashfs, at)
				if err != nil {
					return nil, nil, fmt.Errorf("volume %s: %w", v.Mount, err)
				}
				progress("stored volume %s for %s (%d bytes)", ref, v.Mount, size)
				mv.Ref = ref
			}
		case message.VolumeEphemeral:
			mv.Ephemeral, mv.SizeMiB = true, v.SizeMiB
		case message.VolumePersistent:
			mv.Persistence, mv.Name, mv.SizeMiB = "host", v.Name, v.SizeMiB
		}
		out = append(out, mv)
	}
	var dc *message.DataContent
	if data != nil {
		progress("packing data %s (zip)", data.Path)
		ref, size, err := s.packAndStore(ctx, data.Path, message.EncodingZip, at)
		if err != nil {
			return nil, nil, fmt.Errorf("data: %w", err)
		}
		progress("stored data %s for %s (%d bytes)", ref, data.Mount, size)
		dc = &message.DataContent{Encoding: message.EncodingZip, Mount: data.Mount, Ref: ref}
	}
	return out, dc, nil
}

// packAndStore packs dir, stores the file and a STORE message for it, and
// returns the message's item hash.
func (s *Store) packAndStore(ctx context.Context, dir string, enc message.Encoding, at time.Time) (string, int64, error) {
	hash, size, err := s.packAndAdd(ctx, dir, enc)
	if err != nil {
		return "", 0, err
	}
	m, err := s.storeMessage(hash, size, nil, at)
	if err != nil {
		return "", 0, err
	}
	return m.ItemHash, size, nil
}

func (s *Store) checkVolume(v UploadVolume) error {
	if err := checkMount(v.Mount); err != nil {
		return err
	}
	switch v.Kind {
	case message.VolumeImmutable:
		switch {
		case (v.Ref == "") == (v.Path == ""):
			return invalidf("an immutable volume needs ref=ITEM_HASH or path=DIR (one of them)")
		case v.Path != "":
			return checkDir(v.Path)
		}
		if err := message.ValidateItemHash(v.Ref); err != nil {
			return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("ref: %w", err))
		}
		m, err := s.GetMessage(v.Ref)
		if errkind.Is(err, errkind.NotFound) {
			return invalidf("ref %s: no such STORE message in the local store (use path=DIR to pack a directory)", v.Ref)
		}
		if err != nil {
			return fmt.Errorf("ref %s: %w", v.Ref, err)
		}
		if _, err := m.Store(); err != nil {
			return errkind.Wrap(errkind.InvalidInput, fmt.Errorf("ref %s: %w", v.Ref, err))
		}
	case message.VolumeEphemeral:
		if v.SizeMiB < 1 || v.SizeMiB > message.MaxEphemeralVolumeMiB {
			return invalidf("size_mib must be between 1 and %d for an ephemeral volume, got %d", message.MaxEphemeralVolumeMiB, v.SizeMiB)
		}
	case message.VolumePersistent:
		if v.Name == "" {
			return invalidf("a persistent volume needs a name")
		}
		if !message.ValidVolumeName(v.Name) {
			return invalidf("name %q: use up to 64 letters, digits, '.', '_' or '-', starting with a letter or digit", v.Name)
		}
		if v.SizeMiB < 1 || v.SizeMiB > message.MaxPersistentVolumeMiB {
			return invalidf("size_mib must be between 1 and %d for a persistent volume, got %d", message.MaxPersistentVolumeMiB, v.SizeMiB)
		}
	default:
		return invalidf("unknown volume kind %q", v.Kind)
	}
	return nil
}

// checkMount applies the message's rule for mount points, with a message
// in the terms of the command line.
func checkMount(mount string) error {
	switch {
	case mount == "":
		return invalidf("missing mount=PATH")
	case !path.IsAbs(mount):
		return invalidf("mount %q must be an absolute path", mount)
	case path.Clean(mount) == "/":
		return invalidf("mount must not be the root directory")
	}
	for _, el := range strings.Split(mount, "/") {
		if el == ".." {
			return invalidf("mount %q must not contain \"..\"", mount)
		}
	}
	return nil
}

func checkDir(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return invalidf("path %s: %v", p, unwrapPathError(err))
	}
	if !fi.IsDir() {
		return invalidf("path %s is not a directory", p)
	}
	return nil
}
