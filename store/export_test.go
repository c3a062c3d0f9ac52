package store

import (
	"context"
	"io/fs"
	"time"

	"github.com/lib/pq"
)

// PreparedStatements counts the statements prepared on the session of one
// of s's connections (all of them, with MaxOpenConns 1).
func (s *Store) PreparedStatements(ctx context.Context) (int, error) {
	var n int
	err := s.db.GetContext(ctx, &n, "SELECT count(*) FROM pg_prepared_statements")
	return n, err
}

// ReadModelWrites is how many statements the read-model writes prepare.
var ReadModelWrites = len(readModelWrites)

// IsPrepared reports whether query holds a prepared statement.
func (s *Store) IsPrepared(query string) bool {
	_, ok := s.stmts.Load(query)
	return ok
}

// QInsertedHere is the statement that picks the new events of an inbox
// insert that met some applied before.
var QInsertedHere = qInsertedHere

// UpdatedRows is how many rows of table the transaction's connection
// updated, as its statistics not yet reported count them (so also earlier
// transactions of the connection): compare two readings in one
// transaction.
func (tx *Tx) UpdatedRows(ctx context.Context, table string) (int, error) {
	var n int
	err := tx.tx.GetContext(ctx, &n, "SELECT pg_stat_get_xact_tuples_updated($1::regclass)", table)
	return n, err
}

// InsertedAtTopLevel counts the inbox rows of ids that this transaction
// inserted outside any savepoint (their xmin is its own id).
func (tx *Tx) InsertedAtTopLevel(ctx context.Context, ids []string) (int, error) {
	var mine []string
	err := tx.tx.SelectContext(ctx, &mine, qInsertedHere, pq.Array(ids))
	return len(mine), err
}

// PlainInboxMin is the smallest batch the inbox records with a plain insert.
const PlainInboxMin = plainInboxMin

// MigrateFS is Migrate with the migrations of fsys (NNNN_name.sql at its
// root), a lock timeout of lockTimeout, and retries after retry, doubling
// up to four times retry.
func (s *Store) MigrateFS(ctx context.Context, fsys fs.FS, lockTimeout, retry time.Duration) ([]string, error) {
	return s.migrate(ctx, fsys, migrateOptions{lockTimeout: lockTimeout, retryMin: retry, retryMax: 4 * retry})
}

// Setting is the value of a setting on one of s's connections (the only
// one, with MaxOpenConns 1).
func (s *Store) Setting(ctx context.Context, name string) (string, error) {
	var v string
	err := s.db.GetContext(ctx, &v, "SELECT current_setting($1)", name)
	return v, err
}

// DocumentColumns and EmailColumns are the columns the getters read.
const (
	DocumentColumns = documentColumns
	EmailColumns    = emailColumns
)
