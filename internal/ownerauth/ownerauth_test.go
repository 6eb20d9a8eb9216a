package ownerauth_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/nodekey/nodekeytest"
	"github.com/aleph-vm-go/vm-supervisor/internal/ownerauth"
)

const domain = "node.example.org"

func ephemeralKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func request(t *testing.T, c *ownerauth.Credentials, op ownerauth.Operation, method, path string) *http.Request {
	t.Helper()
	h, err := c.Headers(op)
	if err != nil {
		t.Fatal(err)
	}
	r := httptest.NewRequest(method, path, nil)
	r.Header = h
	return r
}

func TestRequest(t *testing.T) {
	wallet := nodekeytest.Fixed(t, 7)
	key := ephemeralKey(t)
	v := ownerauth.Verifier{Domain: domain}
	good, err := ownerauth.Authorize(wallet, key, domain, time.Now().Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	expired, _ := ownerauth.Authorize(wallet, key, domain, time.Now().Add(-time.Second))
	// Another wallet's signature over the payload naming wallet.
	forged := *good
	other, _ := ownerauth.Authorize(nodekeytest.Fixed(t, 9), key, domain, time.Now().Add(time.Hour))
	forged.PubKey.Signature = other.PubKey.Signature
	// A key the wallet never approved signs the operation.
	stranger, _ := ownerauth.Authorize(wallet, ephemeralKey(t), domain, time.Now().Add(time.Hour))
	swapped := *stranger
	swapped.PubKey = good.PubKey

	path := "/control/machine/abc/stop"
	op := ownerauth.NewOperation(http.MethodPost, path, domain)
	stale := op
	stale.Time = time.Now().Add(-3 * time.Minute).UTC().Format(time.RFC3339)
	wrongDomain := ownerauth.NewOperation(http.MethodPost, path, "baddomain")

	cases := []struct {
		name   string
		creds  *ownerauth.Credentials
		op     ownerauth.Operation
		method string
		status int
		reason string
	}{
		{"valid", good, op, http.MethodPost, 0, ""},
		{"expired key", expired, op, http.MethodPost, 401, "Token expired"},
		{"another wallet's signature", &forged, op, http.MethodPost, 401, "Invalid signature"},
		{"operation signed by an unapproved key", &swapped, op, http.MethodPost, 401, "Signature could not verified"},
		{"wrong domain", good, wrongDomain, http.MethodPost, 401, "Invalid domain: Signed: 'baddomain' != Request: 'node.example.org'"},
		{"wrong method", good, op, http.MethodGet, 401, "Invalid method. Signed: 'POST' !=  request:'GET"},
		{"stale operation", good, stale, http.MethodPost, 400, "Invalid X-SignedOperation fields"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			addr, err := v.Request(request(t, c.creds, c.op, c.method, path))
			if c.status == 0 {
				if err != nil || addr != wallet.Address() {
					t.Fatalf("got %q, %v; want %s", addr, err, wallet.Address())
				}
				return
			}
			if err == nil {
				t.Fatalf("accepted as %s", addr)
			}
			if got := errkind.HTTPStatus(err); got != c.status || err.Error() != c.reason {
				t.Fatalf("got %d %q, want %d %q", got, err, c.status, c.reason)
			}
		})
	}
}

func TestRequestWrongPath(t *testing.T) {
	wallet := nodekeytest.Fixed(t, 7)
	c, _ := ownerauth.Authorize(wallet, ephemeralKey(t), domain, time.Now().Add(time.Hour))
	r := request(t, c, ownerauth.NewOperation("POST", "/control/machine/abc/stop", domain), "POST", "/control/machine/abc/erase")
	_, err := ownerauth.Verifier{Domain: domain}.Request(r)
	want := "Invalid path. Signed: '/control/machine/abc/stop' !=  requested path: '/control/machine/abc/erase'"
	if errkind.HTTPStatus(err) != 401 || err.Error() != want {
		t.Fatalf("got %v", err)
	}
}

func TestMalformedHeaders(t *testing.T) {
	v := ownerauth.Verifier{Domain: domain}
	c, _ := ownerauth.Authorize(nodekeytest.Fixed(t, 7), ephemeralKey(t), domain, time.Now().Add(time.Hour))
	valid, _ := c.Headers(ownerauth.NewOperation("GET", "/", domain))
	cases := []struct {
		name, pub, op, reason string
	}{
		{"no headers", "", "", "Missing X-SignedPubKey header"},
		{"pubkey not JSON", "invalid_json", "", "Invalid X-SignedPubKey format"},
		{"pubkey payload not hex", `{"payload":"zz","signature":"0x00"}`, "", "Invalid X-SignedPubKey data"},
		{"no operation", valid.Get(ownerauth.HeaderPubKey), "", "Missing X-SignedOperation header"},
		{"operation not JSON", valid.Get(ownerauth.HeaderPubKey), "{", "Invalid X-SignedOperation fields"},
		{"operation without payload", valid.Get(ownerauth.HeaderPubKey), `{"time":"2023-07-14T22:14:14.132Z","signature":"96ff"}`, "Invalid X-SignedOperation fields"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", "/", nil)
			if tc.pub != "" {
				r.Header.Set(ownerauth.HeaderPubKey, tc.pub)
			}
			if tc.op != "" {
				r.Header.Set(ownerauth.HeaderOperation, tc.op)
			}
			_, err := v.Request(r)
			if errkind.HTTPStatus(err) != 400 || err.Error() != tc.reason {
				t.Fatalf("got %v, want 400 %q", err, tc.reason)
			}
		})
	}
}

