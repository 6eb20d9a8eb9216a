package reactor

import (
	"encoding/json"

	"github.com/aleph-vm-go/vm-supervisor/internal/message"
)

// Matches reports whether message m satisfies one of a program's
// on.message filters, with aleph-vm's rules (reactor.py,
// subscription_matches): every key of a filter names a field of the
// message (item_hash, type, chain, sender, channel, content, ...); a
// string value must equal the field, an object value must match the
// field's own fields the same way, recursively. An empty filter matches
// nothing. Values of other JSON types make aleph-vm raise; here they just
// do not match.
func Matches(filters []message.Filter, m *message.Message) bool {
	if len(filters) == 0 {
		return false
	}
	fields, err := messageFields(m)
	if err != nil {
		return false
	}
	for _, f := range filters {
		if len(f) > 0 && includes(f, fields) {
			return true
		}
	}
	return false
}

// messageFields is the message as aleph-message's model exposes it:
// envelope fields plus the decoded content.
func messageFields(m *message.Message) (map[string]any, error) {
	raw, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	var fields map[string]any
	if err := json.Unmarshal(raw, &fields); err != nil {
		return nil, err
	}
	var content any
	if err := json.Unmarshal(m.Content, &content); err != nil {
		return nil, err
	}
	fields["content"] = content
	return fields, nil
}

func includes(want map[string]any, have map[string]any) bool {
	for k, v := range want {
		got, ok := have[k]
		if !ok || !equalOrIncludes(v, got) {
			return false
		}
	}
	return true
}

func equalOrIncludes(want, got any) bool {
	switch w := want.(type) {
	case string:
		g, ok := got.(string)
		return ok && g == w
	case map[string]any:
		g, ok := got.(map[string]any)
		return ok && includes(w, g)
	default:
		return false
	}
}
