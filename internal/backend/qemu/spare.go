package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
	"github.com/aleph-vm-go/vm-supervisor/internal/backend/vmimage"
)

// Spares (Spec.DeferCode) boot with every drive but the code's content:
// vmimage gives them an empty placeholder file as the code drive (vdb),
// and the kernel command line tells the agent to start the launcher's
// preload at once. Under TCG most of a cold start is Python importing
// uvicorn and FastAPI, which a spare has done before its program is known.
//
// virtio-mmio devices cannot be hot-plugged (the guest learns them only
// at boot), so the code arrives in the drive that is already there:
// LoadCode copies the program's squashfs image into the placeholder and
// tells QEMU its new size (QMP block_resize), which raises a virtio
// configuration change; the guest kernel updates the disk's capacity and
// the agent, told by the Config to mount /dev/vdb, waits for a non-zero
// size before mounting it. The code thus still comes as a read-only
// squashfs drive, and the guest protocol is unchanged.

// MakesSpares implements backend.SpareMaker.
func (b *Backend) MakesSpares() {}

var (
	_ backend.SpareMaker = (*Backend)(nil)
	_ backend.CodeLoader = (*instance)(nil)
)

// codeDriveID is the QEMU block backend of the code drive (vmimage's drive
// id, used as -drive id=).
const codeDriveID = "code"

// sectorSize is the unit of virtio-blk capacities: an image is padded to
// it, or its tail would be invisible to the guest.
const sectorSize = 512

// preloadArg tells the agent to preload the interpreter (a spare).
const preloadArg = "aleph.preload=1"

// LoadCode implements backend.CodeLoader. Errors about the code itself
// (errkind.InvalidInput, TooLarge, ResourceMissing from the conversion)
// come before anything is written: the spare can still take other code.
// Until QEMU is told the new size the guest sees an empty disk, so a
// failed copy leaves the spare as it was too.
func (i *instance) LoadCode(ctx context.Context, spec backend.Spec) error {
	if !i.spec.DeferCode {
		return errors.New("qemu: LoadCode on a VM that already has its code")
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.codeLoaded {
		return errors.New("qemu: the spare VM already has its code")
	}
	if spec.CodePath == "" {
		return nil // ConfigureGuest then names no code drive
	}
	img, err := i.b.images.CodeImage(ctx, spec, true)
	if err != nil {
		return err
	}
	dst := i.prepared.Code.Path
	size, err := fillPlaceholder(dst, img.Path)
	if err == nil {
		_, err = i.qmp.call(ctx, "block_resize", map[string]any{"device": codeDriveID, "size": size})
	}
	if err != nil {
		// Empty again: whatever QEMU was told, the guest reads nothing.
		if terr := os.Truncate(dst, 0); terr != nil {
			i.log.Warn("emptying the code placeholder", "err", terr)
		}
		return fmt.Errorf("qemu: loading code into the spare VM: %w", err)
	}
	i.codeLoaded = true
	i.log.Debug("code drive filled", "image", img.Path, "bytes", size)
	return nil
}

// fillPlaceholder copies the image at src over the placeholder dst,
// padded to whole sectors, and returns its new size.
func fillPlaceholder(dst, src string) (int64, error) {
	in, err := os.Open(src)
	if err != nil {
		return 0, err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return 0, err
	}
	n, err := io.Copy(out, in)
	if err == nil {
		n = (n + sectorSize - 1) / sectorSize * sectorSize
		err = out.Truncate(n)
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	return n, err
}

// configureCode drops the code drive from a spare's Config while it has
// no code (a program without a code file took it).
func (i *instance) configureCode(drives []vmimage.Drive) []vmimage.Drive {
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.spec.DeferCode && !i.codeLoaded {
		return vmimage.WithoutCode(drives)
	}
	return drives
}
