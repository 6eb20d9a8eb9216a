package guestapi

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/redis/go-redis/v9"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// RedisStore keeps the cache in Redis under aleph-vm's key names,
// `<program hash>:<key>` with a 7-day EX, so that nodes of either
// implementation sharing one Redis see the same entries.
//
// The per-program caps need to know which keys a program holds without
// scanning the keyspace: this node records the keys it wrote in a set
// under a prefix of its own (IndexPrefix + hash), which aleph-vm's
// `KEYS <hash>:*` never matches. The check and the write run in one Lua
// script; entries that expired or were removed by another node fall out
// of the set there, and sizes are read with STRLEN, so the accounting
// cannot drift. Keys written by other nodes are not counted.
type RedisStore struct {
	client *redis.Client
	limits Limits
	desc   string
}

// IndexPrefix names the sets of keys this supervisor wrote per program.
const IndexPrefix = "aleph-vm-go:guest-cache-keys:"

// OpenRedis makes a client for the Redis that rawURL names (redis://,
// rediss:// or unix://). It connects lazily, as aleph-vm does: a Redis
// that is down answers 503 until it is back (Ping tells at start-up).
func OpenRedis(ctx context.Context, rawURL string, limits Limits) (*RedisStore, error) {
	opts, err := redis.ParseURL(rawURL)
	if err != nil {
		return nil, errkind.Wrap(errkind.InvalidInput, fmt.Errorf("guest cache: REDIS_URL: %w", err))
	}
	return &RedisStore{
		client: redis.NewClient(opts), limits: limits.withDefaults(),
		desc: fmt.Sprintf("redis %s://%s/%d", opts.Network, opts.Addr, opts.DB),
	}, nil
}

// Ping checks that the server answers.
func (s *RedisStore) Ping(ctx context.Context) error {
	if err := s.client.Ping(ctx).Err(); err != nil {
		return unavailable("PING", err)
	}
	return nil
}

// Describe names the server, without its password.
func (s *RedisStore) Describe() string { return s.desc }

// Close closes the connections.
func (s *RedisStore) Close() error { return s.client.Close() }

func dataKey(ns, key string) string { return ns + ":" + key }

func unavailable(op string, err error) error {
	return errkind.Wrap(errkind.Unavailable, fmt.Errorf("guest cache: redis %s: %w", op, err))
}

// Get reads `<hash>:<key>`.
func (s *RedisStore) Get(ctx context.Context, ns, key string) ([]byte, bool, error) {
	v, err := s.client.Get(ctx, dataKey(ns, key)).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, unavailable("GET", err)
	}
	return v, true, nil
}

// setScript: KEYS[1] the index set, KEYS[2] the data key; ARGV: the
// namespace prefix ("<hash>:"), the key, the value, the expiry in
// seconds, MaxKeys, MaxBytes (0 = no cap). Returns 1 when stored, or
// {-1, keys} / {-2, bytes} when a cap would be passed.
var setScript = redis.NewScript(`
local index, target = KEYS[1], KEYS[2]
local prefix, key, value = ARGV[1], ARGV[2], ARGV[3]
local ttl, maxKeys, maxBytes = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local keys, bytes, old, present = 0, 0, 0, false
for _, member in ipairs(redis.call('SMEMBERS', index)) do
	local name = prefix .. member
	if redis.call('EXISTS', name) == 1 then
		local n = redis.call('STRLEN', name)
		keys = keys + 1
		bytes = bytes + n
		if member == key then present, old = true, n end
	else
		redis.call('SREM', index, member)
	end
end
if not present and redis.call('EXISTS', target) == 1 then
	old = redis.call('STRLEN', target)
end
if not present and maxKeys > 0 and keys + 1 > maxKeys then return {-1, keys} end
if maxBytes > 0 and bytes - old + string.len(value) > maxBytes then return {-2, bytes - old} end
redis.call('SET', target, value, 'EX', ttl)
redis.call('SADD', index, key)
redis.call('EXPIRE', index, ttl)
return {1, 0}
`)

// Set writes `<hash>:<key>` with aleph-vm's expiry, within the caps.
func (s *RedisStore) Set(ctx context.Context, ns, key string, value []byte) error {
	l := s.limits
	ttl := int64(l.Expiry.Seconds())
	if ttl < 1 {
		ttl = 1
	}
	res, err := setScript.Run(ctx, s.client, []string{IndexPrefix + ns, dataKey(ns, key)},
		ns+":", key, value, ttl, l.MaxKeys, l.MaxBytes).Int64Slice()
	if err != nil {
		return unavailable("SET", err)
	}
	switch res[0] {
	case -1:
		return quotaError("cache quota exceeded: this program already has %d keys (at most %d)", res[1], l.MaxKeys)
	case -2:
		return quotaError("cache quota exceeded: %d bytes stored plus %d would pass the program's %d bytes", res[1], len(value), l.MaxBytes)
	}
	return nil
}

// Delete removes `<hash>:<key>` and answers DEL's count, as aleph-vm does.
func (s *RedisStore) Delete(ctx context.Context, ns, key string) (int, error) {
	var del *redis.IntCmd
	_, err := s.client.TxPipelined(ctx, func(p redis.Pipeliner) error {
		del = p.Del(ctx, dataKey(ns, key))
		p.SRem(ctx, IndexPrefix+ns, key)
		return nil
	})
	if err != nil {
		return 0, unavailable("DEL", err)
	}
	return int(del.Val()), nil
}

// Keys matches `<hash>:<pattern>` as aleph-vm's KEYS does, with SCAN so
// that a shared Redis is not blocked on a large keyspace.
func (s *RedisStore) Keys(ctx context.Context, ns, pattern string) ([]string, error) {
	prefix := ns + ":"
	var out []string
	iter := s.client.Scan(ctx, 0, prefix+pattern, 1000).Iterator()
	for iter.Next(ctx) {
		out = append(out, strings.TrimPrefix(iter.Val(), prefix))
	}
	if err := iter.Err(); err != nil {
		return nil, unavailable("SCAN", err)
	}
	slices.Sort(out)
	return append([]string{}, slices.Compact(out)...), nil
}

// Sweep has nothing to do: Redis expires entries itself, and the index
// sets are pruned at each write.
func (s *RedisStore) Sweep(context.Context) error { return nil }
