package ownerauth

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey"
)

// AllocationScheme names the scheduler's signed requests, aleph-vm's Aleph-EIP191-V1 scheme
// (orchestrator/views/allocation_auth.py):
//
//	Authorization: Aleph-EIP191-V1 sig=<hex>,payload=<hex>
//
// payload is the hex of a JSON object with the request's method, path,
// body_sha256 (lower-case hex) and iat (integer Unix seconds); sig is the
// Ethereum personal_sign (EIP-191) signature of those payload bytes, as
// they are. The scheme name is case-insensitive (RFC 7235); sig and
// payload may carry 0x; any other parameter is refused.
const AllocationScheme = "Aleph-EIP191-V1"

// MaxSignedAllocationBody bounds a signed request's body: its
// Content-Length must be given and below it (aiohttp refuses 1 MiB or
// more, and upstream's verifier turns that refusal into a 401).
const MaxSignedAllocationBody = 1 << 20

// DefaultAllocationMaxAge is upstream's ALLOCATION_SIGNATURE_MAX_AGE_SECONDS.
const DefaultAllocationMaxAge = 300 * time.Second

// AllocationVerifier checks Aleph-EIP191-V1 requests. Every refusal is an
// errkind.Unauthorized error whose text says why (for the log); upstream
// answers them all alike.
type AllocationVerifier struct {
	// Signers returns the authorized addresses (any case).
	Signers func(ctx context.Context) []string
	// MaxAge is how far iat may be from now, either way
	// (DefaultAllocationMaxAge when zero).
	MaxAge time.Duration
	// Now is the clock (time.Now when nil).
	Now func() time.Time
	// Replays refuses a second use of the same payload by the same
	// signer while its iat is in the window; nil remembers nothing.
	Replays *Replays
}

// allocationParams are the auth-params the scheme has; any other is
// refused, so that nothing is accepted without being bound.
var allocationParams = []string{"payload", "sig"}

// ParseAllocationAuth splits "Aleph-EIP191-V1 sig=…,payload=…" into its
// parameters, as upstream's _parse_auth_params does.
func ParseAllocationAuth(header string) (map[string]string, error) {
	scheme, rest, _ := strings.Cut(header, " ")
	if !strings.EqualFold(scheme, AllocationScheme) {
		return nil, fmt.Errorf("unsupported auth scheme %q", scheme)
	}
	rest = strings.TrimSpace(rest)
	if rest == "" {
		return nil, errors.New("auth header has no parameters")
	}
	params := map[string]string{}
	for _, pair := range strings.Split(rest, ",") {
		key, value, ok := strings.Cut(strings.TrimSpace(pair), "=")
		if !ok || value == "" {
			return nil, fmt.Errorf("malformed auth-param %q", pair)
		}
		params[key] = value
	}
	for _, k := range allocationParams {
		if _, ok := params[k]; !ok {
			return nil, fmt.Errorf("missing required auth-param %q", k)
		}
	}
	for k := range params {
		if !slices.Contains(allocationParams, k) {
			return nil, fmt.Errorf("unknown auth-param %q", k)
		}
	}
	return params, nil
}

// jsonInteger is a JSON number without fraction or exponent: Python's
// json gives an int for it and a float for anything else.
var jsonInteger = regexp.MustCompile(`^-?(0|[1-9][0-9]*)$`)

// Allocation authenticates r, whose Authorization header is in the
// scheme, and returns the signer (lower case) and the body, which it has
// read (r.Body is consumed). Checks follow upstream's order: the header
// and payload, then the time, method, path and absence of a query, then
// the signer, then the body's length and hash, and last the replay set,
// so that only a request that passed everything is remembered.
func (v AllocationVerifier) Allocation(ctx context.Context, r *http.Request) (signer string, body []byte, err error) {
	a, err := readAllocationAuth(r.Header.Get("Authorization"))
	if err != nil {
		return "", nil, err
	}
	iat, method, path := a.iat, a.method, a.path

	now := time.Now
	if v.Now != nil {
		now = v.Now
	}
	maxAge := v.MaxAge
	if maxAge <= 0 {
		maxAge = DefaultAllocationMaxAge
	}
	t := now()
	nowSeconds := float64(t.UnixNano()) / 1e9
	switch {
	case math.Abs(float64(iat)-nowSeconds) > maxAge.Seconds():
		return "", nil, refused("iat %d is more than %v from now", iat, maxAge)
	case method != r.Method || path != r.URL.Path:
		return "", nil, refused("payload signs %q %q, not this request", method, path)
	case r.URL.RawQuery != "":
		return "", nil, refused("a signed request may not carry a query string")
	}

	sig, err := hex.DecodeString(strings.TrimPrefix(a.sig, "0x"))
	if err != nil || len(sig) != 65 {
		return "", nil, malformed(fmt.Errorf("sig is not 65 bytes of hex (%d)", len(sig)))
	}
	if rv := sig[64]; rv >= 35 {
		// EIP-155's chain-encoded v, which eth_account's recovery also
		// takes: its parity is the recovery id.
		sig[64] = 27 + (rv-35)%2
	}
	addr, err := nodekey.RecoverPersonal(a.payload, hex.EncodeToString(sig))
	if err != nil {
		return "", nil, malformed(err)
	}
	signer = strings.ToLower(addr)
	var signers []string
	if v.Signers != nil {
		signers = v.Signers(ctx)
	}
	if !slices.ContainsFunc(signers, func(s string) bool { return strings.EqualFold(s, signer) }) {
		return "", nil, refused("signer %s is not authorized", addr)
	}

	// No Content-Length (chunked, or none at all: aiohttp's
	// content_length is then None) is refused, as upstream does.
	if _, given := r.Header["Content-Length"]; !given || r.ContentLength < 0 || r.ContentLength >= MaxSignedAllocationBody {
		return "", nil, refused("body length %d is not below %d", r.ContentLength, MaxSignedAllocationBody)
	}
	body, err = io.ReadAll(io.LimitReader(r.Body, r.ContentLength))
	if err != nil {
		return "", nil, fmt.Errorf("reading the signed body: %w", err)
	}
	sum := sha256.Sum256(body)
	if hex.EncodeToString(sum[:]) != a.bodyHash {
		return "", nil, refused("body does not match body_sha256")
	}

	opHash := sha256.Sum256(a.payload)
	expires := time.Unix(iat, 0).Add(maxAge).Add(time.Nanosecond)
	if err := v.Replays.use([]byte(signer), opHash[:], expires, t); err != nil {
		if errkind.Is(err, errkind.Unauthorized) {
			return "", nil, refused("payload already used by %s", addr)
		}
		return "", nil, err
	}
	return signer, body, nil
}

