// Package records keeps one row per execution in SQLite, with
// aleph-vm's `records` columns, so that /about/executions/records answers
// with the same shape. The pure-Go driver keeps the supervisor static.
package records

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/sqlitedb"
)

// Record is one execution: when each phase began, what it consumed and
// which resources it had. JSON names equal the column names.
type Record struct {
	UUID          string    `json:"uuid"`
	VMHash        string    `json:"vm_hash"`
	TimeDefined   time.Time `json:"time_defined"`
	TimePrepared  time.Time `json:"time_prepared"`
	TimeStarted   time.Time `json:"time_started"`
	TimeStopping  time.Time `json:"time_stopping"`
	CPUTimeUser   float64   `json:"cpu_time_user"`   // seconds
	CPUTimeSystem float64   `json:"cpu_time_system"` // seconds
	IOReadCount   int64     `json:"io_read_count"`
	IOWriteCount  int64     `json:"io_write_count"`
	IOReadBytes   int64     `json:"io_read_bytes"`
	IOWriteBytes  int64     `json:"io_write_bytes"`
	VCPUs         int       `json:"vcpus"`
	Memory        int       `json:"memory"` // MiB, as in the program's resources
	NetworkTap    string    `json:"network_tap"`
	IPv4          string    `json:"ipv4,omitempty"` // ours, beyond upstream: the program's address/prefix
}

// recordJSON shadows the fields whose zero value means "never happened",
// so that they read null (as aleph-vm's nullable columns do) instead of
// year 1 or an empty name.
type recordJSON struct {
	jsonAlias
	TimeDefined  *pyTime `json:"time_defined"`
	TimePrepared *pyTime `json:"time_prepared"`
	TimeStarted  *pyTime `json:"time_started"`
	TimeStopping *pyTime `json:"time_stopping"`
	NetworkTap   *string `json:"network_tap"`
}

type jsonAlias Record

// pyTime is a time as aleph-vm's records answer it: Python's str() of the
// naive UTC datetime SQLAlchemy reads back from SQLite ("2024-05-01
// 10:00:00.123456", no fraction when it is zero), through dumps_for_json's
// default=str (utils/__init__.py, orchestrator/metrics.py).
type pyTime time.Time

const (
	pyTimeLayout         = "2006-01-02 15:04:05"
	pyTimeLayoutFraction = "2006-01-02 15:04:05.000000"
)

func (t pyTime) MarshalJSON() ([]byte, error) {
	u := time.Time(t).UTC().Truncate(time.Microsecond)
	layout := pyTimeLayoutFraction
	if u.Nanosecond() == 0 {
		layout = pyTimeLayout
	}
	return json.Marshal(u.Format(layout))
}

// UnmarshalJSON reads what MarshalJSON writes, and RFC 3339 as earlier
// versions wrote.
func (t *pyTime) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	for _, layout := range []string{pyTimeLayoutFraction, pyTimeLayout, time.RFC3339Nano} {
		if v, err := time.Parse(layout, s); err == nil {
			*t = pyTime(v.UTC())
			return nil
		}
	}
	return fmt.Errorf("records: time %q is neither Python's str(datetime) nor RFC 3339", s)
}

func timePtr(t time.Time) *pyTime {
	if t.IsZero() {
		return nil
	}
	u := pyTime(t.UTC())
	return &u
}

func timeVal(p *pyTime) time.Time {
	if p == nil {
		return time.Time{}
	}
	return time.Time(*p)
}

// MarshalJSON writes times as aleph-vm does (pyTime) and absent values as
// null.
func (r Record) MarshalJSON() ([]byte, error) {
	out := recordJSON{
		jsonAlias:    jsonAlias(r),
		TimeDefined:  timePtr(r.TimeDefined),
		TimePrepared: timePtr(r.TimePrepared),
		TimeStarted:  timePtr(r.TimeStarted),
		TimeStopping: timePtr(r.TimeStopping),
	}
	if r.NetworkTap != "" {
		out.NetworkTap = &r.NetworkTap
	}
	return json.Marshal(out)
}

// UnmarshalJSON accepts what MarshalJSON writes, nulls included.
func (r *Record) UnmarshalJSON(b []byte) error {
	var in recordJSON
	if err := json.Unmarshal(b, &in); err != nil {
		return err
	}
	*r = Record(in.jsonAlias)
	r.TimeDefined = timeVal(in.TimeDefined)
	r.TimePrepared = timeVal(in.TimePrepared)
	r.TimeStarted = timeVal(in.TimeStarted)
	r.TimeStopping = timeVal(in.TimeStopping)
	r.NetworkTap = ""
	if in.NetworkTap != nil {
		r.NetworkTap = *in.NetworkTap
	}
	return nil
}

