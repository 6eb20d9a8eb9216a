package guestapi

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/aleph-vm-go/vm-supervisor/internal/errkind"
	"github.com/aleph-vm-go/vm-supervisor/internal/sqlitedb"
)

// DiskStore is the embedded store: one SQLite file (the driver the
// execution records already use), so that the cache survives a restart.
// A usage table kept by triggers makes the caps exact within the same
// transaction as the write; incremental vacuum gives freed pages back.
//
// Writes go through one connection (SQLite serialises them anyway) and
// reads through a small pool of read-only ones: in WAL mode readers never
// wait for the writer nor the writer for them, so a program listing its
// keys in a loop cannot starve another's writes (with one connection for
// all, a neighbour's PUT took 1.2 s instead of 7 ms).
type DiskStore struct {
	db     *sql.DB // the writer
	read   *sql.DB // readers
	path   string
	limits Limits
	now    func() time.Time
}

const diskSchema = `
CREATE TABLE IF NOT EXISTS entries (
	ns      TEXT    NOT NULL,
	key     TEXT    NOT NULL,
	size    INTEGER NOT NULL,
	expires INTEGER NOT NULL, -- unix milliseconds
	value   BLOB    NOT NULL,
	UNIQUE (ns, key)
);
CREATE INDEX IF NOT EXISTS entries_expires ON entries (expires);
CREATE TABLE IF NOT EXISTS usage (
	ns    TEXT PRIMARY KEY,
	keys  INTEGER NOT NULL,
	bytes INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS entries_insert AFTER INSERT ON entries BEGIN
	INSERT INTO usage (ns, keys, bytes) VALUES (NEW.ns, 1, NEW.size)
	ON CONFLICT (ns) DO UPDATE SET keys = keys + 1, bytes = bytes + NEW.size;
END;
CREATE TRIGGER IF NOT EXISTS entries_update AFTER UPDATE OF size ON entries BEGIN
	UPDATE usage SET bytes = bytes - OLD.size + NEW.size WHERE ns = NEW.ns;
END;
CREATE TRIGGER IF NOT EXISTS entries_delete AFTER DELETE ON entries BEGIN
	UPDATE usage SET keys = keys - 1, bytes = bytes - OLD.size WHERE ns = OLD.ns;
END;
`

// OpenDisk opens (or creates) the store at path.
func OpenDisk(ctx context.Context, path string, limits Limits) (*DiskStore, error) {
	db, err := sqlitedb.Open(path,
		// auto_vacuum only takes effect on a new file, before the first table.
		"auto_vacuum(INCREMENTAL)",
		// The WAL is truncated back to this after checkpoints.
		"journal_size_limit(16777216)")
	if err != nil {
		return nil, fmt.Errorf("guest cache: %w", err)
	}
	// One writer: writes are serialised anyway.
	db.SetMaxOpenConns(1)
	if err := sqlitedb.RetryBusy(ctx, func() error {
		_, err := db.ExecContext(ctx, diskSchema)
		return err
	}); err != nil {
		db.Close()
		return nil, fmt.Errorf("guest cache: schema of %s: %w", path, err)
	}
	// Opened once the file is in WAL mode with its schema.
	read, err := sqlitedb.Open(path, "query_only(1)")
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("guest cache: %w", err)
	}
	// Few: each may hold a value the driver read (bounded by the cache's
	// values in flight too), and the machine's cores are the real limit.
	read.SetMaxOpenConns(readers)
	read.SetMaxIdleConns(readers)
	return &DiskStore{db: db, read: read, path: path, limits: limits.withDefaults(), now: time.Now}, nil
}

// readers is the size of the read pool: more than one execution's
// values and listings in flight (perProgramValues + perProgramLists), so
// that one program cannot hold them all.
const readers = 8

// maxListedKeys bounds what one listing returns (and holds in memory),
// whatever the per-program key cap is.
const maxListedKeys = 10_000

// Describe names the file.
func (s *DiskStore) Describe() string { return "embedded " + s.path }

// Close closes the file.
func (s *DiskStore) Close() error { return errors.Join(s.read.Close(), s.db.Close()) }

func (s *DiskStore) nowMs() int64 { return s.now().UnixMilli() }

// Get returns a live value; an expired one is removed on the way.
func (s *DiskStore) Get(ctx context.Context, ns, key string) ([]byte, bool, error) {
	var value []byte
	var expires int64
	err := s.read.QueryRowContext(ctx, `SELECT value, expires FROM entries WHERE ns = ? AND key = ?`, ns, key).Scan(&value, &expires)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("guest cache: get: %w", err)
	}
	if now := s.nowMs(); expires <= now {
		if _, err := s.db.ExecContext(ctx, `DELETE FROM entries WHERE ns = ? AND key = ? AND expires <= ?`, ns, key, now); err != nil {
			return nil, false, fmt.Errorf("guest cache: removing an expired entry: %w", err)
		}
		return nil, false, nil
	}
	return value, true, nil
}

