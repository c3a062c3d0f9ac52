// Package store is Conveyor's Postgres access: the read models (documents,
// emails), the projector's inbox, transactions and the embedded SQL
// migrations. It is the only importer of sqlx and lib/pq.
//
// Only the projector writes read models; the api reads them. store must not
// import bus, api, handlers, projector or cache.
package store

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"log/slog"
	"net/url"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jmoiron/sqlx"
	"github.com/lib/pq"
)

//go:embed migrations/*.sql
var migrationFiles embed.FS

// ErrNotFound is returned when a read model row does not exist.
var ErrNotFound = errors.New("not found")

// Config configures a Store.
type Config struct {
	// URL is a PostgreSQL connection URL. Required.
	URL string
	// MaxOpenConns defaults to 20.
	MaxOpenConns int
	// ConnMaxLifetime defaults to 30m.
	ConnMaxLifetime time.Duration
	// Logger receives what Migrate has to say while it waits (a migration
	// waiting for a lock). Defaults to slog.Default().
	Logger *slog.Logger
}

func (c *Config) setDefaults() {
	if c.MaxOpenConns == 0 {
		c.MaxOpenConns = 20
	}
	if c.ConnMaxLifetime == 0 {
		c.ConnMaxLifetime = 30 * time.Minute
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Validate reports every configuration problem at once.
func (c *Config) Validate() error {
	var errs []error
	if c.URL == "" {
		errs = append(errs, errors.New("store: URL is required"))
	}
	if c.MaxOpenConns < 1 {
		errs = append(errs, errors.New("store: MaxOpenConns must be at least 1"))
	}
	return errors.Join(errs...)
}

// Store is a handle on the database.
type Store struct {
	db  *sqlx.DB
	log *slog.Logger
	// stmts holds the prepared read-model writes, by query text (see
	// readModelWrites).
	stmts       sync.Map
	allPrepared atomic.Bool
	prepareMu   sync.Mutex
	preparedAt  time.Time // of the last attempt
	// forgotten counts statements dropped as stale (forgetIfStale), so that
	// a prepare running meanwhile does not mark everything prepared.
	forgotten atomic.Int64
}

// Open returns a Store. It does not contact the database: callers that
// must ride out a database that is still starting use Ping with retries.
func Open(cfg Config) (*Store, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	db, err := sqlx.Open("postgres", withOneRoundTrip(cfg.URL))
	if err != nil {
		return nil, fmt.Errorf("open database: %w", err)
	}
	db.SetMaxOpenConns(cfg.MaxOpenConns)
	db.SetMaxIdleConns(cfg.MaxOpenConns)
	db.SetConnMaxLifetime(cfg.ConnMaxLifetime)
	return &Store{db: db, log: cfg.Logger}, nil
}

// withOneRoundTrip turns on lib/pq's binary_parameters unless the URL sets
// it: a query with arguments is then parsed, bound and run in one round trip
// instead of two, which shortens every projector transaction by a round
// trip per statement. It is safe here because no argument is []byte bound
// to a jsonb or other binary-sensitive column (the read models hold text,
// numbers and times).
func withOneRoundTrip(dsn string) string {
	if strings.Contains(dsn, "binary_parameters") {
		return dsn
	}
	if strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://") {
		u, err := url.Parse(dsn)
		if err != nil {
			return dsn // sqlx.Open reports it
		}
		q := u.Query()
		q.Set("binary_parameters", "yes")
		u.RawQuery = q.Encode()
		return u.String()
	}
	return strings.TrimSpace(dsn + " binary_parameters=yes")
}

// Close closes the connection pool.
func (s *Store) Close() error { return s.db.Close() }

// Ping checks the database answers a query.
func (s *Store) Ping(ctx context.Context) error {
	var one int
	if err := s.db.GetContext(ctx, &one, "SELECT 1"); err != nil {
		return fmt.Errorf("ping database: %w", err)
	}
	return nil
}

// Tx is a transaction of the store.
type Tx struct {
	tx *sqlx.Tx
	s  *Store
	// created holds the cache keys of the rows this transaction inserted.
	created map[string]bool
	// written lists the rows each statement wrote, and inboxed the events
	// each inbox call recorded: kept as they come, since only a rare path
	// looks them up.
	written []writes
	inboxed []map[string]bool
}

// writes is the rows of ids that one statement wrote.
type writes struct {
	key func(id string) string
	ids []string
}

// readModelWrites are the statements of the read-model writes: a few
// fixed statements run thousands of times a second. Each is prepared (see
// Store.prepare), so each pooled connection parses it once and PostgreSQL
// keeps its plan, where an unprepared query is parsed and planned on every
// call: with small batches (a quiet system) planning them cost more than
// running them.
var readModelWrites []string

// readModelWrite registers query as a read-model write and returns it.
func readModelWrite(query string) string {
	readModelWrites = append(readModelWrites, query)
	return query
}

// prepare prepares the read-model writes not prepared yet. WithTx calls it
// before it takes a connection: preparing on the pool from inside a
// transaction could wait for a connection that transactions hold. Until a
// statement is prepared (the database is down, or not migrated yet), it
// runs unprepared; preparing is tried again at most once a second. A
// transaction that finds another one preparing goes on unprepared rather
// than wait (preparing waits for the locks of the tables, as the writes
// themselves do).
func (s *Store) prepare(ctx context.Context) {
	if s.allPrepared.Load() {
		return
	}
	if !s.prepareMu.TryLock() {
		return // another transaction is preparing them; this one need not wait
	}
	defer s.prepareMu.Unlock()
	if s.allPrepared.Load() || time.Since(s.preparedAt) < time.Second {
		return
	}
	s.preparedAt = time.Now()
	forgotten := s.forgotten.Load()
	all := true
	for _, q := range readModelWrites {
		if _, ok := s.stmts.Load(q); ok {
			continue
		}
		st, err := s.db.PreparexContext(ctx, q)
		if err != nil {
			all = false
			continue
		}
		s.stmts.Store(q, st)
	}
	s.allPrepared.Store(all && s.forgotten.Load() == forgotten)
}

// stmt returns query as a statement of the transaction, and the store's
// prepared statement it comes from: the prepared one (on this connection,
// prepared on first use), or nil if query is not prepared.
func (tx *Tx) stmt(ctx context.Context, query string) (st, parent *sqlx.Stmt) {
	p, ok := tx.s.stmts.Load(query)
	if !ok {
		return nil, nil
	}
	parent = p.(*sqlx.Stmt)
	return tx.tx.StmtxContext(ctx, parent), parent
}

// exec runs a read-model write, prepared if it is (see readModelWrites).
func (tx *Tx) exec(ctx context.Context, query string, args ...any) error {
	_, err := tx.execCount(ctx, query, args...)
	return err
}

// execCount is exec returning the number of rows the statement wrote.
func (tx *Tx) execCount(ctx context.Context, query string, args ...any) (int64, error) {
	var res sql.Result
	var err error
	if st, parent := tx.stmt(ctx, query); st != nil {
		res, err = st.ExecContext(ctx, args...)
		tx.s.forgetIfStale(query, parent, err)
	} else {
		res, err = tx.tx.ExecContext(ctx, query, args...)
	}
	if err != nil {
		return 0, err
	}
	return res.RowsAffected()
}

// selectAll is exec for a statement returning rows, scanned into dest.
func (tx *Tx) selectAll(ctx context.Context, dest any, query string, args ...any) error {
	if st, parent := tx.stmt(ctx, query); st != nil {
		err := st.SelectContext(ctx, dest, args...)
		tx.s.forgetIfStale(query, parent, err)
		return err
	}
	return tx.tx.SelectContext(ctx, dest, query, args...)
}

// forgetIfStale drops the prepared statement of query if err says that a
// schema change (a migration altering a column it returns) changed its
// result type. PostgreSQL re-plans a prepared statement after a schema
// change but refuses one whose result type changed, on every connection it
// was prepared on, until it is prepared anew. The transaction that met the
// error fails (its caller retries it); later ones run unprepared until
// prepare prepares the statement again.
//
// Only parent, the statement the transaction used, is dropped: transactions
// that used it fail together, and the first must not make the others drop
// the statement prepared since. Closing it waits for no one: transactions
// holding a copy keep it until they end, and connections in use close
// theirs when they are released.
func (s *Store) forgetIfStale(query string, parent *sqlx.Stmt, err error) {
	if !isStalePlan(err) {
		return
	}
	if s.stmts.CompareAndDelete(query, parent) {
		s.forgotten.Add(1)
		s.allPrepared.Store(false)
		_ = parent.Close()
	}
}

// isStalePlan reports PostgreSQL's refusal of a prepared statement whose
// result type a schema change altered. The message may be translated
// (lc_messages); the routine that raises it is not.
func isStalePlan(err error) bool {
	var pqErr *pq.Error
	return errors.As(err, &pqErr) && pqErr.Code == "0A000" &&
		(pqErr.Routine == "RevalidateCachedQuery" || strings.Contains(pqErr.Message, "cached plan must not change result type"))
}

// WithTx runs fn in a transaction and commits it if fn returns nil. The
// commit error is returned: a swallowed commit error is a lost write.
func (s *Store) WithTx(ctx context.Context, fn func(tx *Tx) error) (err error) {
	s.prepare(ctx)
	tx, err := s.db.BeginTxx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin transaction: %w", err)
	}
	defer func() {
		if p := recover(); p != nil {
			_ = tx.Rollback()
			panic(p)
		}
	}()
	if err := fn(&Tx{tx: tx, s: s}); err != nil {
		if rbErr := tx.Rollback(); rbErr != nil {
			return errors.Join(err, fmt.Errorf("rollback: %w", rbErr))
		}
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// migrationLockID is the advisory lock that serialises migrations when
// several processes start at once.
const migrationLockID = 0x636f6e76 // "conv"

type migration struct {
	version int
	name    string
	sql     string
}

// loadMigrations reads the migrations of fsys, named NNNN_name.sql at its
// root, in the order of their versions.
func loadMigrations(fsys fs.FS) ([]migration, error) {
	entries, err := fs.ReadDir(fsys, ".")
	if err != nil {
		return nil, err
	}
	var out []migration
	for _, e := range entries {
		name := e.Name()
		num, _, ok := strings.Cut(name, "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || !strings.HasSuffix(name, ".sql") {
			return nil, fmt.Errorf("migration file %q must be named NNNN_name.sql", name)
		}
		body, err := fs.ReadFile(fsys, name)
		if err != nil {
			return nil, err
		}
		out = append(out, migration{version: v, name: name, sql: string(body)})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].version < out[j].version })
	for i := 1; i < len(out); i++ {
		if out[i].version == out[i-1].version {
			return nil, fmt.Errorf("two migrations with version %d", out[i].version)
		}
	}
	return out, nil
}

