package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/logging"

	"github.com/conveyor/conveyor/api"
	"github.com/conveyor/conveyor/config"
	"github.com/conveyor/conveyor/internal/harness"
	"github.com/conveyor/conveyor/internal/testenv"
	"github.com/conveyor/conveyor/store"
)

// TestRedisLoggerLimits: go-redis's lines go through slog at warn level, at
// most one per format per interval; the next one written says how many were
// left out.
func TestRedisLoggerLimits(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	l := newRedisLogger(slog.New(slog.NewJSONHandler(&buf, nil)))
	now := time.Date(2026, 12, 7, 3, 0, 0, 0, time.UTC)
	l.now = func() time.Time { return now }
	const dial = "redis: connection pool: failed to dial after %d attempts: %v"
	for range 100 {
		l.Printf(t.Context(), dial, 5, "connection refused")
		now = now.Add(50 * time.Millisecond) // 100 lines in 5 s
	}
	l.Printf(t.Context(), "redis: unknown message type: %T", 1) // another format: its own line
	now = now.Add(redisLogEvery)
	l.Printf(t.Context(), dial, 5, "connection refused")

	var lines []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Fatalf("line %q is not JSON: %v", line, err)
		}
		lines = append(lines, m)
	}
	if len(lines) != 3 {
		t.Fatalf("%d lines, want 3 (one per format, then one after the interval):\n%s", len(lines), buf.String())
	}
	for i, want := range []struct {
		msg        string
		suppressed any
	}{
		{"redis: connection pool: failed to dial after 5 attempts: connection refused", nil},
		{"redis: unknown message type: int", nil},
		{"redis: connection pool: failed to dial after 5 attempts: connection refused", float64(99)},
	} {
		if lines[i]["msg"] != want.msg || lines[i]["level"] != "WARN" || lines[i]["suppressed"] != want.suppressed {
			t.Errorf("line %d = %v, want msg %q at WARN with suppressed %v", i, lines[i], want.msg, want.suppressed)
		}
	}
}

// TestReadinessPerRole: a role stays ready, degraded, while a dependency it
// works without is down, and is unavailable while one it needs is down.
func TestReadinessPerRole(t *testing.T) {
	t.Parallel()
	live := testenv.Redis(t)
	// Nothing listens on port 1 (tcpmux, privileged and unused): its
	// connections are refused. A port found free may be another test's by
	// the time it is dialled.
	dead := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1})
	t.Cleanup(func() { _ = dead.Close() })
	deadDB, err := store.Open(store.Config{URL: "postgres://conveyor@127.0.0.1:1/x?sslmode=disable"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = deadDB.Close() })
	liveDB, err := store.Open(store.Config{URL: testenv.DatabaseURL(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = liveDB.Close() })

	tests := []struct {
		name   string
		role   string
		rdb    *redis.Client
		cache  *redis.Client
		db     *store.Store // nil: the role has no database (handler)
		status int
		word   string
	}{
		{name: "api without cache and postgres", role: "api", rdb: live, cache: dead, db: deadDB, status: http.StatusOK, word: "degraded"},
		{name: "api without postgres", role: "api", rdb: live, cache: live, db: deadDB, status: http.StatusOK, word: "degraded"},
		{name: "api without streams redis", role: "api", rdb: dead, cache: live, db: liveDB, status: http.StatusServiceUnavailable, word: "unavailable"},
		{name: "api with everything", role: "api", rdb: live, cache: live, db: liveDB, status: http.StatusOK, word: "ready"},
		{name: "handler without cache", role: "handler", rdb: live, cache: dead, status: http.StatusOK, word: "degraded"},
		{name: "handler without streams redis", role: "handler", rdb: dead, cache: live, status: http.StatusServiceUnavailable, word: "unavailable"},
		{name: "projector without postgres", role: "projector", rdb: live, cache: live, db: deadDB, status: http.StatusServiceUnavailable, word: "unavailable"},
		{name: "projector without cache", role: "projector", rdb: live, cache: dead, db: liveDB, status: http.StatusServiceUnavailable, word: "unavailable"},
		{name: "scheduler without postgres", role: "scheduler", rdb: live, cache: live, db: deadDB, status: http.StatusOK, word: "degraded"},
		{name: "scheduler without streams redis", role: "scheduler", rdb: dead, cache: live, db: liveDB, status: http.StatusServiceUnavailable, word: "unavailable"},
		{name: "up without postgres", role: "up", rdb: live, cache: live, db: deadDB, status: http.StatusServiceUnavailable, word: "unavailable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			// A cache Redis that is not the streams one is checked apart;
			// here a live one is a second client of the same server. It is
			// not made from live.Options(): go-redis writes to a client's
			// options while it connects, which the parallel subtests do,
			// and copying them then is a data race.
			cache := tt.cache
			if cache == live {
				cache = testenv.Redis(t)
			}
			a := &app{rdb: tt.rdb, cacheRdb: cache, store: tt.db}
			status, body := api.Readiness(t.Context(), a.checks(tt.role, nil))
			if status != tt.status || body.Status != tt.word {
				t.Errorf("readiness = %d %+v, want %d %s", status, body, tt.status, tt.word)
			}
		})
	}
}

