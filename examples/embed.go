// Package examples embeds the example programs so that the supervisor's
// self-test (/status/check/fastapi) works without the source tree.
package examples

import "embed"

// FastAPI is examples/example_fastapi, the self-test program.
//
//go:embed example_fastapi/*.py
var FastAPI embed.FS

// FastAPIEntrypoint is the ASGI entrypoint of FastAPI.
const FastAPIEntrypoint = "main:app"
