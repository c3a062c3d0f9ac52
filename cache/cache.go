// Package cache is the Redis cache in front of the API's reads, and the cache
// of LLM responses.
//
// The cache may live on its own Redis with an LRU eviction policy, so nothing
// stored here is ever required for correctness: every value can be evicted or
// lost at any moment, and [Fetch] treats an unreachable Redis as a miss and
// serves from the database. Redis's "no such key" (redis.Nil) never leaves
// this package; it becomes [ErrMiss].
//
// Invalidation is guarded against the stale-set race by a per-key version
// (see [Client.Invalidate] and [Fetch]), so that a reader which loaded a row
// before the projector committed a newer one cannot put the old row back into
// the cache after the projector invalidated it.
//
// Package cache must not import other project packages: the API and the
// projector depend on it, not the other way round.
package cache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/sync/singleflight"
)

// ErrMiss is returned by [Client.Get] when the key is not in the cache.
var ErrMiss = errors.New("cache: miss")

const (
	defaultPrefix = "cache:"
	defaultTTL    = 60 * time.Second
	defaultJitter = 0.1

	// versionTTL is how long a version key lives after the load that made
	// it (an invalidation replaces the version but keeps its expiry).
	// Only keys loaded on a miss get a version (about 165 bytes in Redis),
	// so this bounds the versions' memory by the misses of the last 10
	// minutes. A version that expires during a load makes its store fail
	// (see Fetch), so its length only trades memory for stores refused:
	// the value of a load that took longer than half of it is not stored.
	versionTTL = 10 * time.Minute

	defaultRedisTimeout = 250 * time.Millisecond
	// defaultRedisPause is how long Fetch leaves Redis alone after a
	// failed call.
	defaultRedisPause = time.Second
)

// Config configures a [Client].
type Config struct {
	// Redis is the connection to the cache's Redis (a plain client or a
	// Cluster client). Required. The Client never closes it: its owner does.
	// Give it short dial and read timeouts and few retries (MaxRetries,
	// DialerRetries): a slow or unreachable cache should fall back to the
	// database quickly, not hold up the request.
	Redis redis.UniversalClient

	// Prefix is put in front of every key, so that the cache can share a
	// Redis with other data. It must not contain '{' or '}', which would
	// change the Redis Cluster hash tag. Defaults to "cache:".
	Prefix string

	// TTL is the time to live of a value stored with a TTL of zero or less.
	// Defaults to 60s.
	TTL time.Duration

	// Jitter is the fraction of the TTL added at random (between 0 and
	// Jitter×TTL) to every expiry, so that values cached together do not
	// expire together and stampede the database from every replica at once
	// (singleflight only protects one process). Must be in [0, 1]. Zero
	// means the default, 0.1: jitter cannot be switched off.
	Jitter float64

	// RedisTimeout bounds each Redis call of [Fetch]: a slow or hung Redis
	// costs a read at most this long before it is served from its load,
	// and after a failed call Fetch leaves Redis alone for a second (the
	// reads in between go straight to their loads), so an outage does not
	// cost every read the timeout. Defaults to 250ms.
	RedisTimeout time.Duration

	// Logger receives the warnings of a degraded cache (Redis unreachable,
	// undecodable values). Defaults to slog.Default().
	Logger *slog.Logger
}

