package testenv_test

import (
	"database/sql"
	"strings"
	"testing"
	"time"

	_ "github.com/lib/pq" // the postgres driver for database/sql
	"go.uber.org/goleak"

	"github.com/conveyor/conveyor/embedded"
	"github.com/conveyor/conveyor/internal/testenv"
)

// The shared servers are stopped by Wrap's Run before goleak looks, so no
// goroutine of theirs is left to report.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(testenv.Wrap(m))
}

func TestRedis(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	c := testenv.Redis(t)
	key := testenv.Prefix(t) + "k"
	if err := c.Set(ctx, key, "v", 0).Err(); err != nil {
		t.Fatalf("SET: %v", err)
	}
	if got, err := c.Get(ctx, key).Result(); err != nil || got != "v" {
		t.Fatalf("GET = %q, %v; want \"v\"", got, err)
	}
	if testenv.RedisURL(t) != testenv.RedisURL(t) {
		t.Error("RedisURL changed between calls; want one server per test binary")
	}
}

// WaitRenewed returns once a renewed key outlived its lease. The key is
// renewed far more often than its lease needs, so that a stalled renewer
// does not lose it on a loaded machine.
func TestWaitRenewed(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	c := testenv.Redis(t)
	key := testenv.Prefix(t) + "lock"
	const lease = 3 * time.Second
	if err := c.Set(ctx, key, "holder", lease).Err(); err != nil {
		t.Fatalf("SET: %v", err)
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
				c.PExpire(ctx, key, lease)
			}
		}
	}()
	defer func() { close(stop); <-done }()
	start := time.Now()
	testenv.WaitRenewed(t, c, key, lease, 2)
	if d := time.Since(start); d <= lease {
		t.Errorf("WaitRenewed returned after %s, want more than the lease %s", d, lease)
	}
}

func TestPrefixIsUnique(t *testing.T) {
	t.Parallel()
	a, b := testenv.Prefix(t), testenv.Prefix(t)
	if a == b {
		t.Errorf("two Prefix calls gave %q", a)
	}
	if !strings.HasPrefix(a, "test:TestPrefixIsUnique:") || strings.ContainsAny(a, "{}") {
		t.Errorf("Prefix = %q, want test:TestPrefixIsUnique:<random>: without braces", a)
	}
}

func TestDatabaseURLGivesFreshDatabases(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	first, second := testenv.DatabaseURL(t), testenv.DatabaseURL(t)
	if first == second {
		t.Fatalf("two DatabaseURL calls gave %s", first)
	}
	names := make(map[string]bool)
	for _, u := range []string{first, second} {
		db, err := sql.Open("postgres", u)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = db.Close() })
		var name string
		var tables int
		if err := db.QueryRowContext(ctx, "SELECT current_database()").Scan(&name); err != nil {
			t.Fatalf("connect to %s: %v", u, err)
		}
		if err := db.QueryRowContext(ctx, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").Scan(&tables); err != nil || tables != 0 {
			t.Errorf("tables in new database %s = %d, %v; want 0", name, tables, err)
		}
		if _, err := db.ExecContext(ctx, "CREATE TABLE t (id int)"); err != nil {
			t.Errorf("create table in %s: %v", name, err)
		}
		names[name] = true
	}
	if len(names) != 2 {
		t.Errorf("databases = %v, want two different ones", names)
	}
}

func TestDedicatedServers(t *testing.T) {
	t.Parallel()
	ctx := t.Context()

	r := testenv.StartRedis(t, embedded.RedisConfig{})
	if r.URL() == testenv.RedisURL(t) {
		t.Errorf("StartRedis gave the shared server %s", r.URL())
	}
	if err := r.Kill(); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	if err := r.Restart(ctx); err != nil {
		t.Fatalf("Restart: %v", err)
	}

	p := testenv.StartPostgres(t, embedded.PostgresConfig{})
	db, err := sql.Open("postgres", p.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var one int
	if err := db.QueryRowContext(ctx, "SELECT 1").Scan(&one); err != nil {
		t.Fatalf("SELECT 1 on dedicated postgres: %v", err)
	}
}