// DB is the records database. It is safe for concurrent use.
type DB struct {
	db *sql.DB
}

// migrations are applied in order; the database's PRAGMA user_version is
// the count already applied. Append new steps, never edit old ones.
var migrations = []string{
	`CREATE TABLE records (
		uuid TEXT PRIMARY KEY NOT NULL,
		vm_hash TEXT NOT NULL,
		time_defined TEXT,
		time_prepared TEXT,
		time_started TEXT,
		time_stopping TEXT,
		cpu_time_user REAL,
		cpu_time_system REAL,
		io_read_count INTEGER,
		io_write_count INTEGER,
		io_read_bytes INTEGER,
		io_write_bytes INTEGER,
		vcpus INTEGER,
		memory INTEGER,
		network_tap TEXT
	)`,
	`CREATE INDEX records_time_defined ON records (time_defined)`,
	// The program's address/prefix, for operators tracing traffic.
	`ALTER TABLE records ADD COLUMN ipv4 TEXT`,
}

// timeLayout is fixed-width UTC so that text order is time order and
// ORDER BY needs no conversion.
const timeLayout = "2006-01-02T15:04:05.000000000Z"

// Open opens (creating if needed) the database at path and brings its
// schema up to date.
func Open(ctx context.Context, path string) (*DB, error) {
	db, err := sqlitedb.Open(path)
	if err != nil {
		return nil, fmt.Errorf("records: %w", err)
	}
	d := &DB{db: db}
	if err := sqlitedb.RetryBusy(ctx, func() error { return d.migrate(ctx) }); err != nil {
		db.Close()
		return nil, fmt.Errorf("records: %s: %w", path, err)
	}
	return d, nil
}

func (d *DB) migrate(ctx context.Context) error {
	tx, err := d.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin migration: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // after Commit this is a no-op
	var version int
	if err := tx.QueryRowContext(ctx, "PRAGMA user_version").Scan(&version); err != nil {
		return fmt.Errorf("read schema version: %w", err)
	}
	if version > len(migrations) {
		return fmt.Errorf("schema version %d is newer than this program knows (%d)", version, len(migrations))
	}
	for i := version; i < len(migrations); i++ {
		if _, err := tx.ExecContext(ctx, migrations[i]); err != nil {
			return fmt.Errorf("migration %d: %w", i+1, err)
		}
	}
	if version == len(migrations) {
		return nil
	}
	// PRAGMA takes no bound parameters; the value is our own integer.
	if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", len(migrations))); err != nil {
		return fmt.Errorf("set schema version: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit migration: %w", err)
	}
	return nil
}

// SchemaVersion is the number of migrations applied.
func (d *DB) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	if err := d.db.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil {
		return 0, fmt.Errorf("records: schema version: %w", err)
	}
	return v, nil
}

func nullTime(t time.Time) sql.NullString {
	if t.IsZero() {
		return sql.NullString{}
	}
	return sql.NullString{String: t.UTC().Format(timeLayout), Valid: true}
}

func nullString(s string) sql.NullString {
	return sql.NullString{String: s, Valid: s != ""}
}

// ErrNoUUID is returned by Insert for a record without a uuid: the uuid is
// the execution's own, so making one up here would hide a caller's bug.
var ErrNoUUID = errors.New("records: record has no uuid")

// Insert stores r. A uuid already present is an error.
func (d *DB) Insert(ctx context.Context, r Record) error { return d.write(ctx, r, "") }

// Save stores r, replacing the row of the same uuid. The pool saves an
// execution's row when it starts and again when it ends, so a crash of
// the supervisor loses no execution: the start-up sweep closes the rows
// left open (CloseUnfinished).
func (d *DB) Save(ctx context.Context, r Record) error {
	return d.write(ctx, r, `ON CONFLICT(uuid) DO UPDATE SET
		vm_hash = excluded.vm_hash, time_defined = excluded.time_defined,
		time_prepared = excluded.time_prepared, time_started = excluded.time_started,
		time_stopping = excluded.time_stopping, cpu_time_user = excluded.cpu_time_user,
		cpu_time_system = excluded.cpu_time_system, io_read_count = excluded.io_read_count,
		io_write_count = excluded.io_write_count, io_read_bytes = excluded.io_read_bytes,
		io_write_bytes = excluded.io_write_bytes, vcpus = excluded.vcpus,
		memory = excluded.memory, network_tap = excluded.network_tap, ipv4 = excluded.ipv4`)
}

