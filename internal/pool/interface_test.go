package pool

import (
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/guest"
	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// code.interface decides over the entrypoint's look, as in aleph-vm's
// Interface.from_entrypoint; without it a colon means ASGI.
func TestProgramInterface(t *testing.T) {
	for _, c := range []struct {
		iface, entry, want string
	}{
		{"", "main:app", guest.InterfaceASGI},
		{"", "serve", guest.InterfaceExecutable},
		{"asgi", "app", guest.InterfaceASGI},
		{"binary", "main:app", guest.InterfaceExecutable},
		{"binary", "serve", guest.InterfaceExecutable},
	} {
		got := programInterface(message.CodeContent{Interface: c.iface, Entrypoint: c.entry})
		if got != c.want {
			t.Errorf("interface %q entrypoint %q: %s, want %s", c.iface, c.entry, got, c.want)
		}
	}
}
