package cache_test

import (
	"context"
	"errors"
	"log/slog"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/cache"
	"github.com/conveyor/conveyor/internal/testenv"
)

// newClient returns a Client on the test Redis under the test's own prefix.
// Fields of cfg that are set are kept.
func newClient(t *testing.T, cfg cache.Config) *cache.Client {
	t.Helper()
	if cfg.Redis == nil {
		cfg.Redis = testenv.Redis(t)
	}
	if cfg.Prefix == "" {
		cfg.Prefix = testenv.Prefix(t)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	c, err := cache.New(cfg)
	if err != nil {
		t.Fatalf("cache.New: %v", err)
	}
	return c
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	// NewClient does not connect, so this needs no Redis.
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:0"})
	t.Cleanup(func() { _ = rdb.Close() })

	tests := []struct {
		name    string
		cfg     cache.Config
		wantErr []string // substrings of the error; none means valid
	}{
		{name: "defaults", cfg: cache.Config{Redis: rdb}},
		{name: "all set", cfg: cache.Config{Redis: rdb, Prefix: "p:", TTL: time.Minute, Jitter: 1}},
		{name: "no redis", cfg: cache.Config{}, wantErr: []string{"Redis is required"}},
		{name: "negative ttl", cfg: cache.Config{Redis: rdb, TTL: -time.Second}, wantErr: []string{"TTL"}},
		{name: "jitter above one", cfg: cache.Config{Redis: rdb, Jitter: 1.5}, wantErr: []string{"Jitter"}},
		{name: "negative jitter", cfg: cache.Config{Redis: rdb, Jitter: -0.1}, wantErr: []string{"Jitter"}},
		{name: "nan jitter", cfg: cache.Config{Redis: rdb, Jitter: math.NaN()}, wantErr: []string{"Jitter"}},
		{name: "brace in prefix", cfg: cache.Config{Redis: rdb, Prefix: "a{b}:"}, wantErr: []string{"Prefix"}},
		{
			name:    "every problem at once",
			cfg:     cache.Config{TTL: -1, Jitter: 2, Prefix: "{"},
			wantErr: []string{"Redis is required", "TTL", "Jitter", "Prefix"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := cache.New(tt.cfg)
			if len(tt.wantErr) == 0 {
				if err != nil {
					t.Fatalf("New: %v, want no error", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("New: no error, want one mentioning %q", tt.wantErr)
			}
			for _, want := range tt.wantErr {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("New error %q does not mention %q", err, want)
				}
			}
		})
	}
}

type document struct {
	ID     string            `json:"id"`
	Status string            `json:"status"`
	Tags   []string          `json:"tags"`
	Meta   map[string]string `json:"meta"`
}

func TestGetSet(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		v    any
	}{
		{name: "string", v: "hello"},
		{name: "number", v: 42.5},
		{name: "struct", v: document{ID: "d1", Status: "processed", Tags: []string{"a"}, Meta: map[string]string{"k": "v"}}},
		{name: "slice", v: []int{1, 2, 3}},
		{name: "map", v: map[string]bool{"x": true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c := newClient(t, cache.Config{})
			if err := c.Set(t.Context(), "k", tt.v, 0); err != nil {
				t.Fatalf("Set: %v", err)
			}
			dst := reflect.New(reflect.TypeOf(tt.v))
			if err := c.Get(t.Context(), "k", dst.Interface()); err != nil {
				t.Fatalf("Get: %v", err)
			}
			if got := dst.Elem().Interface(); !reflect.DeepEqual(got, tt.v) {
				t.Errorf("Get = %#v, want %#v", got, tt.v)
			}
		})
	}
}

func TestGetMiss(t *testing.T) {
	t.Parallel()
	c := newClient(t, cache.Config{})
	var s string
	if err := c.Get(t.Context(), "absent", &s); !errors.Is(err, cache.ErrMiss) {
		t.Fatalf("Get of an absent key = %v, want ErrMiss", err)
	}
}

func TestInvalidKeys(t *testing.T) {
	t.Parallel()
	c := newClient(t, cache.Config{})
	for _, key := range []string{"", "a}b"} {
		if err := c.Set(t.Context(), key, 1, 0); err == nil {
			t.Errorf("Set(%q): no error, want an invalid key error", key)
		}
		if err := c.Invalidate(t.Context(), "ok", key); err == nil {
			t.Errorf("Invalidate(%q): no error, want an invalid key error", key)
		}
	}
}

// TestSetTTL checks the expiry that Set gives a value against the bounds
// [TTL, TTL×(1+Jitter)]. It reads absolute times from Redis (TIME before and
// after the SET, PEXPIRETIME after), so the check does not depend on how
// fast the machine runs.
func TestSetTTL(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		cfg      cache.Config
		ttl      time.Duration // passed to Set
		wantBase time.Duration // the TTL that jitter is added to
	}{
		{name: "explicit ttl", cfg: cache.Config{Jitter: 0.1}, ttl: 10 * time.Minute, wantBase: 10 * time.Minute},
		{name: "zero ttl means default", cfg: cache.Config{TTL: 5 * time.Minute}, ttl: 0, wantBase: 5 * time.Minute},
		{name: "negative ttl means default", cfg: cache.Config{TTL: 5 * time.Minute}, ttl: -time.Second, wantBase: 5 * time.Minute},
		{name: "default ttl and jitter", cfg: cache.Config{}, ttl: 0, wantBase: 60 * time.Second},
		{name: "full jitter", cfg: cache.Config{Jitter: 1}, ttl: time.Hour, wantBase: time.Hour},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			rdb := testenv.Redis(t)
			tt.cfg.Redis = rdb
			c := newClient(t, tt.cfg)
			jitter := tt.cfg.Jitter
			if jitter == 0 {
				jitter = 0.1
			}
			maxTTL := time.Duration(float64(tt.wantBase) * (1 + jitter))

			// Several keys, so that the test also sees jitter being added:
			// all of them drawing less than the SET's own duration is
			// practically impossible.
			sawJitter := false
			for i := range 20 {
				key := "k" + string(rune('a'+i))
				before := redisTime(t, rdb)
				if err := c.Set(t.Context(), key, "v", tt.ttl); err != nil {
					t.Fatalf("Set: %v", err)
				}
				after := redisTime(t, rdb).Add(time.Millisecond) // TIME has µs, expiries ms
				expireAt := time.UnixMilli(int64(rdb.PExpireTime(t.Context(), c.ValueKey(key)).Val() / time.Millisecond))

				// The SET ran between before and after, so its TTL is at
				// least expireAt-after and at most expireAt-before.
				if longest := expireAt.Sub(before.Truncate(time.Millisecond)); longest < tt.wantBase {
					t.Errorf("%s: TTL at most %s, want at least %s", key, longest, tt.wantBase)
				}
				if shortest := expireAt.Sub(after); shortest > maxTTL {
					t.Errorf("%s: TTL at least %s, want at most %s", key, shortest, maxTTL)
				} else if shortest > tt.wantBase {
					sawJitter = true
				}
				pttl, err := rdb.PTTL(t.Context(), c.ValueKey(key)).Result()
				if err != nil || pttl <= 0 || pttl > maxTTL {
					t.Errorf("%s: PTTL = %s, %v; want in (0, %s]", key, pttl, err, maxTTL)
				}
			}
			if !sawJitter {
				t.Errorf("no key got a TTL above %s: jitter not applied", tt.wantBase)
			}
		})
	}
}

