package cache_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/cache"
	"github.com/conveyor/conveyor/internal/testenv"
)

func TestFetch(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		cached    *document // set before the first Fetch
		wantLoads int
	}{
		{name: "hit does not call load", cached: &document{ID: "d1", Status: "cached"}, wantLoads: 0},
		{name: "miss calls load once and stores", cached: nil, wantLoads: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c := newClient(t, cache.Config{})
			fromDB := document{ID: "d1", Status: "loaded"}
			want := fromDB
			if tt.cached != nil {
				if err := c.Set(t.Context(), "doc:d1", tt.cached, 0); err != nil {
					t.Fatalf("Set: %v", err)
				}
				want = *tt.cached
			}
			var loads atomic.Int32
			load := func(context.Context) (document, error) {
				loads.Add(1)
				return fromDB, nil
			}
			// The second Fetch must be a hit either way.
			for i := range 2 {
				got, err := cache.Fetch(t.Context(), c, "doc:d1", 0, load)
				if err != nil {
					t.Fatalf("Fetch #%d: %v", i+1, err)
				}
				if got.ID != want.ID || got.Status != want.Status {
					t.Errorf("Fetch #%d = %+v, want %+v", i+1, got, want)
				}
			}
			if got := int(loads.Load()); got != tt.wantLoads {
				t.Errorf("load called %d times, want %d", got, tt.wantLoads)
			}
			var stored document
			if err := c.Get(t.Context(), "doc:d1", &stored); err != nil || stored.Status != want.Status {
				t.Errorf("Get after Fetch = %+v, %v; want %+v stored", stored, err, want)
			}
		})
	}
}

// TestFetchSingleflight starts 50 concurrent Fetches of one missing key and
// holds the load until all 50 have missed the cache, as a go-redis hook on
// the (real) connection observes. After missing, a caller either joins the
// running load or, if it comes too late for it, starts a new flight whose
// second look at the cache finds the stored value; so exactly one load is
// deterministic, not a matter of timing.
func TestFetchSingleflight(t *testing.T) {
	t.Parallel()
	const callers = 50

	rdb := testenv.Redis(t) // a client of this test's own, so the hook sees only its commands
	misses := &missCounter{}
	rdb.AddHook(misses)
	c := newClient(t, cache.Config{Redis: rdb})
	misses.key.Store(c.ValueKey("hot"))

	var loads atomic.Int32
	load := func(ctx context.Context) (string, error) {
		loads.Add(1)
		select {
		case <-misses.all(callers):
			return "value", nil
		case <-ctx.Done():
			return "", ctx.Err()
		}
	}

	var wg sync.WaitGroup
	results := make([]string, callers)
	errs := make([]error, callers)
	for i := range callers {
		wg.Go(func() {
			results[i], errs[i] = cache.Fetch(t.Context(), c, "hot", 0, load)
		})
	}
	wg.Wait()

	for i := range callers {
		if errs[i] != nil || results[i] != "value" {
			t.Errorf("caller %d: Fetch = %q, %v; want %q", i, results[i], errs[i], "value")
		}
	}
	if got := loads.Load(); got != 1 {
		t.Errorf("load called %d times for %d concurrent misses, want 1", got, callers)
	}
}

// missCounter is a go-redis hook that counts GETs of one key that found
// nothing, and closes a channel when a given number is reached.
type missCounter struct {
	key  atomic.Value // string
	mu   sync.Mutex
	n    int
	want int
	done chan struct{}
}

// all returns a channel closed once n misses have been seen.
func (m *missCounter) all(n int) <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.done == nil {
		m.done = make(chan struct{})
		m.want = n
		m.check()
	}
	return m.done
}

func (m *missCounter) check() {
	if m.done != nil && m.n >= m.want {
		select {
		case <-m.done:
		default:
			close(m.done)
		}
	}
}

func (m *missCounter) DialHook(next redis.DialHook) redis.DialHook { return next }

