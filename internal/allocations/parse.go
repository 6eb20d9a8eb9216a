package allocations

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sort"
	"strings"

	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// Allocation is what the scheduler wants on this node: the body of
// POST /control/allocations (aleph-vm orchestrator/resources.py
// Allocation). Sets are kept sorted and without duplicates.
type Allocation struct {
	PersistentVMs []string `json:"persistent_vms"`
	Instances     []string `json:"instances"`
	// OnDemandVMs and Jobs are accepted and ignored, as upstream does.
	OnDemandVMs []string `json:"on_demand_vms,omitempty"`
	Jobs        []string `json:"jobs,omitempty"`
}

// hashes is every hash the node must keep running.
func (a Allocation) hashes() []string {
	return sortedSet(append(append([]string(nil), a.PersistentVMs...), a.Instances...))
}

// FieldError is one validation error in pydantic's JSON shape, which
// aleph-vm answers as a 400 body (a list of them).
type FieldError struct {
	Type  string         `json:"type"`
	Loc   []any          `json:"loc"`
	Msg   string         `json:"msg"`
	Input any            `json:"input"`
	Ctx   map[string]any `json:"ctx,omitempty"`
}

// Parse reads an allocation as pydantic validates upstream's model:
// unknown keys are ignored, missing sets are empty, on_demand_vms and
// jobs may be null, and every element must be an item hash. A body that
// is not JSON gives one json_invalid error (upstream fails with a 500
// there; a malformed body is the client's fault).
func Parse(body []byte) (Allocation, []FieldError) {
	var raw any
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	if err := dec.Decode(&raw); err != nil || dec.More() {
		msg := "trailing data"
		if err != nil {
			msg = err.Error()
		}
		return Allocation{}, []FieldError{{Type: "json_invalid", Loc: []any{}, Msg: "Invalid JSON: " + msg, Input: string(body)}}
	}
	obj, ok := raw.(map[string]any)
	if !ok {
		return Allocation{}, []FieldError{{
			Type: "model_type", Loc: []any{},
			Msg:   "Input should be a valid dictionary or instance of Allocation",
			Input: raw,
		}}
	}
	var a Allocation
	var errs []FieldError
	for _, f := range []struct {
		name     string
		nullable bool
		dst      *[]string
	}{
		{"persistent_vms", false, &a.PersistentVMs},
		{"instances", false, &a.Instances},
		{"on_demand_vms", true, &a.OnDemandVMs},
		{"jobs", true, &a.Jobs},
	} {
		v, present := obj[f.name]
		if !present || (v == nil && f.nullable) {
			continue
		}
		set, ferrs := hashSet(f.name, v)
		errs = append(errs, ferrs...)
		*f.dst = set
	}
	if a.PersistentVMs == nil {
		a.PersistentVMs = []string{}
	}
	if a.Instances == nil {
		a.Instances = []string{}
	}
	return a, errs
}

// hashSet validates one set[ItemHash] field.
func hashSet(field string, v any) ([]string, []FieldError) {
	list, ok := v.([]any)
	if !ok {
		return nil, []FieldError{{Type: "set_type", Loc: []any{field}, Msg: "Input should be a valid set", Input: v}}
	}
	var out []string
	var errs []FieldError
	for i, item := range list {
		s, ok := item.(string)
		if !ok {
			errs = append(errs, FieldError{Type: "string_type", Loc: []any{field, i}, Msg: "Input should be a valid string", Input: item})
			continue
		}
		if !message.IsItemHash(s) {
			why := "Could not determine hash type: " + pyRepr(s)
			errs = append(errs, FieldError{
				Type: "value_error", Loc: []any{field, i}, Msg: "Value error, " + why,
				Input: s, Ctx: map[string]any{"error": why},
			})
			continue
		}
		out = append(out, s)
	}
	return sortedSet(out), errs
}

// pyRepr quotes s as Python's repr does for plain strings, so messages
// read as upstream's.
func pyRepr(s string) string {
	quote := "'"
	if strings.Contains(s, "'") && !strings.Contains(s, `"`) {
		quote = `"`
	}
	var b strings.Builder
	b.WriteString(quote)
	for _, r := range s {
		switch {
		case r == '\\':
			b.WriteString(`\\`)
		case string(r) == quote:
			b.WriteString(`\` + quote)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\t':
			b.WriteString(`\t`)
		case r == '\r':
			b.WriteString(`\r`)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, `\x%02x`, r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteString(quote)
	return b.String()
}

func sortedSet(in []string) []string {
	seen := map[string]bool{}
	out := []string{}
	for _, s := range in {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	sort.Strings(out)
	return out
}
