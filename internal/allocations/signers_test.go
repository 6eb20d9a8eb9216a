package allocations

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"
)

const (
	signerLocal     = "0xdAC17F958D2ee523a2206206994597C13D831ec7"
	signerAggregate = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
	signerDefault   = "0x2937f62e5F81A88e921f883f8fE56ceCf4A4A44A"
)

func aggregateOf(body string, err error, calls *int) func(context.Context) (map[string]json.RawMessage, error) {
	return func(context.Context) (map[string]json.RawMessage, error) {
		*calls++
		if err != nil {
			return nil, err
		}
		var m map[string]json.RawMessage
		if e := json.Unmarshal([]byte(body), &m); e != nil {
			panic(e)
		}
		return m, nil
	}
}

// Upstream's precedence cases (test_signers_* in
// tests/supervisor/views/test_allocation_auth.py).
func TestSignersPrecedence(t *testing.T) {
	quiet := slog.New(slog.DiscardHandler)
	down := errors.New("api down")
	cases := []struct {
		name  string
		local []string
		agg   string
		err   error
		want  string
		calls int
	}{
		{"local overrides aggregate", []string{signerLocal}, `{"authorized_allocation_signers":["` + signerAggregate + `"]}`, nil, signerLocal, 0},
		{"aggregate when local empty", nil, `{"authorized_allocation_signers":["` + signerAggregate + `"]}`, nil, signerAggregate, 1},
		{"default when aggregate unavailable", nil, "", down, signerDefault, 1},
		{"default when aggregate omits the key", nil, `{"compatible_gpus":[]}`, nil, signerDefault, 1},
		{"default when aggregate lists nobody", nil, `{"authorized_allocation_signers":[]}`, nil, signerDefault, 1},
		{"default when aggregate's list is malformed", nil, `{"authorized_allocation_signers":[1]}`, nil, signerDefault, 1},
	}
	for _, c := range cases {
		calls := 0
		s := &Signers{Local: c.local, Default: []string{signerDefault}, Aggregate: aggregateOf(c.agg, c.err, &calls), Log: quiet}
		got := s.Authorized(context.Background())
		if !slices.Equal(got, []string{strings.ToLower(c.want)}) || calls != c.calls {
			t.Errorf("%s: %q after %d fetches, want %s after %d", c.name, got, calls, c.want, c.calls)
		}
	}
}

// The aggregate is fetched once per TTL; a failure is retried after
// RetryAfter, not on every request.
func TestSignersCache(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	calls := 0
	var fail error
	s := &Signers{Default: []string{signerDefault}, Now: func() time.Time { return now }, Log: slog.New(slog.DiscardHandler)}
	s.Aggregate = func(ctx context.Context) (map[string]json.RawMessage, error) {
		return aggregateOf(`{"authorized_allocation_signers":["`+signerAggregate+`"]}`, fail, &calls)(ctx)
	}
	ctx := context.Background()
	for range 3 {
		s.Authorized(ctx)
	}
	if calls != 1 {
		t.Fatalf("%d fetches within the TTL, want 1", calls)
	}
	now = now.Add(61 * time.Second)
	fail = errors.New("down")
	if got := s.Authorized(ctx); calls != 2 || got[0] != strings.ToLower(signerDefault) {
		t.Fatalf("after the TTL with the API down: %q, %d fetches", got, calls)
	}
	now = now.Add(5 * time.Second)
	s.Authorized(ctx)
	if calls != 2 {
		t.Fatalf("failure retried after 5 s: %d fetches", calls)
	}
	now = now.Add(6 * time.Second)
	fail = nil
	if got := s.Authorized(ctx); calls != 3 || got[0] != strings.ToLower(signerAggregate) {
		t.Fatalf("after RetryAfter: %q, %d fetches", got, calls)
	}
}

// The start-up summary (upstream's log_allocation_auth_config): the
// legacy token is warned about once, only when it is on.
func TestSignersLogConfig(t *testing.T) {
	for _, c := range []struct {
		local  []string
		legacy bool
		want   []string
		warn   bool
	}{
		{[]string{signerLocal}, false, []string{"Aleph-EIP191-V1 enabled"}, false},
		{[]string{signerLocal}, true, []string{"Aleph-EIP191-V1 enabled", "legacy X-Auth-Signature token is still accepted"}, true},
		{nil, true, []string{"settings aggregate", "legacy X-Auth-Signature token is still accepted"}, true},
		{nil, false, []string{"settings aggregate"}, false},
	} {
		var b bytes.Buffer
		s := &Signers{Local: c.local, Default: []string{signerDefault}, Log: slog.New(slog.NewTextHandler(&b, nil))}
		s.LogConfig(c.legacy)
		for _, w := range c.want {
			if !strings.Contains(b.String(), w) {
				t.Errorf("%v %v: log lacks %q:\n%s", c.local, c.legacy, w, b.String())
			}
		}
		if strings.Contains(b.String(), "level=WARN") != c.warn {
			t.Errorf("%v %v: warning %v:\n%s", c.local, c.legacy, !c.warn, b.String())
		}
	}
}
