// Package vmimage turns a backend.Spec into the block-device images a
// micro-VM attaches (QEMU microvm and Firecracker share it), and tells the
// guest agent which device holds what.
//
// A VM sees only block devices, so everything the program needs becomes an
// image file on the host:
//
//   - the runtime squashfs, as it is (read-only, first drive: /dev/vda);
//   - the code: squashfs as it is; zip or plain code is extracted once per
//     code hash (by codeprep, which refuses unsafe archives) and packed into
//     a squashfs kept in the cache, so later executions attach it directly;
//   - immutable volumes: squashfs as they are (zip converted like code);
//   - ephemeral volumes: a sparse ext4 file in the execution's StateDir,
//     gone with the execution;
//   - persistent volumes: an ext4 file that outlives executions, created
//     the first time it is needed and locked while the VM runs (volimage,
//     shared with the gVisor backend);
//   - the optional data archive, as one more read-only squashfs volume.
//
// Drive order decides guest device names (virtio-blk devices are named in
// the order the VMM announces them), so GuestDrives is the one place that
// assigns both the order and the names.
package vmimage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"sync"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/codeprep"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/volimage"
	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// File system types of the images, as the guest's mount(2) names them.
const (
	FSSquashfs = "squashfs"
	FSExt4     = "ext4"
)

// DefaultEphemeralMiB sizes an ephemeral volume that asks for no size.
const DefaultEphemeralMiB = 64

// Role tells what a drive carries.
type Role string

// Roles of the drives a VM gets, in the order they are attached.
const (
	RoleRuntime Role = "runtime"
	RoleCode    Role = "code"
	RoleVolume  Role = "volume"
	RoleData    Role = "data"
)

// Image is one host file to attach as a block device.
type Image struct {
	Path     string // host path
	FSType   string // FSSquashfs or FSExt4
	ReadOnly bool
	// Temporary images belong to one execution and are removed by
	// Prepared.Cleanup; the others are shared (cache) or persistent.
	Temporary bool
}

// VolumeImage is an image with the guest path where the agent mounts it
// (empty: attached but not mounted, as a message may ask).
type VolumeImage struct {
	Image
	Mount string
	Kind  message.VolumeKind
}

// Prepared is the set of images for one execution.
type Prepared struct {
	Runtime Image
	Code    *Image // nil when the program has no code file
	Volumes []VolumeImage
	Data    *VolumeImage // the data archive, copied writable to its mount by the agent

	// locks hold this execution's persistent images until Cleanup.
	locks []*volimage.Lock
}

// Cleanup removes the execution's temporary images and lets go of its
// persistent ones, which stay, like cache images. Call it once the VMM is
// gone. Safe to call more than once.
func (p *Prepared) Cleanup() error {
	if p == nil {
		return nil
	}
	var errs []error
	if p.Code != nil && p.Code.Temporary {
		if err := os.Remove(p.Code.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("vmimage: %w", err))
		}
	}
	for _, v := range p.Volumes {
		if v.Temporary {
			if err := os.Remove(v.Path); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("vmimage: %w", err))
			}
		}
	}
	for _, l := range p.locks {
		if err := l.Release(); err != nil {
			errs = append(errs, fmt.Errorf("vmimage: %w", err))
		}
	}
	p.locks = nil
	return errors.Join(errs...)
}

// Drive is one block device of a VM, in attachment order.
type Drive struct {
	ID       string // stable identifier: "rootfs", "code", "vol0", "data"
	Role     Role
	HostPath string
	ReadOnly bool
	// Root is set on the runtime drive, the VM's read-only root device.
	Root   bool
	Device string // guest device name, e.g. /dev/vdb
	FSType string
	Mount  string // guest mount point; guest.CodeDir for code
	// Temporary mirrors Image.Temporary: the image is this execution's own
	// (a backend may copy it instead of sharing it).
	Temporary bool
}

