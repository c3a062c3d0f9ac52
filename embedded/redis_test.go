package embedded

import (
	"bytes"
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"
)

// The servers are processes, not goroutines: once every test has stopped its
// servers and closed its clients, no goroutine of this package may be left.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func startTestRedis(t *testing.T, cfg RedisConfig) *Redis {
	t.Helper()
	r, err := StartRedis(t.Context(), cfg)
	if err != nil {
		t.Fatalf("StartRedis: %v", err)
	}
	t.Cleanup(func() {
		if err := r.Stop(context.Background()); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
	return r
}

func redisClient(t *testing.T, url string) *redis.Client {
	t.Helper()
	opt, err := redis.ParseURL(url)
	if err != nil {
		t.Fatalf("ParseURL(%q): %v", url, err)
	}
	c := redis.NewClient(opt)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// assertGone checks that the process pid has been reaped and that nothing
// is left in its process group.
func assertGone(t *testing.T, pid int) {
	t.Helper()
	if pid <= 0 {
		t.Fatalf("pid = %d, want a process id", pid)
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("signal 0 to pid %d: %v, want ESRCH (process gone and reaped)", pid, err)
	}
	if groupAlive(pid) {
		t.Errorf("process group %d still has live members", pid)
	}
}

func off() *bool { b := false; return &b }

func TestRedisKillAndRestartKeepAOFData(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r := startTestRedis(t, RedisConfig{Dir: t.TempDir(), AppendFsync: "always"})

	if err := redisClient(t, r.URL()).Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatalf("SET: %v", err)
	}
	pid, addr := r.PID(), r.Addr()

	if err := r.Kill(); err != nil {
		t.Fatalf("Kill: %v", err)
	}
	assertGone(t, pid)

	if err := r.Restart(ctx); err != nil {
		t.Fatalf("Restart: %v", err)
	}
	if r.Addr() != addr {
		t.Errorf("Addr after Restart = %s, want %s", r.Addr(), addr)
	}
	if r.PID() == pid {
		t.Errorf("PID after Restart = %d, the killed process", pid)
	}
	got, err := redisClient(t, r.URL()).Get(ctx, "k").Result()
	if err != nil || got != "v" {
		t.Fatalf("GET after Kill and Restart = %q, %v; want \"v\" (AOF with appendfsync always)", got, err)
	}

	pid = r.PID()
	if err := r.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	assertGone(t, pid)
	if err := r.Stop(ctx); err != nil {
		t.Errorf("second Stop: %v, want nil", err)
	}
	if err := r.Kill(); err != nil {
		t.Errorf("Kill after Stop: %v, want nil", err)
	}
}

func TestRedisStopThenRestart(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	r := startTestRedis(t, RedisConfig{Dir: t.TempDir()})
	if err := redisClient(t, r.URL()).Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatalf("SET: %v", err)
	}
	if err := r.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	// Restart also stops a running server first; here it is stopped.
	if err := r.Restart(ctx); err != nil {
		t.Fatalf("Restart: %v", err)
	}
	got, err := redisClient(t, r.URL()).Get(ctx, "k").Result()
	if err != nil || got != "v" {
		t.Fatalf("GET after Stop and Restart = %q, %v; want \"v\"", got, err)
	}
	if err := r.Restart(ctx); err != nil {
		t.Fatalf("Restart of a running server: %v", err)
	}
}

func TestRedisStopKillsWhenContextEnds(t *testing.T) {
	t.Parallel()
	r := startTestRedis(t, RedisConfig{Dir: t.TempDir(), AppendOnly: off()})
	pid := r.PID()
	// A stopped process cannot act on SIGTERM, so only the kill that follows
	// the end of ctx can end it: the outcome does not depend on timing.
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := r.Stop(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Stop with an ended context = %v, want it to wrap context.Canceled", err)
	}
	assertGone(t, pid)
}

func TestRedisReusesRecordedPort(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	first, err := StartRedis(t.Context(), RedisConfig{Dir: dir, AppendOnly: off()})
	if err != nil {
		t.Fatalf("StartRedis: %v", err)
	}
	addr := first.Addr()
	if err := first.Stop(t.Context()); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	second := startTestRedis(t, RedisConfig{Dir: dir, AppendOnly: off()})
	if second.Addr() != addr {
		t.Errorf("second start on %s, want the recorded %s", second.Addr(), addr)
	}
}

// syncBuffer is a bytes.Buffer that the server's output copier and the
// test may use at the same time.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestRedisOutputGoesToWriters(t *testing.T) {
	t.Parallel()
	var out syncBuffer
	r := startTestRedis(t, RedisConfig{Dir: t.TempDir(), AppendOnly: off(), Stdout: &out, Stderr: &out})
	if err := r.Stop(t.Context()); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	if !strings.Contains(out.String(), "Ready to accept connections") {
		t.Errorf("Stdout got %q, want the server's log", out.String())
	}
}

func TestRedisPortTakenQuotesLog(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	port := l.Addr().(*net.TCPAddr).Port

	_, err = StartRedis(t.Context(), RedisConfig{Dir: t.TempDir(), Port: port, AppendOnly: off()})
	if err == nil {
		t.Fatal("StartRedis on a taken port succeeded")
	}
	t.Log(err)
	if !errors.Is(err, errPortInUse) || !strings.Contains(err.Error(), "Address already in use") {
		t.Errorf("StartRedis on a taken port: %v, want the server's log saying the address is in use", err)
	}
}

func TestNotInstalled(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		start    func(ctx context.Context, dir string) error
		wantHint string
	}{
		{
			name: "redis",
			start: func(ctx context.Context, dir string) error {
				_, err := StartRedis(ctx, RedisConfig{Dir: dir, Binary: "/nonexistent/redis-server"})
				return err
			},
			wantHint: "apt-get install -y redis-server",
		},
		{
			name: "postgres",
			start: func(ctx context.Context, dir string) error {
				_, err := StartPostgres(ctx, PostgresConfig{Dir: dir, BinDir: "/nonexistent"})
				return err
			},
			wantHint: "apt-get install -y postgresql",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := tt.start(t.Context(), t.TempDir())
			if !errors.Is(err, ErrNotInstalled) {
				t.Fatalf("err = %v, want ErrNotInstalled", err)
			}
			t.Log(err)
			for _, want := range []string{tt.wantHint, "brew install", "docker compose"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("err = %q, want it to mention %q", err, want)
				}
			}
		})
	}
}

func TestValidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		err  error
		want []string
	}{
		{name: "redis ok", err: RedisConfig{Dir: "d"}.Validate()},
		{
			name: "redis all wrong",
			err:  RedisConfig{Port: 70000, AppendFsync: "sometimes"}.Validate(),
			want: []string{"Dir is required", "Port 70000", "AppendFsync \"sometimes\""},
		},
		{name: "postgres ok", err: PostgresConfig{Dir: "d"}.Validate()},
		{
			name: "postgres all wrong",
			err:  PostgresConfig{Port: -1, Database: "a\x00b"}.Validate(),
			want: []string{"Dir is required", "Port -1", "Database must not contain NUL"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if len(tt.want) == 0 {
				if tt.err != nil {
					t.Errorf("Validate() = %v, want nil", tt.err)
				}
				return
			}
			if tt.err == nil {
				t.Fatalf("Validate() = nil, want errors %q", tt.want)
			}
			for _, w := range tt.want {
				if !strings.Contains(tt.err.Error(), w) {
					t.Errorf("Validate() = %q, want it to mention %q", tt.err, w)
				}
			}
		})
	}
}
