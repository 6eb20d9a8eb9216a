// Package examples embeds the example programs so that the supervisor's
// self-test (/status/check/fastapi) works without the source tree.
package examples

import (
	"embed"

	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// FastAPI is examples/example_fastapi, the self-test program.
//
//go:embed example_fastapi/*.py
var FastAPI embed.FS

// FastAPIEntrypoint is the ASGI entrypoint of FastAPI.
const FastAPIEntrypoint = "main:app"

// FastAPIStateVolume is the persistent volume the program keeps its
// /state/increment counter in; the counter survives stops and supervisor
// restarts because the volume does.
var FastAPIStateVolume = message.Volume{
	Comment:     "State of the diagnostic program (/state/increment)",
	Mount:       "/var/lib/example",
	Name:        "example-state",
	Persistence: "host",
	SizeMiB:     16,
}