func (m *missCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

func (m *missCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		args := cmd.Args()
		if cmd.Name() == "get" && len(args) == 2 && args[1] == m.key.Load() && errors.Is(err, redis.Nil) {
			m.mu.Lock()
			m.n++
			m.check()
			m.mu.Unlock()
		}
		return err
	}
}

func TestFetchLoadError(t *testing.T) {
	t.Parallel()
	errDB := errors.New("database unavailable")
	tests := []struct {
		name      string
		err       error
		wantErr   error
		wantValue string
	}{
		{name: "error is returned", err: errDB, wantErr: errDB},
		{name: "wrapped error is returned", err: fmt.Errorf("load doc: %w", errDB), wantErr: errDB},
		{name: "not cacheable returns the value", err: cache.ErrNotCacheable, wantValue: "partial"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c := newClient(t, cache.Config{})
			var loads atomic.Int32
			failing := func(context.Context) (string, error) {
				loads.Add(1)
				return "partial", tt.err
			}
			got, err := cache.Fetch(t.Context(), c, "k", 0, failing)
			if !errors.Is(err, tt.wantErr) || got != tt.wantValue {
				t.Fatalf("Fetch = %q, %v; want %q, %v", got, err, tt.wantValue, tt.wantErr)
			}
			// Nothing was cached: the next Fetch calls load again.
			got, err = cache.Fetch(t.Context(), c, "k", 0, func(context.Context) (string, error) {
				loads.Add(1)
				return "fresh", nil
			})
			if err != nil || got != "fresh" {
				t.Fatalf("second Fetch = %q, %v; want %q from load", got, err, "fresh")
			}
			if got := loads.Load(); got != 2 {
				t.Errorf("load called %d times, want 2", got)
			}
		})
	}
}

func TestFetchPanic(t *testing.T) {
	t.Parallel()
	c := newClient(t, cache.Config{})
	_, err := cache.Fetch(t.Context(), c, "k", 0, func(context.Context) (string, error) {
		panic("boom")
	})
	if err == nil {
		t.Fatal("Fetch with a panicking load: no error")
	}
}

// TestReadForLoadVersions: the read before a load gives the key a version
// only when the load will store: when no value is cached, or when the one
// cached does not decode (force). A read that finds the value after all
// (another flight stored it) leaves no version behind.
func TestReadForLoadVersions(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	c := newClient(t, cache.Config{Redis: rdb})
	ctx := t.Context()
	hasVersion := func(key string) bool {
		t.Helper()
		n, err := rdb.Exists(ctx, c.VersionKey(key)).Result()
		if err != nil {
			t.Fatalf("EXISTS: %v", err)
		}
		return n == 1
	}

	cached, v, err := c.ReadForLoad(ctx, "absent", false)
	if err != nil || cached != nil || v == "" || !hasVersion("absent") {
		t.Errorf("ReadForLoad(absent) = %q, %q, %v, version key %v; want no value and a new version", cached, v, err, hasVersion("absent"))
	}
	if _, v2, err := c.ReadForLoad(ctx, "absent", false); err != nil || v2 != v {
		t.Errorf("a second ReadForLoad(absent) = version %q, %v; want the first one, %q", v2, err, v)
	}

	if err := c.Set(ctx, "cached", "x", 0); err != nil {
		t.Fatalf("Set: %v", err)
	}
	cached, v, err = c.ReadForLoad(ctx, "cached", false)
	if err != nil || string(cached) != `"x"` || v != "" || hasVersion("cached") {
		t.Errorf("ReadForLoad(cached) = %q, %q, %v, version key %v; want the value and no version", cached, v, err, hasVersion("cached"))
	}
	cached, v, err = c.ReadForLoad(ctx, "cached", true)
	if err != nil || string(cached) != `"x"` || v == "" || !hasVersion("cached") {
		t.Errorf("ReadForLoad(cached, force) = %q, %q, %v, version key %v; want the value and a new version", cached, v, err, hasVersion("cached"))
	}
}

