package message

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
)

// maxFieldErrors caps how many problems one decode reports, so a hostile
// message with thousands of junk keys yields a short error.
const maxFieldErrors = 20

var (
	rawMessageType = reflect.TypeFor[json.RawMessage]()
	volumeType     = reflect.TypeFor[Volume]()
	fieldCache     sync.Map // reflect.Type -> map[string]reflect.Type
)

// jsonFields maps the JSON names a struct declares to their Go types. Names
// are matched exactly: encoding/json would accept "Entrypoint" for
// "entrypoint", the reference schema would not.
func jsonFields(t reflect.Type) map[string]reflect.Type {
	if v, ok := fieldCache.Load(t); ok {
		return v.(map[string]reflect.Type)
	}
	m := make(map[string]reflect.Type, t.NumField())
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" {
			continue
		}
		if name == "" {
			name = f.Name
		}
		m[name] = f.Type
	}
	fieldCache.Store(t, m)
	return m
}

// scalarProblem checks that raw is a JSON value of the given kind.
func scalarProblem(raw json.RawMessage, k reflect.Kind) string {
	raw = bytes.TrimSpace(raw)
	switch k {
	case reflect.String:
		if raw[0] != '"' {
			return "must be a string"
		}
	case reflect.Bool:
		if s := string(raw); s != "true" && s != "false" {
			return "must be a boolean"
		}
	case reflect.Int, reflect.Int64:
		if _, err := strconv.ParseInt(string(raw), 10, 64); err != nil {
			if raw[0] == '-' || raw[0] >= '0' && raw[0] <= '9' {
				return "must be an integer in range, got " + quoteShort(string(raw))
			}
			return "must be an integer"
		}
	case reflect.Float64:
		if _, err := strconv.ParseFloat(string(raw), 64); err != nil || raw[0] == '"' {
			return "must be a number"
		}
	}
	return ""
}

func isNull(raw []byte) bool {
	raw = bytes.TrimSpace(raw)
	return len(raw) == 0 || string(raw) == "null"
}

var plainKey = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// keyPath appends a JSON key to a field path, quoting keys that would make
// the path ambiguous or that carry control characters into error text.
func keyPath(path, key string) string {
	if plainKey.MatchString(key) {
		return path + "." + key
	}
	if len(key) > 64 {
		key = key[:64]
	}
	return path + "[" + fmt.Sprintf("%q", key) + "]"
}

// checkKnown walks raw alongside the Go type t and records every key that t
// does not declare. Go's DisallowUnknownFields stops at the first one and
// does not say where it was; users need the full path. Maps, interfaces
// and json.RawMessage are free-form by design (metadata, filters,
// requirements, payment) and are not descended into.
func checkKnown(raw json.RawMessage, t reflect.Type, path string, errs *[]error) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == rawMessageType || isNull(raw) || len(*errs) >= maxFieldErrors {
		return
	}
	switch t.Kind() {
	case reflect.String, reflect.Bool, reflect.Int, reflect.Int64, reflect.Float64:
		// Checked here rather than left to json.Unmarshal, whose errors
		// drop slice indexes and map keys from the field path.
		if p := scalarProblem(raw, t.Kind()); p != "" {
			*errs = append(*errs, fieldErr(path, p))
		}
	case reflect.Map:
		if t.Key().Kind() != reflect.String || t.Elem().Kind() != reflect.String {
			return // free-form
		}
		var obj map[string]json.RawMessage
		if err := json.Unmarshal(raw, &obj); err != nil {
			*errs = append(*errs, fieldErr(path, "must be an object"))
			return
		}
		for _, k := range slices.Sorted(maps.Keys(obj)) {
			if !isNull(obj[k]) {
				checkKnown(obj[k], t.Elem(), keyPath(path, k), errs)
			}
		}
	case reflect.Struct:
		var obj map[string]json.RawMessage
		if err := json.Unmarshal(raw, &obj); err != nil {
			*errs = append(*errs, fieldErr(path, "must be an object"))
			return
		}
		fields := jsonFields(t)
		keys := make([]string, 0, len(obj))
		for k := range obj {
			keys = append(keys, k)
		}
		sort.Strings(keys) // deterministic errors
		for _, k := range keys {
			ft, ok := fields[k]
			if !ok {
				*errs = append(*errs, fieldErr(keyPath(path, k), "unknown field"))
				continue
			}
			checkKnown(obj[k], ft, keyPath(path, k), errs)
		}
		if t == volumeType {
			checkVolumeKeys(obj, keys, path, errs)
		}
	case reflect.Slice:
		if t.Elem().Kind() == reflect.Uint8 {
			return
		}
		var items []json.RawMessage
		if err := json.Unmarshal(raw, &items); err != nil {
			*errs = append(*errs, fieldErr(path, "must be an array"))
			return
		}
		for i, it := range items {
			checkKnown(it, t.Elem(), fmt.Sprintf("%s[%d]", path, i), errs)
		}
	}
}

// Keys each volume variant may carry. The reference schema is a union of
// three models that each forbid extras, so a key of another variant makes
// the volume invalid rather than silently ignored.
var volumeKeys = map[VolumeKind]map[string]bool{
	VolumeImmutable:  {"comment": true, "mount": true, "ref": true, "use_latest": true},
	VolumeEphemeral:  {"comment": true, "mount": true, "ephemeral": true, "size_mib": true},
	VolumePersistent: {"comment": true, "mount": true, "parent": true, "persistence": true, "name": true, "size_mib": true},
}

// volumeKindOfKeys guesses the variant from which keys are present; the
// values are checked later by Validate.
func volumeKindOfKeys(obj map[string]json.RawMessage) VolumeKind {
	switch {
	case obj["ref"] != nil:
		return VolumeImmutable
	case obj["ephemeral"] != nil:
		return VolumeEphemeral
	case obj["persistence"] != nil || obj["name"] != nil:
		return VolumePersistent
	}
	return ""
}

func checkVolumeKeys(obj map[string]json.RawMessage, keys []string, path string, errs *[]error) {
	kind := volumeKindOfKeys(obj)
	allowed, ok := volumeKeys[kind]
	if !ok {
		return
	}
	for _, k := range keys {
		if _, known := jsonFields(volumeType)[k]; known && !allowed[k] {
			*errs = append(*errs, fieldErr(keyPath(path, k), fmt.Sprintf("not allowed in an %s volume", kind)))
		}
	}
}

// jsonErr turns an encoding/json error into a FieldError under prefix
// ("" for the envelope, whose problems are then named "message").
func jsonErr(prefix string, err error) error {
	field := prefix
	if field == "" {
		field = "message"
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		switch {
		case te.Field == "":
		case prefix == "":
			field = te.Field
		default:
			field = prefix + "." + te.Field
		}
		return fieldErr(field, fmt.Sprintf("must be %s, not JSON %s", jsonKindName(te.Type), te.Value))
	}
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fieldErr(field, fmt.Sprintf("invalid JSON at offset %d: %v", se.Offset, se))
	}
	return fieldErr(field, err.Error())
}

func jsonKindName(t reflect.Type) string {
	if t == nil {
		return "a different type"
	}
	switch t.Kind() {
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "a boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "an integer in range"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Slice, reflect.Array:
		return "an array"
	case reflect.Map, reflect.Struct:
		return "an object"
	}
	return "a " + t.String()
}
