package store_test

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lib/pq"

	"github.com/conveyor/conveyor/internal/testenv"
	"github.com/conveyor/conveyor/store"
)

// openStore opens a Store on a fresh, empty database, closed at cleanup. It
// returns the database URL too, for tests that need a second connection.
func openStore(t *testing.T) (*store.Store, string) {
	t.Helper()
	url := testenv.DatabaseURL(t)
	st, err := store.Open(store.Config{URL: url})
	if err != nil {
		t.Fatalf("store.Open: %v", err)
	}
	t.Cleanup(func() {
		if err := st.Close(); err != nil {
			t.Errorf("close store: %v", err)
		}
	})
	return st, url
}

// newStore returns a Store on a fresh database with the migrations applied,
// by the same code production runs.
func newStore(t *testing.T) (*store.Store, *sql.DB) {
	t.Helper()
	st, url := openStore(t)
	if _, err := st.Migrate(t.Context()); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	return st, rawDB(t, url)
}

// rawDB is a plain connection for what the store's API does not offer:
// inspecting tables and sabotaging transactions. The driver is registered
// by package store.
func rawDB(t *testing.T, url string) *sql.DB {
	t.Helper()
	db, err := sql.Open("postgres", url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := db.Close(); err != nil {
			t.Errorf("close raw db: %v", err)
		}
	})
	return db
}

func count(t *testing.T, db *sql.DB, query string, args ...any) int {
	t.Helper()
	var n int
	// The test's own context may be cancelled already in cleanups.
	if err := db.QueryRowContext(context.Background(), query, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

func TestOpenValidates(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		cfg     store.Config
		wantErr []string
	}{
		{name: "no url", cfg: store.Config{}, wantErr: []string{"URL is required"}},
		{name: "negative pool", cfg: store.Config{URL: "postgres://x/y", MaxOpenConns: -1}, wantErr: []string{"MaxOpenConns"}},
		{name: "every problem at once", cfg: store.Config{MaxOpenConns: -1}, wantErr: []string{"URL is required", "MaxOpenConns"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			st, err := store.Open(tt.cfg)
			if err == nil {
				_ = st.Close()
				t.Fatal("Open: no error")
			}
			for _, want := range tt.wantErr {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("Open error %q does not mention %q", err, want)
				}
			}
		})
	}
}

func TestMigrate(t *testing.T) {
	t.Parallel()
	st, url := openStore(t)
	ctx := t.Context()

	ran, err := st.Migrate(ctx)
	if err != nil {
		t.Fatalf("first Migrate: %v", err)
	}
	if want := allMigrations(t); !slices.Equal(ran, want) {
		t.Fatalf("first Migrate applied %q, want %q", ran, want)
	}
	ran, err = st.Migrate(ctx)
	if err != nil {
		t.Fatalf("second Migrate: %v", err)
	}
	if len(ran) != 0 {
		t.Fatalf("second Migrate applied %q, want nothing", ran)
	}

	db := rawDB(t, url)
	if n := count(t, db, "SELECT count(*) FROM schema_migrations"); n != len(allMigrations(t)) {
		t.Errorf("schema_migrations has %d rows, want %d", n, len(allMigrations(t)))
	}
	for _, table := range []string{"documents", "emails", "processed_events"} {
		if n := count(t, db, "SELECT count(*) FROM information_schema.tables WHERE table_name = $1", table); n != 1 {
			t.Errorf("table %s missing after Migrate", table)
		}
	}
	if err := st.Ping(ctx); err != nil {
		t.Errorf("Ping: %v", err)
	}
}

