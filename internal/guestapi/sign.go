package guestapi

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey"
)

// properties answers as aleph-vm's VM connector does behind its guest API
// (vm_connector/main.py:181-192, relayed by guest_api/__main__.py:80-88):
// FastAPI's compact JSON, relayed as plain "application/json".
func (g *guestAPI) properties(w http.ResponseWriter, r *http.Request) {
	k := g.o.Signer
	if k == nil {
		writeTrouble(w)
		return
	}
	var b bytes.Buffer
	b.WriteString(`{"chain":`)
	writePyString(&b, nodekey.Chain)
	b.WriteString(`,"curve":`)
	writePyString(&b, nodekey.Curve)
	b.WriteString(`,"address":`)
	writePyString(&b, k.Address())
	b.WriteString(`,"public_key":`)
	writePyString(&b, k.PublicKey())
	b.WriteByte('}')
	writeRelayed(w, http.StatusOK, "application/json", b.Bytes())
}

// sign signs a message for the program with the node's key, with
// aleph-vm's two checks: the guest API's (guest_api/__main__.py:91-98:
// the message's content must name the program's item hash as its
// address, else 400) and the connector's (aleph SDK
// BaseAccount._setup_sender: an empty sender becomes the node's address,
// another sender is refused). Malformed requests get aiohttp's or
// FastAPI's 500, as they do upstream.
//
// Past aleph-vm: the signature covers item_hash, not the content whose
// address was checked, so the message must be inline with item_hash the
// sha256 of item_content (else 400 for another item type, 403 for a hash
// that is not the content's: a signature for someone else's message); and
// signatures are rate-limited (429).
func (g *guestAPI) sign(w http.ResponseWriter, r *http.Request) {
	k := g.o.Signer
	body, ok := readBody(w, r, DefaultMaxValueSize)
	if !ok {
		return
	}
	msg, err := parseObject(body)
	if err != nil {
		g.log.Debug("guest API /sign: not a JSON object", "program", g.o.Program.Hash, "err", err)
		writeTrouble(w)
		return
	}
	switch address, err := contentAddress(msg); {
	case err != nil:
		g.log.Debug("guest API /sign: bad item_content", "program", g.o.Program.Hash, "err", err)
		writeTrouble(w)
		return
	case address != namespace(g.o.Program.Hash):
		writeText(w, http.StatusBadRequest, "400: Message address does not match VM item_hash")
		return
	}
	if err := checkItemHash(msg); err != nil {
		g.refuse(w, r, err, 0)
		return
	}
	if k == nil {
		writeTrouble(w)
		return
	}
	if retry, err := g.o.Publications.take(g.o.Program.Hash); err != nil {
		g.refuse(w, r, err, retry)
		return
	}
	signed, err := signMessage(k, msg)
	var out []byte
	if err == nil {
		out, err = signed.encode()
	}
	if err != nil {
		g.log.Debug("guest API /sign refused", "program", g.o.Program.Hash, "err", err)
		// FastAPI's answer to the connector's exception, relayed.
		writeRelayed(w, http.StatusInternalServerError, "text/plain", []byte("Internal Server Error"))
		return
	}
	g.log.Debug("guest API signed a message", "program", g.o.Program.Hash, "signer", k)
	writeRelayed(w, http.StatusOK, "application/json", out)
}

// checkItemHash refuses a message whose signature would not cover the
// content that was checked: item_type must be "inline" (400) and
// item_hash the hex sha256 of item_content (403). item_content was read
// as a string by contentAddress already.
func checkItemHash(msg object) error {
	var itemType, itemHash, content string
	raw, ok := msg.get("item_type")
	if !ok || json.Unmarshal(raw, &itemType) != nil || itemType != "inline" {
		return errkind.New(errkind.InvalidInput, `only inline messages can be signed (item_type "inline")`)
	}
	raw, _ = msg.get("item_content")
	if json.Unmarshal(raw, &content) != nil {
		return errkind.New(errkind.InvalidInput, "item_content is not a string")
	}
	raw, ok = msg.get("item_hash")
	if !ok || json.Unmarshal(raw, &itemHash) != nil {
		return errkind.New(errkind.InvalidInput, "item_hash is not a string")
	}
	sum := sha256.Sum256([]byte(content))
	if itemHash != hex.EncodeToString(sum[:]) {
		return errkind.New(errkind.Forbidden, "item_hash is not the sha256 of item_content: the node signs only the program's own content")
	}
	return nil
}