// migrateOptions are the settings of migrate. Tests shorten them.
type migrateOptions struct {
	// lockTimeout bounds each wait of a migration's statements for a lock.
	lockTimeout time.Duration
	// retryMin is the wait before the second attempt of a migration that
	// timed out on a lock; it doubles per attempt, up to retryMax.
	retryMin, retryMax time.Duration
}

// defaultMigrateOptions are Migrate's. A lock timeout of 5s is what the
// readers of a table may wait behind a migration that waits for the table:
// see Migrate.
var defaultMigrateOptions = migrateOptions{lockTimeout: 5 * time.Second, retryMin: time.Second, retryMax: 15 * time.Second}

// Migrate applies the embedded migrations that are not applied yet, in
// order, under an advisory lock. It returns the names of the migrations it
// applied.
//
// Each migration runs in its own transaction, with its version recorded in
// the same one, and with a lock timeout of 5s. PostgreSQL queues every
// later request for a table's lock behind a waiting ALTER TABLE, reads
// included: without the timeout, a migration waiting for a session that
// keeps a transaction open on the table (an idle psql, a long report)
// would hold up every read and write of it for as long as it waits. With
// it, the migration gives up after 5s, rolls back and tries again after a
// backoff (1s, 2s, 4s... up to 15s), until ctx is done; the readers wait
// at most 5s per attempt. Each wait is logged, and the error once ctx is
// done names the tables and the sessions that hold them.
//
// Every migration runs in a transaction: one that needs to run outside
// (CREATE INDEX CONCURRENTLY, for a large table) needs a way to say so
// first.
func (s *Store) Migrate(ctx context.Context) ([]string, error) {
	sub, err := fs.Sub(migrationFiles, "migrations")
	if err != nil {
		return nil, fmt.Errorf("load migrations: %w", err)
	}
	return s.migrate(ctx, sub, defaultMigrateOptions)
}