// TestMigrateConcurrent starts several migrators at once on a fresh
// database, as several replicas starting together do. The advisory lock
// must let exactly one apply each migration, and the others must see it
// applied rather than fail on "relation already exists".
func TestMigrateConcurrent(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		migrators  int
		sharedPool bool
	}{
		{name: "two processes", migrators: 2},
		{name: "five processes", migrators: 5},
		{name: "one pool, four callers", migrators: 4, sharedPool: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			url := testenv.DatabaseURL(t)
			stores := make([]*store.Store, tt.migrators)
			for i := range stores {
				if tt.sharedPool && i > 0 {
					stores[i] = stores[0]
					continue
				}
				st, err := store.Open(store.Config{URL: url})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = st.Close() })
				stores[i] = st
			}

			start := make(chan struct{})
			results := make([][]string, tt.migrators)
			errs := make([]error, tt.migrators)
			var wg sync.WaitGroup
			for i, st := range stores {
				wg.Go(func() {
					<-start
					results[i], errs[i] = st.Migrate(t.Context())
				})
			}
			close(start)
			wg.Wait()

			var applied []string
			for i := range stores {
				if errs[i] != nil {
					t.Errorf("Migrate #%d: %v", i, errs[i])
				}
				applied = append(applied, results[i]...)
			}
			if want := allMigrations(t); !slices.Equal(applied, want) {
				t.Errorf("migrations applied across all callers = %q, want %q once", applied, want)
			}
			if n := count(t, rawDB(t, url), "SELECT count(*) FROM schema_migrations"); n != len(allMigrations(t)) {
				t.Errorf("schema_migrations has %d rows, want %d", n, len(allMigrations(t)))
			}
		})
	}
}

// failAtCommit installs a deferred constraint trigger on the inbox that
// raises for one event id. The INSERT succeeds and the error surfaces only
// at COMMIT: a real commit failure, the kind a swallowed commit error loses.
func failAtCommit(t *testing.T, db *sql.DB, eventID string) {
	t.Helper()
	for _, q := range []string{
		`CREATE FUNCTION fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			RAISE EXCEPTION 'refused at commit: %', NEW.event_id USING ERRCODE = 'check_violation';
		END $$`,
		fmt.Sprintf(`CREATE CONSTRAINT TRIGGER fail_at_commit AFTER INSERT ON processed_events
			DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
			WHEN (NEW.event_id = %s) EXECUTE FUNCTION fail_at_commit()`, pq.QuoteLiteral(eventID)),
	} {
		if _, err := db.ExecContext(t.Context(), q); err != nil {
			t.Fatalf("install commit failure: %v", err)
		}
	}
}

func TestWithTx(t *testing.T) {
	t.Parallel()
	errFn := errors.New("fn failed")
	tests := []struct {
		name      string
		id        string
		fnErr     error
		panicWith any
		sabotage  bool // the commit itself fails
		wantRow   bool
		wantErrIs error
		wantPgErr pq.ErrorCode
	}{
		{name: "nil commits", id: "commit", wantRow: true},
		{name: "error rolls back", id: "rollback", fnErr: errFn, wantErrIs: errFn},
		{name: "commit error is returned", id: "commit-fails", sabotage: true, wantPgErr: "23514"},
		{name: "panic rolls back and re-panics", id: "panics", panicWith: "boom"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			st, db := newStore(t)
			ctx := t.Context()
			if tt.sabotage {
				failAtCommit(t, db, tt.id)
			}

			var recovered any
			err := func() (err error) {
				defer func() { recovered = recover() }()
				return st.WithTx(ctx, func(tx *store.Tx) error {
					fresh, err := tx.Inbox(ctx, []store.InboxEntry{{EventID: tt.id, EventType: "t"}})
					if err != nil {
						return err
					}
					if !fresh[tt.id] {
						return fmt.Errorf("inbox did not report %s fresh", tt.id)
					}
					// Inside the transaction the row is there.
					if n := countInTx(ctx, t, tx, tt.id); n != 1 {
						return fmt.Errorf("inbox row not visible inside its transaction")
					}
					if tt.panicWith != nil {
						panic(tt.panicWith)
					}
					return tt.fnErr
				})
			}()

			if recovered != tt.panicWith {
				t.Fatalf("recovered %v, want %v", recovered, tt.panicWith)
			}
			switch {
			case tt.wantErrIs != nil:
				if !errors.Is(err, tt.wantErrIs) {
					t.Errorf("WithTx = %v, want %v", err, tt.wantErrIs)
				}
			case tt.wantPgErr != "":
				var pqErr *pq.Error
				if !errors.As(err, &pqErr) || pqErr.Code != tt.wantPgErr {
					t.Errorf("WithTx = %v, want the commit's error with code %s", err, tt.wantPgErr)
				}
				if err != nil && !strings.Contains(err.Error(), "commit") {
					t.Errorf("WithTx = %v, want it to say the commit failed", err)
				}
			case tt.panicWith == nil && err != nil:
				t.Errorf("WithTx = %v, want nil", err)
			}

			want := 0
			if tt.wantRow {
				want = 1
			}
			if n := count(t, db, "SELECT count(*) FROM processed_events WHERE event_id = $1", tt.id); n != want {
				t.Errorf("%d inbox rows visible after WithTx, want %d", n, want)
			}
			// No connection is left inside an open transaction, holding the
			// locks of its rows.
			if n := count(t, db, `SELECT count(*) FROM pg_stat_activity
				WHERE datname = current_database() AND state LIKE 'idle in transaction%'`); n != 0 {
				t.Errorf("%d connections left idle in a transaction", n)
			}
			// The pool is usable afterwards.
			if err := st.WithTx(ctx, func(tx *store.Tx) error {
				_, err := tx.Inbox(ctx, []store.InboxEntry{{EventID: tt.id + "-after", EventType: "t"}})
				return err
			}); err != nil {
				t.Errorf("WithTx after the first one: %v", err)
			}
		})
	}
}