// GuestDrives returns the drives of p in attachment order — runtime
// (/dev/vda), code (/dev/vdb when present), volumes, then data — with the
// device names the guest will see, and fills cfg.CodeDevice and
// cfg.Volumes so that the agent mounts them. cfg may be nil.
func GuestDrives(p *Prepared, cfg *guest.Config) []Drive {
	drives := []Drive{{
		ID: "rootfs", Role: RoleRuntime, HostPath: p.Runtime.Path, ReadOnly: true,
		Root: true, FSType: p.Runtime.FSType, Mount: "/",
	}}
	if p.Code != nil {
		drives = append(drives, Drive{
			ID: "code", Role: RoleCode, HostPath: p.Code.Path, ReadOnly: true,
			FSType: p.Code.FSType, Mount: guest.CodeDir, Temporary: p.Code.Temporary,
		})
	}
	for n, v := range p.Volumes {
		drives = append(drives, Drive{
			ID: fmt.Sprintf("vol%d", n), Role: RoleVolume, HostPath: v.Path, ReadOnly: v.ReadOnly,
			FSType: v.FSType, Mount: v.Mount, Temporary: v.Temporary,
		})
	}
	if p.Data != nil {
		drives = append(drives, Drive{
			ID: "data", Role: RoleData, HostPath: p.Data.Path, ReadOnly: true,
			FSType: p.Data.FSType, Mount: p.Data.Mount,
		})
	}
	for i := range drives {
		drives[i].Device = DeviceName(i)
	}
	if cfg != nil {
		FillGuest(drives, cfg)
	}
	return drives
}

// FillGuest sets cfg.CodeDevice, cfg.Data and cfg.Volumes from drives (as
// GuestDrives returns them): the code drive, the data drive (which the
// agent copies, writable, to its mount), and every other drive that has
// a mount point except the runtime, which the agent mounts itself.
func FillGuest(drives []Drive, cfg *guest.Config) {
	cfg.CodeDevice = ""
	cfg.Volumes = nil
	cfg.Data = nil
	for _, d := range drives {
		switch {
		case d.Role == RoleCode:
			cfg.CodeDevice = d.Device
		case d.Role == RoleData:
			cfg.Data = &guest.DataCopy{Device: d.Device, Mount: d.Mount}
		case d.Role == RoleRuntime, d.Mount == "":
		default:
			cfg.Volumes = append(cfg.Volumes, guest.VolumeMount{
				Device: d.Device, Mount: d.Mount, FSType: d.FSType, ReadOnly: d.ReadOnly,
			})
		}
	}
}

// WithoutCode returns drives less the code drive: a spare's Config names
// no code device while its placeholder is still empty (a program without
// a code file took it). Device names stay those of attachment order.
func WithoutCode(drives []Drive) []Drive {
	out := make([]Drive, 0, len(drives))
	for _, d := range drives {
		if d.Role != RoleCode {
			out = append(out, d)
		}
	}
	return out
}

// DeviceName is the name Linux gives the n-th virtio-blk disk (0-based):
// vda … vdz, vdaa … vdzz, as the kernel's disk-name scheme counts.
func DeviceName(n int) string {
	name := ""
	for n >= 0 {
		name = string(rune('a'+n%26)) + name
		n = n/26 - 1
	}
	return "/dev/vd" + name
}

// Options configure a Preparer.
type Options struct {
	// CacheDir holds code (and zip volume) squashfs images, one per content
	// hash. Required.
	CacheDir string
	// PersistentDir holds persistent volume images that have no path of
	// their own (volimage.PersistentPath: unamed_volume_<i>, as aleph-vm).
	PersistentDir string
	// MksquashfsPath and MkfsExt4Path default to the names in PATH.
	MksquashfsPath string
	MkfsExt4Path   string
	CodeLimits     codeprep.Limits
	Logger         *slog.Logger
}

// Preparer creates images. It is safe for concurrent use.
type Preparer struct {
	opts Options
	log  *slog.Logger
}

// NewPreparer applies defaults; it checks nothing on disk, so that a
// dry-run plan works on hosts without the tools.
func NewPreparer(opts Options) *Preparer {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.MksquashfsPath == "" {
		opts.MksquashfsPath = "mksquashfs"
	}
	if opts.MkfsExt4Path == "" {
		opts.MkfsExt4Path = "mkfs.ext4"
	}
	return &Preparer{opts: opts, log: opts.Logger}
}

