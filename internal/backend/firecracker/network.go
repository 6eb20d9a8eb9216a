package firecracker

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/aleph-vm-go/vm-supervisor/internal/backend"
)

var _ backend.Networker = (*Backend)(nil)

// NetworkLink implements backend.Networker: a Firecracker VM's card is
// backed by a tap device on the host (Spec.Network.TapName), which the
// pool creates in the host network namespace before Start.
func (b *Backend) NetworkLink() backend.LinkKind { return backend.LinkTap }

// TapOwner is the uid and gid Firecracker runs as: the jail user under the
// jailer, else the supervisor's own. The tap of an execution must be
// created with this owner and group (`ip tuntap add NAME mode tap user UID
// group GID`), or with none: Firecracker attaches to it after dropping
// privileges, without CAP_NET_ADMIN. Note that vishvananda/netlink's
// LinkAdd always sets Tuntap.Owner and Tuntap.Group, so left at zero they
// make the tap root's and the jailed Firecracker is refused (EPERM).
func (b *Backend) TapOwner() (uid, gid int) {
	if b.opts.UseJailer {
		return b.opts.JailerUID, b.opts.JailerGID
	}
	return os.Geteuid(), os.Getegid()
}

// sysClassNet is where the kernel describes network devices; a test seam.
var sysClassNet = "/sys/class/net"

// tun_flags bits (linux/if_tun.h).
const (
	iffTap        = 0x0002
	iffMultiQueue = 0x0100
)

// checkTap verifies, before Firecracker starts, that it will be able to
// attach to the tap: it exists, is a single-queue tap (Firecracker v1.0.0
// asks TUNSETIFF for IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, which an existing tun
// or multi-queue device refuses with EINVAL), and a process running as
// uid:gid without CAP_NET_ADMIN may attach to it (the kernel's
// tun_not_capable: a set owner or group must be the caller's). Otherwise
// Firecracker would only fail once started, with the reason in its log.
// root is the supervisor running Firecracker unjailed as root, which has
// CAP_NET_ADMIN: ownership does not matter then.
func checkTap(name string, uid, gid int, root bool) error {
	dir := filepath.Join(sysClassNet, name)
	if _, err := os.Stat(dir); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("tap device %s does not exist in the host network namespace", name)
		}
		return fmt.Errorf("tap device %s: %w", name, err)
	}
	flags, err := readSysInt(dir, "tun_flags")
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("network device %s is not a tun/tap device", name)
	}
	if err != nil {
		return err
	}
	switch {
	case flags&iffTap == 0:
		return fmt.Errorf("network device %s is a tun device, Firecracker needs a tap", name)
	case flags&iffMultiQueue != 0:
		return fmt.Errorf("tap device %s is multi-queue, Firecracker v1.0.0 attaches single-queue taps only", name)
	}
	if root {
		return nil
	}
	for _, id := range []struct {
		file string
		want int
	}{{"owner", uid}, {"group", gid}} {
		got, err := readSysInt(dir, id.file)
		if err != nil {
			return err
		}
		if got != -1 && got != int64(id.want) {
			return fmt.Errorf("tap device %s has %s %d but Firecracker runs as %d:%d without CAP_NET_ADMIN and could not attach to it (create the tap with user %d group %d)",
				name, id.file, got, uid, gid, uid, gid)
		}
	}
	return nil
}

// readSysInt reads a sysfs attribute holding one integer, in decimal or
// 0x-prefixed hexadecimal.
func readSysInt(dir, file string) (int64, error) {
	b, err := os.ReadFile(filepath.Join(dir, file))
	if err != nil {
		return 0, err
	}
	s := strings.TrimSpace(string(b))
	v, err := strconv.ParseInt(s, 0, 64)
	if err != nil {
		return 0, fmt.Errorf("%s/%s: unexpected content %q", dir, file, s)
	}
	return v, nil
}

// checkNetwork is the start step that checks the execution's tap.
func (i *instance) checkNetwork(context.Context) (backend.Undo, error) {
	if i.spec.Network == nil {
		return nil, nil
	}
	uid, gid := i.b.TapOwner()
	return nil, checkTap(i.spec.Network.TapName, uid, gid, !i.b.opts.UseJailer && uid == 0)
}
