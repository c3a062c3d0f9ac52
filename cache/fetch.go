package cache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"time"

	"github.com/redis/go-redis/v9"
)

// ErrNotCacheable, returned (possibly wrapped) by the load function given to
// [Fetch] together with a valid value, makes Fetch return that value with a
// nil error, without storing it. Use it for answers that are right for this
// request but must not be remembered, such as an empty LLM response.
var ErrNotCacheable = errors.New("cache: not cacheable")

// readForLoad reads a value and its version before a load, giving the key a
// version if it has none and no value is cached (or ARGV[3] is "1": the
// cached value does not decode, and the load will replace it), so that an
// invalidation during the load, which replaces only a version that exists,
// finds one. KEYS[1] is the value key and KEYS[2] its version key (one
// slot, thanks to the hash tag). ARGV[1] is the version to give a key
// without one and ARGV[2] its expiry in milliseconds. It returns the value
// (nil if none) and the version (nil if none).
var readForLoad = redis.NewScript(`
local val = redis.call('GET', KEYS[1])
local v = redis.call('GET', KEYS[2])
if v == false and (val == false or ARGV[3] == '1') then
  v = ARGV[1]
  redis.call('SET', KEYS[2], v, 'PX', ARGV[2])
end
return {val, v}
`)

// setIfVersion stores a value only if the key's version is still the one
// read before the load. KEYS[1] is the value key and KEYS[2] its version key
// (one slot, thanks to the hash tag). ARGV[1] is the version read before the
// load ("" for none: a reader of an older release, which did not give keys a
// version, may still run this script), ARGV[2] the value and
// ARGV[3] the expiry in milliseconds. It returns 1 if it stored the value.
var setIfVersion = redis.NewScript(`
local v = redis.call('GET', KEYS[2])
if v == false then v = '' end
if v ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
`)

// Fetch is the cache-aside read, the Go form of a caching decorator. On a hit
// it decodes and returns the cached value. On a miss it calls load, stores
// the result for ttl plus jitter (ttl <= 0 means the configured TTL) unless
// the key was invalidated meanwhile, and returns it.
//
// Concurrent misses of one key in one process share a single call of load
// (singleflight), so a popular key that expires costs the database one query
// per process, not one per request. The shared work reads the cache once
// more before loading, so a caller that missed just as another load finished
// gets that result instead of loading again. Each caller gets its own copy,
// decoded from the JSON that is stored, so callers never share mutable values
// and a miss returns exactly what the next hit will. The shared load runs
// detached from the cancellation and the deadline of the caller that started
// it, so that one client going away, or in a hurry, does not fail the others;
// every caller still stops waiting when its own ctx is done. load must
// therefore bound its own time (a query timeout, an HTTP client's).
//
// Errors from load are returned as they are and never cached; the next Fetch
// calls load again. A load that returns [ErrNotCacheable] with its value gets
// that value returned and not stored. A panic in load becomes an error for
// every caller sharing it (singleflight would otherwise crash the process).
//
// Fetch never fails because of the cache: if Redis cannot be read or
// written (within Config.RedisTimeout), or holds a value that does not
// decode into T, Fetch serves from load, logs a warning the first time this
// kind of failure occurs (then at debug level until it recovers), and leaves
// the cache alone; after a failed call, the Fetches of the next second do
// not try Redis at all. A cache outage therefore degrades to the database
// instead of becoming an API outage, or a slow one.
//
// # The stale-set guard
//
// Without a guard, this interleaving leaves a stale value for a whole TTL:
// a reader misses and loads the old row; the projector commits the new row
// and invalidates the key; the reader then stores the old row. To prevent it,
// a key being loaded has a version, which [Client.Invalidate] replaces. Before
// calling load, Fetch reads the version, giving the key one if it has none
// (in one script with its second look at the value, which makes no version
// if that look finds the value after all); after load, it stores
// the value only if the version is unchanged, atomically, in a Lua script
// over the two keys, which share a slot. An invalidation that lands anywhere
// between the read and the store therefore makes the store a no-op, and the
// next Fetch loads the new row. Invalidate replaces only a version that
// exists: a key that no load is reading needs none, and if the version
// expired or was evicted during the load, the store finds none and is
// refused as well.
//
// The guard rests on these assumptions:
//   - load reads its data after Fetch read the version, which holds because
//     Fetch calls load only after that read;
//   - the writer invalidates after its commit is visible to readers;
//   - a version read before a load is never empty, and a version never comes
//     back (a random number), so a version key that expires or is evicted
//     during the load makes the store fail, as an invalidation does; the
//     value of a load that took longer than 5 minutes (from the version read
//     to the store) is not stored either. A Redis failover that loses an
//     invalidation's new version but keeps the old one could still let one
//     stale value in, for at most one TTL (the TTL is the final bound on
//     staleness, as it is when an invalidation fails outright);
//   - writers that use [Client.Set] bypass the guard.
//
// Callers in other processes, or callers that joined a load before an
// invalidation, may still receive the value loaded before it: the guard keeps
// stale values out of the cache, it does not make reads linearizable.
func Fetch[T any](ctx context.Context, c *Client, key string, ttl time.Duration, load func(ctx context.Context) (T, error)) (T, error) {
	var zero T
	if err := checkKey(key); err != nil {
		return zero, err
	}

	if c.redisPaused() {
		return fetchLoad(ctx, c, key, ttl, false, load)
	}
	rctx, cancel := context.WithTimeout(ctx, c.redisTimeout)
	raw, err := c.rdb.Get(rctx, c.valueKey(key)).Bytes()
	cancel()
	cacheUp := true
	switch {
	case err == nil:
		v, err := decode[T](raw)
		if err == nil {
			c.recovered(ctx, failRead)
			return v, nil
		}
		// Treat it as a miss: the load below overwrites the bad value.
		c.failed(ctx, failDecode, key, err)
	case errors.Is(err, redis.Nil):
		c.recovered(ctx, failRead)
	case ctx.Err() != nil:
		return zero, ctx.Err()
	default:
		// Do not try Redis again in this call: go straight to load.
		c.failed(ctx, failRead, key, err)
		cacheUp = false
	}
	return fetchLoad(ctx, c, key, ttl, cacheUp, load)
}