// allocationAuth is a parsed Authorization header: the signed payload as
// sent and the fields read from it.
type allocationAuth struct {
	payload                []byte
	sig                    string
	method, path, bodyHash string
	iat                    int64
}

// readAllocationAuth parses the header and its payload: every field
// present, iat a JSON integer. A field of another type than a string
// reads as "" and so matches nothing, as it compares unequal upstream.
func readAllocationAuth(header string) (allocationAuth, error) {
	var a allocationAuth
	params, err := ParseAllocationAuth(header)
	if err != nil {
		return a, malformed(err)
	}
	a.sig = params["sig"]
	a.payload, err = hex.DecodeString(strings.TrimPrefix(params["payload"], "0x"))
	if err != nil {
		return a, malformed(fmt.Errorf("payload is not hex: %w", err))
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(a.payload, &fields); err != nil {
		return a, malformed(fmt.Errorf("payload is not a JSON object: %w", err))
	}
	for _, f := range []string{"method", "path", "body_sha256", "iat"} {
		if _, ok := fields[f]; !ok {
			return a, malformed(fmt.Errorf("missing payload field %q", f))
		}
	}
	iatRaw := string(bytes.TrimSpace(fields["iat"]))
	if !jsonInteger.MatchString(iatRaw) {
		return a, malformed(fmt.Errorf("iat must be a JSON integer, got %s", iatRaw))
	}
	if a.iat, err = strconv.ParseInt(iatRaw, 10, 64); err != nil {
		// Beyond int64 is centuries away: stale.
		return a, refused("iat %s out of the window", iatRaw)
	}
	_ = json.Unmarshal(fields["method"], &a.method)
	_ = json.Unmarshal(fields["path"], &a.path)
	_ = json.Unmarshal(fields["body_sha256"], &a.bodyHash)
	return a, nil
}

// ErrMalformedAllocationAuth marks refusals of a header or payload that
// could not be read (upstream logs those at WARNING), as opposed to a
// well-formed request that is stale, misdirected, foreign or replayed.
var ErrMalformedAllocationAuth = errors.New("malformed Aleph-EIP191-V1 request")

func malformed(err error) error {
	return errkind.Wrap(errkind.Unauthorized, fmt.Errorf("%w: %w", ErrMalformedAllocationAuth, err))
}

func refused(format string, args ...any) error {
	return errkind.New(errkind.Unauthorized, format, args...)
}

// SignAllocation is the Authorization header value that key gives a
// request of method to path with body at iat, as aleph's scheduler makes
// it: the payload is json.dumps(…, sort_keys=True, separators=(",", ":")).
func SignAllocation(key *nodekey.Key, method, path string, body []byte, iat int64) string {
	return SignAllocationPayload(key, AllocationPayload(method, path, body, iat))
}

// AllocationPayload is the payload SignAllocation signs.
func AllocationPayload(method, path string, body []byte, iat int64) []byte {
	sum := sha256.Sum256(body)
	m := map[string]any{"method": method, "path": path, "body_sha256": hex.EncodeToString(sum[:]), "iat": iat}
	b, _ := json.Marshal(m) // encoding/json sorts map keys and adds no spaces
	return b
}

// SignAllocationPayload signs payload as it is, for tests that need a
// payload the scheduler would not make.
func SignAllocationPayload(key *nodekey.Key, payload []byte) string {
	return AllocationScheme + " sig=" + strings.TrimPrefix(key.SignPersonal(payload), "0x") + ",payload=" + hex.EncodeToString(payload)
}
