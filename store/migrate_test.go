package store_test

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/internal/testenv"
	"github.com/conveyor/conveyor/store"
)

// addPages is a test migration that alters documents, as a migration
// adding a column does: it needs the table's ACCESS EXCLUSIVE lock.
var addPages = fstest.MapFS{"9001_add_pages.sql": {Data: []byte("ALTER TABLE documents ADD COLUMN pages integer;\n")}}

// holdDocuments opens a transaction that has read documents and keeps it
// open (an idle psql session, a long report), until the returned function
// ends it (also at cleanup).
func holdDocuments(t *testing.T, db *sql.DB) (release func()) {
	t.Helper()
	tx, err := db.BeginTx(t.Context(), nil)
	if err != nil {
		t.Fatal(err)
	}
	var n int
	if err := tx.QueryRowContext(t.Context(), "SELECT count(*) FROM documents").Scan(&n); err != nil {
		t.Fatal(err)
	}
	var once bool
	release = func() {
		if !once {
			once = true
			_ = tx.Rollback()
		}
	}
	t.Cleanup(release)
	return release
}

// waitForLockWait waits until a session of the test database waits for a
// lock in a statement that holds stmt.
func waitForLockWait(t *testing.T, db *sql.DB, stmt string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for count(t, db, `SELECT count(*) FROM pg_stat_activity
		WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE $1`, "%"+stmt+"%") == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("no session waits for a lock in %q", stmt)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// loggedStore is newStore with the store's log in logs (nil: the test's
// output).
func loggedStore(t *testing.T, logs io.Writer) (*store.Store, *sql.DB) {
	t.Helper()
	if logs == nil {
		logs = t.Output()
	}
	url := testenv.DatabaseURL(t)
	st, err := store.Open(store.Config{URL: url, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	if _, err := st.Migrate(t.Context()); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	return st, rawDB(t, url)
}

func hasColumn(t *testing.T, db *sql.DB, table, column string) bool {
	t.Helper()
	return count(t, db, "SELECT count(*) FROM information_schema.columns WHERE table_name = $1 AND column_name = $2", table, column) == 1
}

// TestMigrateDoesNotHoldUpReaders: a migration altering a table that
// another session holds a transaction open on waits for it, and
// PostgreSQL queues every read of the table behind the waiting ALTER. With
// a lock timeout the migration gives up after it, lets the reads through
// and tries again, so a read waits at most about one lock timeout; and the
// migration succeeds once the other session ends its transaction.
func TestMigrateDoesNotHoldUpReaders(t *testing.T) {
	t.Parallel()
	st, db := loggedStore(t, nil)
	ctx := t.Context()
	release := holdDocuments(t, db)

	type result struct {
		ran []string
		err error
	}
	res := make(chan result, 1)
	go func() {
		ran, err := st.MigrateFS(ctx, addPages, 300*time.Millisecond, 100*time.Millisecond)
		res <- result{ran, err}
	}()
	waitForLockWait(t, db, "ALTER TABLE documents")

	// Reads keep being answered, each within about one lock timeout, for
	// several attempts of the migration.
	for i := range 5 {
		rctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		began := time.Now()
		_, err := st.Document(rctx, events.NewID())
		took := time.Since(began)
		cancel()
		if !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("read %d while the migration waits: %v after %s, want ErrNotFound", i, err, took.Round(time.Millisecond))
		}
		if took > 2*time.Second {
			t.Errorf("read %d took %s while the migration waited", i, took)
		}
		time.Sleep(150 * time.Millisecond)
	}
	select {
	case r := <-res:
		t.Fatalf("migration ended while the table was held: %q, %v", r.ran, r.err)
	default:
	}

	release()
	select {
	case r := <-res:
		if r.err != nil || !slices.Equal(r.ran, []string{"9001_add_pages.sql"}) {
			t.Fatalf("migration after the table was released: %q, %v", r.ran, r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("migration did not finish after the table was released")
	}
	if !hasColumn(t, db, "documents", "pages") {
		t.Error("column pages missing after the migration")
	}
}

// TestMigrateNamesWhatItWaitsFor: a migration that never gets its lock
// before ctx is done fails with an error that says what it waited for,
// and leaves nothing applied.
func TestMigrateNamesWhatItWaitsFor(t *testing.T) {
	t.Parallel()
	var logs bytes.Buffer // written by Migrate's goroutine only
	st, db := loggedStore(t, &logs)
	holdDocuments(t, db)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	ran, err := st.MigrateFS(ctx, addPages, 200*time.Millisecond, 100*time.Millisecond)
	if err == nil {
		t.Fatalf("Migrate with documents held = %q, nil; want an error", ran)
	}
	t.Logf("error: %v", err)
	for _, want := range []string{"9001_add_pages.sql", "waiting for a lock on documents: another session holds a transaction open on it", "idle in transaction"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("error %q does not wrap ctx's", err)
	}
	if !strings.Contains(logs.String(), "migration waiting for a lock") ||
		!strings.Contains(logs.String(), "waiting for a lock on documents") {
		t.Errorf("the waits were not logged: %q", logs.String())
	}
	if len(ran) != 0 || hasColumn(t, db, "documents", "pages") ||
		count(t, db, "SELECT count(*) FROM schema_migrations WHERE version = 9001") != 0 {
		t.Errorf("the migration is (partly) applied: ran %q", ran)
	}
}
