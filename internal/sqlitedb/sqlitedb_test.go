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

// The database and the files SQLite makes beside it (WAL, shared memory)
// are 0600, whatever the umask, and a file left 0644 by an older version
// is made 0600 again.
func TestFilesArePrivate(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	dir := t.TempDir()
	path := filepath.Join(dir, "x.sqlite3")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	db, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec("CREATE TABLE t (x); INSERT INTO t VALUES ('secret')"); err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(path + "*")
	if len(files) < 2 {
		t.Fatalf("want the database and its WAL files, have %v", files)
	}
	for _, f := range files {
		fi, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want 0600", filepath.Base(f), fi.Mode())
		}
	}
}
