package guestapi

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey"
)

// Upstream references: aleph-vm src/aleph/vm/guest_api/__main__.py
// (guest_api below) and vm_connector/main.py (connector below), at
// aleph-vm 6da21a3a.

// testKey is the key whose address, public key and signature were
// computed independently with ethers (internal/nodekey TestKnownVector).
func testKey(t *testing.T) *nodekey.Key {
	t.Helper()
	b, _ := hex.DecodeString("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
	k, err := nodekey.New(b)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

const (
	testAddress = "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"
	testVMHash  = "4a14c1b9c5d4a0a2b0b27a5e0ef4e0d0c1f1e7e0e2a0b8b1b2a8d9d9f9e9a9b9"
	// aiohttp's answer to an unhandled exception in a handler.
	trouble = "500 Internal Server Error\n\nServer got itself in trouble"
)

func TestProperties(t *testing.T) {
	h := New(Options{Program: Program{Hash: testVMHash}, Signer: testKey(t)})
	// connector:181-192 returns chain, curve, address, public_key in that
	// order (FastAPI's compact JSON); guest_api:84-88 relays body and
	// media type. ETHAccount.CHAIN/CURVE and get_public_key (compressed)
	// come from the aleph SDK (chains/ethereum.py, chains/common.py).
	do(t, h, "GET", "/properties", nil).is(t, "properties", 200, "application/json",
		`{"chain":"ETH","curve":"secp256k1","address":"`+testAddress+`","public_key":"0x024e3b81af9c2234cad09d679ce6035ed1392347ce64ce405f5dcd36228a25de6e"}`)
	// Without a signer aleph-vm cannot reach its connector: aiohttp's 500.
	do(t, New(Options{}), "GET", "/properties", nil).is(t, "no signer", 500, textType, trouble)
}

// signRequest is a message for address's content, inline with its true
// item hash, as a program's SDK makes it.
func signRequest(address string, extra string) string {
	content, _ := json.Marshal(map[string]any{"address": address, "type": "test", "time": 1.5})
	ic, _ := json.Marshal(string(content))
	return `{"chain": "ETH", "type": "POST"` + extra + `, "item_hash": "` + sha256Hex(content) +
		`", "item_type": "inline", "item_content": ` + string(ic) + `, "channel": "TEST", "time": 1.5}`
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func TestSign(t *testing.T) {
	key := testKey(t)
	h := New(Options{Program: Program{Hash: testVMHash}, Signer: key})
	s := strings.NewReader
	content, _ := json.Marshal(map[string]any{"address": testVMHash, "type": "test", "time": 1.5})
	ic, _ := json.Marshal(string(content))
	itemHash := sha256Hex(content)
	// nodekey's TestKnownVector checks SignPersonal against ethers.
	sig := key.SignPersonal(nodekey.VerificationBuffer("ETH", testAddress, "POST", itemHash))

	// No sender: the connector's SDK (BaseAccount._setup_sender) adds the
	// node's address at the end, then signature (sign_message); FastAPI
	// returns the dict compact, in order (connector:195-204).
	r := do(t, h, "POST", "/sign", s(signRequest(testVMHash, "")))
	want := `{"chain":"ETH","type":"POST","item_hash":"` + itemHash + `","item_type":"inline","item_content":` +
		string(ic) + `,"channel":"TEST","time":1.5,"sender":"` + testAddress + `","signature":"` + sig + `"}`
	r.is(t, "sign", 200, "application/json", want)

	// The signature covers item_hash, not item_content: a hash that is not
	// the content's would have the node sign someone else's message (the
	// hash of another program's content), and only inline content can be
	// hashed here.
	other, _ := json.Marshal(map[string]any{"address": strings.Repeat("0", 64), "type": "test", "time": 1.5})
	forged := strings.Replace(signRequest(testVMHash, ""), itemHash, sha256Hex(other), 1)
	do(t, h, "POST", "/sign", s(forged)).is(t, "another content's hash", 403, textType,
		"403: item_hash is not the sha256 of item_content: the node signs only the program's own content")
	upper := strings.Replace(signRequest(testVMHash, ""), itemHash, strings.ToUpper(itemHash), 1)
	do(t, h, "POST", "/sign", s(upper)).is(t, "upper-case hash", 403, textType,
		"403: item_hash is not the sha256 of item_content: the node signs only the program's own content")
	for _, typ := range []string{`"storage"`, `"ipfs"`, `null`, `1`} {
		body := strings.Replace(signRequest(testVMHash, ""), `"item_type": "inline"`, `"item_type": `+typ, 1)
		do(t, h, "POST", "/sign", s(body)).is(t, "item_type "+typ, 400, textType,
			`400: only inline messages can be signed (item_type "inline")`)
	}
	noType := strings.Replace(signRequest(testVMHash, ""), `"item_type": "inline", `, "", 1)
	if r := do(t, h, "POST", "/sign", s(noType)); r.code != 400 {
		t.Errorf("no item_type: %+v", r)
	}

	// An empty sender is replaced where it stands; the node's own is kept.
	r = do(t, h, "POST", "/sign", s(signRequest(testVMHash, `, "sender": ""`)))
	if r.code != 200 || !strings.Contains(r.body, `"type":"POST","sender":"`+testAddress+`","item_hash"`) {
		t.Errorf("empty sender: %+v", r)
	}
	if r := do(t, h, "POST", "/sign", s(signRequest(testVMHash, `, "sender": "`+testAddress+`"`))); r.code != 200 || !strings.Contains(r.body, sig) {
		t.Errorf("node's sender: %+v", r)
	}

	// guest_api:96-98: the content's address must be the VM's item hash.
	for _, addr := range []string{testAddress, strings.ToUpper(testVMHash), ""} {
		do(t, h, "POST", "/sign", s(signRequest(addr, ""))).is(t, "address "+addr, 400, textType,
			"400: Message address does not match VM item_hash")
	}
	// Someone else as sender: the SDK raises ValueError, FastAPI answers
	// its plain 500, relayed with its media type (guest_api:104-110).
	for _, extra := range []string{`, "sender": "0x0000000000000000000000000000000000000001"`, `, "sender": "` + strings.ToLower(testAddress) + `"`} {
		do(t, h, "POST", "/sign", s(signRequest(testVMHash, extra))).is(t, "foreign sender", 500, "text/plain", "Internal Server Error")
	}
	// A message without the item hash the signature covers.
	noHash := strings.Replace(signRequest(testVMHash, ""), `"item_hash"`, `"hash"`, 1)
	do(t, h, "POST", "/sign", s(noHash)).is(t, "no item_hash", 400, textType, "400: item_hash is not a string")
	// Without a type, chain or sender the verification buffer cannot be made:
	// FastAPI's plain 500 as upstream.
	noChain := strings.Replace(signRequest(testVMHash, ""), `"chain": "ETH", `, "", 1)
	do(t, h, "POST", "/sign", s(noChain)).is(t, "no chain", 500, "text/plain", "Internal Server Error")

	// What guest_api:93-97 cannot read raises there: aiohttp's 500.
	for name, body := range map[string]string{
		"not JSON":                "{",
		"a list":                  `[1]`,
		"no item_content":         `{"chain": "ETH"}`,
		"item_content object":     `{"item_content": {"address": "` + testVMHash + `"}}`,
		"item_content not JSON":   `{"item_content": "x"}`,
		"content without address": `{"item_content": "{\"type\": \"x\"}"}`,
	} {
		do(t, h, "POST", "/sign", s(body)).is(t, name, 500, textType, trouble)
	}
	// request.json() reads at most aiohttp's client_max_size.
	big := `{"x": "` + strings.Repeat("v", DefaultMaxValueSize) + `"}`
	if r := do(t, h, "POST", "/sign", s(big)); r.code != 413 {
		t.Errorf("1 MiB message: %+v", r)
	}
	do(t, New(Options{Program: Program{Hash: testVMHash}}), "POST", "/sign", s(signRequest(testVMHash, ""))).
		is(t, "no signer", 500, textType, trouble)
	// A program without hash signs as "_" (guest_api:188).
	if r := do(t, New(Options{Signer: testKey(t)}), "POST", "/sign", s(signRequest("_", ""))); r.code != 200 {
		t.Errorf("no hash: %+v", r)
	}
}

// guest_api:190-203 registers GET /properties, POST /sign, GET /cache/,
// GET|PUT|DELETE /cache/{key}, GET|HEAD|OPTIONS /{tail:.*} and POST on
// the two pubsub paths; aiohttp answers any other method 405 with the
// sorted methods of every route matching the path.
func TestMethodNotAllowed(t *testing.T) {
	h := New(Options{Program: Program{Hash: "a"}, Cache: NewCache(testDisk(t), 0, nil), Signer: testKey(t)})
	for _, c := range []struct{ method, path, allow string }{
		{"POST", "/properties", "GET,HEAD,OPTIONS"},
		{"DELETE", "/sign", "GET,HEAD,OPTIONS,POST"},
		{"POST", "/cache/k", "DELETE,GET,HEAD,OPTIONS,PUT"},
		{"POST", "/cache/", "DELETE,GET,HEAD,OPTIONS,PUT"},
		{"PUT", "/api/v0/ipfs/pubsub/pub", "GET,HEAD,OPTIONS,POST"},
		{"POST", "/api/v0/messages", "GET,HEAD,OPTIONS"},
		{"PATCH", "/", "GET,HEAD,OPTIONS"},
	} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(c.method, c.path, strings.NewReader("{}")))
		got := reply{rec.Code, rec.Body.String(), rec.Header().Get("Content-Type")}
		got.is(t, c.method+" "+c.path, 405, textType, "405: Method Not Allowed")
		if a := rec.Header().Get("Allow"); a != c.allow {
			t.Errorf("%s %s: Allow %q, want %q", c.method, c.path, a, c.allow)
		}
	}
	// Pubsub publication needs aleph-vm's connector, which this node
	// does not run: the answer aleph-vm gives without one.
	do(t, h, "POST", "/api/v0/p2p/pubsub/pub", strings.NewReader(`{"topic":"t","data":"{}"}`)).is(t, "pubsub", 500, textType, trouble)
}

// The fake Aleph API records what reached it.
type seen struct {
	mu      sync.Mutex
	method  string
	uri     string
	headers http.Header
	body    string
}

func fakeAlephAPI(t *testing.T) (*httptest.Server, *seen) {
	var s seen
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		s.mu.Lock()
		s.method, s.uri, s.headers, s.body = r.Method, r.RequestURI, r.Header.Clone(), string(b)
		s.mu.Unlock()
		w.Header().Set("X-Upstream", "1")
		w.Header().Set("Content-Type", "application/JSON; charset=utf-8")
		w.WriteHeader(http.StatusTeapot)
		_, _ = io.WriteString(w, `{"messages": []}`)
	})
	mux.HandleFunc("/moved", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "/api/v0/info/public.json", http.StatusFound)
	})
	mux.HandleFunc("/gz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Encoding", "gzip")
		w.Header().Set("Content-Type", "text/plain")
		zw := gzip.NewWriter(w)
		_, _ = io.WriteString(zw, "unzipped")
		_ = zw.Close()
	})
	mux.HandleFunc("/bare", func(w http.ResponseWriter, r *http.Request) {
		w.Header()["Content-Type"] = nil
		_, _ = w.Write([]byte{0, 1, 2})
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv, &s
}

func TestProxy(t *testing.T) {
	api, saw := fakeAlephAPI(t)
	h := New(Options{Program: Program{Hash: "a"}, APIServer: api.URL + "/", Signer: testKey(t)})

	// guest_api:40-49: same method, path (leading slashes dropped) and
	// query, always with "?"; no headers or body of the program's; the
	// answer's status, body and media type only.
	for _, c := range []struct{ method, path, uri, body string }{
		{"GET", "/api/v0/messages.json?hashes=x&y=1", "/api/v0/messages.json?hashes=x&y=1", `{"messages": []}`},
		{"GET", "/sign", "/sign?", `{"messages": []}`},       // GET /sign is not the signing route
		{"GET", "/cache/k", "/cache/k?", `{"messages": []}`}, // no cache configured
		{"GET", "//api/x", "/api/x?", `{"messages": []}`},
		{"OPTIONS", "/api/v0/x", "/api/v0/x?", `{"messages": []}`},
		{"HEAD", "/api/v0/x", "/api/v0/x?", ""},
	} {
		req := httptest.NewRequest(c.method, c.path, strings.NewReader("program body"))
		req.Header.Set("Authorization", "Bearer program")
		req.Header.Set("X-Program", "1")
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		got := reply{rec.Code, rec.Body.String(), rec.Header().Get("Content-Type")}
		got.is(t, c.method+" "+c.path, http.StatusTeapot, "application/json", c.body)
		if rec.Header().Get("X-Upstream") != "" {
			t.Errorf("%s %s: upstream headers relayed", c.method, c.path)
		}
		saw.mu.Lock()
		if saw.method != c.method || saw.uri != c.uri || saw.body != "" ||
			saw.headers.Get("Authorization") != "" || saw.headers.Get("X-Program") != "" {
			t.Errorf("%s %s: upstream saw %s %s %q %v", c.method, c.path, saw.method, saw.uri, saw.body, saw.headers)
		}
		saw.mu.Unlock()
	}
	// aiohttp's client follows redirects and decodes gzip; a missing
	// Content-Type reads as application/octet-stream.
	do(t, h, "GET", "/moved", nil).is(t, "redirect", http.StatusTeapot, "application/json", `{"messages": []}`)
	do(t, h, "GET", "/gz", nil).is(t, "gzip", 200, "text/plain", "unzipped")
	do(t, h, "GET", "/bare", nil).is(t, "no type", 200, "application/octet-stream", "\x00\x01\x02")

	api.Close()
	do(t, h, "GET", "/api/v0/x", nil).is(t, "API down", 500, textType, trouble)
	do(t, New(Options{}), "GET", "/api/v0/x", nil).is(t, "no API", 500, textType, trouble)
}

func TestMediaType(t *testing.T) {
	for in, want := range map[string]string{
		"":                          "application/octet-stream",
		"Text/HTML; charset=latin1": "text/html",
		"text/html; charset":        "text/html",
		"nonsense":                  "text/plain",
		"a/b/c":                     "text/plain",
	} {
		if got := mediaType(in); got != want {
			t.Errorf("mediaType(%q) = %q, want %q", in, got, want)
		}
	}
}

func testDisk(t *testing.T) Store {
	s, _ := openTestDisk(t, "", Limits{})
	return s
}

// Python's json.dumps(json.loads(v), separators=(",", ":")) for these
// inputs (CPython 3.11; ascii is ensure_ascii).
func TestPyJSON(t *testing.T) {
	for _, c := range []struct {
		in, want string
		ascii    bool
	}{
		{`{"a": 1, "b": [true, null], "a": 2}`, `{"a":2,"b":[true,null]}`, false},
		{`[1e5, 1.5e-7, 1e16, 1E-4, 0.1, 123456789.0, -0.0, -0, 12345678901234567890123]`,
			`[100000.0,1.5e-07,1e+16,0.0001,0.1,123456789.0,-0.0,0,12345678901234567890123]`, false},
		{`"é😀\u2028\u007f\u0001"`, `"\u00e9\ud83d\ude00\u2028\u007f\u0001"`, true},
		{`"é😀\u007f"`, "\"é😀\x7f\"", false},
	} {
		var b bytes.Buffer
		if err := pyJSON(&b, []byte(c.in), c.ascii); err != nil {
			t.Errorf("%s: %v", c.in, err)
		} else if b.String() != c.want {
			t.Errorf("%s (ascii %v):\n got %s\nwant %s", c.in, c.ascii, b.String(), c.want)
		}
	}
	var b bytes.Buffer
	if err := pyJSON(&b, []byte(`1e400`), false); err == nil {
		t.Error("1e400 (inf in Python, refused by allow_nan=False) encoded")
	}
}

// guest_api:52-73 hands the message to the connector, whose
// publish_data (connector:155-178) publishes its content as a POST by
// the node with address "VM on executor", through the SDK's create_post
// (POST /api/v0/messages, sync false), and answers {"status":"success"}.
func TestPubsubRepost(t *testing.T) {
	key := testKey(t)
	var mu sync.Mutex
	var got []byte
	apiStatus := http.StatusOK
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		defer mu.Unlock()
		if r.Method != "POST" || r.URL.Path != "/api/v0/messages" {
			t.Errorf("API saw %s %s", r.Method, r.URL)
		}
		got = b
		w.WriteHeader(apiStatus)
		_, _ = io.WriteString(w, `{"publication_status":{"status":"success","failed":[]},"message_status":"pending"}`)
	}))
	defer api.Close()
	h := New(Options{Program: Program{Hash: testVMHash}, APIServer: api.URL, Signer: key})
	inner := `{"address": "0xprogram", "type": "chat", "content": {"text": "héllo", "n": 1e5}}`
	msg, _ := json.Marshal(map[string]any{"channel": "TEST", "item_content": inner, "item_type": "inline"})
	req, _ := json.Marshal(map[string]string{"topic": "ALEPH-TEST", "data": string(msg)})

	do(t, h, "POST", "/api/v0/ipfs/pubsub/pub", bytes.NewReader(req)).is(t, "repost", 200, "application/json", `{"status":"success"}`)
	var sent struct {
		Sync    *bool
		Message map[string]any
	}
	mu.Lock()
	if err := json.Unmarshal(got, &sent); err != nil || sent.Sync == nil || *sent.Sync {
		t.Fatalf("API got %s (%v)", got, err)
	}
	mu.Unlock()
	m := sent.Message
	ic, _ := m["item_content"].(string)
	sum := sha256.Sum256([]byte(ic))
	if m["item_hash"] != hex.EncodeToString(sum[:]) || m["sender"] != testAddress || m["chain"] != "ETH" ||
		m["type"] != "POST" || m["item_type"] != "inline" || m["channel"] != "TEST" {
		t.Errorf("message %v", m)
	}
	// PostContent(address, time, content, type).dict(), dumped compact
	// with ensure_ascii (the SDK's _prepare_aleph_message).
	if !strings.HasPrefix(ic, `{"address":"VM on executor","time":`) ||
		!strings.HasSuffix(ic, `,"content":{"text":"h\u00e9llo","n":100000.0},"type":"chat"}`) {
		t.Errorf("item_content %s", ic)
	}
	signer, err := nodekey.RecoverPersonal(nodekey.VerificationBuffer("ETH", testAddress, "POST", m["item_hash"].(string)), m["signature"].(string))
	if err != nil || signer != testAddress {
		t.Errorf("signature by %s (%v)", signer, err)
	}

	// What the connector cannot read, or the API refuses: FastAPI's 500.
	noChannel, _ := json.Marshal(map[string]string{"topic": "t", "data": `{"item_content": "{\"type\": \"x\", \"content\": 1}"}`})
	do(t, h, "POST", "/api/v0/p2p/pubsub/pub", bytes.NewReader(noChannel)).is(t, "no channel", 500, "text/plain", "Internal Server Error")
	mu.Lock()
	apiStatus = http.StatusUnprocessableEntity
	mu.Unlock()
	do(t, h, "POST", "/api/v0/p2p/pubsub/pub", bytes.NewReader(req)).is(t, "API refuses", 500, "text/plain", "Internal Server Error")
	// What the guest API itself cannot read: aiohttp's 500.
	for _, body := range []string{`{`, `{"data": "{}"}`, `{"topic": "t", "data": "{}"}`, `{"topic": "t", "data": 5}`} {
		do(t, h, "POST", "/api/v0/ipfs/pubsub/pub", strings.NewReader(body)).is(t, body, 500, textType, trouble)
	}
}
