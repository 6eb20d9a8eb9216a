// Package sqlitedb opens the supervisor's SQLite files (execution records,
// the guest API's disk cache) with the settings they share, through the
// cgo-free modernc driver so that the binary stays static.
package sqlitedb

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"modernc.org/sqlite" // also registers the "sqlite" driver
)

// Open opens (creating if needed) the database at path, its directory
// made 0700 and the file 0600 before SQLite first writes to it (SQLite
// gives its -wal and -shm files the database file's mode): programs' data
// and the node's records are no other local user's to read. Files of an
// earlier version are made 0600 too. Every connection runs pragmas first (in order: some, like
// auto_vacuum, only act on a new file), then the shared ones:
//   - WAL, so that readers run while a writer writes;
//   - busy_timeout, so that concurrent writers wait for the lock instead
//     of failing at once;
//   - synchronous=NORMAL, durable at each checkpoint, safe with WAL;
//   - transactions take the write lock at BEGIN, so that a write never has
//     to upgrade a read lock (which fails with SQLITE_BUSY, timeout or not).
func Open(path string, pragmas ...string) (*sql.DB, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("create directory: %w", err)
	}
	if err := makePrivate(path); err != nil {
		return nil, err
	}
	q := url.Values{}
	for _, p := range pragmas {
		q.Add("_pragma", p)
	}
	q.Add("_pragma", "busy_timeout(10000)")
	q.Add("_pragma", "journal_mode(WAL)")
	q.Add("_pragma", "synchronous(NORMAL)")
	q.Set("_txlock", "immediate")
	dsn := (&url.URL{Scheme: "file", Path: path, RawQuery: q.Encode()}).String()
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return db, nil
}

// makePrivate creates path 0600 if it is missing and makes it and
// SQLite's side files 0600 whatever the umask was when they were made.
func makePrivate(path string) error {
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	f.Close()
	for _, p := range []string{path, path + "-wal", path + "-shm", path + "-journal"} {
		if err := os.Chmod(p, 0o600); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("make %s private: %w", p, err)
		}
	}
	return nil
}

// busyCode is SQLITE_BUSY; extended codes keep it in their low byte.
const busyCode = 5

// Busy reports whether err is SQLite's "database is locked".
func Busy(err error) bool {
	var se *sqlite.Error
	return errors.As(err, &se) && se.Code()&0xff == busyCode
}

// RetryBusy runs fn again while it fails with SQLITE_BUSY, a few times
// with growing pauses. busy_timeout does not cover every case: while a
// brand-new file is turned to WAL mode, another connection's first
// transaction can be refused at once (4 runs in 300 of 8 concurrent opens,
// on a loaded machine).
func RetryBusy(ctx context.Context, fn func() error) error {
	for attempt := 1; ; attempt++ {
		err := fn()
		if err == nil || !Busy(err) || attempt == 20 {
			return err
		}
		select {
		case <-time.After(time.Duration(attempt) * 10 * time.Millisecond):
		case <-ctx.Done():
			return fmt.Errorf("%w (after: %w)", ctx.Err(), err)
		}
	}
}
