// Package guest is the protocol between the supervisor (host) and the
// vm-agent (guest), shared by both binaries.
//
// One byte stream links them (sandbox stdio, vsock or virtio-serial). The
// host runs a yamux client over it, the agent a yamux server. Every yamux
// stream starts with a single byte naming its purpose:
//
//	StreamControl ('C')  host→guest, opened first: the host writes one JSON
//	                     Config line; the agent answers one JSON Status line
//	                     once the program is ready to serve (or failed).
//	                     Later the host writes a JSON Command line
//	                     {"op":"stop"}; the agent runs lifespan shutdown,
//	                     answers a Status line and exits.
//	StreamHTTP    ('H')  host→guest: the rest of the stream is one plain
//	                     HTTP/1.1 connection to the program (keep-alive ok).
//	StreamGuestAPI('A')  guest→host: the rest of the stream is one HTTP/1.1
//	                     connection to the host's guest API (internal/guestapi).
//	StreamWarm    ('W')  guest→host, at most once, empty: a pre-warmed
//	                     agent's interpreter has finished its imports (or
//	                     could not start), so the sandbox no longer keeps a
//	                     core busy. The host bounds how many spares warm up
//	                     at once by it.
//
// Control stream lifecycle, in order:
//
//	host  → Config line
//	agent → Status{Ready} or Status{Error} (then the agent exits)
//	agent → Status{Exited, Error} at any later time if the program ends by
//	        itself; the agent then closes the session and exits, so the host
//	        learns why before Done fires
//	host  → Command{Op: OpStop}
//	agent → Status{Stopped} once nothing of the program runs any more
//
// A channel that closes (host gone) or a SIGTERM to the agent stops the
// program the same way, without an answer. The program's stdout and stderr
// go, line by line, to the agent's stderr (the sandbox console), which the
// backend hands to Spec.ProgramOutput.
//
// The host side is Client (client.go); the agent is cmd/vm-agent. Both use
// MuxConfig, OpenStream and Splice (mux.go).
//
// Closing a yamux stream only half-closes it (sends FIN): each side keeps
// reading until the other side closes too, which is what lets an HTTP
// request body end while the response still streams.
//
// Changes to the first sketch: Config.StartTimeoutMS (the agent's own bound
// on program start, so a slow start is reported with the program's output
// rather than as a bare host timeout), Status.Exited, OpStop and
// StreamWarm.
package guest

// Stream type bytes, written first on every yamux stream.
const (
	StreamControl  byte = 'C'
	StreamHTTP     byte = 'H'
	StreamGuestAPI byte = 'A'
	StreamWarm     byte = 'W'
)

// Paths inside the sandbox, common to all backends.
const (
	CodeDir = "/opt/code" // program code (read-only, extracted)
	// DataSourceDir is where the sandbox sees the data archive's tree,
	// read-only and shared: gVisor binds the extracted tree there, the
	// agent of a VM mounts DataCopy.Device there. The agent copies it to
	// DataCopy.Mount, in the sandbox's own writable root, before the
	// program starts (aleph-vm unzips the data into the guest's root).
	DataSourceDir  = "/opt/.aleph-data"
	GuestAPISocket = "/run/aleph/api.sock"  // ALEPH_API_UNIX_SOCKET
	ProgramSocket  = "/run/aleph/asgi.sock" // uvicorn's unix socket
	ExecutablePort = 8080
)

// CompatGuestAPISocket also serves the guest API: the path aleph-vm's
// runtime gives programs (ALEPH_API_UNIX_SOCKET) and its examples
// hard-code.
const CompatGuestAPISocket = "/tmp/socat-socket"

// Interface kinds of programs.
const (
	InterfaceASGI       = "asgi"
	InterfaceExecutable = "executable"
)

// Config is sent by the host on the control stream to start the program.
type Config struct {
	ProgramHash string `json:"program_hash"`
	// Interface is "asgi" (entrypoint module:attr) or "executable".
	Interface  string `json:"interface"`
	Entrypoint string `json:"entrypoint"`
	// Encoding of the code as published (plain|zip|squashfs). Backends
	// present code already extracted at CodeDir, except in VMs where the
	// agent mounts/extracts CodeDevice.
	Encoding   string            `json:"encoding"`
	CodeDevice string            `json:"code_device,omitempty"` // VMs: block device holding the code
	Variables  map[string]string `json:"variables,omitempty"`
	// Environment variables the agent adds (ALEPH_API_HOST etc.).
	AlephEnv map[string]string `json:"aleph_env,omitempty"`
	// Volumes to mount inside VMs (ignored where the backend mounted them).
	Volumes []VolumeMount `json:"volumes,omitempty"`
	// Data, when the program has a data archive: copied writable from
	// DataSourceDir to its Mount before the program starts.
	Data *DataCopy `json:"data,omitempty"`
	// Network configuration (VMs); empty means no network.
	IPv4     string   `json:"ipv4,omitempty"`    // address/prefix
	Gateway  string   `json:"gateway,omitempty"` // IPv4 gateway
	DNS      []string `json:"dns,omitempty"`
	Hostname string   `json:"hostname,omitempty"`
	// StartTimeoutMS bounds how long the agent waits for the program to
	// listen before answering Status{Error}; 0 means DefaultStartTimeoutMS.
	StartTimeoutMS int64 `json:"start_timeout_ms,omitempty"`
}

// DefaultStartTimeoutMS is generous because Python imports under gVisor's
// ptrace platform or QEMU TCG take seconds.
const DefaultStartTimeoutMS = 60_000

// VolumeMount describes a block device to mount inside a VM.
type VolumeMount struct {
	Device   string `json:"device"`
	Mount    string `json:"mount"`
	FSType   string `json:"fstype"`
	ReadOnly bool   `json:"read_only"`
}

// DataCopy is where the agent makes the data archive's tree writable.
type DataCopy struct {
	// Device (VMs) holds the tree (squashfs); the agent mounts it
	// read-only at DataSourceDir. Empty where the backend put the tree
	// there.
	Device string `json:"device,omitempty"`
	// Mount is the data's place in the program's file system (data.mount,
	// /data by default).
	Mount string `json:"mount"`
}

// Status is the agent's answer on the control stream.
type Status struct {
	Ready bool   `json:"ready,omitempty"`
	Error string `json:"error,omitempty"`
	// Stopped is set in the answer to a stop command.
	Stopped bool `json:"stopped,omitempty"`
	// Exited is sent unasked when the program ended by itself after it was
	// ready; Error then holds the exit status and its last output lines.
	Exited bool `json:"exited,omitempty"`
	// Traceback, with Error, is the program's own account of why it could
	// not start (a Python traceback: its import raised, its lifespan
	// startup failed). The host answers it to the client, as aleph-vm does.
	Traceback string `json:"traceback,omitempty"`
}

// Command is a later instruction on the control stream.
type Command struct {
	Op string `json:"op"` // OpStop
}

// OpStop asks the agent to stop the program (ASGI lifespan shutdown runs)
// and exit; the agent answers Status{Stopped: true}.
const OpStop = "stop"

// HoldReadyLine is what an agent started with --hold writes raw on its
// stdio channel once its interpreter is warm, before any session: the host
// may checkpoint the sandbox there. One newline from the host (the first
// one, or a restoring host's) releases it into the session.
const HoldReadyLine = "held\n"