func TestFetchUndecodableValue(t *testing.T) {
	t.Parallel()
	c := newClient(t, cache.Config{})
	// A value cached with another type, as after a change across a deploy.
	if err := c.Set(t.Context(), "k", "not a document", 0); err != nil {
		t.Fatalf("Set: %v", err)
	}
	got, err := cache.Fetch(t.Context(), c, "k", 0, func(context.Context) (document, error) {
		return document{ID: "d1"}, nil
	})
	if err != nil || got.ID != "d1" {
		t.Fatalf("Fetch = %+v, %v; want the loaded document", got, err)
	}
	var stored document
	if err := c.Get(t.Context(), "k", &stored); err != nil || stored.ID != "d1" {
		t.Errorf("Get = %+v, %v; want the bad value replaced", stored, err)
	}
}

// TestFetchStaleSetRace replays the stale-set race step by step: the load
// reads the old row, then the row changes and the key is invalidated, and
// only then does the load return the old row. The guard must keep it out of
// the cache. The case without an invalidation shows that the value is
// otherwise cached, so the test would fail if Fetch never stored anything.
func TestFetchStaleSetRace(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name            string
		invalidateFirst bool // the key already has a version
		invalidate      bool // invalidate while the load is running
		// evictVersion drops the version key (as an LRU eviction would)
		// before the invalidation during the load.
		evictVersion bool
		wantCached   string
		wantLoads    int32
	}{
		{name: "invalidated during load", invalidate: true, wantCached: "", wantLoads: 2},
		{name: "invalidated before and during load", invalidateFirst: true, invalidate: true, wantCached: "", wantLoads: 2},
		{name: "no invalidation caches the value", invalidate: false, wantCached: "old", wantLoads: 1},
		{name: "invalidated only before load caches the value", invalidateFirst: true, wantCached: "old", wantLoads: 1},
		// A version that restarted after its key was lost (a counter back
		// at 1) would match the one the load read and let the old row in.
		{name: "version evicted, then invalidated during load", invalidateFirst: true, invalidate: true, evictVersion: true, wantCached: "", wantLoads: 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			rdb := testenv.Redis(t)
			c := newClient(t, cache.Config{Redis: rdb})
			ctx := t.Context()
			if tt.invalidateFirst {
				// An earlier load gave the key a version, which the
				// invalidation replaces (with the value it deletes).
				if _, err := cache.Fetch(ctx, c, "doc", 0, func(context.Context) (string, error) { return "older", nil }); err != nil {
					t.Fatalf("earlier Fetch: %v", err)
				}
				if n, err := rdb.Exists(ctx, c.VersionKey("doc")).Result(); err != nil || n != 1 {
					t.Fatalf("the earlier load left %d version keys (%v), want 1", n, err)
				}
				if err := c.Invalidate(ctx, "doc"); err != nil {
					t.Fatalf("Invalidate: %v", err)
				}
			}

			var (
				mu    sync.Mutex
				row   = "old" // the database
				loads atomic.Int32
			)
			loaded := make(chan struct{})
			proceed := make(chan struct{})
			var releaseOnce sync.Once
			release := func() { releaseOnce.Do(func() { close(proceed) }) }
			t.Cleanup(release) // do not leave the load blocked if the test fails early
			slowLoad := func(context.Context) (string, error) {
				loads.Add(1)
				mu.Lock()
				v := row
				mu.Unlock()
				close(loaded)
				<-proceed
				return v, nil
			}

			done := make(chan error, 1)
			go func() {
				got, err := cache.Fetch(ctx, c, "doc", 0, slowLoad)
				if err == nil && got != "old" {
					err = fmt.Errorf("first Fetch = %q, want the %q it loaded", got, "old")
				}
				done <- err
			}()

			<-loaded
			if tt.invalidate {
				// The projector: commit the new row, then invalidate.
				mu.Lock()
				row = "new"
				mu.Unlock()
				if tt.evictVersion {
					if err := rdb.Del(ctx, c.VersionKey("doc")).Err(); err != nil {
						t.Fatalf("drop the version key: %v", err)
					}
				}
				if err := c.Invalidate(ctx, "doc"); err != nil {
					t.Fatalf("Invalidate: %v", err)
				}
			}
			release()
			if err := <-done; err != nil {
				t.Fatal(err)
			}

			var cached string
			err := c.Get(ctx, "doc", &cached)
			if tt.wantCached == "" {
				if !errors.Is(err, cache.ErrMiss) {
					t.Fatalf("cache holds %q, %v after the race; want a miss", cached, err)
				}
			} else if err != nil || cached != tt.wantCached {
				t.Fatalf("cache holds %q, %v; want %q", cached, err, tt.wantCached)
			}

			// A later Fetch returns the current row.
			got, err := cache.Fetch(ctx, c, "doc", 0, func(context.Context) (string, error) {
				loads.Add(1)
				mu.Lock()
				defer mu.Unlock()
				return row, nil
			})
			want := row
			if !tt.invalidate {
				want = "old"
			}
			if err != nil || got != want {
				t.Errorf("later Fetch = %q, %v; want %q", got, err, want)
			}
			if got := loads.Load(); got != tt.wantLoads {
				t.Errorf("load called %d times, want %d", got, tt.wantLoads)
			}
		})
	}
}

