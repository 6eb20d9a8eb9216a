// Package sqlitedb opens the supervisor's SQLite files (execution records,
// the guest API's disk cache) with the settings they share, through the
// cgo-free modernc driver so that the binary stays static.
package sqlitedb

import (
	"database/sql"
	"fmt"
	"net/url"
	"os"
	"path/filepath"

	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// Open opens (creating if needed) the database at path, its directory
// made 0700. Every connection runs pragmas first (in order: some, like
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
