package guestapi

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey"
)

// proxy relays a GET, HEAD or OPTIONS request to the Aleph API as
// aleph-vm's guest API does (guest_api/__main__.py:40-49): same method,
// path and query, no request headers or body; the answer's status, body
// and media type only. Compressed bodies are decoded, as aiohttp's client
// does; redirects are followed only within the API's host (aiohttp follows
// any), others relayed as they are. An unreachable API is aiohttp's 500.
func (g *guestAPI) proxy(w http.ResponseWriter, r *http.Request) {
	if g.apiServer == "" {
		writeTrouble(w)
		return
	}
	// tail.lstrip("/"), and the query even when empty ("?" always).
	url := g.apiServer + "/" + strings.TrimLeft(r.URL.EscapedPath(), "/") + "?" + r.URL.RawQuery
	req, err := http.NewRequestWithContext(r.Context(), r.Method, url, nil)
	if err != nil {
		writeTrouble(w)
		return
	}
	resp, err := g.client.Do(req)
	if err != nil {
		g.log.Debug("guest API: Aleph API unreachable", "program", g.o.Program.Hash, "err", err)
		writeTrouble(w)
		return
	}
	defer resp.Body.Close()
	w.Header().Set("Content-Type", mediaType(resp.Header.Get("Content-Type")))
	w.WriteHeader(resp.StatusCode)
	// Streamed rather than read whole as aleph-vm does: the program sees
	// the same bytes and the supervisor holds none of them.
	_, _ = io.Copy(w, resp.Body)
}

// mediaType is aiohttp's ClientResponse.content_type (Python's email
// get_content_type): the lower-cased value before any parameter,
// application/octet-stream without a header, text/plain when it is not
// one type/subtype.
func mediaType(header string) string {
	if header == "" {
		return "application/octet-stream"
	}
	mt, _, _ := strings.Cut(header, ";")
	mt = strings.ToLower(strings.TrimSpace(mt))
	if strings.Count(mt, "/") != 1 {
		return "text/plain"
	}
	return mt
}

// repost is aleph-vm's pubsub publication (guest_api/__main__.py:52-73
// with vm_connector/main.py:155-178): the program's message becomes a
// POST by the node, its content's address replaced by "VM on executor",
// signed with the node's key and sent to the Aleph API's
// POST /api/v0/messages, as the connector's SDK (create_post) does. The
// answer is the connector's: {"status":"success"}, or FastAPI's plain 500
// when the message lacks what the connector reads or the API refuses it.
func (g *guestAPI) repost(w http.ResponseWriter, r *http.Request) {
	body, ok := readBody(w, r, DefaultMaxValueSize)
	if !ok {
		return
	}
	// The guest API's part: what it cannot read is aiohttp's 500.
	req, err := parseObject(body)
	var data string
	if err == nil {
		if _, ok := req.get("topic"); !ok {
			err = errors.New("no topic")
		} else if raw, ok := req.get("data"); !ok {
			err = errors.New("no data")
		} else {
			err = json.Unmarshal(raw, &data)
		}
	}
	var msg, content object
	if err == nil {
		if msg, err = parseObject([]byte(data)); err == nil {
			var ic string
			if raw, ok := msg.get("item_content"); !ok {
				err = errors.New("no item_content")
			} else if err = json.Unmarshal(raw, &ic); err == nil {
				content, err = parseObject([]byte(ic))
			}
		}
	}
	if err != nil {
		g.log.Debug("guest API pubsub: unreadable message", "program", g.o.Program.Hash, "err", err)
		writeTrouble(w)
		return
	}
	if g.o.Signer == nil || g.apiServer == "" {
		writeTrouble(w) // no connector to forward to
		return
	}
	if retry, err := g.o.Publications.take(g.o.Program.Hash); err != nil {
		g.refuse(w, r, err, retry)
		return
	}
	if err := g.publishPost(r.Context(), msg, content); err != nil {
		g.log.Debug("guest API pubsub: not published", "program", g.o.Program.Hash, "err", err)
		writeRelayed(w, http.StatusInternalServerError, "text/plain", []byte("Internal Server Error"))
		return
	}
	writeRelayed(w, http.StatusOK, "application/json", []byte(`{"status":"success"}`))
}

// maxInlineSize is the SDK's MAX_INLINE_SIZE: larger contents go to
// storage first, which this node does not do.
const maxInlineSize = 50_000

// publishPost is the connector's create_post: the POST content (address,
// time, content, type; null content left out as exclude_none does) inline,
// hashed, signed, and broadcast without waiting (sync false).
func (g *guestAPI) publishPost(ctx context.Context, msg, content object) error {
	channel, ok := msg.get("channel")
	if !ok {
		return errors.New("no channel")
	}
	postType, ok := content.get("type")
	var typeText string
	if !ok || json.Unmarshal(postType, &typeText) != nil {
		return errors.New("content type is not a string") // PostContent refuses it
	}
	inner, ok := content.get("content")
	if !ok {
		return errors.New("no content in content")
	}
	now := pyFloat(float64(time.Now().UnixMicro()) / 1e6)
	var ic bytes.Buffer
	ic.WriteString(`{"address":"VM on executor","time":` + now)
	if string(bytes.TrimSpace(inner)) != "null" {
		ic.WriteString(`,"content":`)
		if err := pyJSON(&ic, inner, true); err != nil {
			return err
		}
	}
	ic.WriteString(`,"type":`)
	if err := pyJSON(&ic, postType, true); err != nil {
		return err
	}
	ic.WriteByte('}')
	if ic.Len() >= maxInlineSize {
		return fmt.Errorf("content of %d bytes is too large to inline", ic.Len())
	}
	sum := sha256.Sum256(ic.Bytes())
	itemHash := hex.EncodeToString(sum[:])
	k := g.o.Signer
	sig := k.SignPersonal(nodekey.VerificationBuffer(nodekey.Chain, k.Address(), "POST", itemHash))
	var chanJSON bytes.Buffer
	if err := pyJSON(&chanJSON, channel, false); err != nil {
		return err
	}
	out := object{
		{"sender", quote(k.Address())}, {"chain", quote(nodekey.Chain)}, {"signature", quote(sig)},
		{"type", quote("POST")}, {"item_type", quote("inline")}, {"item_content", quote(ic.String())},
		{"item_hash", quote(itemHash)}, {"time", json.RawMessage(now)}, {"channel", chanJSON.Bytes()},
	}
	m, err := out.encode()
	if err != nil {
		return err
	}
	body := append(append([]byte(`{"sync":false,"message":`), m...), '}')
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, g.apiServer+"/api/v0/messages", bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := g.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusAccepted {
		return fmt.Errorf("the Aleph API answered %s", resp.Status)
	}
	g.log.Info("guest API published a POST for a program", "program", g.o.Program.Hash, "item_hash", itemHash, "signer", k)
	return nil
}