func redisTime(t *testing.T, rdb *redis.Client) time.Time {
	t.Helper()
	now, err := rdb.Time(t.Context()).Result()
	if err != nil {
		t.Fatalf("TIME: %v", err)
	}
	return now
}

func TestInvalidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		set        []string
		invalidate []string
		wantKept   []string
	}{
		{name: "several keys in one call", set: []string{"a", "b", "c"}, invalidate: []string{"a", "b"}, wantKept: []string{"c"}},
		{name: "absent keys", set: []string{"a"}, invalidate: []string{"x", "y"}, wantKept: []string{"a"}},
		{name: "no keys", set: []string{"a"}, invalidate: nil, wantKept: []string{"a"}},
		{name: "the same key twice", set: []string{"a", "b"}, invalidate: []string{"a", "a"}, wantKept: []string{"b"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c := newClient(t, cache.Config{})
			for _, key := range tt.set {
				if err := c.Set(t.Context(), key, key, 0); err != nil {
					t.Fatalf("Set(%q): %v", key, err)
				}
			}
			if err := c.Invalidate(t.Context(), tt.invalidate...); err != nil {
				t.Fatalf("Invalidate: %v", err)
			}
			for _, key := range tt.invalidate {
				var s string
				if err := c.Get(t.Context(), key, &s); !errors.Is(err, cache.ErrMiss) {
					t.Errorf("Get(%q) after Invalidate = %q, %v; want ErrMiss", key, s, err)
				}
			}
			for _, key := range tt.wantKept {
				var s string
				if err := c.Get(t.Context(), key, &s); err != nil || s != key {
					t.Errorf("Get(%q) = %q, %v; want it kept", key, s, err)
				}
			}
		})
	}
}

