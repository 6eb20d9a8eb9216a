package records

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func openTemp(t *testing.T) (*DB, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "sub", "dir", "executions.sqlite3")
	db, err := Open(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db, path
}

func sample(i int, defined time.Time) Record {
	return Record{
		UUID:          fmt.Sprintf("00000000-0000-4000-8000-%012d", i),
		VMHash:        strings.Repeat("ab", 32),
		TimeDefined:   defined,
		TimePrepared:  defined.Add(10 * time.Millisecond),
		TimeStarted:   defined.Add(2 * time.Second),
		TimeStopping:  defined.Add(time.Hour + 123456789),
		CPUTimeUser:   1.25,
		CPUTimeSystem: 0.5,
		IOReadCount:   10, IOWriteCount: 20, IOReadBytes: 4096, IOWriteBytes: 8192,
		VCPUs: 1, Memory: 128, NetworkTap: "vmtap4",
	}
}

func TestMigrationsIdempotent(t *testing.T) {
	ctx := context.Background()
	db, path := openTemp(t)
	base := time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)
	if err := db.Insert(ctx, sample(1, base)); err != nil {
		t.Fatal(err)
	}
	db.Close()
	for range 2 {
		db2, err := Open(ctx, path)
		if err != nil {
			t.Fatal(err)
		}
		v, err := db2.SchemaVersion(ctx)
		if err != nil || v != len(migrations) {
			t.Errorf("version %d, %v; want %d", v, err, len(migrations))
		}
		got, err := db2.List(ctx, 0)
		if err != nil || len(got) != 1 {
			t.Errorf("reopened: %d records, %v", len(got), err)
		}
		db2.Close()
	}
}

func TestRefusesNewerSchema(t *testing.T) {
	ctx := context.Background()
	db, path := openTemp(t)
	if _, err := db.db.ExecContext(ctx, "PRAGMA user_version = 999"); err != nil {
		t.Fatal(err)
	}
	db.Close()
	if _, err := Open(ctx, path); err == nil || !strings.Contains(err.Error(), "newer") {
		t.Errorf("got %v", err)
	}
}

func TestInsertListRoundTrip(t *testing.T) {
	ctx := context.Background()
	db, _ := openTemp(t)
	base := time.Date(2024, 5, 1, 12, 0, 0, 0, time.FixedZone("X", 3600))
	var want []Record
	for i := range 5 {
		r := sample(i, base.Add(time.Duration(i)*time.Minute))
		if err := db.Insert(ctx, r); err != nil {
			t.Fatal(err)
		}
		want = append([]Record{r}, want...) // newest first
	}
	sparse := Record{UUID: "sparse", VMHash: "h", TimeDefined: base.Add(-time.Hour)}
	if err := db.Insert(ctx, sparse); err != nil {
		t.Fatal(err)
	}
	want = append(want, sparse)

	got, err := db.List(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) {
		t.Fatalf("got %d records, want %d", len(got), len(want))
	}
	for i := range want {
		if !equalRecord(got[i], want[i]) {
			t.Errorf("record %d:\n got %+v\nwant %+v", i, got[i], want[i])
		}
	}

	limited, err := db.List(ctx, 2)
	if err != nil || len(limited) != 2 || limited[0].UUID != want[0].UUID {
		t.Errorf("limit 2: %v, %v", limited, err)
	}

	if err := db.Insert(ctx, sample(0, base)); err == nil {
		t.Error("duplicate uuid accepted")
	}
	if err := db.Insert(ctx, Record{VMHash: "h"}); !errors.Is(err, ErrNoUUID) {
		t.Errorf("empty uuid: %v", err)
	}
}

func equalRecord(a, b Record) bool {
	for _, p := range [][2]*time.Time{{&a.TimeDefined, &b.TimeDefined}, {&a.TimePrepared, &b.TimePrepared},
		{&a.TimeStarted, &b.TimeStarted}, {&a.TimeStopping, &b.TimeStopping}} {
		if !p[0].Equal(*p[1]) {
			return false
		}
		*p[0], *p[1] = time.Time{}, time.Time{}
	}
	return reflect.DeepEqual(a, b)
}

func TestEmptyListIsEmptyArray(t *testing.T) {
	db, _ := openTemp(t)
	got, err := db.List(context.Background(), 10)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(got)
	if string(b) != "[]" {
		t.Errorf("got %s", b)
	}
}

