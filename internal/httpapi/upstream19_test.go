package httpapi

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"testing"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/records"

	"github.com/aleph-vm-go/vm-supervisor/internal/pool/pooltest"
)

func okProgram() program {
	return program{agent: pooltest.Agent{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte("ok"))
	})}}
}

// POST /control/machine/{ref}/update: aleph-vm's operate_update
// (views/__init__.py; tests/supervisor/test_views.py test_operate): no
// authentication, 200 {} for a running execution; its errors through
// error_middleware: 404 {"error": "404: VM not found"}, 400 for a bad ref.
func TestControlUpdateAsUpstream(t *testing.T) {
	l := startLiveOn(t, pooltest.NewStore(t), map[string]program{"a": okProgram()}, nil,
		func(o *Options) { o.Control = nil })
	l.srv.opts.Control = l.pool
	l.srv.controlRoutes()
	hash := l.hashes["a"]
	if a := l.do(t, "POST", "/control/machine/"+hash+"/update", nil); a.code != 404 || a.body != `{"error": "404: VM not found"}` ||
		a.header.Get("Content-Type") != "application/json; charset=utf-8" {
		t.Errorf("update of a program not running: %d %q %q", a.code, a.header.Get("Content-Type"), a.body)
	}
	if a := l.do(t, "GET", "/vm/"+hash+"/", nil); a.code != 200 {
		t.Fatalf("start: %d %q", a.code, a.body)
	}
	if a := l.do(t, "POST", "/control/machine/"+hash+"/update", nil); a.code != 200 || a.body != `{}` ||
		a.header.Get("Content-Type") != "application/json; charset=utf-8" {
		t.Errorf("update of a running program: %d %q %q", a.code, a.header.Get("Content-Type"), a.body)
	}
	if a := l.do(t, "POST", "/control/machine/nothash/update", nil); a.code != 400 || a.body != `{"error": "Invalid ref: 'nothash'"}` {
		t.Errorf("update of a bad ref: %d %q", a.code, a.body)
	}
	// Only POST: a GET is an unknown /control path.
	if a := l.do(t, "GET", "/control/machine/"+hash+"/update", nil); a.code != 404 || a.body != `{"error": "404: Not Found"}` {
		t.Errorf("GET update: %d %q", a.code, a.body)
	}
}

// GET /about/certificates on a node without confidential computing
// (tests/supervisor/test_views.py test_about_certificates_missing_setting).
func TestCertificatesAsUpstream(t *testing.T) {
	s, _ := newTestServer(t)
	rec := serve(s, "GET", "node.example", "/about/certificates")
	if rec.Code != 503 || rec.Body.String() != `{"error": "Confidential computing setting not enabled on that server"}` ||
		rec.Header().Get("Content-Type") != "application/json; charset=utf-8" {
		t.Errorf("certificates: %d %q %q", rec.Code, rec.Header().Get("Content-Type"), rec.Body)
	}
}

// /about/usage/system: pydantic's compact JSON of MachineUsage
// (resources.py about_system_usage), with gpu and properties.cpu.features.
func TestUsageAsUpstream(t *testing.T) {
	s := New(Options{DiskPath: t.TempDir(), Logger: quiet})
	rec := serve(s, "GET", "node.example", "/about/usage/system")
	body := rec.Body.String()
	if rec.Code != 200 || rec.Header().Get("Content-Type") != "application/json; charset=utf-8" {
		t.Fatalf("usage: %d %q %s", rec.Code, rec.Header().Get("Content-Type"), body)
	}
	if !regexp.MustCompile(`^\{"cpu":\{"count":\d+,"load_average":\{"load1":\d+\.\d+,"load5":\d+\.\d+,"load15":\d+\.\d+\},` +
		`"core_frequencies":\{"min":\d+\.\d+,"max":\d+\.\d+\}\},"mem":\{"total_kB":\d+,"available_kB":\d+\},` +
		`"disk":\{"total_kB":\d+,"available_kB":\d+\},"period":\{"start_timestamp":"\d{4}-\d\d-\d\dT\d\d:\d\d:00Z","duration_seconds":60\.0\},` +
		`"properties":\{"cpu":\{"architecture":"[a-z0-9_]+","vendor":"[^"]*","features":\[\]\}\},` +
		`"gpu":\{"devices":\[\],"available_devices":\[\]\},"active":true\}$`).MatchString(body) {
		t.Errorf("usage body not in upstream's shape: %s", body)
	}
}