// migrate is Migrate with the migrations of fsys and opt.
func (s *Store) migrate(ctx context.Context, fsys fs.FS, opt migrateOptions) ([]string, error) {
	migs, err := loadMigrations(fsys)
	if err != nil {
		return nil, fmt.Errorf("load migrations: %w", err)
	}
	conn, err := s.db.Connx(ctx)
	if err != nil {
		return nil, fmt.Errorf("migrate: connect: %w", err)
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, "SELECT pg_advisory_lock($1)", migrationLockID); err != nil {
		return nil, fmt.Errorf("migrate: lock: %w", err)
	}
	defer func() {
		_, _ = conn.ExecContext(context.WithoutCancel(ctx), "SELECT pg_advisory_unlock($1)", migrationLockID)
	}()
	if _, err := conn.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version integer PRIMARY KEY,
		name text NOT NULL,
		applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		return nil, fmt.Errorf("migrate: create schema_migrations: %w", err)
	}
	var applied []int
	if err := conn.SelectContext(ctx, &applied, "SELECT version FROM schema_migrations"); err != nil {
		return nil, fmt.Errorf("migrate: read schema_migrations: %w", err)
	}
	done := map[int]bool{}
	for _, v := range applied {
		done[v] = true
	}
	var ran []string
	for _, m := range migs {
		if done[m.version] {
			continue
		}
		if err := s.applyWithRetry(ctx, conn, m, opt); err != nil {
			return ran, fmt.Errorf("migrate %s: %w", m.name, err)
		}
		ran = append(ran, m.name)
	}
	return ran, nil
}