// fetchLoad is Fetch after its first read of the cache: it joins (or
// starts) the shared flight of key's load (see fill) and decodes its result.
func fetchLoad[T any](ctx context.Context, c *Client, key string, ttl time.Duration, cacheUp bool, load func(ctx context.Context) (T, error)) (T, error) {
	var zero T
	flight := c.flights.DoChan(key, func() (any, error) {
		usable := func(raw []byte) bool {
			_, err := decode[T](raw)
			return err == nil
		}
		return c.fill(ctx, key, ttl, cacheUp, usable, func(ctx context.Context) (any, error) {
			return load(ctx)
		})
	})
	select {
	case <-ctx.Done():
		return zero, ctx.Err()
	case res := <-flight:
		if res.Err != nil {
			return zero, res.Err
		}
		v, err := decode[T](res.Val.([]byte))
		if err != nil {
			// Only a type whose JSON methods do not round trip gets here.
			return zero, fmt.Errorf("cache: decode %q: %w", key, err)
		}
		return v, nil
	}
}

// fill is the work that one flight of [Fetch] shares among its callers. If
// cacheUp, it reads the value and its version; it returns the value if it is
// there by now and usable. Otherwise it calls load and, if it read the
// version, stores the result under the stale-set guard. It returns the
// result as JSON.
func (c *Client) fill(ctx context.Context, key string, ttl time.Duration, cacheUp bool, usable func([]byte) bool, load func(context.Context) (any, error)) (raw []byte, err error) {
	// Detached: the flight is shared, so it must not end with the
	// cancellation or the deadline of the caller that started it.
	ctx = context.WithoutCancel(ctx)
	defer func() {
		// DoChan runs fill on its own goroutine and re-panics there, where no
		// HTTP server can recover it; an error keeps a bad request local.
		if r := recover(); r != nil {
			c.logger.ErrorContext(ctx, "cache load panicked", "key", key, "panic", r, "stack", string(debug.Stack()))
			raw, err = nil, fmt.Errorf("cache: load %q panicked: %v", key, r)
		}
	}()

	// The version must be read, and made if missing, before load runs; the
	// value comes along in the same script (both keys share a slot), in
	// case a flight that ended just before this one stored it.
	var version string
	var versionRead time.Time
	versionKnown := false
	if cacheUp {
		// The load is timed from before the read: the read's own wait
		// (a pool, retries) counts against the guard too.
		start := time.Now()
		cached, v, err := c.readForLoad(ctx, key, false)
		if err == nil && cached != nil {
			if usable(cached) {
				return cached, nil
			}
			if v == "" {
				// The load replaces an undecodable value: it needs a version.
				_, v, err = c.readForLoad(ctx, key, true)
			}
		}
		if err != nil {
			// Without a version the store cannot be guarded, so it is skipped.
			c.failed(ctx, failRead, key, err)
		} else {
			version = v
			versionKnown, versionRead = version != "", start
		}
	}

	v, err := load(ctx)
	store := versionKnown
	if err != nil {
		if !errors.Is(err, ErrNotCacheable) {
			return nil, err
		}
		store = false
	}
	raw, err = json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("cache: encode %q: %w", key, err)
	}
	if !store {
		return raw, nil
	}
	if took := time.Since(versionRead); took > c.guardedLoad {
		// A version written by an invalidation early in the load may have
		// expired by now: the guard cannot vouch for the value.
		c.logger.DebugContext(ctx, "cache store skipped: the load outlasted the stale-set guard", "key", key, "took", took)
		return raw, nil
	}
	keys := []string{c.valueKey(key), c.versionKey(key)}
	rctx, cancel := context.WithTimeout(ctx, c.redisTimeout)
	stored, err := setIfVersion.Run(rctx, c.rdb, keys, version, raw, max(1, c.expiry(ttl).Milliseconds())).Int()
	cancel()
	switch {
	case err != nil:
		c.failed(ctx, failStore, key, err)
	case stored == 0:
		c.recovered(ctx, failStore)
		c.logger.DebugContext(ctx, "cache store skipped: key invalidated during load, or its version expired", "key", key)
	default:
		c.recovered(ctx, failStore)
	}
	return raw, nil
}