// Prepare creates (or finds in the cache) every image spec needs. On
// error, temporary images already made are removed.
func (p *Preparer) Prepare(ctx context.Context, spec backend.Spec) (*Prepared, error) {
	return p.prepare(ctx, spec, true)
}

// Plan returns the images Prepare would use, with the paths they would
// have, without creating anything (code without a hash in the spec is
// hashed, which only reads it). For `program inspect`.
func (p *Preparer) Plan(ctx context.Context, spec backend.Spec) (*Prepared, error) {
	return p.prepare(ctx, spec, false)
}

func (p *Preparer) prepare(ctx context.Context, spec backend.Spec, create bool) (_ *Prepared, err error) {
	if spec.RuntimePath == "" {
		return nil, errkind.New(errkind.InvalidInput, "vmimage: spec has no runtime")
	}
	if create {
		if _, err := os.Stat(spec.RuntimePath); err != nil {
			return nil, errkind.Wrap(errkind.ResourceMissing, fmt.Errorf("runtime: %w", err))
		}
	}
	out := &Prepared{Runtime: Image{Path: spec.RuntimePath, FSType: FSSquashfs, ReadOnly: true}}
	defer func() {
		if err != nil && create {
			_ = out.Cleanup()
		}
	}()

	switch {
	case spec.DeferCode:
		img, err := placeholder(spec, create)
		if err != nil {
			return nil, err
		}
		out.Code = &img
	case spec.CodePath != "":
		img, err := p.CodeImage(ctx, spec, create)
		if err != nil {
			return nil, err
		}
		out.Code = &img
	}

	for n, v := range spec.Volumes {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if v.Mount != "" && (!path.IsAbs(v.Mount) || path.Clean(v.Mount) == "/") {
			return nil, errkind.New(errkind.InvalidInput, "volume %d: mount %q must be an absolute path below /", n, v.Mount)
		}
		vi := VolumeImage{Mount: v.Mount, Kind: v.Kind}
		switch v.Kind {
		case message.VolumeImmutable:
			enc := v.Encoding
			if enc == "" {
				enc = message.EncodingSquashfs
			}
			img, err := p.squashfsOf(ctx, source{path: v.Path, hash: v.Hash, encoding: enc, what: "volume " + v.Mount}, create)
			if err != nil {
				return nil, err
			}
			vi.Image = img
		case message.VolumeEphemeral:
			if spec.StateDir == "" {
				return nil, errors.New("vmimage: spec has no StateDir for ephemeral volumes")
			}
			vi.Image = Image{
				Path:   filepath.Join(spec.StateDir, "volumes", fmt.Sprintf("ephemeral-%d.ext4", n)),
				FSType: FSExt4, Temporary: true,
			}
			if create {
				size := v.SizeMiB
				if size <= 0 {
					size = DefaultEphemeralMiB
				}
				if err := volimage.MakeExt4(ctx, p.opts.MkfsExt4Path, vi.Path, size, false); err != nil {
					return nil, fmt.Errorf("volume %s: %w", v.Mount, err)
				}
			}
		case message.VolumePersistent:
			img, err := p.persistent(ctx, spec, n, v, create, out)
			if err != nil {
				return nil, err
			}
			vi.Image = img
		default:
			return nil, errkind.New(errkind.Unsupported, "volume %s: unknown kind %q", v.Mount, v.Kind)
		}
		out.Volumes = append(out.Volumes, vi)
	}

	if spec.DataPath != "" {
		if spec.DataMount == "" {
			return nil, errkind.New(errkind.InvalidInput, "vmimage: data archive without a mount point")
		}
		if spec.DataEncoding == message.EncodingPlain {
			return nil, errkind.New(errkind.Unsupported, "vmimage: plain data archives are not supported (zip or squashfs)")
		}
		img, err := p.squashfsOf(ctx, source{path: spec.DataPath, hash: spec.DataHash, encoding: spec.DataEncoding, what: "data"}, create)
		if err != nil {
			return nil, err
		}
		out.Data = &VolumeImage{Image: img, Mount: spec.DataMount}
	}
	return out, nil
}