// applyWithRetry applies m, again and again while it times out on a lock,
// with a backoff between attempts, until ctx is done.
func (s *Store) applyWithRetry(ctx context.Context, conn *sqlx.Conn, m migration, opt migrateOptions) error {
	began := time.Now()
	wait := opt.retryMin
	blocked := "" // what the last attempt waited for
	for attempt := 1; ; attempt++ {
		err := applyMigration(ctx, conn, m, opt.lockTimeout)
		if err == nil {
			return nil
		}
		if !isLockTimeout(err) {
			if ctx.Err() != nil && blocked != "" {
				// Cancelled while waiting for the lock again.
				return fmt.Errorf("%s; gave up after %d attempts in %s: %w (last attempt: %w)",
					blocked, attempt, time.Since(began).Round(time.Second), context.Cause(ctx), err)
			}
			return err
		}
		blocked = describeLockWait(ctx, conn, m, opt.lockTimeout)
		s.log.Warn("migration waiting for a lock; retrying",
			"migration", m.name, "attempt", attempt, "retry_in", wait, "lock_timeout", opt.lockTimeout, "blocked_by", blocked)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%s; gave up after %d attempts in %s: %w (last attempt: %w)",
				blocked, attempt, time.Since(began).Round(time.Second), context.Cause(ctx), err)
		case <-t.C:
		}
		wait = min(2*wait, opt.retryMax)
	}
}

