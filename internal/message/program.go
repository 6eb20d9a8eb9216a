package message

import (
	"encoding/json"
	"fmt"
	"maps"
	"path"
	"reflect"
	"regexp"
	"slices"
	"strings"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// ProgramType is the only `content.type` a PROGRAM message may carry.
const ProgramType = "vm-function"

// Program decodes, completes with schema defaults and validates the content
// of a PROGRAM message. Other message kinds are refused with an Unsupported
// error: /vm serves programs only. Problems with the content are
// InvalidInput errors naming the field, e.g. "content.code.entrypoint".
func (m *Message) Program() (*ProgramContent, error) {
	if m.Type != TypeProgram {
		return nil, errkind.New(errkind.Unsupported,
			"message is %s %s, not a PROGRAM: /vm serves programs only", article(string(m.Type)), quoteIfOdd(string(m.Type)))
	}
	return DecodeProgramContent(m.Content)
}

// DecodeProgramContent is Program for content without its envelope.
//
// Decoding is strict: a key the schema does not declare, at any depth of a
// known object, is an error. Defaults are applied to absent fields before
// validation, the way the reference schema fills them, so an explicit 0
// for resources.memory is still rejected while a missing one becomes 128.
func DecodeProgramContent(raw []byte) (*ProgramContent, error) {
	const root = "content"
	if isNull(raw) {
		return nil, invalid([]error{fieldErr(root, "missing")})
	}
	var errs []error
	checkKnown(raw, reflect.TypeFor[ProgramContent](), root, &errs)
	if len(errs) > 0 {
		return nil, invalid(errs)
	}
	p := &ProgramContent{
		Runtime:   RuntimeContent{UseLatest: true},
		Resources: Resources{VCPUs: DefaultVCPUs, Memory: DefaultMemory, Seconds: DefaultSeconds},
	}
	if err := json.Unmarshal(raw, p); err != nil {
		return nil, invalid([]error{jsonErr(root, err)})
	}
	if err := volumeDefaults(raw, p.Volumes); err != nil {
		return nil, invalid([]error{jsonErr(root+".volumes", err)})
	}
	if err := p.validate(root + "."); err != nil {
		return nil, err
	}
	return p, nil
}

// volumeDefaults sets use_latest to the schema default (true) on immutable
// volumes and parents that omit it. Slice elements are allocated by the
// decoder, so they cannot be pre-filled like the other defaults.
func volumeDefaults(raw []byte, vols []Volume) error {
	if len(vols) == 0 {
		return nil
	}
	var shape struct {
		Volumes []map[string]json.RawMessage `json:"volumes"`
	}
	if err := json.Unmarshal(raw, &shape); err != nil {
		return err
	}
	for i := range vols {
		if i >= len(shape.Volumes) {
			break
		}
		obj := shape.Volumes[i]
		if _, set := obj["use_latest"]; !set && vols[i].Kind() == VolumeImmutable {
			vols[i].UseLatest = true
		}
		if vols[i].Parent != nil {
			var parent map[string]json.RawMessage
			if err := json.Unmarshal(obj["parent"], &parent); err != nil {
				return err
			}
			if _, set := parent["use_latest"]; !set {
				vols[i].Parent.UseLatest = true
			}
		}
	}
	return nil
}

// ApplyDefaults fills zero resources with the schema defaults, and an empty
// type with "vm-function". It is meant
// for content built in Go (program upload), where zero means "not given";
// decoded content already has its defaults.
func (p *ProgramContent) ApplyDefaults() {
	if p.Resources.VCPUs == 0 {
		p.Resources.VCPUs = DefaultVCPUs
	}
	if p.Resources.Memory == 0 {
		p.Resources.Memory = DefaultMemory
	}
	if p.Resources.Seconds == 0 {
		p.Resources.Seconds = DefaultSeconds
	}
	if p.Type == "" {
		p.Type = ProgramType
	}
}

// Validate checks the content against the reference schema and against
// what this supervisor needs to run it safely. All problems are reported
// in one InvalidInput error; each names its field (e.g. "code.encoding").
// Call ApplyDefaults first for content built in Go.
func (p *ProgramContent) Validate() error { return p.validate("") }

func (p *ProgramContent) validate(prefix string) error {
	v := validator{prefix: prefix}
	if p.Type != ProgramType {
		v.add("type", fmt.Sprintf("must be %q, got %s", ProgramType, quoteShort(p.Type)))
	}

	v.encoding("code.encoding", p.Code.Encoding)
	if p.Code.Entrypoint == "" {
		v.add("code.entrypoint", "required")
	} else if hasControl(p.Code.Entrypoint) {
		v.add("code.entrypoint", "must not contain control characters")
	}
	v.ref("code.ref", p.Code.Ref, true)
	switch p.Code.Interface {
	case "", "asgi", "binary":
	default:
		v.add("code.interface", fmt.Sprintf("must be asgi or binary, got %s", quoteShort(p.Code.Interface)))
	}

	v.ref("runtime.ref", p.Runtime.Ref, true)

	if d := p.Data; d != nil {
		v.encoding("data.encoding", d.Encoding)
		v.mount("data.mount", d.Mount, true)
		v.ref("data.ref", d.Ref, false)
	}
	if e := p.Export; e != nil {
		v.encoding("export.encoding", e.Encoding)
		v.mount("export.mount", e.Mount, true)
	}

	v.between("resources.vcpus", p.Resources.VCPUs, 1, MaxVCPUs)
	v.between("resources.memory", p.Resources.Memory, 1, MaxMemoryMiB)
	v.between("resources.seconds", p.Resources.Seconds, 1, MaxSeconds)
	v.publishedPorts(p.Resources.PublishedPorts)

	for _, k := range slices.Sorted(maps.Keys(p.Variables)) {
		if !envName.MatchString(k) {
			v.add(keyPath("variables", k), "not a valid environment variable name")
		} else if strings.ContainsRune(p.Variables[k], 0) {
			v.add("variables."+k, "must not contain NUL bytes")
		}
	}

	names := map[string]int{}
	for i, vol := range p.Volumes {
		field := fmt.Sprintf("volumes[%d]", i)
		v.volume(field, vol)
		// Both entries would be the one image on the host
		// (PERSISTENT_VOLUMES_DIR/<program>/<name>.ext4): attached twice
		// read-write, or waiting forever for its own lock.
		// Names are compared as the files they become: "a.b" and "a_b"
		// are the same a_b.ext4.
		if vol.Kind() == VolumePersistent {
			file := PersistentVolumeName(i, vol.Name)
			if first, seen := names[file]; seen {
				v.add(field+".name", fmt.Sprintf("persistent volume %s is already volumes[%d] (both are %s on the host)", quoteShort(vol.Name), first, quoteShort(file)))
			} else {
				names[file] = i
			}
		}
	}
	return invalid(v.errs)
}

// envName is what a POSIX shell and execve accept as a variable name; an
// "=" or NUL in a key would corrupt the program's environment block.
var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// volumeName keeps persistent volume names usable as a single file name on
// the host: they end up in paths under PERSISTENT_VOLUMES_DIR.
var volumeName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidVolumeName reports whether name is usable as a persistent volume's
// name (what validation accepts; a persistent volume may also have none).
func ValidVolumeName(name string) bool { return volumeName.MatchString(name) }

// upstreamKeptName is what aleph-vm leaves as it is in a persistent
// volume's name; anything else has each character outside upstreamNameChar
// replaced by "_" (storage.py, get_volume_path). "/" is never kept here:
// validation refuses it, and it would name a sub-directory.
var (
	upstreamKeptName = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)
	upstreamNameChar = regexp.MustCompile(`[^A-Za-z0-9_-]`)
)

