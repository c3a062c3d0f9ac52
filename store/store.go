// Package store is Conveyor's Postgres access: the read models (documents,
// emails), the projector's inbox, transactions and the embedded SQL
// migrations. It is the only importer of sqlx and lib/pq.
//
// Only the projector writes read models; the api reads them. store must not
// import bus, api, handlers, projector or cache.
package store

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"net/url"
	"sort"
	"strconv"
	"strings"
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
}

func (c *Config) setDefaults() {
	if c.MaxOpenConns == 0 {
		c.MaxOpenConns = 20
	}
	if c.ConnMaxLifetime == 0 {
		c.ConnMaxLifetime = 30 * time.Minute
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
	db *sqlx.DB
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
	return &Store{db: db}, nil
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
}

// WithTx runs fn in a transaction and commits it if fn returns nil. The
// commit error is returned: a swallowed commit error is a lost write.
func (s *Store) WithTx(ctx context.Context, fn func(tx *Tx) error) (err error) {
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
	if err := fn(&Tx{tx: tx}); err != nil {
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

func loadMigrations() ([]migration, error) {
	entries, err := fs.ReadDir(migrationFiles, "migrations")
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
		body, err := fs.ReadFile(migrationFiles, "migrations/"+name)
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

// Migrate applies the embedded migrations that are not applied yet, each in
// its own transaction, under an advisory lock. It returns the names of the
// migrations it applied.
func (s *Store) Migrate(ctx context.Context) ([]string, error) {
	migs, err := loadMigrations()
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
		tx, err := conn.BeginTxx(ctx, nil)
		if err != nil {
			return ran, fmt.Errorf("migrate %s: begin: %w", m.name, err)
		}
		if _, err := tx.ExecContext(ctx, m.sql); err != nil {
			_ = tx.Rollback()
			return ran, fmt.Errorf("migrate %s: %w", m.name, err)
		}
		if _, err := tx.ExecContext(ctx, "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name); err != nil {
			_ = tx.Rollback()
			return ran, fmt.Errorf("migrate %s: record: %w", m.name, err)
		}
		if err := tx.Commit(); err != nil {
			return ran, fmt.Errorf("migrate %s: commit: %w", m.name, err)
		}
		ran = append(ran, m.name)
	}
	return ran, nil
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

// IsDataError reports whether err is PostgreSQL refusing the data itself
// (SQLSTATE class 22, data exception: a value out of range, a NUL byte in
// text...). Retrying such a write cannot succeed.
func IsDataError(err error) bool {
	var pe *pq.Error
	return errors.As(err, &pe) && pe.Code.Class() == "22"
}