func TestJSONShape(t *testing.T) {
	r := sample(1, time.Date(2024, 5, 1, 12, 0, 0, 123456, time.FixedZone("X", 7200)))
	r.TimeStarted = r.TimeDefined.Add(time.Second - 123456) // a whole second
	r.TimeStopping = time.Time{}
	r.NetworkTap = ""
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	cols := []string{"uuid", "vm_hash", "time_defined", "time_prepared", "time_started", "time_stopping",
		"cpu_time_user", "cpu_time_system", "io_read_count", "io_write_count", "io_read_bytes",
		"io_write_bytes", "vcpus", "memory", "network_tap"}
	if len(m) != len(cols) {
		t.Errorf("%d keys, want %d: %s", len(m), len(cols), b)
	}
	for _, c := range cols {
		if _, ok := m[c]; !ok {
			t.Errorf("missing %s in %s", c, b)
		}
	}
	// An execution with a network adds its address, and only then.
	r.IPv4 = "172.16.3.2/24"
	b, _ = json.Marshal(r)
	var withNet map[string]any
	_ = json.Unmarshal(b, &withNet)
	if len(withNet) != len(cols)+1 || withNet["ipv4"] != "172.16.3.2/24" {
		t.Errorf("with a network: %s", b)
	}
	// Python's str() of the naive UTC datetime aleph-vm reads back
	// (microseconds, dropped when zero), through dumps_for_json.
	if m["time_defined"] != "2024-05-01 10:00:00.000123" || m["time_prepared"] != "2024-05-01 10:00:00.010123" ||
		m["time_started"] != "2024-05-01 10:00:01" {
		t.Errorf("times %v %v %v", m["time_defined"], m["time_prepared"], m["time_started"])
	}
	// Sub-microsecond parts are dropped, as Python's datetime has none.
	r.TimeDefined = r.TimeDefined.Add(999)
	b2, _ := json.Marshal(r)
	if !strings.Contains(string(b2), `"time_defined":"2024-05-01 10:00:00.000124"`) &&
		!strings.Contains(string(b2), `"time_defined":"2024-05-01 10:00:00.000123"`) {
		t.Errorf("sub-microsecond: %s", b2)
	}
	r.TimeDefined = r.TimeDefined.Add(-999)
	if m["time_stopping"] != nil || m["network_tap"] != nil {
		t.Errorf("absent values not null: %s", b)
	}
	var back Record
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	for _, p := range []*time.Time{&r.TimeDefined, &r.TimePrepared, &r.TimeStarted} {
		*p = p.Truncate(time.Microsecond)
	}
	if !equalRecord(back, r) {
		t.Errorf("JSON round trip:\n got %+v\nwant %+v", back, r)
	}
}

func TestConcurrentInserts(t *testing.T) {
	ctx := context.Background()
	db, path := openTemp(t)
	// A second handle stands for another process on the same file.
	other, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	const n = 60
	base := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		h := db
		if i%2 == 1 {
			h = other
		}
		wg.Go(func() {
			if err := h.Insert(ctx, sample(i, base.Add(time.Duration(i)*time.Millisecond))); err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	got, err := db.List(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != n {
		t.Fatalf("%d records, want %d", len(got), n)
	}
	for i := 1; i < len(got); i++ {
		if got[i].TimeDefined.After(got[i-1].TimeDefined) {
			t.Fatalf("not newest first at %d", i)
		}
	}
}

func TestCanceledContext(t *testing.T) {
	db, _ := openTemp(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := db.Insert(ctx, sample(1, time.Now())); err == nil {
		t.Error("insert with canceled context succeeded")
	}
}

func TestWALEnabled(t *testing.T) {
	db, _ := openTemp(t)
	var mode string
	if err := db.db.QueryRowContext(context.Background(), "PRAGMA journal_mode").Scan(&mode); err != nil {
		t.Fatal(err)
	}
	if mode != "wal" {
		t.Errorf("journal_mode = %q", mode)
	}
}

func TestConcurrentOpenMigratesOnce(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "x.sqlite3")
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			db, err := Open(ctx, path)
			if err != nil {
				errs <- err
				return
			}
			db.Close()
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// An execution's row is written when it starts and completed when it
// ends; rows a crash left open are closed by the next start-up.
func TestSaveUpdatesAndCloseUnfinished(t *testing.T) {
	ctx := context.Background()
	db, _ := openTemp(t)
	base := time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)
	open := sample(1, base)
	open.TimeStarted, open.TimeStopping, open.CPUTimeUser = time.Time{}, time.Time{}, 0
	if err := db.Save(ctx, open); err != nil {
		t.Fatal(err)
	}
	finished := sample(1, base)
	if err := db.Save(ctx, finished); err != nil {
		t.Fatal(err)
	}
	crashed := sample(2, base.Add(time.Minute))
	crashed.TimeStopping = time.Time{}
	if err := db.Save(ctx, crashed); err != nil {
		t.Fatal(err)
	}
	sweep := base.Add(2 * time.Hour)
	n, err := db.CloseUnfinished(ctx, sweep)
	if err != nil || n != 1 {
		t.Fatalf("CloseUnfinished = %d, %v; want 1 row", n, err)
	}
	got, err := db.List(ctx, 0)
	if err != nil || len(got) != 2 {
		t.Fatalf("List = %v, %v", got, err)
	}
	if !got[0].TimeStopping.Equal(sweep) || got[0].UUID != crashed.UUID {
		t.Errorf("crashed row: %+v, want stopping %v", got[0], sweep)
	}
	if !got[1].TimeStopping.Equal(finished.TimeStopping) || got[1].CPUTimeUser != finished.CPUTimeUser || !got[1].TimeStarted.Equal(finished.TimeStarted) {
		t.Errorf("updated row: %+v, want %+v", got[1], finished)
	}
	if n, _ := db.CloseUnfinished(ctx, sweep); n != 0 {
		t.Errorf("second CloseUnfinished closed %d rows", n)
	}
}

// The records (programs' hashes, addresses, resource use) are the node's
// alone: the database and SQLite's WAL and shared-memory files are 0600
// under a 0700 directory, whatever the umask.
func TestFilesArePrivate(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	db, path := openTemp(t)
	if err := db.Insert(context.Background(), sample(1, time.Unix(1_700_000_000, 0).UTC())); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		if fi, err := os.Stat(p); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v %v, want mode 600", p, fi, err)
		}
	}
	if fi, err := os.Stat(filepath.Dir(path)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("directory: %v %v, want mode 700", fi, err)
	}
}
