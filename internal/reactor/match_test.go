package reactor

import (
	"strings"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/message"
	"github.com/aleph-vm-go/vm-supervisor/internal/sources"
)

func TestMatches(t *testing.T) {
	m := &message.Message{
		ItemHash: "aa", Type: message.TypePost, Chain: "ETH", Sender: "0xB31B", Channel: "TEST",
		Content: []byte(`{"type":"chat","address":"0xB31B","content":{"text":"hi","n":1}}`),
	}
	for _, c := range []struct {
		name    string
		filters []message.Filter
		want    bool
	}{
		{"channel", []message.Filter{{"channel": "TEST"}}, true},
		{"other channel", []message.Filter{{"channel": "PROD"}}, false},
		{"every key must match", []message.Filter{{"channel": "TEST", "sender": "0xOTHER"}}, false},
		{"any filter may match", []message.Filter{{"channel": "PROD"}, {"type": "POST"}}, true},
		{"nested content field", []message.Filter{{"content": map[string]any{"type": "chat"}}}, true},
		{"nested twice", []message.Filter{{"content": map[string]any{"content": map[string]any{"text": "hi"}}}}, true},
		{"nested mismatch", []message.Filter{{"content": map[string]any{"type": "other"}}}, false},
		{"unknown field", []message.Filter{{"nope": "x"}}, false},
		{"non-string value", []message.Filter{{"content": map[string]any{"content": map[string]any{"n": 1.0}}}}, false},
		{"empty filter", []message.Filter{{}}, false},
		{"no filters", nil, false},
	} {
		if got := Matches(c.filters, m); got != c.want {
			t.Errorf("%s: Matches = %v, want %v", c.name, got, c.want)
		}
	}
}

func TestFollowedRefsAndKeys(t *testing.T) {
	c, err := message.DecodeProgramContent([]byte(`{
		"type":"vm-function","address":"0x1","time":1,"allow_amend":false,
		"code":{"encoding":"zip","entrypoint":"main:app","ref":"` + hx("c") + `","use_latest":true},
		"runtime":{"ref":"` + hx("r") + `","use_latest":false,"comment":""},
		"on":{"http":true},"environment":{"reproducible":false,"internet":false,"aleph_api":false,"shared_cache":false},
		"resources":{"vcpus":1,"memory":128,"seconds":30},
		"volumes":[{"mount":"/opt/v","ref":"` + hx("v") + `"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	got := refOwners(&sources.Program{Content: c})
	if got[hx("c")] != "0x1" || got[hx("v")] != "0x1" || len(got) != 2 {
		t.Fatalf("refOwners = %v: want code and the volume (use_latest by default) owned by 0x1, not the pinned runtime", got)
	}
	amend := &message.Message{ItemHash: hx("a"), Type: message.TypeStore, Content: []byte(`{"ref":"` + hx("c") + `"}`)}
	if k := refKeys(amend); len(k) != 2 || k[1] != hx("c") {
		t.Fatalf("refKeys = %v", k)
	}
}

// hx makes a distinct valid item hash per name.
func hx(name string) string {
	return strings.Repeat("0", 63) + map[string]string{"c": "c", "r": "d", "v": "e", "a": "a"}[name]
}
