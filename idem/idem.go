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
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
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

// ErrClaimLost is returned by Prepare, Complete, Keep and Release when the
// claim they act for is no longer the caller's: its lease ran out and
// another request claimed the key, or the record was removed. The caller
// must not publish work under the key; the other request does it.
var ErrClaimLost = errors.New("idempotency key claim lost")

// Claim starts an idempotent operation under key. If no record exists, it
// stores a placeholder holding fingerprint and a random owner token for
// lease, and returns it with claimed = true: the caller does the work
// (calling Keep while it runs longer than a fraction of lease), then calls
// Prepare and Complete (or Release on failure) with the returned record's
// Owner. If a record exists, it returns it: a completed record carries the
// stored response; an in-progress one has Done = false.
func (s *Store) Claim(ctx context.Context, key, fingerprint string, lease time.Duration) (Record, bool, error) {
	placeholder := Record{Fingerprint: fingerprint, Owner: newToken()}
	for {
		ok, err := s.rdb.SetNX(ctx, s.prefix+key, placeholder.encode(), lease).Result()
		if err != nil {
			return Record{}, false, fmt.Errorf("claim idempotency key: %w", err)
		}
		if ok {
			return placeholder, true, nil
		}
		raw, err := s.rdb.Get(ctx, s.prefix+key).Result()
		if errors.Is(err, redis.Nil) {
			continue // released or expired in between
		}
		if err != nil {
			return Record{}, false, fmt.Errorf("read idempotency key: %w", err)
		}
		rec, err := decodeRecord(raw)
		if err != nil {
			return Record{}, false, fmt.Errorf("idempotency key record: %w", err)
		}
		if !rec.Done && rec.Pending == nil && rec.Owner == placeholder.Owner {
			// Our own placeholder: the Redis client sent the SET NX again
			// after a connection broke under a first attempt that Redis
			// had run, and the retry found what that attempt stored. The
			// owner token is new to this call, so no other request can
			// have written it: the claim is ours.
			return placeholder, true, nil
		}
		return rec, false, nil
	}
}

// ownedScript runs one write on an idempotency record only if the record
// is still owned by ARGV[1]: KEYS[1] is the record; ARGV[2] is the
// action: "set" (ARGV[3] the new record, ARGV[4] its TTL in ms), "keep"
// (ARGV[4] the lease in ms) or "release". keep and release act only on a
// claim that is not prepared, whose work was not recorded yet. It returns
// 1 when it acted, 0 when the record is gone or owned by another request.
// A record of a replica that predates owners has none, and matches no
// owner: that request is served by that replica, which writes without
// looking.
var ownedScript = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local ok, r = pcall(cjson.decode, v)
if not ok or type(r) ~= 'table' or r.own ~= ARGV[1] then return 0 end
local placeholder = r.done ~= true and (r.pending == nil or r.pending == cjson.null)
if ARGV[2] == 'set' then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
elseif ARGV[2] == 'keep' then
  if not placeholder then return 1 end
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
elseif ARGV[2] == 'release' then
  if not placeholder then return 0 end
  redis.call('DEL', KEYS[1])
