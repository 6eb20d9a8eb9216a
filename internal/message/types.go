// Package message models Aleph messages (PROGRAM, STORE, INSTANCE, FORGET)
// and validates PROGRAM content the way the reference schema does: unknown
// content fields are rejected, every error names the offending field.
package message

import "encoding/json"

// Type is the message type as served by the Aleph API.
type Type string

// Message types of the Aleph network.
const (
	TypeProgram   Type = "PROGRAM"
	TypeInstance  Type = "INSTANCE"
	TypeStore     Type = "STORE"
	TypeForget    Type = "FORGET"
	TypePost      Type = "POST"
	TypeAggregate Type = "AGGREGATE"
)

// Encoding of code or data archives.
type Encoding string

// Encodings the reference schema allows.
const (
	EncodingPlain    Encoding = "plain"
	EncodingZip      Encoding = "zip"
	EncodingSquashfs Encoding = "squashfs"
)

// Message is the envelope common to every Aleph message. Content keeps its
// raw JSON so it can be decoded strictly according to Type.
type Message struct {
	ItemHash    string          `json:"item_hash,omitempty"`
	Type        Type            `json:"type"`
	Chain       string          `json:"chain,omitempty"`
	Sender      string          `json:"sender,omitempty"`
	Channel     string          `json:"channel,omitempty"`
	Signature   string          `json:"signature,omitempty"`
	ItemType    string          `json:"item_type,omitempty"` // inline | storage | ipfs
	HashType    string          `json:"hash_type,omitempty"` // only sha256 exists
	ItemContent string          `json:"item_content,omitempty"`
	Time        float64         `json:"time,omitempty"`
	Size        int64           `json:"size,omitempty"`
	Confirmed   bool            `json:"confirmed,omitempty"`
	Content     json.RawMessage `json:"content"`
}

// CodeContent is the `code` section of a program.
type CodeContent struct {
	Encoding   Encoding `json:"encoding"`
	Entrypoint string   `json:"entrypoint"`
	Ref        string   `json:"ref"`
	UseLatest  bool     `json:"use_latest"`
	Args       []string `json:"args,omitempty"`
	Interface  string   `json:"interface,omitempty"` // asgi | binary (newer schema)
}

// RuntimeContent is the `runtime` section: a root filesystem image.
type RuntimeContent struct {
	Ref       string `json:"ref"`
	UseLatest bool   `json:"use_latest"`
	Comment   string `json:"comment"`
}

// DataContent is the optional `data` section mounted into the guest.
type DataContent struct {
	Encoding  Encoding `json:"encoding"`
	Mount     string   `json:"mount"`
	Ref       string   `json:"ref,omitempty"`
	UseLatest bool     `json:"use_latest"`
}

// ExportContent is the optional `export` section.
type ExportContent struct {
	Encoding Encoding `json:"encoding"`
	Mount    string   `json:"mount"`
}

// Filter is one subscription filter of `on.message`; free-form.
type Filter = map[string]any

// Triggers is the `on` section.
type Triggers struct {
	HTTP       bool     `json:"http"`
	Persistent *bool    `json:"persistent,omitempty"`
	Message    []Filter `json:"message,omitempty"`
}

// Environment is the `environment` section.
type Environment struct {
	Reproducible bool   `json:"reproducible"`
	Internet     bool   `json:"internet"`
	AlephAPI     bool   `json:"aleph_api"`
	SharedCache  bool   `json:"shared_cache"`
	Hypervisor   string `json:"hypervisor,omitempty"`
}

// Resources is the `resources` section; zero values mean "default".
type Resources struct {
	VCPUs          int             `json:"vcpus"`
	Memory         int             `json:"memory"`  // MiB
	Seconds        int             `json:"seconds"` // per-request timeout
	PublishedPorts json.RawMessage `json:"published_ports,omitempty"`
}

// Default resource values of the reference schema.
const (
	DefaultVCPUs   = 1
	DefaultMemory  = 128
	DefaultSeconds = 1
)

// Upper bounds of the reference schema (aleph-message). They are what a
// message may ask for, not what this node grants: the pool checks capacity.
const (
	MaxVCPUs               = 256
	MaxMemoryMiB           = 1024 * 1024          // 1 TiB
	MaxSeconds             = 10 * 365 * 24 * 3600 // ~10 years
	MaxEphemeralVolumeMiB  = 1000                 // 1 GB
	MaxPersistentVolumeMiB = 1953125              // 2048 GB in MiB, rounded up
)

// VolumeKind tells immutable, ephemeral and persistent volumes apart.
type VolumeKind string

// Volume kinds, as Volume.Kind tells them.
const (
	VolumeImmutable  VolumeKind = "immutable"
	VolumeEphemeral  VolumeKind = "ephemeral"
	VolumePersistent VolumeKind = "persistent"
)

// Volume is one entry of `volumes`. The JSON is a union; Kind() tells
// which variant it is, based on which fields are present.
type Volume struct {
	Comment     string        `json:"comment,omitempty"`
	Mount       string        `json:"mount,omitempty"`
	Ref         string        `json:"ref,omitempty"`
	UseLatest   bool          `json:"use_latest,omitempty"`
	Ephemeral   bool          `json:"ephemeral,omitempty"`
	Name        string        `json:"name,omitempty"`
	Persistence string        `json:"persistence,omitempty"` // host | store
	SizeMiB     int           `json:"size_mib,omitempty"`
	Parent      *ParentVolume `json:"parent,omitempty"`
}

// ParentVolume is the image a persistent volume starts as a copy of.
type ParentVolume struct {
	Ref       string `json:"ref"`
	UseLatest bool   `json:"use_latest"`
}

// ProgramContent is the content of a PROGRAM message (type vm-function).
type ProgramContent struct {
	Type           string            `json:"type"`
	Address        string            `json:"address"`
	Time           float64           `json:"time"`
	AllowAmend     bool              `json:"allow_amend"`
	Code           CodeContent       `json:"code"`
	Runtime        RuntimeContent    `json:"runtime"`
	Data           *DataContent      `json:"data,omitempty"`
	Export         *ExportContent    `json:"export,omitempty"`
	On             Triggers          `json:"on"`
	Environment    Environment       `json:"environment"`
	Resources      Resources         `json:"resources"`
	Variables      map[string]string `json:"variables,omitempty"`
	Volumes        []Volume          `json:"volumes,omitempty"`
	Replaces       string            `json:"replaces,omitempty"`
	Metadata       map[string]any    `json:"metadata,omitempty"`
	Requirements   json.RawMessage   `json:"requirements,omitempty"`
	Payment        json.RawMessage   `json:"payment,omitempty"`
	AuthorizedKeys []string          `json:"authorized_keys,omitempty"`
}

// StoreContent is the content of a STORE message: a pointer to a file.
type StoreContent struct {
	Address  string         `json:"address"`
	Time     float64        `json:"time"`
	ItemType string         `json:"item_type"` // storage | ipfs
	ItemHash string         `json:"item_hash"`
	Size     int64          `json:"size,omitempty"`
	Ref      string         `json:"ref,omitempty"`
	Metadata map[string]any `json:"metadata,omitempty"`
}