// readForLoad runs the script of that name (force: give the key a version
// even if a value is cached). It returns the cached value (nil if none) and
// the version ("" if none).
func (c *Client) readForLoad(ctx context.Context, key string, force bool) (cached []byte, version string, err error) {
	rctx, cancel := context.WithTimeout(ctx, c.redisTimeout)
	defer cancel()
	keys := []string{c.valueKey(key), c.versionKey(key)}
	forced := "0"
	if force {
		forced = "1"
	}
	vals, err := readForLoad.Run(rctx, c.rdb, keys, newVersion(), versionTTL.Milliseconds(), forced).Slice()
	if err == nil && len(vals) != 2 {
		err = fmt.Errorf("read for load: %d replies, want 2", len(vals))
	}
	if err != nil {
		return nil, "", err
	}
	if s, ok := vals[0].(string); ok {
		cached = []byte(s)
	}
	version, _ = vals[1].(string)
	return cached, version, nil
}

func decode[T any](raw []byte) (T, error) {
	var v T
	err := json.Unmarshal(raw, &v)
	return v, err
}

// redisPaused reports whether a Redis call failed less than c.redisPause
// ago: Fetch then does not try Redis.
func (c *Client) redisPaused() bool {
	until := c.skipUntil.Load()
	return until != 0 && time.Now().UnixNano() < until
}

// failure is a kind of cache failure that Fetch absorbs.
type failure int

const (
	failRead   failure = iota // reading a value or its version
	failDecode                // a cached value that does not decode
	failStore                 // the guarded store after a load
	numFailures
)

func (f failure) String() string {
	switch f {
	case failRead:
		return "read"
	case failDecode:
		return "decode"
	case failStore:
		return "store"
	}
	return fmt.Sprintf("failure(%d)", int(f))
}

// failed logs a failure that Fetch absorbed: a warning the first time, so an
// operator learns that the cache is degraded, then at debug level, so an
// outage does not log once per request.
func (c *Client) failed(ctx context.Context, f failure, key string, err error) {
	if f != failDecode && ctx.Err() == nil {
		c.skipUntil.Store(time.Now().Add(c.redisPause).UnixNano())
	}
	level := slog.LevelDebug
	if ctx.Err() == nil && c.failing[f].CompareAndSwap(false, true) {
		level = slog.LevelWarn
	}
	c.logger.Log(ctx, level, "cache degraded, serving from load", "failure", f.String(), "key", key, "error", err)
}

// recovered notes that an operation of kind f succeeded again, so that the
// next outage warns again. A successful decode does not count: undecodable
// values usually come from a type change across a deploy, and alternate with
// good ones until they expire, so they warn only once per process.
func (c *Client) recovered(ctx context.Context, f failure) {
	// Load first: the common case, nothing failing, then costs no write.
	if c.failing[f].Load() && c.failing[f].CompareAndSwap(true, false) {
		c.logger.InfoContext(ctx, "cache recovered", "failure", f.String())
	}
}