type recordList []records.Record

func (l recordList) List(context.Context, int) ([]records.Record, error) { return l, nil }

// /about/executions/records in the bytes of aleph-vm's
// json.dumps(records, default=to_json): its table's columns in order,
// times as str() of the naive UTC datetime SQLAlchemy reads back, floats
// as Python writes them (views/__init__.py about_execution_records,
// orchestrator/metrics.py, utils dumps_for_json).
func TestRecordsAsUpstream(t *testing.T) {
	at := time.Date(2024, 5, 1, 12, 0, 0, 123456000, time.FixedZone("X", 7200))
	rec := records.Record{
		UUID: "00000000-0000-4000-8000-000000000001", VMHash: "ab",
		TimeDefined: at, TimePrepared: at.Add(time.Second - 123456000), TimeStarted: at.Add(2 * time.Second),
		CPUTimeUser: 1.25, CPUTimeSystem: 0, IOReadCount: 10, IOWriteCount: 20, IOReadBytes: 4096, IOWriteBytes: 8192,
		VCPUs: 1, Memory: 128, NetworkTap: "vmtap4", IPv4: "172.16.3.2/24",
	}
	s := New(Options{Records: recordList{rec, {UUID: "u2", VMHash: "cd", TimeDefined: at}}, Logger: quiet})
	got := serve(s, "GET", "node.example", "/about/executions/records")
	want := `[{"uuid": "00000000-0000-4000-8000-000000000001", "vm_hash": "ab", "vm_id": null, ` +
		`"time_defined": "2024-05-01 10:00:00.123456", "time_prepared": "2024-05-01 10:00:01", ` +
		`"time_started": "2024-05-01 10:00:02.123456", "time_stopping": null, "cpu_time_user": 1.25, ` +
		`"cpu_time_system": 0.0, "io_read_count": 10, "io_write_count": 20, "io_read_bytes": 4096, ` +
		`"io_write_bytes": 8192, "vcpus": 1, "memory": 128, "network_tap": "vmtap4", "message": null, ` +
		`"original_message": null, "persistent": null, "gpus": null, "mapped_ports": null, "ipv4": "172.16.3.2/24"}, ` +
		`{"uuid": "u2", "vm_hash": "cd", "vm_id": null, "time_defined": "2024-05-01 10:00:00.123456", ` +
		`"time_prepared": null, "time_started": null, "time_stopping": null, "cpu_time_user": 0.0, ` +
		`"cpu_time_system": 0.0, "io_read_count": 0, "io_write_count": 0, "io_read_bytes": 0, "io_write_bytes": 0, ` +
		`"vcpus": 0, "memory": 0, "network_tap": null, "message": null, "original_message": null, "persistent": null, ` +
		`"gpus": null, "mapped_ports": null}]`
	if got.Code != 200 || got.Body.String() != want || got.Header().Get("Content-Type") != "application/json; charset=utf-8" {
		t.Errorf("records: %d %q\n got %s\nwant %s", got.Code, got.Header().Get("Content-Type"), got.Body, want)
	}
}

// GET /v2/about/executions/list: aleph-vm's list_executions_v2
// (tests/supervisor/test_views.py test_v2_executions_list): networking {}
// without a network, the times as str() of aware UTC datetimes, null when
// not reached, then running, awaiting_confidential_init and vm_type.
func TestExecutionListV2AsUpstream(t *testing.T) {
	l := startLive(t, map[string]program{"a": okProgram()}, nil)
	if a := l.do(t, "GET", "/v2/about/executions/list", nil); a.code != 200 || a.body != `{}` {
		t.Errorf("empty list: %d %q", a.code, a.body)
	}
	hash := l.hashes["a"]
	if a := l.do(t, "GET", "/vm/"+hash+"/", nil); a.code != 200 {
		t.Fatalf("start: %d %q", a.code, a.body)
	}
	a := l.do(t, "GET", "/v2/about/executions/list", nil)
	ts := `"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{6})?\+00:00"`
	want := regexp.MustCompile(`^\{"` + hash + `": \{"networking": \{\}, "status": \{"defined_at": ` + ts +
		`, "preparing_at": ` + ts + `, "prepared_at": ` + ts + `, "starting_at": ` + ts + `, "started_at": ` + ts +
		`, "stopping_at": null, "stopped_at": null\}, "running": true, "awaiting_confidential_init": false, "vm_type": "microvm"\}\}$`)
	if a.code != 200 || !want.MatchString(a.body) || a.header.Get("Content-Type") != "application/json; charset=utf-8" {
		t.Errorf("list: %d %q %s", a.code, a.header.Get("Content-Type"), a.body)
	}
}