// contentAddress is the address in the message's item_content, or an
// error where aleph-vm's guest API would raise (not a string, not JSON,
// no address). A non-string address is returned as its JSON text, which
// never equals an item hash.
func contentAddress(msg object) (string, error) {
	raw, ok := msg.get("item_content")
	if !ok {
		return "", errors.New("no item_content")
	}
	var text string
	if err := json.Unmarshal(raw, &text); err != nil {
		return "", fmt.Errorf("item_content is not a string: %w", err)
	}
	content, err := parseObject([]byte(text))
	if err != nil {
		return "", fmt.Errorf("item_content: %w", err)
	}
	addr, ok := content.get("address")
	if !ok {
		return "", errors.New("item_content has no address")
	}
	var s string
	if json.Unmarshal(addr, &s) != nil {
		return string(addr), nil
	}
	return s, nil
}

// signMessage does what the connector's ETHAccount.sign_message does:
// set or check the sender, sign the verification buffer, add signature.
func signMessage(k *nodekey.Key, msg object) (object, error) {
	sender, present := msg.get("sender")
	if !present || isFalsy(sender) {
		msg.set("sender", quote(k.Address()))
	} else {
		var s string
		if json.Unmarshal(sender, &s) != nil || s != k.Address() {
			return nil, errors.New("message sender does not match the node's address")
		}
	}
	var fields [4]string
	for i, name := range []string{"chain", "sender", "type", "item_hash"} {
		raw, ok := msg.get(name)
		if !ok {
			return nil, fmt.Errorf("message has no %s", name)
		}
		if err := json.Unmarshal(raw, &fields[i]); err != nil {
			return nil, fmt.Errorf("message %s is not a string", name)
		}
	}
	sig := k.SignPersonal(nodekey.VerificationBuffer(fields[0], fields[1], fields[2], fields[3]))
	msg.set("signature", quote(sig))
	return msg, nil
}

// isFalsy is Python's truth test on a JSON value.
func isFalsy(raw json.RawMessage) bool {
	switch s := strings.TrimSpace(string(raw)); s {
	case "null", "false", `""`, "[]", "{}", "0":
		return true
	default:
		var f float64
		if json.Unmarshal(raw, &f) == nil && f == 0 {
			return true
		}
		var v any
		if json.Unmarshal(raw, &v) == nil {
			switch v := v.(type) {
			case string:
				return v == ""
			case []any:
				return len(v) == 0
			case map[string]any:
				return len(v) == 0
			}
		}
		return false
	}
}

// readBody reads a request body of at most limit bytes, answering 413 in
// aiohttp's words beyond it.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, bool) {
	tooLarge := func(actual int64) {
		writeText(w, http.StatusRequestEntityTooLarge,
			fmt.Sprintf("Maximum request body size %d exceeded, actual body size %d", limit+1, actual))
	}
	if r.ContentLength > limit {
		tooLarge(r.ContentLength)
		return nil, false
	}
	b, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		tooLarge(int64(len(b)) + 1)
		return nil, false
	}
	if err != nil {
		writeTrouble(w)
		return nil, false
	}
	return b, true
}

// writeRelayed answers as aiohttp's web.Response(body=..., content_type=X)
// does when aleph-vm relays an upstream answer: the media type alone.
func writeRelayed(w http.ResponseWriter, code int, contentType string, body []byte) {
	w.Header().Set("Content-Type", contentType)
	w.WriteHeader(code)
	_, _ = w.Write(body)
}

// object is a JSON object that keeps its keys' order, as Python's dict
// does, so a signed message comes back in the order it was sent.
type object []member

type member struct {
	key   string
	value json.RawMessage
}

// parseObject decodes a JSON object; a repeated key keeps its first place
// and its last value, as json.loads does.
func parseObject(b []byte) (object, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return nil, errors.New("not a JSON object")
	}
	var o object
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, _ := t.(string)
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, err
		}
		o.set(key, v)
	}
	if _, err := dec.Token(); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("data after the JSON object")
	}
	return o, nil
}

func (o object) get(key string) (json.RawMessage, bool) {
	for _, m := range o {
		if m.key == key {
			return m.value, true
		}
	}
	return nil, false
}

func (o *object) set(key string, v json.RawMessage) {
	for i := range *o {
		if (*o)[i].key == key {
			(*o)[i].value = v
			return
		}
	}
	*o = append(*o, member{key, v})
}

// encode writes the object as FastAPI's JSONResponse does: no spaces,
// non-ASCII unescaped, values as Python re-encodes them.
func (o object) encode() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, m := range o {
		if i > 0 {
			b.WriteByte(',')
		}
		writePyString(&b, m.key)
		b.WriteByte(':')
		if err := pyJSON(&b, m.value, false); err != nil {
			return nil, err
		}
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

func quote(s string) json.RawMessage {
	var b bytes.Buffer
	writePyString(&b, s)
	return b.Bytes()
}

// writePyString encodes s as Python's json.dumps(ensure_ascii=False).
func writePyString(b *bytes.Buffer, s string) { writePyStr(b, s, false) }