// PlaceholderName is the file, in a spare's StateDir, behind its code
// drive until LoadCode fills it.
const PlaceholderName = "code-placeholder.img"

// placeholder is the code drive of a spare (Spec.DeferCode): an empty file
// of its own, so the guest sees a code device of zero size from boot on
// and the VMM swaps or fills it once a program is assigned (virtio-mmio
// devices cannot be hot-plugged, and the kernel probes them only at boot).
func placeholder(spec backend.Spec, create bool) (Image, error) {
	if spec.StateDir == "" {
		return Image{}, errors.New("vmimage: spec has no StateDir for the code placeholder")
	}
	img := Image{Path: filepath.Join(spec.StateDir, PlaceholderName), FSType: FSSquashfs, ReadOnly: true, Temporary: true}
	if create {
		f, err := os.OpenFile(img.Path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return Image{}, fmt.Errorf("vmimage: code placeholder: %w", err)
		}
		if err := f.Close(); err != nil {
			return Image{}, fmt.Errorf("vmimage: code placeholder: %w", err)
		}
	}
	return img, nil
}

// CodeImage returns the read-only squashfs image of spec's code (the file
// itself, or its cached conversion; with create false only its path).
// Errors about the code itself have the kinds InvalidInput, TooLarge or
// ResourceMissing.
func (p *Preparer) CodeImage(ctx context.Context, spec backend.Spec, create bool) (Image, error) {
	return p.squashfsOf(ctx, source{
		path: spec.CodePath, hash: spec.CodeHash, encoding: spec.CodeEncoding,
		entrypoint: spec.Entrypoint, what: "code",
	}, create)
}

type source struct {
	path, hash string
	encoding   message.Encoding
	entrypoint string
	what       string // for messages
}