func (c *Config) setDefaults() {
	if c.Prefix == "" {
		c.Prefix = defaultPrefix
	}
	if c.TTL == 0 {
		c.TTL = defaultTTL
	}
	if c.Jitter == 0 {
		c.Jitter = defaultJitter
	}
	if c.RedisTimeout == 0 {
		c.RedisTimeout = defaultRedisTimeout
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Validate reports every problem with the configuration at once.
func (c Config) Validate() error {
	var errs []error
	if c.Redis == nil {
		errs = append(errs, errors.New("cache: Redis is required"))
	}
	if strings.ContainsAny(c.Prefix, "{}") {
		errs = append(errs, fmt.Errorf("cache: Prefix %q must not contain '{' or '}'", c.Prefix))
	}
	if c.TTL < 0 {
		errs = append(errs, fmt.Errorf("cache: TTL %s must not be negative", c.TTL))
	}
	if c.RedisTimeout < 0 {
		errs = append(errs, fmt.Errorf("cache: RedisTimeout %s must not be negative", c.RedisTimeout))
	}
	// Written so that NaN fails too.
	if !(c.Jitter >= 0 && c.Jitter <= 1) {
		errs = append(errs, fmt.Errorf("cache: Jitter %v must be in [0, 1]", c.Jitter))
	}
	return errors.Join(errs...)
}

// Client is a JSON cache on Redis. It is safe for concurrent use.
//
// The value of key k is stored at <Prefix>{k} and its version (see
// [Client.Invalidate]) at <Prefix>{k}:v; the braces are a Redis Cluster
// hash tag that keeps both in one slot. Keys must therefore be non-empty and
// must not contain '}'; methods given such a key return an error.
type Client struct {
	rdb     redis.UniversalClient
	prefix  string
	ttl     time.Duration
	jitter  float64
	logger  *slog.Logger
	flights singleflight.Group
	// guardedLoad is the longest load whose value Fetch stores: within
	// it, a version written by an invalidation during the load is still
	// there when the load's value is offered (see versionTTL).
	guardedLoad time.Duration

	// redisTimeout bounds each Redis call of Fetch.
	redisTimeout time.Duration
	// redisPause is how long Fetch leaves Redis alone after a failed call.
	redisPause time.Duration
	// skipUntil is when Fetch tries Redis again after a failed call (unix
	// nanoseconds; 0 when nothing failed).
	skipUntil atomic.Int64

	// failing records, per kind of failure, whether the last attempt failed,
	// so that an outage logs one warning rather than one per request.
	failing [numFailures]atomic.Bool
}

// New returns a Client for cfg, after applying defaults and validating it.
func New(cfg Config) (*Client, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Client{
		rdb:    cfg.Redis,
		prefix: cfg.Prefix,
		ttl:    cfg.TTL,
		jitter: cfg.Jitter,
		logger: cfg.Logger,

		guardedLoad:  versionTTL / 2,
		redisTimeout: cfg.RedisTimeout,
		redisPause:   defaultRedisPause,
	}, nil
}

// Get decodes the JSON value cached under key into dst. It returns [ErrMiss]
// if the key is not cached. Unlike [Fetch], it does not hide a failing
// Redis: it returns the error, and its caller decides what to do.
func (c *Client) Get(ctx context.Context, key string, dst any) error {
	if err := checkKey(key); err != nil {
		return err
	}
	raw, err := c.rdb.Get(ctx, c.valueKey(key)).Bytes()
	if errors.Is(err, redis.Nil) {
		return ErrMiss
	}
	if err != nil {
		return fmt.Errorf("cache: get %q: %w", key, err)
	}
	if err := json.Unmarshal(raw, dst); err != nil {
		return fmt.Errorf("cache: decode %q: %w", key, err)
	}
	return nil
}

// Set caches v as JSON under key for ttl plus jitter; a ttl of zero or less
// means the configured TTL.
//
// Set writes unconditionally, outside the stale-set guard: use it for values
// known to be current (for instance right after a commit). A read that loads
// from the database should go through [Fetch], which refuses to store what
// an invalidation made stale while it was loading. Never store a value for a
// row that does not exist yet (a placeholder, a view built from a request):
// whoever creates the row may skip the invalidation, since a cache that
// only ever holds rows it read holds nothing for a new one.
func (c *Client) Set(ctx context.Context, key string, v any, ttl time.Duration) error {
	if err := checkKey(key); err != nil {
		return err
	}
	raw, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("cache: encode %q: %w", key, err)
	}
	if err := c.rdb.Set(ctx, c.valueKey(key), raw, c.expiry(ttl)).Err(); err != nil {
		return fmt.Errorf("cache: set %q: %w", key, err)
	}
	return nil
}

// Invalidate removes keys from the cache, in one pipelined round trip, and
// makes any [Fetch] that was loading one of them before the call refuse to
// store what it loaded. Call it after the change that made the keys stale is
// committed: an invalidation before the commit lets a reader cache the old
// row again.
//
// For each key it replaces the key's version, if it has one, with a new one
// (a random number; the version keeps its expiry), and only then deletes the
// value: two commands per key. A key has a version only if a [Fetch] loaded
// it in the last 10 minutes (a load gives the key one before it reads), so a
// key that nobody read costs Redis no new key, only two lookups; before,
// every invalidation created a version key for 10 minutes, which at the
// projector's rates (tens of thousands of rows a second, most of them never
// read) was most of the cache Redis's memory and work. The order matters: a
// guarded store that lands between the two commands sees the new version
// and is refused; one that lands before both is deleted. A random version,
// unlike a counter, never comes back: a counter whose key was evicted
// starts again at 1 and may repeat a version that a running load read. The
// versions are integers, so an older process that increments them during a
// rolling upgrade still works.
func (c *Client) Invalidate(ctx context.Context, keys ...string) error {
	if len(keys) == 0 {
		return nil
	}
	for _, key := range keys {
		if err := checkKey(key); err != nil {
			return err
		}
	}
	// A plain pipeline, not MULTI: the keys may live in different Cluster
	// slots, and the per-key order above is all the guard needs.
	pipe := c.rdb.Pipeline()
	for _, key := range keys {
		pipe.SetXX(ctx, c.versionKey(key), newVersion(), redis.KeepTTL)
		pipe.Del(ctx, c.valueKey(key))
	}
	if _, err := pipe.Exec(ctx); err != nil {
		return fmt.Errorf("cache: invalidate %d keys: %w", len(keys), err)
	}
	// Callers in this process that arrive from now on must not join a load
	// that began before the invalidation: they start a new one, which reads
	// the new version. (Callers already waiting still get the older result;
	// the guard keeps it out of the cache.)
	for _, key := range keys {
		c.flights.Forget(key)
	}
	return nil
}

// newVersion returns a key's next version: a random integer in [2^61, 2^62),
// never "" (no version) and far from overflowing an INCR.
func newVersion() int64 { return 1<<61 | rand.Int64N(1<<61) }

// valueKey and versionKey put the caller's key in braces, a Redis Cluster
// hash tag, so that a value and its version always share a slot and one Lua
// script may touch both.
func (c *Client) valueKey(key string) string   { return c.prefix + "{" + key + "}" }
func (c *Client) versionKey(key string) string { return c.prefix + "{" + key + "}:v" }

// checkKey rejects keys that would break the shared hash tag: with an empty
// key ("{}") Redis hashes the whole name, and a '}' would end the tag early.
func checkKey(key string) error {
	if key == "" || strings.Contains(key, "}") {
		return fmt.Errorf("cache: invalid key %q: it must be non-empty and must not contain '}'", key)
	}
	return nil
}

// expiry returns ttl (or the default TTL if ttl <= 0) plus a random jitter
// in [0, Jitter×ttl].
func (c *Client) expiry(ttl time.Duration) time.Duration {
	if ttl <= 0 {
		ttl = c.ttl
	}
	if spread := time.Duration(float64(ttl) * c.jitter); spread > 0 {
		ttl += rand.N(spread + 1)
	}
	return ttl
}
