// Package idem keeps Conveyor's idempotency records in Redis: the api's
// Idempotency-Key records and accepted-but-not-yet-projected markers, and
// the "already done" marks of handlers (an email was sent).
//
// These records must survive, so they live on the main Redis (noeviction,
// AOF), never on the cache Redis, which may evict. idem must not import
// other project packages.
package idem

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// Config configures a Store.
type Config struct {
	// Redis is the main Redis. Required; never closed here.
	Redis redis.UniversalClient
	// Prefix is put before every key. Defaults to "conveyor:idem:".
	Prefix string
	// TTL is how long records are kept. Defaults to DefaultTTL.
	TTL time.Duration
}

// DefaultTTL is how long records are kept by default: longer than any
// retry schedule, so a redelivery always finds its record.
const DefaultTTL = 7 * 24 * time.Hour

// Store reads and writes idempotency records.
type Store struct {
	rdb    redis.UniversalClient
	prefix string
	ttl    time.Duration
}

// New returns a Store.
func New(cfg Config) (*Store, error) {
	if cfg.Prefix == "" {
		cfg.Prefix = "conveyor:idem:"
	}
	if cfg.TTL == 0 {
		cfg.TTL = DefaultTTL
	}
	var errs []error
	if cfg.Redis == nil {
		errs = append(errs, errors.New("idem: Redis is required"))
	}
	if cfg.TTL < 0 {
		errs = append(errs, errors.New("idem: TTL must be positive"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return &Store{rdb: cfg.Redis, prefix: cfg.Prefix, ttl: cfg.TTL}, nil
}

// Get returns the value recorded under key.
func (s *Store) Get(ctx context.Context, key string) (string, bool, error) {
	v, err := s.rdb.Get(ctx, s.prefix+key).Result()
	if errors.Is(err, redis.Nil) {
		return "", false, nil
	}
	if err != nil {
		return "", false, fmt.Errorf("get idempotency record %s: %w", key, err)
	}
	return v, true, nil
}

// Set records value under key unless a value is there already, and reports
// whether it recorded.
func (s *Store) Set(ctx context.Context, key, value string) (bool, error) {
	ok, err := s.rdb.SetNX(ctx, s.prefix+key, value, s.ttl).Result()
	if err != nil {
		return false, fmt.Errorf("set idempotency record %s: %w", key, err)
	}
	return ok, nil
}

// Put records value under key, replacing what was there.
func (s *Store) Put(ctx context.Context, key, value string, ttl time.Duration) error {
	if ttl <= 0 {
		ttl = s.ttl
	}
	if err := s.rdb.Set(ctx, s.prefix+key, value, ttl).Err(); err != nil {
		return fmt.Errorf("put idempotency record %s: %w", key, err)
	}
	return nil
}

// Delete removes records.
func (s *Store) Delete(ctx context.Context, keys ...string) error {
	full := make([]string, len(keys))
	for i, k := range keys {
		full[i] = s.prefix + k
	}
	if err := s.rdb.Del(ctx, full...).Err(); err != nil {
		return fmt.Errorf("delete idempotency records: %w", err)
	}
	return nil
}

// Claim starts an idempotent operation under key. If no record exists, it
// stores a placeholder holding fingerprint and returns claimed = true: the
// caller does the work, then calls Complete (or Release on failure). If a
// record exists, it returns it: a completed record carries the stored
// response; an in-progress one has Done = false.
func (s *Store) Claim(ctx context.Context, key, fingerprint string, lease time.Duration) (Record, bool, error) {
	placeholder := Record{Fingerprint: fingerprint}
	ok, err := s.rdb.SetNX(ctx, s.prefix+key, placeholder.encode(), lease).Result()
	if err != nil {
		return Record{}, false, fmt.Errorf("claim idempotency key: %w", err)
	}
	if ok {
		return placeholder, true, nil
	}
	raw, err := s.rdb.Get(ctx, s.prefix+key).Result()
	if errors.Is(err, redis.Nil) {
		// Released or expired in between: try once more.
		return s.Claim(ctx, key, fingerprint, lease)
	}
	if err != nil {
		return Record{}, false, fmt.Errorf("read idempotency key: %w", err)
	}
	rec, err := decodeRecord(raw)
	if err != nil {
		return Record{}, false, fmt.Errorf("idempotency key record: %w", err)
	}
	return rec, false, nil
}

// Complete stores the response of a claimed operation for TTL.
func (s *Store) Complete(ctx context.Context, key string, rec Record) error {
	rec.Done = true
	rec.Pending = nil
	return s.Put(ctx, key, rec.encode(), 0)
}

// Prepare records, under a claimed key, the event the operation is about
// to publish and the response it will give, for TTL. From then on the key
// is never released: the publish may have happened even if it reported an
// error, so a retry must finish it rather than start over.
func (s *Store) Prepare(ctx context.Context, key string, rec Record) error {
	if rec.Pending == nil {
		return errors.New("prepare idempotency key: no pending event")
	}
	rec.Done = false
	return s.Put(ctx, key, rec.encode(), 0)
}

// Release drops a claim whose operation failed, so a retry can run it.
func (s *Store) Release(ctx context.Context, key string) error {
	return s.Delete(ctx, key)
}
