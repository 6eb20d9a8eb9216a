package firecracker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/vmimage"
	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
)

// Spares (Spec.DeferCode) boot as QEMU's do (see internal/backend/qemu):
// vmimage gives them an empty placeholder as the code drive and the boot
// arguments carry PreloadArg. The code arrives by swapping the drive's
// backing file after boot (PATCH /drives/code, which Firecracker v1.0.0
// documents as post-boot only): Firecracker opens the new file and
// raises a virtio configuration change, so the guest sees the disk's new
// capacity, and the agent mounts it once it is non-empty.

// MakesSpares implements backend.SpareMaker.
func (b *Backend) MakesSpares() {}

var (
	_ backend.SpareMaker = (*Backend)(nil)
	_ backend.CodeLoader = (*instance)(nil)
)

// JailCodeImage is where a spare's code image is placed in the jail when
// it is loaded (the placeholder stays at JailDrivesDir/code).
const JailCodeImage = JailDrivesDir + "/code-loaded"

// CodeSwap is how a spare of plan takes the code image at image (a host
// path): the file to place into the jail first (nil when not jailed), and
// the body of PATCH /drives/code.
func CodeSwap(plan *Plan, image string) (*JailFile, PartialDrive) {
	d := PartialDrive{DriveID: "code", PathOnHost: image}
	if !plan.Jailed {
		return nil, d
	}
	d.PathOnHost = JailCodeImage
	return &JailFile{Source: image, Dest: JailCodeImage}, d
}

// spareState is what LoadCode changed on a spare.
type spareState struct {
	mu     sync.Mutex
	loaded bool
}

// LoadCode implements backend.CodeLoader. Errors about the code itself
// come from the conversion, before anything reaches the VM.
func (i *instance) LoadCode(ctx context.Context, spec backend.Spec) error {
	if !i.spec.DeferCode {
		return errors.New("firecracker: LoadCode on a VM that already has its code")
	}
	i.spare.mu.Lock()
	defer i.spare.mu.Unlock()
	if i.spare.loaded {
		return errors.New("firecracker: the spare VM already has its code")
	}
	if spec.CodePath == "" {
		return nil
	}
	img, err := i.b.opts.preparer().CodeImage(ctx, spec, true)
	if err != nil {
		return err
	}
	file, patch := CodeSwap(i.p, img.Path)
	if file != nil {
		if _, err := placeFile(i.p.ChrootDir, *file, i.b.opts.JailerUID, i.b.opts.JailerGID); err != nil {
			return fmt.Errorf("firecracker: placing the code into the jail: %w", err)
		}
	}
	if err := PatchDrive(ctx, i.p.APISocket, patch); err != nil {
		if file != nil { // so that other code can be placed later
			if rerr := os.Remove(filepath.Join(i.p.ChrootDir, file.Dest)); rerr != nil {
				i.log.Warn("removing the code image from the jail", "err", rerr)
			}
		}
		return fmt.Errorf("firecracker: loading code into the spare VM: %w", err)
	}
	i.spare.loaded = true
	return nil
}

// ConfigureGuest implements backend.GuestConfigurer: the drives' devices,
// less a spare's code drive while it is still empty.
func (i *instance) ConfigureGuest(cfg *guest.Config) {
	i.spare.mu.Lock()
	drives := i.drives
	if i.spec.DeferCode && !i.spare.loaded {
		drives = vmimage.WithoutCode(drives)
	}
	i.spare.mu.Unlock()
	vmimage.FillGuest(drives, cfg)
}
