// Package testenv gives integration tests real servers, never mocks: a
// redis-server and a PostgreSQL cluster shared by the tests of one package
// (each test isolated by a key prefix or by a database of its own), and
// dedicated servers for tests that stop, kill or restart them.
//
// TEST_REDIS_URL and TEST_DATABASE_URL point the tests at servers that are
// already running, as in CI with service containers. Otherwise the shared
// servers are started from PATH on first use, once per test binary, and
// stopped by [Main]. A missing server binary fails the test with the
// install hint; it never skips it, so that a green run means the
// integration tests ran.
//
// Only tests import testenv. It must not import project packages other
// than embedded.
package testenv

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lib/pq"
	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/embedded"
)

// Environment variables naming servers to use instead of starting them.
const (
	envRedisURL    = "TEST_REDIS_URL"
	envDatabaseURL = "TEST_DATABASE_URL"
)

// stopTimeout bounds the graceful stop of a test server before it is
// killed. It is a safety net against a hung server, not an assertion.
const stopTimeout = 30 * time.Second

// The servers shared by the tests of one binary, started on first use.
var (
	redisOnce   sync.Once
	sharedRedis struct {
		url    string
		server *embedded.Redis // nil with TEST_REDIS_URL
		tmp    string
		err    error
	}

	postgresOnce   sync.Once
	sharedPostgres struct {
		admin  *sql.DB  // connection used to create and drop test databases
		base   *url.URL // URL of the server; each test database replaces the path
		server *embedded.Postgres
		tmp    string
		err    error
	}
)

// Main runs the tests of a package and then stops the servers that were
// started lazily. Use it as:
//
//	func TestMain(m *testing.M) { testenv.Main(m) }
//
// Without it the servers are still stopped on Linux, when the test binary
// exits, but their temporary folders are left behind.
func Main(m *testing.M) {
	os.Exit(Wrap(m).Run())
}

// Wrap returns m with a Run method that also stops the servers started
// lazily, for a TestMain that runs something around the tests. With
// goleak, whose check must come after the servers' goroutines are gone:
//
//	func TestMain(m *testing.M) { goleak.VerifyTestMain(testenv.Wrap(m)) }
func Wrap(m *testing.M) interface{ Run() int } {
	return runner{m}
}

type runner struct{ m *testing.M }

func (r runner) Run() int {
	code := r.m.Run()
	if err := shutdown(); err != nil {
		fmt.Fprintln(os.Stderr, "testenv: stop test servers:", err)
		if code == 0 {
			code = 1
		}
	}
	return code
}

// shutdown stops the shared servers and removes their folders. It runs
// after every test has finished.
func shutdown() error {
	ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
	defer cancel()
	var errs []error
	if sharedRedis.server != nil {
		errs = append(errs, sharedRedis.server.Stop(ctx))
	}
	if sharedPostgres.admin != nil {
		errs = append(errs, sharedPostgres.admin.Close())
	}
	if sharedPostgres.server != nil {
		errs = append(errs, sharedPostgres.server.Stop(ctx))
	}
	for _, dir := range []string{sharedRedis.tmp, sharedPostgres.tmp} {
		if dir != "" {
			errs = append(errs, os.RemoveAll(dir))
		}
	}
	return errors.Join(errs...)
}

// RedisURL returns the URL of a real Redis: TEST_REDIS_URL if it is set,
// else a throw-away redis-server (AOF off) started once per test binary on
// a free port in a temporary folder. Tests share it, so each one keeps to
// its own keys (see [Prefix]). If redis-server is missing, the test fails
// with the install hint.
func RedisURL(t testing.TB) string {
	t.Helper()
	redisOnce.Do(func() {
		s := &sharedRedis
		if s.url = os.Getenv(envRedisURL); s.url != "" {
			return
		}
		if s.tmp, s.err = os.MkdirTemp("", "conveyor-test-redis-"); s.err != nil {
			return
		}
		off := false
		s.server, s.err = embedded.StartRedis(t.Context(), embedded.RedisConfig{Dir: s.tmp, AppendOnly: &off})
		if s.err == nil {
			s.url = s.server.URL()
		}
	})
	if err := sharedRedis.err; err != nil {
		t.Fatalf("test redis: %v", err)
	}
	return sharedRedis.url
}

// Redis returns a client of the Redis at [RedisURL], closed at cleanup.
func Redis(t testing.TB) *redis.Client {
	t.Helper()
	opt, err := redis.ParseURL(RedisURL(t))
	if err != nil {
		t.Fatalf("test redis: %v", err)
	}
	c := redis.NewClient(opt)
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("close test redis client: %v", err)
		}
	})
	return c
}

// Prefix returns a key and stream prefix that no other test uses, such as
// "test:TestPublish_retries:3f9a61c2:". Tests put every key under it instead
// of flushing the shared Redis, so they can run in parallel and against a
// Redis that other runs use too. It holds no '{' or '}', so it never changes
// a Redis Cluster hash tag.
func Prefix(t testing.TB) string {
	t.Helper()
	name := strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '_', r == '-':
			return r
		default:
			return '_'
		}
	}, t.Name())
	if len(name) > 48 {
		name = name[:48]
	}
	return "test:" + name + ":" + randomHex(4) + ":"
}