// TestUpstreamFixture checks a header pair made by aleph-vm's own test
// suite (tests/supervisor/test_authentication.py, the wrong-key case):
// its wallet signature does not cover the payload, and must be refused
// as upstream refuses it.
func TestUpstreamFixture(t *testing.T) {
	pub := `{"payload": "7b227075626b6579223a207b22637276223a2022502d323536222c20226b7479223a20224543222c202278223a202273765759314e5652614a683231527834576a765f67657057772d714d436f774d76304a52353057327a7545222c202279223a2022794950424d6135474e7a49555878656c513762415a5f437776303875763448774d4c49456c656c43534473227d2c2022616c67223a20224543445341222c2022646f6d61696e223a20226c6f63616c686f7374222c202261646472657373223a2022307842323564623537643234304438353132366262364234384661633635343837323161343537343538222c202265787069726573223a2022323032332d30352d30325431303a34343a34322e3735343939345a227d", "signature": "0x58e1498a6c4f88ac1982e7147ff49405ffe1b9633e048bb74cf741abb05ce0b63bb406f3079f641ae89f597654ecd2a704d37ffbf86a28e462140033cc0eedcb1c"}`
	v := ownerauth.Verifier{Domain: "localhost", Now: func() time.Time { return time.Date(2010, 12, 25, 17, 5, 55, 0, time.UTC) }}
	r := httptest.NewRequest("GET", "/", nil)
	r.Header.Set(ownerauth.HeaderPubKey, pub)
	r.Header.Set(ownerauth.HeaderOperation, `{"payload":"7b2274696d65223a2022323031302d31322d32355431373a30353a35355a222c20226d6574686f64223a2022474554222c202270617468223a20222f222c2022646f6d61696e223a20226c6f63616c686f7374227d","signature":"96ffdbbd1704d5f6bfe4698235a0de0d2f58668deaa4371422bee26664f313f51fd483c78c34c6b317fc209779f9ddd9c45accf558e3bf881b49ad970ebf0ade"}`)
	_, err := v.Request(r)
	if errkind.HTTPStatus(err) != 401 || err.Error() != "Invalid signature" {
		t.Fatalf("got %v, want 401 Invalid signature", err)
	}
	// Once "now" is past its expiry, the same header is refused for that.
	v.Now = time.Now
	if _, err := v.Request(r); err == nil || err.Error() != "Token expired" {
		t.Fatalf("got %v, want Token expired", err)
	}
}

func TestMessage(t *testing.T) {
	wallet := nodekeytest.Fixed(t, 7)
	c, _ := ownerauth.Authorize(wallet, ephemeralKey(t), domain, time.Now().Add(time.Hour))
	v := ownerauth.Verifier{Domain: domain}
	msg, _ := c.AuthMessage(ownerauth.NewOperation("GET", "/control/machine/abc/stream_logs", domain))
	var first struct {
		Auth json.RawMessage `json:"auth"`
	}
	if err := json.Unmarshal(msg, &first); err != nil {
		t.Fatal(err)
	}
	if addr, err := v.Message(first.Auth); err != nil || addr != wallet.Address() {
		t.Fatalf("got %q, %v", addr, err)
	}
	if _, err := v.Message(json.RawMessage(`"invalid auth package"`)); err == nil ||
		!strings.Contains(err.Error(), "Invalid format for auth packet") {
		t.Fatalf("got %v", err)
	}
	other := ownerauth.Verifier{Domain: "elsewhere"}
	if _, err := other.Message(first.Auth); err == nil || err.Error() != "Invalid domain" {
		t.Fatalf("got %v", err)
	}
}

// TestUpstreamDocExample verifies the websocket auth packet printed in
// aleph-vm's doc/operator_auth.md, signed by Python (eth_account and
// jwcrypto): the wire format, not only our own round trip.
func TestUpstreamDocExample(t *testing.T) {
	auth := `{
        "X-SignedPubKey": {
            "payload": "7b227075626b6579223a207b22637276223a2022502d323536222c20226b7479223a20224543222c202278223a20223962446f34754949686b735a5272677a31477972325050656d4334364e735f4730577144364d4d6a774673222c202279223a20226f48343342786c7854334f3065733336685967713143372d61325a535a71456d5f6b56356e636c79667a59227d2c2022616c67223a20224543445341222c2022646f6d61696e223a20226c6f63616c686f7374222c202261646472657373223a2022307862413236623135333539314434363230666432413734304130463165463730644164363532336230222c202265787069726573223a2022323031302d31322d32365431373a30353a35355a227d",
            "signature": "0xea99ef5f1a10f2d103f94dce4f8650730315246e6d15cf9e5862c11adfd6482703cd1ec684a4f3dffb36ae5c4a57b08a47108fe55e3b2454e45f6e63342e0f471b"
        },
        "X-SignedOperation": {
            "payload": "7b2274696d65223a2022323031302d31322d32355431373a30353a35355a222c20226d6574686f64223a2022474554222c202270617468223a20222f222c2022646f6d61696e223a20226c6f63616c686f7374227d",
            "signature": "6f737654cd00e4d4155d387509978e7a9a4d27f5b59c9492ac1dec7b09f9aecc58c9365526bbddd6211b65f40f4956c50ab26f395f7170ce1698c11e28e25d3a"
        }
    }`
	v := ownerauth.Verifier{Domain: "localhost", Now: func() time.Time { return time.Date(2010, 12, 25, 17, 5, 55, 0, time.UTC) }}
	addr, err := v.Message(json.RawMessage(auth))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.EqualFold(addr, "0xbA26b153591D4620fd2A740A0F1eF70dAd6523b0") {
		t.Fatalf("address %s", addr)
	}
}