// countInTx asks the transaction itself whether it sees its inbox row, by
// offering the id again: a row the transaction wrote comes back as not fresh.
func countInTx(ctx context.Context, t *testing.T, tx *store.Tx, id string) int {
	t.Helper()
	fresh, err := tx.Inbox(ctx, []store.InboxEntry{{EventID: id, EventType: "t"}})
	if err != nil {
		t.Errorf("Inbox: %v", err)
		return -1
	}
	if fresh[id] {
		return 0
	}
	return 1
}

// TestWithTxBeginError checks that WithTx does not call fn when it cannot
// begin, and says so.
func TestWithTxBeginError(t *testing.T) {
	t.Parallel()
	st, _ := newStore(t)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	called := false
	err := st.WithTx(ctx, func(*store.Tx) error { called = true; return nil })
	if err == nil || called {
		t.Fatalf("WithTx on a cancelled context = %v, fn called %v; want an error and no call", err, called)
	}
}

// allMigrations lists the migration files, in order: each must be applied
// exactly once.
func allMigrations(t *testing.T) []string {
	t.Helper()
	entries, err := os.ReadDir("migrations")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if len(names) == 0 {
		t.Fatal("no migrations")
	}
	return names
}

// TestPreparedStatementSurvivesAResultTypeChange: a migration that changes
// a column a prepared statement returns (here the collation of the inbox's
// event_id, which the statement picking new events returns) makes
// PostgreSQL refuse the statement prepared before it, on every connection it
// was prepared on, with "cached plan must not change result type". The
// store must drop the stale statement after the first refusal, not keep
// failing, and prepare it again later.
func TestPreparedStatementSurvivesAResultTypeChange(t *testing.T) {
	t.Parallel()
	st, db := newStore(t)
	ctx := t.Context()
	// Every transaction offers "first" again, so that the inbox runs the
	// statement that returns rows: the one that picks the new events.
	record := func(id string, hold <-chan struct{}) error {
		return st.WithTx(ctx, func(tx *store.Tx) error {
			_, err := tx.Inbox(ctx, []store.InboxEntry{{EventID: id, EventType: "email.sent"}, {EventID: "first", EventType: "email.sent"}})
			if hold != nil {
				<-hold
			}
			return err
		})
	}
	// The first prepares the statement; then three transactions open at
	// once use it on three connections, so that every idle connection of
	// the pool has it.
	if err := record("first", nil); err != nil {
		t.Fatalf("record before the change: %v", err)
	}
	hold := make(chan struct{})
	errs := make(chan error, 3)
	for i := range 3 {
		go func() { errs <- record(fmt.Sprintf("before-%d", i), hold) }()
	}
	deadline := time.Now().Add(10 * time.Second)
	for count(t, db, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle in transaction'") < 3 {
		if time.Now().After(deadline) {
			t.Fatal("the three transactions did not all start")
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(hold)
	for range 3 {
		if err := <-errs; err != nil {
			t.Fatalf("record before the change: %v", err)
		}
	}
	if !st.IsPrepared(store.QInsertedHere) {
		t.Fatal("the statement is not prepared; the test needs it prepared")
	}

	if _, err := db.ExecContext(ctx, `ALTER TABLE processed_events ALTER COLUMN event_id TYPE text COLLATE "C"`); err != nil {
		t.Fatal(err)
	}
	failed := 0
	for i := range 5 {
		if err := record(fmt.Sprintf("after-%d", i), nil); err != nil {
			failed++
			if !strings.Contains(err.Error(), "cached plan must not change result type") {
				t.Fatalf("record after the change: %v", err)
			}
		}
	}
	// Exactly one: PostgreSQL does refuse the stale statement (else this
	// test tests nothing), and the store drops it everywhere at once.
	if failed != 1 {
		t.Errorf("%d of 5 transactions after the change failed, want exactly the first", failed)
	}
	// Prepared again (prepare retries at most once a second), it works.
	time.Sleep(1100 * time.Millisecond)
	if err := record("later", nil); err != nil {
		t.Errorf("record once the statement is prepared again: %v", err)
	}
	if !st.IsPrepared(store.QInsertedHere) {
		t.Error("the statement was not prepared again")
	}
	if n := count(t, db, "SELECT count(*) FROM processed_events"); n != 1+3+5-failed+1 {
		t.Errorf("%d inbox rows, want %d", n, 1+3+5-failed+1)
	}
}

// Writes PostgreSQL refuses for their data, whatever the retry, are data
// errors (the projector dead-letters such an event at once); an error of
// the connection or the server is not.
func TestIsDataError(t *testing.T) {
	t.Parallel()
	st, _ := newStore(t)
	ctx := t.Context()
	inbox := func(id string) error {
		return st.WithTx(ctx, func(tx *store.Tx) error {
			_, err := tx.LockAndInbox(ctx, []string{"k"}, []store.InboxEntry{{EventID: id, EventType: "x"}})
			return err
		})
	}
	for _, tt := range []struct {
		name string
		err  error
		want bool
	}{
		{"a NUL byte in text", inbox("a\x00b"), true},
		// Over the 2,704 bytes a btree entry may hold: PostgreSQL's
		// "index row size exceeds maximum" (54000).
		{"an event id too long for its index", inbox(incompressible(4000)), true},
		// Over a page: refused while the index entry is formed
		// (index_form_tuple, index_form_tuple_context from PostgreSQL 16).
		{"an event id too long for an index page", inbox(incompressible(10_000)), true},
		// The same code refuses every write near transaction id wraparound.
		{"writes refused near wraparound", &pq.Error{Code: "54000", Routine: "GetNewTransactionId",
			Message: `database is not accepting commands to avoid wraparound data loss in database "conveyor"`}, false},
		{"a closed database", func() error { _ = st.Close(); return inbox("fine") }(), false},
	} {
		if tt.err == nil {
			t.Errorf("%s: no error", tt.name)
			continue
		}
		if got := store.IsDataError(tt.err); got != tt.want {
			t.Errorf("%s: IsDataError(%v) = %v, want %v", tt.name, tt.err, got, tt.want)
		}
	}
}

// incompressible returns n hex digits that PostgreSQL cannot compress to
// fit a btree entry.
func incompressible(n int) string {
	var b strings.Builder
	for i := 0; b.Len() < n; i++ {
		sum := sha256.Sum256([]byte(strconv.Itoa(i)))
		b.WriteString(hex.EncodeToString(sum[:]))
	}
	return b.String()[:n]
}