// DatabaseURL returns the URL of a new, empty PostgreSQL database for this
// test, dropped at cleanup. The database is created on the server of
// TEST_DATABASE_URL if it is set (which must be a postgres:// URL of a user
// allowed to create databases), else on a throw-away cluster (fsync off)
// started once per test binary in a temporary folder. If PostgreSQL is
// missing, the test fails with the install hint.
func DatabaseURL(t testing.TB) string {
	t.Helper()
	postgresOnce.Do(func() { sharedPostgres.err = startSharedPostgres(t.Context()) })
	s := &sharedPostgres
	if s.err != nil {
		t.Fatalf("test postgres: %v", s.err)
	}
	name := "test_" + randomHex(8)
	if _, err := s.admin.ExecContext(t.Context(), "CREATE DATABASE "+pq.QuoteIdentifier(name)); err != nil {
		t.Fatalf("test postgres: create database %s: %v", name, err)
	}
	t.Cleanup(func() {
		// t.Context() is already cancelled when cleanups run. FORCE ends
		// connections the test left open.
		ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
		defer cancel()
		if _, err := s.admin.ExecContext(ctx, "DROP DATABASE IF EXISTS "+pq.QuoteIdentifier(name)+" WITH (FORCE)"); err != nil {
			t.Errorf("test postgres: drop database %s: %v", name, err)
		}
	})
	u := *s.base
	u.Path = "/" + name
	u.RawPath = ""
	return u.String()
}

// startSharedPostgres connects to TEST_DATABASE_URL, or starts a cluster.
func startSharedPostgres(ctx context.Context) error {
	s := &sharedPostgres
	raw := os.Getenv(envDatabaseURL)
	if raw == "" {
		dir, err := reachableTempDir("conveyor-test-postgres-")
		if err != nil {
			return err
		}
		s.tmp = dir
		off := false
		// The maintenance database is enough: every test gets its own.
		s.server, err = embedded.StartPostgres(ctx, embedded.PostgresConfig{
			Dir:      filepath.Join(dir, "data"),
			Database: "postgres",
			Fsync:    &off,
		})
		if err != nil {
			return err
		}
		raw = s.server.URL()
	}
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		return fmt.Errorf("%s must be a postgres:// URL, got %q", envDatabaseURL, raw)
	}
	s.base = u
	if s.admin, err = sql.Open("postgres", raw); err != nil {
		return err
	}
	if err := s.admin.PingContext(ctx); err != nil {
		return fmt.Errorf("connect to %s: %w", u.Redacted(), err)
	}
	return nil
}

// reachableTempDir creates a temporary folder that the unprivileged user
// PostgreSQL runs as (when the tests run as root) can enter. os.MkdirTemp
// and t.TempDir create private (0700) folders.
func reachableTempDir(pattern string) (string, error) {
	dir, err := os.MkdirTemp("", pattern)
	if err != nil {
		return "", err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", errors.Join(err, os.RemoveAll(dir))
	}
	return dir, nil
}

// StartRedis starts a redis-server of its own for a test that stops, kills
// or restarts it, and stops it at cleanup. cfg.Dir defaults to a temporary
// folder, and the AOF is on unless cfg says otherwise, as in production.
// The server's warnings (an unexpected exit) go to the test log.
func StartRedis(t testing.TB, cfg embedded.RedisConfig) *embedded.Redis {
	t.Helper()
	if cfg.Dir == "" {
		cfg.Dir = t.TempDir()
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	r, err := embedded.StartRedis(t.Context(), cfg)
	if err != nil {
		t.Fatalf("start test redis: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
		defer cancel()
		if err := r.Stop(ctx); err != nil {
			t.Errorf("stop test redis: %v", err)
		}
	})
	return r
}

// StartPostgres starts a PostgreSQL cluster of its own for a test that
// stops, kills or restarts it, and stops it at cleanup. cfg.Dir defaults to
// a temporary folder that PostgreSQL can enter, removed at cleanup. Fsync
// stays on unless cfg turns it off, because without it a killed server
// loses its last commits. The server's warnings go to the test log.
func StartPostgres(t testing.TB, cfg embedded.PostgresConfig) *embedded.Postgres {
	t.Helper()
	if cfg.Dir == "" {
		dir, err := reachableTempDir("conveyor-test-postgres-")
		if err != nil {
			t.Fatalf("start test postgres: %v", err)
		}
		// Registered first, so it runs after the server has stopped.
		t.Cleanup(func() {
			if err := os.RemoveAll(dir); err != nil {
				t.Errorf("remove test postgres folder: %v", err)
			}
		})
		cfg.Dir = filepath.Join(dir, "data")
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	p, err := embedded.StartPostgres(t.Context(), cfg)
	if err != nil {
		t.Fatalf("start test postgres: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
		defer cancel()
		if err := p.Stop(ctx); err != nil {
			t.Errorf("stop test postgres: %v", err)
		}
	})
	return p
}

// testLogger writes warnings and errors to the test's output.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// randomHex returns 2n random hex digits.
func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails
	return hex.EncodeToString(b)
}