var (
	hashPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$`)
	// keyLocks serialises conversions of one cache entry within this
	// process so that concurrent cold starts convert once.
	keyLocks sync.Map
)

// squashfsOf returns a read-only squashfs image of src: the file itself
// when it already is one, else a cached conversion.
func (p *Preparer) squashfsOf(ctx context.Context, src source, create bool) (Image, error) {
	if src.path == "" {
		return Image{}, errkind.New(errkind.ResourceMissing, "%s: no file", src.what)
	}
	if src.encoding == message.EncodingSquashfs {
		if create {
			if _, err := os.Stat(src.path); err != nil {
				return Image{}, errkind.Wrap(errkind.ResourceMissing, fmt.Errorf("%s: %w", src.what, err))
			}
		}
		return Image{Path: src.path, FSType: FSSquashfs, ReadOnly: true}, nil
	}
	key, err := cacheKey(src)
	if err != nil {
		return Image{}, err
	}
	if p.opts.CacheDir == "" {
		return Image{}, errors.New("vmimage: no CacheDir to convert " + src.what + " into")
	}
	dst := filepath.Join(p.opts.CacheDir, key+".squashfs")
	img := Image{Path: dst, FSType: FSSquashfs, ReadOnly: true}
	if !create {
		return img, nil
	}
	if err := p.convert(ctx, src, dst); err != nil {
		return Image{}, fmt.Errorf("%s: %w", src.what, err)
	}
	return img, nil
}

// cacheKey names a conversion: content hash, encoding and, for plain code,
// the file name the entrypoint implies (the same source under another
// entrypoint is another image).
func cacheKey(src source) (string, error) {
	hash := src.hash
	if hash == "" {
		h, err := hashFile(src.path)
		if err != nil {
			return "", fmt.Errorf("%s: %w", src.what, err)
		}
		hash = h
	}
	if !hashPattern.MatchString(hash) {
		return "", errkind.New(errkind.InvalidInput, "%s: hash %q is not usable as a file name", src.what, hash)
	}
	switch src.encoding {
	case message.EncodingZip:
		return hash + ".zip", nil
	case message.EncodingPlain, "":
		name, err := codeprep.PlainFileName(src.entrypoint)
		if err != nil {
			return "", errkind.Wrap(errkind.InvalidInput, err)
		}
		sum := sha256.Sum256([]byte(name))
		return hash + ".plain-" + hex.EncodeToString(sum[:6]), nil
	default:
		return "", errkind.New(errkind.InvalidInput, "%s: unknown encoding %q", src.what, src.encoding)
	}
}

func hashFile(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", errkind.Wrap(errkind.ResourceMissing, err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("hash %s: %w", p, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// convert extracts src into a temporary tree and packs it into dst. The
// image is published by rename only once complete, so a crash never
// leaves a truncated image that a later execution would attach.
func (p *Preparer) convert(ctx context.Context, src source, dst string) error {
	mu, _ := keyLocks.LoadOrStore(dst, &sync.Mutex{})
	mu.(*sync.Mutex).Lock()
	defer mu.(*sync.Mutex).Unlock()

	if fi, err := os.Stat(dst); err == nil && fi.Mode().IsRegular() {
		return nil
	}
	if err := os.MkdirAll(p.opts.CacheDir, 0o755); err != nil {
		return fmt.Errorf("image cache: %w", err)
	}
	tmp, err := os.MkdirTemp(p.opts.CacheDir, ".tmp-"+filepath.Base(dst)+"-")
	if err != nil {
		return fmt.Errorf("image cache: %w", err)
	}
	defer os.RemoveAll(tmp)

	tree := filepath.Join(tmp, "tree")
	if err := codeprep.Extract(ctx, tree, codeprep.Source{
		Path: src.path, Hash: src.hash, Encoding: src.encoding, Entrypoint: src.entrypoint,
	}, p.opts.CodeLimits); err != nil {
		return err
	}
	img := filepath.Join(tmp, "image.squashfs")
	// -all-root: the guest must not see host uids; fixed times keep the
	// image identical for identical code.
	cmd := exec.CommandContext(ctx, p.opts.MksquashfsPath, tree, img,
		"-noappend", "-quiet", "-no-progress", "-all-root", "-no-xattrs",
		"-comp", "gzip", "-mkfs-time", "0", "-all-time", "0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("mksquashfs: %w: %s", err, strings.TrimSpace(string(out)))
	}
	if err := os.Chmod(img, 0o644); err != nil {
		return err
	}
	if err := os.Rename(img, dst); err != nil {
		return fmt.Errorf("image cache: publish %s: %w", filepath.Base(dst), err)
	}
	p.log.Debug("converted to squashfs", "what", src.what, "image", dst)
	return nil
}

// persistent returns the ext4 image of a persistent volume (see
// volimage), creating it the first time, and takes its lock for this
// execution. A Path names the image (the pool gives
// volimage.PersistentPath); an empty Path puts it under PersistentDir.
func (p *Preparer) persistent(ctx context.Context, spec backend.Spec, n int, v backend.Volume, create bool, out *Prepared) (Image, error) {
	img := Image{Path: v.Path, FSType: FSExt4, ReadOnly: v.ReadOnly}
	if img.Path == "" {
		path, err := volimage.PersistentPath(p.opts.PersistentDir, spec.ProgramHash, n, "", v.Mount)
		if err != nil {
			return Image{}, err
		}
		img.Path = path
		v.LegacyPaths = volimage.LegacyPaths(p.opts.PersistentDir, spec.ProgramHash, n, "", v.Mount)
	}
	if !create {
		return img, nil
	}
	origin := volimage.Origin{OldPaths: v.LegacyPaths, Parent: v.ParentPath}
	if err := volimage.EnsurePersistent(ctx, p.opts.MkfsExt4Path, img.Path, v.Mount, v.SizeMiB, v.ReadOnly, origin); err != nil {
		return Image{}, err
	}
	lock, err := volimage.Acquire(ctx, img.Path)
	if err != nil {
		return Image{}, fmt.Errorf("volume %s: %w", v.Mount, err)
	}
	out.locks = append(out.locks, lock)
	return img, nil
}
