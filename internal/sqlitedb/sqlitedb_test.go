package sqlitedb

import (
	"context"
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// A real lock conflict is recognised, and RetryBusy runs again through it
// but not through other errors.
func TestBusyAndRetry(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "sub", "x.sqlite3")
	holder, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	tx, err := holder.BeginTx(ctx, nil) // immediate: takes the write lock
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.ExecContext(ctx, "CREATE TABLE t (x)"); err != nil {
		t.Fatal(err)
	}
	impatient, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(0)&_txlock=immediate")
	if err != nil {
		t.Fatal(err)
	}
	defer impatient.Close()
	calls := 0
	err = RetryBusy(ctx, func() error {
		calls++
		itx, err := impatient.BeginTx(ctx, nil)
		if err != nil {
			if calls == 2 {
				_ = tx.Commit() // the holder lets go: the third try gets through
			}
			return err
		}
		return itx.Rollback()
	})
	if err != nil || calls != 3 {
		t.Errorf("RetryBusy: %v after %d calls, want success at the third", err, calls)
	}
	calls = 0
	other := errors.New("not a lock")
	if err := RetryBusy(ctx, func() error { calls++; return other }); !errors.Is(err, other) || calls != 1 {
		t.Errorf("another error was retried: %v after %d calls", err, calls)
	}
	if Busy(other) || Busy(nil) {
		t.Error("Busy said yes to an error that is no lock")
	}
}

// The database and its WAL and shared-memory files are 0600, whatever the
// umask, from their first write; files an earlier version left 0644 are
// made 0600 on open.
func TestFilesArePrivate(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	dir := t.TempDir()
	path := filepath.Join(dir, "db", "x.sqlite3")
	db, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec("CREATE TABLE t (v); INSERT INTO t VALUES ('secret')"); err != nil {
		t.Fatal(err)
	}
	modes := func() map[string]os.FileMode {
		m := map[string]os.FileMode{}
		for _, suffix := range []string{"", "-wal", "-shm"} {
			fi, err := os.Stat(path + suffix)
			if err != nil {
				t.Fatalf("%s: %v", suffix, err)
			}
			m[path+suffix] = fi.Mode().Perm()
		}
		return m
	}
	for p, mode := range modes() {
		if mode != 0o600 {
			t.Errorf("%s is %o, want 600", p, mode)
		}
	}
	if fi, err := os.Stat(filepath.Dir(path)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("directory: %v %v", fi, err)
	}
	db.Close()

	// A file of an earlier version, readable by all.
	for _, suffix := range []string{"", "-wal", "-shm"} {
		if _, err := os.Stat(path + suffix); err == nil {
			if err := os.Chmod(path+suffix, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	db, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var v string
	if err := db.QueryRow("SELECT v FROM t").Scan(&v); err != nil || v != "secret" {
		t.Fatalf("reopened: %q %v", v, err)
	}
	for p, mode := range modes() {
		if mode != 0o600 {
			t.Errorf("after reopening, %s is %o, want 600", p, mode)
		}
	}
}
