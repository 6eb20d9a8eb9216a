package sqlitedb

import (
	"context"
	"database/sql"
	"errors"
	"path/filepath"
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