// PersistentVolumeName is the file name, less its ".ext4", that aleph-vm
// gives volumes[n] of a program when it is persistent: its name with
// characters other than letters, digits, "_" and "-" replaced by "_", or
// "unamed_volume_<n>" (sic, n counting every volume of the message) when
// it has none. An operator moving a node between aleph-vm and this
// supervisor keeps the volumes' data.
func PersistentVolumeName(n int, name string) string {
	if name == "" {
		return fmt.Sprintf("unamed_volume_%d", n)
	}
	if upstreamKeptName.MatchString(name) {
		return name
	}
	return upstreamNameChar.ReplaceAllString(name, "_")
}

// PersistentVolumeMount is where aleph-vm mounts volumes[n] when it is
// persistent and has no mount: /mnt/<its name, or unamed_volume_<n>>.
func PersistentVolumeMount(n int, name string) string {
	if name == "" {
		name = fmt.Sprintf("unamed_volume_%d", n)
	}
	return "/mnt/" + name
}

type validator struct {
	prefix string
	errs   []error
}

func (v *validator) add(field, problem string) {
	v.errs = append(v.errs, fieldErr(v.prefix+field, problem))
}

func (v *validator) encoding(field string, e Encoding) {
	switch e {
	case EncodingPlain, EncodingZip, EncodingSquashfs:
	case "":
		v.add(field, "required (plain, zip or squashfs)")
	default:
		v.add(field, fmt.Sprintf("must be plain, zip or squashfs, got %s", quoteShort(string(e))))
	}
}

