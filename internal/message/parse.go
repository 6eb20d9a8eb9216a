package message

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
)

// Item types of the envelope: where the content lives.
const (
	ItemInline  = "inline"
	ItemStorage = "storage"
	ItemIPFS    = "ipfs"
)

var knownTypes = map[Type]bool{
	TypeProgram: true, TypeInstance: true, TypeStore: true,
	TypeForget: true, TypePost: true, TypeAggregate: true,
}

// ParseOptions tunes Parse. The zero value is what the network path uses.
type ParseOptions struct {
	// AllowUnverified accepts item hashes that are placeholders (the
	// fixtures' "fake-hash-...") or that do not match item_content, and
	// then prefers `content` over `item_content`. Only for fixtures and the
	// fake-data mode: such a message proves nothing about where it came from.
	AllowUnverified bool
	// ExpectedHash, when set, is the hash the caller asked for: item_hash
	// must equal it, and a message without item_hash takes it.
	ExpectedHash string
}

// Parse decodes and checks a message envelope the way the network does.
// See ParseOptions.Parse.
func Parse(data []byte) (*Message, error) { return ParseOptions{}.Parse(data) }

// ParseUnverified is Parse with AllowUnverified, for fixtures and fake data.
func ParseUnverified(data []byte) (*Message, error) {
	return ParseOptions{AllowUnverified: true}.Parse(data)
}

// Parse decodes a message envelope. Unknown envelope fields (the API's
// `_id`, `confirmations`, ...) are ignored: only content is held to the
// strict schema. For an inline message, item_hash must be the hex sha256 of
// item_content, and the content is taken from item_content, the bytes that
// hash covers; a `content` sent alongside is ignored because the API may
// enrich it (STORE sizes) and it is not what was signed. For storage and
// ipfs messages the content is taken as sent: checking it means fetching
// the item, which is the sources' job. Content is only decoded by Program
// or Store. Errors are InvalidInput naming the field.
func (o ParseOptions) Parse(data []byte) (*Message, error) {
	if isNull(data) {
		return nil, invalid([]error{fieldErr("message", "empty")})
	}
	var m Message
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, invalid([]error{jsonErr("", err)})
	}
	var errs []error
	add := func(field, problem string) { errs = append(errs, fieldErr(field, problem)) }

	switch {
	case m.Type == "":
		add("type", "required")
	case !knownTypes[m.Type]:
		add("type", fmt.Sprintf("unknown message type %s", quoteShort(string(m.Type))))
	}
	if m.HashType != "" && m.HashType != "sha256" {
		add("hash_type", fmt.Sprintf("must be sha256, got %s", quoteShort(m.HashType)))
	}
	if m.ItemType == "" && m.ItemContent != "" {
		m.ItemType = ItemInline
	}
	switch m.ItemType {
	case "", ItemInline, ItemStorage, ItemIPFS:
	default:
		add("item_type", fmt.Sprintf("must be inline, storage or ipfs, got %s", quoteShort(m.ItemType)))
	}
	if m.ItemContent != "" && m.ItemType != ItemInline {
		add("item_content", "only allowed when item_type is inline")
	}

	if o.ExpectedHash != "" {
		switch {
		case m.ItemHash == "":
			m.ItemHash = o.ExpectedHash
		case m.ItemHash != o.ExpectedHash:
			add("item_hash", fmt.Sprintf("is %s, expected %s", quoteShort(m.ItemHash), quoteShort(o.ExpectedHash)))
		}
	}
	if m.ItemHash != "" && !o.AllowUnverified {
		if p := itemHashProblem(m.ItemHash); p != "" {
			add("item_hash", fmt.Sprintf("invalid item hash %s: %s", quoteShort(m.ItemHash), p))
		}
	}

	content, problems := o.pickContent(&m)
	errs = append(errs, problems...)
	if len(errs) > 0 {
		return nil, invalid(errs)
	}
	m.Content = content
	return &m, nil
}