// write inserts r; onConflict is Insert's (none: an error) or Save's.
func (d *DB) write(ctx context.Context, r Record, onConflict string) error {
	if r.UUID == "" {
		return ErrNoUUID
	}
	_, err := d.db.ExecContext(ctx, `INSERT INTO records (
		uuid, vm_hash, time_defined, time_prepared, time_started, time_stopping,
		cpu_time_user, cpu_time_system, io_read_count, io_write_count,
		io_read_bytes, io_write_bytes, vcpus, memory, network_tap, ipv4
	) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) `+onConflict,
		r.UUID, r.VMHash, nullTime(r.TimeDefined), nullTime(r.TimePrepared), nullTime(r.TimeStarted), nullTime(r.TimeStopping),
		r.CPUTimeUser, r.CPUTimeSystem, r.IOReadCount, r.IOWriteCount,
		r.IOReadBytes, r.IOWriteBytes, r.VCPUs, r.Memory, nullString(r.NetworkTap), nullString(r.IPv4))
	if err != nil {
		return fmt.Errorf("records: write %s: %w", r.UUID, err)
	}
	return nil
}

// CloseUnfinished sets time_stopping to at on every row that has none: the
// executions of an earlier run that ended with it (crash, kill -9). It
// returns how many rows it closed.
func (d *DB) CloseUnfinished(ctx context.Context, at time.Time) (int, error) {
	res, err := d.db.ExecContext(ctx, `UPDATE records SET time_stopping = ? WHERE time_stopping IS NULL`, nullTime(at))
	if err != nil {
		return 0, fmt.Errorf("records: close unfinished: %w", err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return 0, fmt.Errorf("records: close unfinished: %w", err)
	}
	return int(n), nil
}

// List returns up to limit records, newest (by time_defined) first;
// limit <= 0 means all.
func (d *DB) List(ctx context.Context, limit int) ([]Record, error) {
	if limit <= 0 {
		limit = -1 // SQLite: no limit
	}
	rows, err := d.db.QueryContext(ctx, `SELECT
		uuid, vm_hash, time_defined, time_prepared, time_started, time_stopping,
		cpu_time_user, cpu_time_system, io_read_count, io_write_count,
		io_read_bytes, io_write_bytes, vcpus, memory, network_tap, ipv4
		FROM records ORDER BY time_defined DESC, rowid DESC LIMIT ?`, limit)
	if err != nil {
		return nil, fmt.Errorf("records: list: %w", err)
	}
	defer rows.Close()
	out := []Record{}
	for rows.Next() {
		var (
			r                  Record
			td, tp, ts, tstop  sql.NullString
			tap, ipv4          sql.NullString
			cpuUser, cpuSys    sql.NullFloat64
			rc, wc, rb, wb, vc sql.NullInt64
			mem                sql.NullInt64
		)
		if err := rows.Scan(&r.UUID, &r.VMHash, &td, &tp, &ts, &tstop,
			&cpuUser, &cpuSys, &rc, &wc, &rb, &wb, &vc, &mem, &tap, &ipv4); err != nil {
			return nil, fmt.Errorf("records: scan: %w", err)
		}
		for _, f := range []struct {
			src sql.NullString
			dst *time.Time
		}{{td, &r.TimeDefined}, {tp, &r.TimePrepared}, {ts, &r.TimeStarted}, {tstop, &r.TimeStopping}} {
			if !f.src.Valid {
				continue
			}
			t, err := time.Parse(time.RFC3339Nano, f.src.String)
			if err != nil {
				return nil, fmt.Errorf("records: %s: bad time %q: %w", r.UUID, f.src.String, err)
			}
			*f.dst = t
		}
		r.CPUTimeUser, r.CPUTimeSystem = cpuUser.Float64, cpuSys.Float64
		r.IOReadCount, r.IOWriteCount, r.IOReadBytes, r.IOWriteBytes = rc.Int64, wc.Int64, rb.Int64, wb.Int64
		r.VCPUs, r.Memory, r.NetworkTap, r.IPv4 = int(vc.Int64), int(mem.Int64), tap.String, ipv4.String
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("records: list: %w", err)
	}
	return out, nil
}

// Close closes the database.
func (d *DB) Close() error {
	return d.db.Close()
}