func (v *validator) ref(field, ref string, required bool) {
	if ref == "" {
		if required {
			v.add(field, "required")
		}
		return
	}
	if p := itemHashProblem(ref); p != "" {
		v.add(field, fmt.Sprintf("invalid item hash %s: %s", quoteShort(ref), p))
	}
}

// mount accepts absolute guest paths without ".." elements: the agent
// joins them under its own roots, and a path that climbs out would mount
// over the runtime itself.
func (v *validator) mount(field, mount string, required bool) {
	switch {
	case mount == "":
		if required {
			v.add(field, "required")
		}
	case !path.IsAbs(mount):
		v.add(field, fmt.Sprintf("must be an absolute path, got %s", quoteShort(mount)))
	case hasControl(mount):
		v.add(field, "must not contain control characters")
	case hasDotDot(mount):
		v.add(field, fmt.Sprintf("must not contain \"..\", got %s", quoteShort(mount)))
	case path.Clean(mount) == "/":
		v.add(field, "must not be the root directory")
	}
}

func (v *validator) between(field string, n, lo, hi int) {
	if n < lo || n > hi {
		v.add(field, fmt.Sprintf("must be between %d and %d, got %d", lo, hi, n))
	}
}

func (v *validator) publishedPorts(raw json.RawMessage) {
	if isNull(raw) {
		return
	}
	var ports []json.RawMessage
	if err := json.Unmarshal(raw, &ports); err != nil {
		v.add("resources.published_ports", "must be an array of {protocol, port}")
		return
	}
	for i, raw := range ports {
		field := fmt.Sprintf("resources.published_ports[%d]", i)
		var keys map[string]json.RawMessage
		if err := json.Unmarshal(raw, &keys); err != nil {
			v.add(field, "must be {protocol: tcp|udp, port: 1..65535}")
			continue
		}
		for _, k := range slices.Sorted(maps.Keys(keys)) {
			if k != "protocol" && k != "port" {
				v.add(keyPath(field, k), "unknown field")
			}
		}
		var port struct {
			Protocol string `json:"protocol"`
			Port     int    `json:"port"`
		}
		if err := json.Unmarshal(raw, &port); err != nil {
			v.add(field, "must be {protocol: tcp|udp, port: 1..65535}")
			continue
		}
		if port.Protocol != "" && port.Protocol != "tcp" && port.Protocol != "udp" {
			v.add(field+".protocol", "must be tcp or udp")
		}
		v.between(field+".port", port.Port, 1, 65535)
	}
}