// applyMigration runs m once, with its statements' waits for locks bounded
// by lockTimeout, and records its version.
func applyMigration(ctx context.Context, conn *sqlx.Conn, m migration, lockTimeout time.Duration) error {
	tx, err := conn.BeginTxx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer func() { _ = tx.Rollback() }() // after Commit, a no-op
	// An integer lock_timeout is in milliseconds.
	if _, err := tx.ExecContext(ctx, fmt.Sprintf("SET LOCAL lock_timeout = %d", max(lockTimeout.Milliseconds(), 1))); err != nil {
		return fmt.Errorf("set lock_timeout: %w", err)
	}
	if _, err := tx.ExecContext(ctx, m.sql); err != nil {
		return err
	}
	if _, err := tx.ExecContext(ctx, "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name); err != nil {
		return fmt.Errorf("record: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// isLockTimeout reports PostgreSQL giving up a wait for a lock
// (lock_timeout): SQLSTATE 55P03, lock_not_available.
func isLockTimeout(err error) bool {
	var pe *pq.Error
	return errors.As(err, &pe) && pe.Code == "55P03"
}

// describeLockWait says what a migration that timed out on a lock waited
// for: the tables it names that other sessions hold locks on, with
// transactions open for at least lockTimeout (the migration waited that
// long for them), and those sessions. PostgreSQL's error names no table.
// It never fails: it is only for the log and the error.
func describeLockWait(ctx context.Context, conn *sqlx.Conn, m migration, lockTimeout time.Duration) string {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
	defer cancel()
	var holders []struct {
		Relation string  `db:"relation"`
		PID      int     `db:"pid"`
		State    string  `db:"state"`
		App      string  `db:"app"`
		Seconds  float64 `db:"seconds"`
	}
	err := conn.SelectContext(ctx, &holders, `
		SELECT DISTINCT c.relname AS relation, a.pid, coalesce(a.state, '') AS state,
		       coalesce(a.application_name, '') AS app,
		       extract(epoch FROM now() - a.xact_start)::float8 AS seconds
		FROM pg_locks l
		JOIN pg_class c ON c.oid = l.relation
		JOIN pg_stat_activity a ON a.pid = l.pid
		WHERE l.granted AND l.pid <> pg_backend_pid()
		  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
		  AND c.relkind IN ('r', 'p', 'm')
		  AND a.xact_start <= now() - $1 * interval '1 millisecond'
		ORDER BY relation, seconds DESC`, lockTimeout.Milliseconds())
	const unknown = "waiting for a lock: another session holds a transaction open on a table the migration changes"
	if err != nil || len(holders) == 0 {
		return unknown
	}
	// The tables the migration names, if any of them is held; else all.
	named := holders[:0:0]
	for _, h := range holders {
		if regexp.MustCompile(`(?i)\b` + regexp.QuoteMeta(h.Relation) + `\b`).MatchString(m.sql) {
			named = append(named, h)
		}
	}
	if len(named) > 0 {
		holders = named
	}
	var tables, sessions []string
	for _, h := range holders {
		if len(tables) == 0 || tables[len(tables)-1] != h.Relation {
			tables = append(tables, h.Relation)
		}
		desc := fmt.Sprintf("pid %d", h.PID)
		if h.App != "" {
			desc += fmt.Sprintf(" %q", h.App)
		}
		if h.State != "" {
			desc += ", " + h.State
		}
		desc += fmt.Sprintf(", transaction open for %s", time.Duration(h.Seconds*float64(time.Second)).Round(time.Second))
		sessions = append(sessions, h.Relation+": "+desc)
	}
	if len(tables) == 1 {
		for i, d := range sessions {
			sessions[i] = strings.TrimPrefix(d, tables[0]+": ")
		}
		return fmt.Sprintf("waiting for a lock on %s: another session holds a transaction open on it (%s)",
			tables[0], strings.Join(sessions, "; "))
	}
	return fmt.Sprintf("waiting for a lock on %s: other sessions hold transactions open on them (%s)",
		strings.Join(tables, ", "), strings.Join(sessions, "; "))
}

// lockIDs maps keys to advisory lock ids, without repeats, in ascending
// order: the one global order every transaction locks in.
func lockIDs(keys []string) []int64 {
	ids := make([]int64, 0, len(keys))
	seen := make(map[int64]bool, len(keys))
	for _, k := range keys {
		h := fnv.New64a()
		_, _ = h.Write([]byte(k))
		id := int64(h.Sum64())
		if !seen[id] {
			seen[id] = true
			ids = append(ids, id)
		}
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	return ids
}

// IsDataError reports whether err is PostgreSQL refusing the data itself:
// SQLSTATE class 22, data exception (a value out of range, a NUL byte in
// text...), or a value too large for its index (an event id of kilobytes
// from a foreign publisher). Retrying such a write cannot succeed.
//
// The latter shares its code, 54000, with refusals of every write (the
// server guarding against transaction id wraparound), which are not the
// data's fault: it is told by the routine that raises it, whatever the
// language of the message.
func IsDataError(err error) bool {
	var pe *pq.Error
	if !errors.As(err, &pe) {
		return false
	}
	return pe.Code.Class() == "22" ||
		pe.Code == "54000" && (pe.Routine == "_bt_check_third_page" || strings.HasPrefix(pe.Routine, "index_form_tuple") ||
			pe.Routine == "" && strings.HasPrefix(pe.Message, "index row"))
}
