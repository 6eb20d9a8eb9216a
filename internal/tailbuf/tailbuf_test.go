package tailbuf

import (
	"strings"
	"testing"
)

func TestKeepsTheLastLinesCut(t *testing.T) {
	b := New(2, 5)
	b.Add([]byte("one\n"))
	b.Add([]byte("two\n"))
	b.Add([]byte("three and more\n"))
	if got := b.String(); got != "two\nthree…" {
		t.Errorf("got %q", got)
	}
	if strings.Contains(b.String(), "one") {
		t.Error("oldest line kept")
	}
}
