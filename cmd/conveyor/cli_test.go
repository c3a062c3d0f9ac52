package main_test

import (
	"encoding/json"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/conveyor/conveyor/api"
	"github.com/conveyor/conveyor/embedded"
	"github.com/conveyor/conveyor/internal/harness"
	"github.com/conveyor/conveyor/internal/testenv"
)

// TestConfigErrors: a variable a command needs that is unset is a
// configuration error like any other: status 2, reported together with
// the others, under the command's name.
func TestConfigErrors(t *testing.T) {
	t.Parallel()
	redisURL := "REDIS_URL=redis://127.0.0.1:1"
	tests := []struct {
		name string
		env  []string
		args []string
		want []string // lines after "conveyor <command>: invalid configuration:"
	}{
		{name: "api, nothing set", args: []string{"api"}, want: []string{"REDIS_URL is required", "DATABASE_URL is required"}},
		{
			name: "api, with another error", env: []string{"LOG_LEVEL=loud"}, args: []string{"api"},
			want: []string{`LOG_LEVEL: must be debug, info, warn or error, not "loud"`, "REDIS_URL is required", "DATABASE_URL is required"},
		},
		{name: "projector without DATABASE_URL", env: []string{redisURL}, args: []string{"projector"}, want: []string{"DATABASE_URL is required"}},
		{name: "migrate without DATABASE_URL", env: []string{redisURL}, args: []string{"migrate"}, want: []string{"DATABASE_URL is required"}},
		{name: "handler", args: []string{"handler"}, want: []string{"REDIS_URL is required"}},
		// The scheduler runs without DATABASE_URL.
		{name: "scheduler", args: []string{"scheduler"}, want: []string{"REDIS_URL is required"}},
		{name: "status", args: []string{"status"}, want: []string{"REDIS_URL is required"}},
		{name: "dlq", args: []string{"dlq", "list"}, want: []string{"REDIS_URL is required"}},
		{name: "schedules", args: []string{"schedules"}, want: []string{"REDIS_URL is required"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, stderr, code := conveyor(t, tt.env, tt.args...)
			if code != 2 {
				t.Errorf("exit status %d, want 2; stderr:\n%s", code, stderr)
			}
			want := "conveyor " + tt.args[0] + ": invalid configuration:\n  " + strings.Join(tt.want, "\n  ") + "\n"
			if stderr != want {
				t.Errorf("stderr:\n%s\nwant:\n%s", stderr, want)
			}
		})
	}
}

// TestVersionAndHelpNeedNoConfig: version and --help work whatever the
// environment holds.
func TestVersionAndHelpNeedNoConfig(t *testing.T) {
	t.Parallel()
	bad := []string{"LOG_LEVEL=loud", "REDIS_URL=nonsense"}
	for _, args := range [][]string{{"version"}, {"--help"}, {"api", "--help"}, {"help", "migrate"}} {
		stdout, stderr, code := conveyor(t, bad, args...)
		// `conveyor <command> --help` writes to stderr, as Go's flag
		// package does.
		if out := stdout + stderr; code != 0 || !strings.HasPrefix(out, "conveyor") && !strings.HasPrefix(out, "Conveyor") || strings.Contains(out, "invalid configuration") {
			t.Errorf("conveyor %s with an invalid environment: status %d, stdout %q, stderr %q; want 0 and its output", strings.Join(args, " "), code, stdout, stderr)
		}
	}
}

