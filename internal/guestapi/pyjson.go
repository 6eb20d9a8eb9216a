package guestapi

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"unicode/utf16"
)

// pyJSON re-encodes a JSON value as Python's json.dumps(json.loads(v),
// separators=(",", ":")) does, which is what aleph-vm's connector sends
// and signs: objects keep their order (a repeated key its first place and
// last value), integers stay integers, floats take Python's repr, and
// with ascii every non-ASCII character is escaped (ensure_ascii).
func pyJSON(b *bytes.Buffer, raw []byte, ascii bool) error {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 {
		return errors.New("empty JSON value")
	}
	switch raw[0] {
	case '{':
		o, err := parseObject(raw)
		if err != nil {
			return err
		}
		b.WriteByte('{')
		for i, m := range o {
			if i > 0 {
				b.WriteByte(',')
			}
			writePyStr(b, m.key, ascii)
			b.WriteByte(':')
			if err := pyJSON(b, m.value, ascii); err != nil {
				return err
			}
		}
		b.WriteByte('}')
	case '[':
		var items []json.RawMessage
		if err := json.Unmarshal(raw, &items); err != nil {
			return err
		}
		b.WriteByte('[')
		for i, v := range items {
			if i > 0 {
				b.WriteByte(',')
			}
			if err := pyJSON(b, v, ascii); err != nil {
				return err
			}
		}
		b.WriteByte(']')
	case '"':
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return err
		}
		writePyStr(b, s, ascii)
	case 't', 'f', 'n':
		var v any
		if err := json.Unmarshal(raw, &v); err != nil {
			return err
		}
		b.Write(raw)
	default:
		var n json.Number
		if err := json.Unmarshal(raw, &n); err != nil {
			return err
		}
		s := n.String()
		if !strings.ContainsAny(s, ".eE") {
			// Python ints are unbounded: only the spelling of zero moves.
			if strings.TrimLeft(s, "-0") == "" {
				s = "0"
			}
			b.WriteString(s)
			return nil
		}
		f, err := strconv.ParseFloat(s, 64)
		if err != nil || math.IsInf(f, 0) {
			// Python reads it as inf, which allow_nan=False refuses.
			return fmt.Errorf("number %s out of range", s)
		}
		b.WriteString(pyFloat(f))
	}
	return nil
}

// pyFloat is Python's repr of a float: the shortest round-tripping
// digits, positional from 1e-4 to below 1e16, always with a fraction or
// an exponent.
func pyFloat(f float64) string {
	if f == 0 {
		if math.Signbit(f) {
			return "-0.0"
		}
		return "0.0"
	}
	e := strconv.FormatFloat(f, 'e', -1, 64) // d.ddde±XX
	mant, expText, _ := strings.Cut(e, "e")
	exp, _ := strconv.Atoi(expText)
	if exp < -4 || exp >= 16 {
		sign := "+"
		if exp < 0 {
			sign, exp = "-", -exp
		}
		return fmt.Sprintf("%se%s%02d", mant, sign, exp)
	}
	s := strconv.FormatFloat(f, 'f', -1, 64)
	if !strings.Contains(s, ".") {
		s += ".0"
	}
	return s
}

// writePyStr encodes s as Python's json.dumps does: with ascii
// (ensure_ascii, the default) every non-ASCII character as \uXXXX
// (surrogate pairs beyond the BMP) and DEL, else only quotes, backslashes and
// control characters escaped.
func writePyStr(b *bytes.Buffer, s string, ascii bool) {
	b.WriteByte('"')
	for _, r := range s {
		switch r {
		case '"':
			b.WriteString(`\"`)
		case '\\':
			b.WriteString(`\\`)
		case '\n':
			b.WriteString(`\n`)
		case '\r':
			b.WriteString(`\r`)
		case '\t':
			b.WriteString(`\t`)
		case '\b':
			b.WriteString(`\b`)
		case '\f':
			b.WriteString(`\f`)
		default:
			switch {
			case r < 0x20 || (ascii && r > 0x7e):
				if r > 0xffff {
					r1, r2 := utf16.EncodeRune(r)
					fmt.Fprintf(b, `\u%04x\u%04x`, r1, r2)
				} else {
					fmt.Fprintf(b, `\u%04x`, r)
				}
			default:
				b.WriteRune(r)
			}
		}
	}
	b.WriteByte('"')
}
