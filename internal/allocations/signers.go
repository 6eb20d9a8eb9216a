package allocations

import (
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"time"
)

// Signers resolves who may sign the scheduler's requests, as aleph-vm's
// get_authorized_allocation_signers does: the local override
// (AUTHORIZED_ALLOCATION_SIGNERS) when it is not empty, else the settings
// aggregate's authorized_allocation_signers when it names some, else the
// built-in default (DEFAULT_ALLOCATION_SIGNERS). An aggregate that cannot
// be fetched, lacks the key or lists nobody falls back to the default, so
// that neither an outage nor a stray empty publication stops scheduling.
//
// The aggregate is cached for TTL (upstream's 60 s). A failed fetch is
// remembered for RetryAfter: upstream retries it on every request, which
// lets anyone with a valid signature of their own make the node call the
// API server once per request.
type Signers struct {
	Local   []string
	Default []string
	// Aggregate returns the settings aggregate (alephapi's
	// SettingsAggregate for SETTINGS_AGGREGATE_ADDRESS); nil: none.
	Aggregate func(ctx context.Context) (map[string]json.RawMessage, error)
	// TTL and RetryAfter: 60 s and 10 s when zero.
	TTL, RetryAfter time.Duration
	// FetchTimeout bounds one fetch (10 s when zero).
	FetchTimeout time.Duration
	Now          func() time.Time
	Log          *slog.Logger

	mu     sync.Mutex
	cached []string
	until  time.Time
}

// Authorized returns the addresses allowed to sign, lower case.
func (s *Signers) Authorized(ctx context.Context) []string {
	if len(s.Local) > 0 {
		return lower(s.Local)
	}
	if agg := s.aggregate(ctx); len(agg) > 0 {
		return agg
	}
	return lower(s.Default)
}

func (s *Signers) aggregate(ctx context.Context) []string {
	if s.Aggregate == nil {
		return nil
	}
	now := time.Now
	if s.Now != nil {
		now = s.Now
	}
	// One fetch at a time: requests arriving meanwhile wait for it.
	s.mu.Lock()
	defer s.mu.Unlock()
	if now().Before(s.until) {
		return s.cached
	}
	timeout := or(s.FetchTimeout, 10*time.Second)
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
	defer cancel()
	settings, err := s.Aggregate(fctx)
	if err != nil {
		s.log().Warn("allocation signers: fetching the settings aggregate failed; using the default signers", "err", err)
		s.cached, s.until = nil, now().Add(or(s.RetryAfter, 10*time.Second))
		return nil
	}
	var signers []string
	if raw, ok := settings["authorized_allocation_signers"]; ok && string(raw) != "null" {
		if err := json.Unmarshal(raw, &signers); err != nil {
			s.log().Warn("allocation signers: the settings aggregate's authorized_allocation_signers is not a list of addresses; using the default signers", "err", err)
			signers = nil
		}
	}
	s.cached, s.until = lower(signers), now().Add(or(s.TTL, 60*time.Second))
	return s.cached
}

// LogConfig says once, at start, where signers come from and whether the
// deprecated X-Auth-Signature token is still accepted (upstream's
// log_allocation_auth_config; the token is not logged per request).
func (s *Signers) LogConfig(legacyToken bool) {
	if len(s.Local) > 0 {
		s.log().Info("allocation auth: Aleph-EIP191-V1 enabled with locally configured signers (they override the settings aggregate)",
			"signers", len(s.Local))
	} else {
		s.log().Info("allocation auth: no local AUTHORIZED_ALLOCATION_SIGNERS; Aleph-EIP191-V1 signers come from the network settings aggregate, else the built-in default signers",
			"default_signers", len(s.Default))
	}
	if legacyToken {
		s.log().Warn("allocation auth: the legacy X-Auth-Signature token is still accepted (ALLOCATION_TOKEN_HASH is set); empty it once every scheduler signs with Aleph-EIP191-V1")
	}
}

func (s *Signers) log() *slog.Logger {
	if s.Log == nil {
		return slog.Default()
	}
	return s.Log
}

func lower(addrs []string) []string {
	out := make([]string, 0, len(addrs))
	for _, a := range addrs {
		out = append(out, strings.ToLower(a))
	}
	return out
}

func or(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}