// Set stores value if the caps allow it, in one transaction.
func (s *DiskStore) Set(ctx context.Context, ns, key string, value []byte) (err error) {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("guest cache: set: %w", err)
	}
	defer func() {
		if err != nil {
			_ = tx.Rollback()
		}
	}()
	now := s.nowMs()
	// Lazily drop this program's expired entries, so they never count.
	if _, err = tx.ExecContext(ctx, `DELETE FROM entries WHERE ns = ? AND expires <= ?`, ns, now); err != nil {
		return fmt.Errorf("guest cache: set: %w", err)
	}
	var old sql.NullInt64
	err = tx.QueryRowContext(ctx, `SELECT size FROM entries WHERE ns = ? AND key = ?`, ns, key).Scan(&old)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("guest cache: set: %w", err)
	}
	var keys, bytes int64
	err = tx.QueryRowContext(ctx, `SELECT keys, bytes FROM usage WHERE ns = ?`, ns).Scan(&keys, &bytes)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("guest cache: set: %w", err)
	}
	size := int64(len(value))
	l := s.limits
	if !old.Valid && l.MaxKeys > 0 && keys+1 > l.MaxKeys {
		return quotaError("cache quota exceeded: this program already has %d keys (at most %d)", keys, l.MaxKeys)
	}
	if l.MaxBytes > 0 && bytes-old.Int64+size > l.MaxBytes {
		return quotaError("cache quota exceeded: %d bytes stored plus %d would pass the program's %d bytes", bytes-old.Int64, size, l.MaxBytes)
	}
	if l.MaxTotalBytes > 0 {
		total, err := totalBytes(ctx, tx)
		if err != nil {
			return err
		}
		if total-old.Int64+size > l.MaxTotalBytes {
			// Expired entries of other programs may be what fills it.
			if _, err = tx.ExecContext(ctx, `DELETE FROM entries WHERE expires <= ?`, now); err != nil {
				return fmt.Errorf("guest cache: set: %w", err)
			}
			if total, err = totalBytes(ctx, tx); err != nil {
				return err
			}
			if total-old.Int64+size > l.MaxTotalBytes {
				return errkind.New(errkind.NoCapacity, "the guest cache of this node is full (%d bytes)", l.MaxTotalBytes)
			}
		}
	}
	_, err = tx.ExecContext(ctx, `INSERT INTO entries (ns, key, size, expires, value) VALUES (?, ?, ?, ?, ?)
		ON CONFLICT (ns, key) DO UPDATE SET size = excluded.size, expires = excluded.expires, value = excluded.value`,
		ns, key, size, now+l.Expiry.Milliseconds(), value)
	if err != nil {
		return fmt.Errorf("guest cache: set: %w", err)
	}
	if err = tx.Commit(); err != nil {
		return fmt.Errorf("guest cache: set: %w", err)
	}
	return nil
}

func totalBytes(ctx context.Context, tx *sql.Tx) (int64, error) {
	var total int64
	if err := tx.QueryRowContext(ctx, `SELECT COALESCE(SUM(bytes), 0) FROM usage`).Scan(&total); err != nil {
		return 0, fmt.Errorf("guest cache: set: %w", err)
	}
	return total, nil
}

// Delete removes a live key; an expired one counts as absent, as in Redis.
func (s *DiskStore) Delete(ctx context.Context, ns, key string) (int, error) {
	now := s.nowMs()
	res, err := s.db.ExecContext(ctx, `DELETE FROM entries WHERE ns = ? AND key = ? AND expires > ?`, ns, key, now)
	if err != nil {
		return 0, fmt.Errorf("guest cache: delete: %w", err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return 0, fmt.Errorf("guest cache: delete: %w", err)
	}
	if _, err := s.db.ExecContext(ctx, `DELETE FROM entries WHERE ns = ? AND key = ? AND expires <= ?`, ns, key, now); err != nil {
		return 0, fmt.Errorf("guest cache: delete: %w", err)
	}
	return int(n), nil
}

// Keys lists live keys with SQLite's GLOB, which treats `*` and `?` as
// Redis's KEYS does and every other character ValidPattern lets through
// literally; at most maxListedKeys of them.
func (s *DiskStore) Keys(ctx context.Context, ns, pattern string) ([]string, error) {
	rows, err := s.read.QueryContext(ctx, `SELECT key FROM entries WHERE ns = ? AND expires > ? AND key GLOB ? ORDER BY key LIMIT ?`,
		ns, s.nowMs(), pattern, maxListedKeys)
	if err != nil {
		return nil, fmt.Errorf("guest cache: keys: %w", err)
	}
	defer rows.Close()
	keys := []string{}
	for rows.Next() {
		var k string
		if err := rows.Scan(&k); err != nil {
			return nil, fmt.Errorf("guest cache: keys: %w", err)
		}
		keys = append(keys, k)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("guest cache: keys: %w", err)
	}
	return keys, nil
}

// Sweep removes every expired entry and gives the freed pages back to the
// file system.
func (s *DiskStore) Sweep(ctx context.Context) error {
	if _, err := s.db.ExecContext(ctx, `DELETE FROM entries WHERE expires <= ?`, s.nowMs()); err != nil {
		return fmt.Errorf("guest cache: sweep: %w", err)
	}
	if _, err := s.db.ExecContext(ctx, `DELETE FROM usage WHERE keys <= 0`); err != nil {
		return fmt.Errorf("guest cache: sweep: %w", err)
	}
	if _, err := s.db.ExecContext(ctx, `PRAGMA incremental_vacuum`); err != nil {
		return fmt.Errorf("guest cache: vacuum: %w", err)
	}
	return nil
}