// TestUpListensOnLoopback: conveyor up listens on 127.0.0.1:8080 unless
// HTTP_ADDR is set (its API has no authentication); the roles keep :8080.
func TestUpListensOnLoopback(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name string
		env  map[string]string
		want string
	}{
		{name: "unset", env: map[string]string{}, want: "127.0.0.1:8080"},
		{name: "set", env: map[string]string{"HTTP_ADDR": ":9090"}, want: ":9090"},
		{name: "set to the roles' default", env: map[string]string{"HTTP_ADDR": ":8080"}, want: ":8080"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			getenv := func(k string) string { return tt.env[k] }
			cfg, err := config.Load(getenv)
			if err != nil {
				t.Fatal(err)
			}
			set := func(name string) bool { return getenv(name) != "" || getenv(name+"_FILE") != "" }
			if got := upDefaults(cfg, set).HTTPAddr; got != tt.want {
				t.Errorf("up's HTTP_ADDR = %q, want %q", got, tt.want)
			}
			if tt.name == "unset" && cfg.HTTPAddr != ":8080" {
				t.Errorf("the roles' HTTP_ADDR = %q, want :8080", cfg.HTTPAddr)
			}
		})
	}
}

// TestOneShotGivesUp: migrate and schedules, which reach their deadline
// waiting for Redis, say they gave up, and fail (status 1): they were not
// stopped. (schedules waited forever, as a server does.)
func TestOneShotGivesUp(t *testing.T) {
	// Not parallel: it shortens the commands' timeouts, and the commands
	// set the process's loggers (restored after).
	oldMigrate, oldSchedules, oldLog := migrateTimeout, schedulesTimeout, slog.Default()
	migrateTimeout, schedulesTimeout = time.Second, time.Second
	t.Cleanup(func() {
		migrateTimeout, schedulesTimeout = oldMigrate, oldSchedules
		slog.SetDefault(oldLog)
		logging.Enable()
	})
	env := map[string]string{
		"REDIS_URL":    "redis://127.0.0.1:1",
		"DATABASE_URL": "postgres://127.0.0.1:1/x",
		"LOG_LEVEL":    "error",
	}
	for _, cmd := range []string{"migrate", "schedules"} {
		var stdout, stderr bytes.Buffer
		ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
		code := run(ctx, []string{cmd}, func(k string) string { return env[k] }, &stdout, &stderr)
		cancel()
		if code != 1 {
			t.Errorf("%s: exit status %d, want 1", cmd, code)
		}
		want := fmt.Sprintf("conveyor %s: gave up waiting for redis after %s: ", cmd, time.Second)
		if got := stderr.String(); !strings.HasPrefix(got, want) || strings.Contains(got, "stopped") {
			t.Errorf("%s: stderr = %q, want it to start with %q", cmd, got, want)
		}
	}
}

// TestInterruptedOneShotFails: a signal that cuts a one-shot command short
// (here while it waits for Redis) exits 130, so that a script or compose's
// service_completed_successfully does not take it for finished; a server
// role stopped the same way exits 0.
func TestInterruptedOneShotFails(t *testing.T) {
	oldLog := slog.Default()
	t.Cleanup(func() {
		slog.SetDefault(oldLog)
		logging.Enable()
	})
	env := map[string]string{
		"REDIS_URL":    "redis://127.0.0.1:1",
		"DATABASE_URL": "postgres://127.0.0.1:1/x",
		"LOG_LEVEL":    "error",
		"HTTP_ADDR":    "127.0.0.1:" + strconv.Itoa(harness.FreePort(t)),
	}
	for _, tc := range []struct {
		args []string
		want int
	}{
		{[]string{"migrate"}, 130},
		{[]string{"schedules"}, 130},
		{[]string{"projector"}, 0},
	} {
		ctx, cancel := context.WithTimeout(t.Context(), 500*time.Millisecond)
		var stdout, stderr bytes.Buffer
		code := run(ctx, tc.args, func(k string) string { return env[k] }, &stdout, &stderr)
		cancel()
		if code != tc.want {
			t.Errorf("conveyor %s interrupted: exit status %d, want %d; stderr %q", tc.args[0], code, tc.want, stderr.String())
		}
	}
}