// GET /about/capability: pydantic's compact MachineCapability
// (tests/supervisor/test_views.py test_system_capability_mock's shape).
func TestCapabilityAsUpstream(t *testing.T) {
	s, _ := newTestServer(t)
	rec := serve(s, "GET", "node.example", "/about/capability")
	re := regexp.MustCompile(`^\{"cpu":\{"architecture":"[a-z0-9_]+","vendor":"[^"]*","features":\[\],"model":("[^"]*"|null),` +
		`"frequency":(\d+|null),"count":[1-9]\d*\},"memory":\{"size":[1-9]\d*,"units":"bytes","type":"","clock":null,"clock_units":null\}\}$`)
	if rec.Code != 200 || !re.MatchString(rec.Body.String()) || rec.Header().Get("Content-Type") != "application/json; charset=utf-8" {
		t.Errorf("capability: %d %q %s", rec.Code, rec.Header().Get("Content-Type"), rec.Body)
	}
}

func TestPyAwareTime(t *testing.T) {
	if got := *pyAwareTime(time.Date(2024, 5, 1, 12, 0, 0, 123456789, time.FixedZone("X", 7200))); got != "2024-05-01 10:00:00.123456+00:00" {
		t.Errorf("%q", got)
	}
	if got := *pyAwareTime(time.Date(2024, 5, 1, 10, 0, 0, 0, time.UTC)); got != "2024-05-01 10:00:00+00:00" {
		t.Errorf("%q", got)
	}
	if pyAwareTime(time.Time{}) != nil {
		t.Error("zero time not null")
	}
}

// GET /status/check/host: aleph-vm's status_check_host
// (views/__init__.py, views/host_status.py), with its targets on loopback
// so that the test never leaves the machine: the JSON in upstream's key
// order, 200 only when every egress, dns and domain check passes; http
// is advisory.
func TestCheckHostAsUpstream(t *testing.T) {
	any4 := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(404) }))
	t.Cleanup(any4.Close)
	ln6, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Fatalf("no IPv6 loopback here: %v", err)
	}
	any6 := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(204) }))
	any6.Listener = ln6
	any6.Start()
	t.Cleanup(any6.Close)
	both := func(_ context.Context, host string) ([]net.IPAddr, error) {
		switch host {
		case "probe.test", "node.example":
			return []net.IPAddr{{IP: net.ParseIP("127.0.0.1")}, {IP: net.ParseIP("::1")}}, nil
		}
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	hc := &HostCheck{IPv4URL: any4.URL, IPv6URL: any6.URL, DNSHostname: "probe.test",
		HTTPURLs: []string{"http://127.0.0.1:1/", any4.URL}, LookupIPAddr: both, Timeout: 2 * time.Second}
	s := New(Options{DomainName: "node.example", HostCheck: hc, Logger: quiet})
	rec := serve(s, "GET", "node.example", "/status/check/host")
	if rec.Code != 200 || rec.Body.String() != `{"ipv4": {"egress": true, "dns": true, "domain": true, "http": true}, `+
		`"ipv6": {"egress": true, "dns": true, "domain": true, "http": false}}` ||
		rec.Header().Get("Content-Type") != "application/json; charset=utf-8" {
		t.Errorf("all required checks pass: %d %q %s", rec.Code, rec.Header().Get("Content-Type"), rec.Body)
	}
	// The domain does not resolve, IPv6 egress fails: 503, same shape.
	hc.IPv6URL = "http://[::1]:1/"
	s = New(Options{DomainName: "elsewhere.example", HostCheck: hc, Logger: quiet})
	rec = serve(s, "GET", "node.example", "/status/check/host")
	if rec.Code != 503 || rec.Body.String() != `{"ipv4": {"egress": true, "dns": true, "domain": false, "http": true}, `+
		`"ipv6": {"egress": false, "dns": true, "domain": false, "http": false}}` {
		t.Errorf("failing checks: %d %s", rec.Code, rec.Body)
	}
}