end
return 1`)

// owned runs ownedScript; it returns ErrClaimLost when the script did not
// act.
func (s *Store) owned(ctx context.Context, what, key, owner, action, rec string, ttl time.Duration) error {
	if owner == "" {
		return fmt.Errorf("%s idempotency key %s: no owner", what, key)
	}
	n, err := ownedScript.Run(ctx, s.rdb, []string{s.prefix + key}, owner, action, rec, ttl.Milliseconds()).Int()
	if err != nil {
		return fmt.Errorf("%s idempotency key %s: %w", what, key, err)
	}
	if n == 0 {
		return fmt.Errorf("%s idempotency key %s: %w", what, key, ErrClaimLost)
	}
	return nil
}

// Keep extends the lease of a claim that is still the caller's and not yet
// prepared, so that work slower than the lease keeps its key. A prepared
// record is kept for TTL already; Keep leaves it.
func (s *Store) Keep(ctx context.Context, key, owner string, lease time.Duration) error {
	return s.owned(ctx, "keep", key, owner, "keep", "", lease)
}

// ttlOf is how long rec is kept from now: TTL, and if rec.RetainUntil is
// later than now, TTL after then.
func (s *Store) ttlOf(rec Record) time.Duration {
	if rec.RetainUntil != nil {
		if d := time.Until(*rec.RetainUntil); d > 0 {
			return s.ttl + d
		}
	}
	return s.ttl
}

// Complete stores the response of an operation under key for TTL (see
// Record.RetainUntil), if the key is still owned by rec.Owner (the claim's
// owner, or the owner of a prepared record that a retry finishes).
//
// A prepared record written by a replica that predates owners has none; a
// retry that finishes it completes it unconditionally, as those replicas
// did (it was prepared, so it is never released or claimed again).
func (s *Store) Complete(ctx context.Context, key string, rec Record) error {
	rec.Done = true
	rec.Pending = nil
	if rec.Owner == "" {
		return s.Put(ctx, key, rec.encode(), s.ttlOf(rec))
	}
	return s.owned(ctx, "complete", key, rec.Owner, "set", rec.encode(), s.ttlOf(rec))
}

// Prepare records, under a key claimed by rec.Owner, the event the
// operation is about to publish and the response it will give, for TTL
// (see Record.RetainUntil).
// From then on the key is never released: the publish may have happened
// even if it reported an error, so a retry must finish it rather than
// start over. It returns ErrClaimLost if the claim is no longer the
// caller's; the operation must then not publish.
func (s *Store) Prepare(ctx context.Context, key string, rec Record) error {
	if rec.Pending == nil {
		return errors.New("prepare idempotency key: no pending event")
	}
	rec.Done = false
	return s.owned(ctx, "prepare", key, rec.Owner, "set", rec.encode(), s.ttlOf(rec))
}

// Release drops a claim of owner whose operation failed before it was
// prepared, so a retry can run it. A claim that is another request's by
// now, or that was prepared, is left.
func (s *Store) Release(ctx context.Context, key, owner string) error {
	err := s.owned(ctx, "release", key, owner, "release", "", 0)
	if errors.Is(err, ErrClaimLost) {
		return nil
	}
	return err
}

// Lock takes a lock named key for lease, unless another holder has it,
// and returns its token; ok is false if it is held. A holder that dies
// keeps it until the lease ends.
func (s *Store) Lock(ctx context.Context, key string, lease time.Duration) (token string, ok bool, err error) {
	token = newToken()
	ok, err = s.rdb.SetNX(ctx, s.prefix+key, token, lease).Result()
	if err != nil {
		return "", false, fmt.Errorf("lock %s: %w", key, err)
	}
	return token, ok, nil
}

// LockAs is Lock with the caller's token, which names the holder across
// its calls: a holder taking its lock again (a retry after a reply it did
// not get) holds it still, with its lease renewed.
func (s *Store) LockAs(ctx context.Context, key, token string, lease time.Duration) (bool, error) {
	ok, err := s.rdb.SetNX(ctx, s.prefix+key, token, lease).Result()
	if err != nil {
		return false, fmt.Errorf("lock %s: %w", key, err)
	}
	if ok {
		return true, nil
	}
	err = s.Extend(ctx, key, token, lease)
	if errors.Is(err, ErrClaimLost) {
		return false, nil // another holder's
	}
	return err == nil, err
}

var extendScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0`)

// Extend renews the lock key for lease if token still holds it, and
// returns ErrClaimLost if it does not (its lease ended, and another holder
// may have taken it).
func (s *Store) Extend(ctx context.Context, key, token string, lease time.Duration) error {
	n, err := extendScript.Run(ctx, s.rdb, []string{s.prefix + key}, token, lease.Milliseconds()).Int()
	if err != nil {
		return fmt.Errorf("extend lock %s: %w", key, err)
	}
	if n == 0 {
		return fmt.Errorf("extend lock %s: %w", key, ErrClaimLost)
	}
	return nil
}

var unlockScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0`)

// Unlock releases the lock key if token still holds it (its lease may have
// ended, and another holder taken it).
func (s *Store) Unlock(ctx context.Context, key, token string) error {
	if err := unlockScript.Run(ctx, s.rdb, []string{s.prefix + key}, token).Err(); err != nil {
		return fmt.Errorf("unlock %s: %w", key, err)
	}
	return nil
}

// newToken returns a random token that names one holder of a claim or lock.
func newToken() string {
	tok := make([]byte, 16)
	_, _ = rand.Read(tok)
	return hex.EncodeToString(tok)
}

// Renew calls renew every interval on a goroutine of its own until the
// returned stop is called (stop waits for it), or until renew returns
// ErrClaimLost: what it renews is someone else's by then. Every error goes
// to failed. It runs on after ctx is cancelled (it keeps ctx's values
// only), so that a claim or lock outlives a cancelled request until its
// holder lets it go; each renew gets at most interval.
func Renew(ctx context.Context, interval time.Duration, renew func(context.Context) error, failed func(error)) (stop func()) {
	bg := context.WithoutCancel(ctx)
	quit := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-quit:
				return
			case <-t.C:
			}
			ctx, cancel := context.WithTimeout(bg, interval)
			err := renew(ctx)
			cancel()
			if err != nil {
				failed(err)
			}
			if errors.Is(err, ErrClaimLost) {
				return
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() { close(quit) })
		<-done
	}
}