func (v *validator) volume(field string, vol Volume) {
	v.mount(field+".mount", vol.Mount, false)
	switch vol.Kind() {
	case VolumeImmutable:
		v.ref(field+".ref", vol.Ref, true)
		if vol.Ephemeral || vol.Name != "" || vol.Persistence != "" || vol.SizeMiB != 0 || vol.Parent != nil {
			v.add(field, "an immutable volume has only mount, ref and use_latest")
		}
	case VolumeEphemeral:
		v.between(field+".size_mib", vol.SizeMiB, 1, MaxEphemeralVolumeMiB)
		if vol.Name != "" || vol.Persistence != "" || vol.Parent != nil || vol.UseLatest {
			v.add(field, "an ephemeral volume has only mount and size_mib")
		}
	case VolumePersistent:
		switch vol.Persistence {
		case "host", "store":
		default:
			v.add(field+".persistence", fmt.Sprintf("must be host or store, got %s", quoteShort(vol.Persistence)))
		}
		// Unnamed is allowed, as upstream: the volume is then
		// unamed_volume_<i> (PersistentVolumeName).
		if vol.Name != "" && !volumeName.MatchString(vol.Name) {
			v.add(field+".name", fmt.Sprintf("must match %s, got %s", volumeName, quoteShort(vol.Name)))
		}
		v.between(field+".size_mib", vol.SizeMiB, 1, MaxPersistentVolumeMiB)
		if vol.Parent != nil {
			v.ref(field+".parent.ref", vol.Parent.Ref, true)
		}
		if vol.UseLatest {
			v.add(field+".use_latest", "not allowed in a persistent volume")
		}
	default:
		v.add(field, "must be immutable {ref}, ephemeral {ephemeral: true, size_mib} or persistent {name, persistence, size_mib}")
	}
}

// Kind tells which variant of the volume union v is, from the fields that
// distinguish them; "" when none is set.
func (v Volume) Kind() VolumeKind {
	switch {
	case v.Ref != "":
		return VolumeImmutable
	case v.Ephemeral:
		return VolumeEphemeral
	case v.Persistence != "" || v.Name != "":
		return VolumePersistent
	}
	return ""
}

// MarshalJSON writes only the keys of v's variant, so that re-encoded
// content passes the strict per-variant check and keeps use_latest of
// immutable volumes explicit (its default is true, its zero value false).
func (v Volume) MarshalJSON() ([]byte, error) {
	switch v.Kind() {
	case VolumeImmutable:
		return json.Marshal(struct {
			Comment   string `json:"comment,omitempty"`
			Mount     string `json:"mount,omitempty"`
			Ref       string `json:"ref"`
			UseLatest bool   `json:"use_latest"`
		}{v.Comment, v.Mount, v.Ref, v.UseLatest})
	case VolumeEphemeral:
		return json.Marshal(struct {
			Comment   string `json:"comment,omitempty"`
			Mount     string `json:"mount,omitempty"`
			Ephemeral bool   `json:"ephemeral"`
			SizeMiB   int    `json:"size_mib"`
		}{v.Comment, v.Mount, true, v.SizeMiB})
	case VolumePersistent:
		return json.Marshal(struct {
			Comment     string        `json:"comment,omitempty"`
			Mount       string        `json:"mount,omitempty"`
			Parent      *ParentVolume `json:"parent,omitempty"`
			Persistence string        `json:"persistence"`
			Name        string        `json:"name,omitempty"`
			SizeMiB     int           `json:"size_mib"`
		}{v.Comment, v.Mount, v.Parent, v.Persistence, v.Name, v.SizeMiB})
	}
	type plain Volume // no methods: avoids recursing into MarshalJSON
	return json.Marshal(plain(v))
}

func hasControl(s string) bool {
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			return true
		}
	}
	return false
}

func hasDotDot(p string) bool {
	for _, el := range strings.Split(p, "/") {
		if el == ".." {
			return true
		}
	}
	return false
}

// article picks "a" or "an" so refusals read naturally ("an INSTANCE").
func article(word string) string {
	if word != "" && strings.ContainsRune("AEIOUaeiou", rune(word[0])) {
		return "an"
	}
	return "a"
}

func quoteIfOdd(s string) string {
	if plainKey.MatchString(s) {
		return s
	}
	return quoteShort(s)
}