// TestLogsStayJSONWhileRedisIsDown: with LOG_FORMAT=json, every line a
// process writes while it waits for a Redis that refuses connections is
// JSON, go-redis's own (a pool's failed dials) included, and those are
// rate-limited.
func TestLogsStayJSONWhileRedisIsDown(t *testing.T) {
	t.Parallel()
	dead := "redis://127.0.0.1:1" // nothing listens on port 1
	start := time.Now()
	// A server role: stopped while it waits, it exits 0 (a one-shot
	// command such as migrate exits 130).
	p := harness.Start(t, "projector", []string{"REDIS_URL=" + dead, "DATABASE_URL=postgres://127.0.0.1:1/x", "LOG_FORMAT=json",
		"HTTP_ADDR=127.0.0.1:" + strconv.Itoa(harness.FreePort(t))}, "projector")
	deadline := time.Now().Add(time.Minute)
	for strings.Count(p.Log(), "waiting for redis") < 3 {
		if time.Now().After(deadline) || p.Exited() {
			t.Fatalf("projector is not waiting for Redis (exited: %v):\n%s", p.Exited(), p.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
	log := p.Log() // before the stop, whose last line is the command's error
	elapsed := time.Since(start)
	if err := p.Stop(30 * time.Second); err != nil {
		t.Errorf("stop: %v", err)
	}
	fromRedis := 0
	for _, line := range strings.Split(strings.TrimSpace(log), "\n") {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil {
			t.Errorf("not JSON: %s", line)
			continue
		}
		if m["component"] == "go-redis" {
			fromRedis++
		}
	}
	// Within the few seconds of three waits the pool failed dozens of
	// dials: one line of them per 10 s.
	if most := 1 + int(elapsed/(10*time.Second)); fromRedis < 1 || fromRedis > most {
		t.Errorf("%d lines of go-redis in %s, want 1 to %d:\n%s", fromRedis, elapsed.Round(time.Second), most, log)
	}
}

// TestAPIReadinessDegrades: the api stays ready, "degraded", while the
// cache Redis and PostgreSQL are down (reads fall back, and accepting work
// needs neither), so a load balancer keeps it; it is unavailable while the
// streams Redis is down. conveyor healthcheck follows.
func TestAPIReadinessDegrades(t *testing.T) {
	t.Parallel()
	streams := testenv.StartRedis(t, embedded.RedisConfig{Dir: t.TempDir()})
	cache := testenv.StartRedis(t, embedded.RedisConfig{Dir: t.TempDir()})
	pg := testenv.StartPostgres(t, embedded.PostgresConfig{})
	p := harness.Start(t, "api", []string{
		"REDIS_URL=" + streams.URL(), "CACHE_REDIS_URL=" + cache.URL(), "DATABASE_URL=" + pg.URL(), "BLOB_DIR=" + t.TempDir(),
	}, "api")
	p.WaitReady(t, time.Minute)

	// waitFor polls /readyz until check is down, and returns the answer.
	waitFor := func(check string) (int, api.ReadinessBody) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			resp, err := http.Get(p.URL() + "/readyz")
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			var body api.ReadinessBody
			if err := json.Unmarshal(b, &body); err != nil {
				t.Fatalf("/readyz: %s: %v", b, err)
			}
			if body.Checks[check] == "down" {
				return resp.StatusCode, body
			}
			if time.Now().After(deadline) {
				t.Fatalf("/readyz = %d %s 30 s after %s stopped", resp.StatusCode, b, check)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	healthcheck := func() int {
		t.Helper()
		_, _, code := conveyor(t, nil, "healthcheck", "--url", p.URL()+"/readyz")
		return code
	}
	ctx := t.Context()
	if err := cache.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if code, body := waitFor("cache_redis"); code != http.StatusOK || body.Status != "degraded" {
		t.Errorf("cache Redis down: /readyz = %d %+v, want 200 degraded", code, body)
	}
	if err := pg.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	code, body := waitFor("postgres")
	if code != http.StatusOK || body.Status != "degraded" || body.Checks["redis"] != "ok" {
		t.Errorf("cache Redis and PostgreSQL down: /readyz = %d %+v, want 200 degraded, redis ok", code, body)
	}
	if c := healthcheck(); c != 0 {
		t.Errorf("healthcheck of a degraded api: status %d, want 0", c)
	}
	// It still accepts work.
	resp, err := http.Post(p.URL()+"/v1/emails", "application/json", strings.NewReader(`{"to":"ann@example.com","subject":"s","body":"b"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Errorf("POST /v1/emails while degraded: %d, want 202", resp.StatusCode)
	}

	if err := streams.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if code, body := waitFor("redis"); code != http.StatusServiceUnavailable || body.Status != "unavailable" {
		t.Errorf("streams Redis down: /readyz = %d %+v, want 503 unavailable", code, body)
	}
	if c := healthcheck(); c != 1 {
		t.Errorf("healthcheck of an unavailable api: status %d, want 1", c)
	}
}