// TestFetchRedisDown points the cache at a closed port: Fetch must serve
// from load, warn once per kind of failure rather than once per call, while
// Get, Set and Invalidate report the error to their callers.
func TestFetchRedisDown(t *testing.T) {
	t.Parallel()
	// Nothing listens on port 1 (tcpmux, privileged and unused): its
	// connections are refused. A port taken from a listener and closed
	// again may meanwhile be another test's.
	rdb := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1, DialerRetries: 1})
	t.Cleanup(func() { _ = rdb.Close() })
	logs := &levelCounter{}
	c := newClient(t, cache.Config{Redis: rdb, Logger: slog.New(logs)})

	for i := range 3 {
		got, err := cache.Fetch(t.Context(), c, "k", 0, func(context.Context) (string, error) {
			return "from database", nil
		})
		if err != nil || got != "from database" {
			t.Fatalf("Fetch #%d = %q, %v; want the loaded value", i+1, got, err)
		}
	}
	if got := logs.count(slog.LevelWarn); got != 1 {
		t.Errorf("%d warnings for 3 failed reads, want 1", got)
	}

	var s string
	if err := c.Get(t.Context(), "k", &s); err == nil || errors.Is(err, cache.ErrMiss) {
		t.Errorf("Get = %v, want a connection error", err)
	}
	if err := c.Set(t.Context(), "k", "v", 0); err == nil {
		t.Error("Set: no error, want a connection error")
	}
	if err := c.Invalidate(t.Context(), "k"); err == nil {
		t.Error("Invalidate: no error, want a connection error")
	}
}

// levelCounter is a slog.Handler that counts records per level.
type levelCounter struct {
	mu     sync.Mutex
	counts map[slog.Level]int
}

func (h *levelCounter) Enabled(context.Context, slog.Level) bool { return true }

func (h *levelCounter) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.counts == nil {
		h.counts = map[slog.Level]int{}
	}
	h.counts[r.Level]++
	return nil
}

func (h *levelCounter) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *levelCounter) WithGroup(string) slog.Handler      { return h }

func (h *levelCounter) count(l slog.Level) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.counts[l]
}