// pickContent decides which JSON is the message's content and checks that
// inline content hashes to item_hash.
func (o ParseOptions) pickContent(m *Message) (json.RawMessage, []error) {
	hasContent := !isNull(m.Content)
	if m.ItemContent == "" {
		if m.ItemType == ItemInline && !o.AllowUnverified {
			// Without item_content nothing ties the content to item_hash,
			// and the hash is how /vm/{ref} names a program.
			return nil, []error{fieldErr("item_content", "required for an inline message: it is what item_hash covers")}
		}
		if !hasContent {
			return nil, []error{fieldErr("content", "missing (and no item_content)")}
		}
		if !isObject(m.Content) {
			return nil, []error{fieldErr("content", "must be a JSON object")}
		}
		return m.Content, nil
	}

	var errs []error
	sum := sha256.Sum256([]byte(m.ItemContent))
	digest := hex.EncodeToString(sum[:])
	switch {
	case m.ItemHash == "":
		m.ItemHash = digest
	case m.ItemHash != digest && !o.AllowUnverified && IsItemHash(m.ItemHash):
		// A malformed item_hash was reported already; one error is enough.
		errs = append(errs, fieldErr("item_hash", fmt.Sprintf(
			"%s does not match sha256(item_content) = %s", quoteShort(m.ItemHash), digest)))
	}
	if !isObject([]byte(m.ItemContent)) {
		return nil, append(errs, fieldErr("item_content", "must be a JSON object"))
	}
	if o.AllowUnverified && hasContent {
		if !isObject(m.Content) {
			return nil, append(errs, fieldErr("content", "must be a JSON object"))
		}
		return m.Content, errs
	}
	return json.RawMessage(m.ItemContent), errs
}

func isObject(raw []byte) bool {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || raw[0] != '{' {
		return false
	}
	return json.Valid(raw)
}

// Store decodes the content of a STORE message: the pointer from a code,
// runtime, data or volume ref to the file itself. Decoding is lenient, as
// in the reference (STORE content allows extra fields, and the API adds
// some), but item_type and item_hash must agree.
func (m *Message) Store() (*StoreContent, error) {
	if m.Type != TypeStore {
		return nil, errkind.New(errkind.InvalidInput,
			"message %s is %s %s, not a STORE", quoteShort(m.ItemHash), article(string(m.Type)), quoteIfOdd(string(m.Type)))
	}
	if isNull(m.Content) {
		return nil, invalid([]error{fieldErr("content", "missing")})
	}
	var s StoreContent
	if err := json.Unmarshal(m.Content, &s); err != nil {
		return nil, invalid([]error{jsonErr("content", err)})
	}
	var errs []error
	switch s.ItemType {
	case ItemStorage:
		// Storage files are fetched by, and checked against, their sha256.
		if len(s.ItemHash) != sha256HexLen || !isLowerHex(s.ItemHash) {
			errs = append(errs, fieldErr("content.item_hash",
				fmt.Sprintf("must be a lowercase sha256 hex digest for item_type storage, got %s", quoteShort(s.ItemHash))))
		}
	case ItemIPFS:
		if p := itemHashProblem(s.ItemHash); p != "" || len(s.ItemHash) == sha256HexLen && isLowerHex(s.ItemHash) {
			errs = append(errs, fieldErr("content.item_hash",
				fmt.Sprintf("must be an IPFS CID for item_type ipfs, got %s", quoteShort(s.ItemHash))))
		}
	default:
		errs = append(errs, fieldErr("content.item_type",
			fmt.Sprintf("must be storage or ipfs, got %s", quoteShort(s.ItemType))))
	}
	if s.Size < 0 {
		errs = append(errs, fieldErr("content.size", "must not be negative"))
	}
	if err := invalid(errs); err != nil {
		return nil, err
	}
	return &s, nil
}

// InlineMessage builds an unsigned inline message whose item_content is the
// compact JSON of content and whose item_hash is its sha256, as the local
// program store needs for the STORE and PROGRAM messages it creates.
// PROGRAM and STORE content is decoded back and validated, so a message
// this returns is one Parse and Program (or Store) accept.
func InlineMessage(typ Type, content any, sender string, at time.Time) (*Message, error) {
	if !knownTypes[typ] {
		return nil, errkind.New(errkind.InvalidInput, "unknown message type %s", quoteShort(string(typ)))
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	// HTML escaping would only make the stored content harder to read.
	enc.SetEscapeHTML(false)
	if err := enc.Encode(content); err != nil {
		return nil, errkind.Wrap(errkind.InvalidInput, fmt.Errorf("encode %s content: %w", typ, err))
	}
	item := bytes.TrimRight(buf.Bytes(), "\n")
	if !isObject(item) {
		return nil, errkind.New(errkind.InvalidInput, "%s content must encode to a JSON object", typ)
	}
	sum := sha256.Sum256(item)
	m := &Message{
		ItemHash:    hex.EncodeToString(sum[:]),
		Type:        typ,
		Sender:      sender,
		ItemType:    ItemInline,
		ItemContent: string(item),
		Time:        float64(at.UnixNano()) / 1e9,
		Content:     json.RawMessage(item),
	}
	switch typ {
	case TypeProgram:
		if _, err := m.Program(); err != nil {
			return nil, fmt.Errorf("build PROGRAM message: %w", err)
		}
	case TypeStore:
		if _, err := m.Store(); err != nil {
			return nil, fmt.Errorf("build STORE message: %w", err)
		}
	}
	return m, nil
}
