package store

import (
	"context"

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