// A load that outlasts the stale-set guard (a version written early in it
// may have expired by its end) has its value returned but not stored; a
// load within the guard has it stored.
func TestFetchLoadOutlastingTheGuard(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	c := newClient(t, cache.Config{Redis: rdb})
	c.SetGuardedLoad(time.Second)
	ctx := t.Context()
	fetch := func(key string, took time.Duration) {
		t.Helper()
		got, err := cache.Fetch(ctx, c, key, 0, func(context.Context) (string, error) {
			time.Sleep(took)
			return "value of " + key, nil
		})
		if err != nil || got != "value of "+key {
			t.Fatalf("Fetch(%s) = %q, %v; want its loaded value", key, got, err)
		}
	}
	fetch("slow", 1500*time.Millisecond)
	fetch("quick", 0)
	for key, want := range map[string]int64{"slow": 0, "quick": 1} {
		if n, err := rdb.Exists(ctx, c.ValueKey(key)).Result(); err != nil || n != want {
			t.Errorf("value of %s stored: %d, %v; want %d", key, n, err, want)
		}
	}
}

// TestFetchRedisHung: a Redis that takes connections and never answers
// costs a Fetch at most Config.RedisTimeout (the client's own read
// timeout here is a minute), and after that failure the next Fetches do
// not try Redis at all for a while: no new connection, no command.
func TestFetchRedisHung(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ln.Close() })
	var conns atomic.Int32
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			t.Cleanup(func() { _ = conn.Close() })
		}
	}()
	rdb := redis.NewClient(&redis.Options{
		Addr: ln.Addr().String(), ReadTimeout: time.Minute, WriteTimeout: time.Minute,
		ContextTimeoutEnabled: true, MaxRetries: -1, DialerRetries: 1,
	})
	t.Cleanup(func() { _ = rdb.Close() })
	c := newClient(t, cache.Config{Redis: rdb, RedisTimeout: 100 * time.Millisecond})
	c.SetRedisPause(time.Hour)

	// Well under the client's minute: only RedisTimeout ends the wait.
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	for i := range 3 {
		got, err := cache.Fetch(ctx, c, "k", 0, func(context.Context) (string, error) {
			return "from database", nil
		})
		if err != nil || got != "from database" {
			t.Fatalf("Fetch #%d = %q, %v; want the loaded value", i+1, got, err)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("%d connections to the hung Redis for 3 Fetches, want 1: after the first failure Fetch leaves Redis alone", n)
	}
}

// TestFetchJoinerOutlivesTheStartersDeadline: a caller that joins a shared
// load gets its result even when the caller that started it had a shorter
// deadline and gave up.
func TestFetchJoinerOutlivesTheStartersDeadline(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t) // a client of this test's own, so the hook sees only its commands
	misses := &missCounter{}
	rdb.AddHook(misses)
	c := newClient(t, cache.Config{Redis: rdb})
	misses.key.Store(c.ValueKey("shared"))
	release := make(chan struct{})
	started := make(chan struct{})
	load := func(ctx context.Context) (string, error) {
		close(started)
		select {
		case <-release:
			return "value", nil
		case <-ctx.Done():
			return "", ctx.Err()
		}
	}
	hurried, cancel := context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	first := make(chan error, 1)
	go func() {
		_, err := cache.Fetch(hurried, c, "shared", 0, load)
		first <- err
	}()
	<-started
	if err := <-first; !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("the hurried caller's Fetch = %v, want its deadline", err)
	}
	joined := make(chan error, 1)
	var got string
	go func() {
		var err error
		got, err = cache.Fetch(t.Context(), c, "shared", 0, func(context.Context) (string, error) {
			return "", errors.New("a second load: the caller did not join the first")
		})
		joined <- err
	}()
	// The load is still running: once the joiner missed the cache (its
	// next step is to join the flight), finish it.
	<-misses.all(2)
	time.Sleep(50 * time.Millisecond)
	close(release)
	if err := <-joined; err != nil || got != "value" {
		t.Fatalf("the joiner's Fetch = %q, %v; want the shared load's value", got, err)
	}
}