func TestInvalidateVersionExpires(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	c := newClient(t, cache.Config{Redis: rdb})
	ctx := t.Context()
	pttl := func() time.Duration {
		t.Helper()
		ttl, err := rdb.PTTL(ctx, c.VersionKey("k")).Result()
		if err != nil {
			t.Fatalf("PTTL: %v", err)
		}
		return ttl
	}
	version := func() string {
		t.Helper()
		v, err := rdb.Get(ctx, c.VersionKey("k")).Result()
		if err != nil {
			t.Fatalf("GET the version: %v", err)
		}
		return v
	}
	// A key nobody loaded gets no version from an invalidation: the
	// projector invalidates every row it updates, and most are never read.
	if err := c.Invalidate(ctx, "k"); err != nil {
		t.Fatalf("Invalidate: %v", err)
	}
	if n, err := rdb.Exists(ctx, c.VersionKey("k"), c.ValueKey("k")).Result(); err != nil || n != 0 {
		t.Fatalf("after invalidating a key never loaded, %d of its keys exist (%v); want none", n, err)
	}
	// A load gives the key a version, which an invalidation replaces.
	if _, err := cache.Fetch(ctx, c, "k", 0, func(context.Context) (string, error) { return "v", nil }); err != nil {
		t.Fatalf("Fetch: %v", err)
	}
	loaded := version()
	if ttl := pttl(); ttl <= c.GuardedLoad() || ttl > cache.VersionTTL {
		t.Errorf("version key PTTL after a load = %s, want more than %s and at most %s", ttl, c.GuardedLoad(), cache.VersionTTL)
	}
	if err := rdb.PExpire(ctx, c.VersionKey("k"), time.Minute).Err(); err != nil {
		t.Fatalf("PEXPIRE: %v", err)
	}
	if err := c.Invalidate(ctx, "k"); err != nil {
		t.Fatalf("Invalidate: %v", err)
	}
	if v := version(); v == loaded {
		t.Errorf("the version is still %s after an invalidation; want a new one", v)
	}
	// Versions must not accumulate: an invalidation keeps the expiry the
	// load gave, so a key invalidated more often than every 10 minutes
	// does not keep its version for ever.
	if ttl := pttl(); ttl <= 0 || ttl > time.Minute {
		t.Errorf("version key PTTL after an invalidation = %s, want the minute it had left kept", ttl)
	}
	if cache.VersionTTL > time.Hour {
		t.Errorf("a version lives %s, more than an hour", cache.VersionTTL)
	}
	// The margin covers the time between the check of a load's length
	// and its store, and clocks that disagree.
	if cache.VersionTTL < 2*c.GuardedLoad() {
		t.Errorf("a version lives %s, less than twice the longest stored load (%s)", cache.VersionTTL, c.GuardedLoad())
	}
}
