package embedded

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// server is what the tests below need of Redis and Postgres.
type server interface {
	PID() int
	URL() string
	Stop(ctx context.Context) error
	Kill() error
	Failed() <-chan struct{}
	Err() error
}

func supervisorOf(s server) *supervisor {
	switch s := s.(type) {
	case *Redis:
		return s.sup
	case *Postgres:
		return s.sup
	}
	panic(fmt.Sprintf("no supervisor in %T", s))
}

// kind is one of the two servers, for tests that run against both.
type kind struct {
	name    string
	dir     func(t *testing.T) string
	start   func(ctx context.Context, dir string, log *slog.Logger) (server, error)
	process string // the server's command name
	// write stores data that must survive a kill -9; check fails the test
	// unless it is there.
	write, check func(t *testing.T, s server)
}

func kinds() []kind {
	return []kind{
		{
			name: "redis",
			dir:  func(t *testing.T) string { return t.TempDir() },
			start: func(ctx context.Context, dir string, log *slog.Logger) (server, error) {
				// appendfsync always: the SET is on disk before it is
				// acknowledged.
				r, err := StartRedis(ctx, RedisConfig{Dir: dir, AppendFsync: "always", Logger: log})
				if err != nil {
					return nil, err
				}
				return r, nil
			},
			process: "redis-server",
			write: func(t *testing.T, s server) {
				if err := redisClient(t, s.URL()).Set(t.Context(), "k", "v", 0).Err(); err != nil {
					t.Fatalf("SET: %v", err)
				}
			},
			check: func(t *testing.T, s server) {
				if got, err := redisClient(t, s.URL()).Get(t.Context(), "k").Result(); err != nil || got != "v" {
					t.Fatalf("GET k = %q, %v; want \"v\"", got, err)
				}
			},
		},
		{
			name: "postgres",
			dir:  postgresDir,
			start: func(ctx context.Context, dir string, log *slog.Logger) (server, error) {
				// Fsync stays on: the row must survive a kill -9.
				p, err := StartPostgres(ctx, PostgresConfig{Dir: dir, Logger: log})
				if err != nil {
					return nil, err
				}
				return p, nil
			},
			process: "postgres",
			write: func(t *testing.T, s server) {
				db := openDB(t, s.URL())
				if _, err := db.ExecContext(t.Context(), "CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items VALUES (1)"); err != nil {
					t.Fatalf("write: %v", err)
				}
				if err := db.Close(); err != nil {
					t.Fatal(err)
				}
			},
			check: func(t *testing.T, s server) {
				if n := countRows(t, s.URL()); n != 1 {
					t.Fatalf("rows = %d, want 1", n)
				}
			},
		},
	}
}

// startKind starts k in dir and stops it at cleanup.
func startKind(t *testing.T, k kind, dir string, log *slog.Logger) server {
	t.Helper()
	s, err := k.start(t.Context(), dir, log)
	if err != nil {
		t.Fatalf("start %s: %v", k.name, err)
	}
	t.Cleanup(func() {
		if err := s.Stop(context.Background()); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
	return s
}

// TestSecondStartOnSameFolderIsRefused: two servers on one data folder
// would write the same files (two redis-servers appending to one AOF lose
// acknowledged writes). A second start on a folder in use is refused, even
// when it would have moved to another port, and the folder is free again
// once the first has stopped.
func TestSecondStartOnSameFolderIsRefused(t *testing.T) {
	t.Parallel()
	for _, k := range kinds() {
		t.Run(k.name, func(t *testing.T) {
			t.Parallel()
			dir := k.dir(t)
			first := startKind(t, k, dir, nil)
			k.write(t, first)

			second, err := k.start(t.Context(), dir, nil)
			if err == nil {
				_ = second.Stop(context.Background())
				t.Fatal("second start on the data folder of a running server succeeded")
			}
			t.Log(err)
			if want := fmt.Sprintf("in use by another server started by this process (pid %d)", os.Getpid()); !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), want) {
				t.Errorf("second start: %v, want ErrInUse saying %q", err, want)
			}
			k.check(t, first)

			if err := first.Stop(t.Context()); err != nil {
				t.Fatalf("Stop: %v", err)
			}
			again := startKind(t, k, dir, nil)
			k.check(t, again)
		})
	}
}

// TestOrphanedServerKeepsFolderLocked: when the process that started a
// server dies (here: lets go of its lock and of its pid in the lock file)
// and the server outlives it, the server still holds the lock, so a new
// start waits for it and then says which process to stop. Once the server
// is gone, the folder is free: flock leaves nothing stale behind.
func TestOrphanedServerKeepsFolderLocked(t *testing.T) {
	t.Parallel()
	for _, k := range kinds() {
		t.Run(k.name, func(t *testing.T) {
			t.Parallel()
			dir := k.dir(t)
			orphan := startKind(t, k, dir, nil)
			sup := supervisorOf(orphan)
			sup.ops.Lock()
			err := sup.lock.release()
			sup.ops.Unlock()
			if err != nil {
				t.Fatal(err)
			}
			const deadOwner = 2147483646
			serverPID := orphan.PID()
			if err := os.WriteFile(sup.lockPath, []byte(fmt.Sprintf("%d\n%d\n", deadOwner, serverPID)), 0o644); err != nil {
				t.Fatal(err)
			}

			ctx, cancel := context.WithTimeout(t.Context(), time.Second)
			defer cancel()
			if s, err := k.start(ctx, dir, nil); err == nil {
				_ = s.Stop(context.Background())
				t.Fatal("start on the data folder of an orphaned server succeeded")
			} else {
				t.Log(err)
				want := fmt.Sprintf("in use by %s (pid %d), left running by a conveyor up (pid %d) that has exited", k.process, serverPID, deadOwner)
				if !errors.Is(err, ErrInUse) || !strings.Contains(err.Error(), want) {
					t.Errorf("start: %v, want ErrInUse saying %q", err, want)
				}
			}

			if err := orphan.Kill(); err != nil {
				t.Fatalf("Kill: %v", err)
			}
			s := startKind(t, k, dir, nil)
			k.write(t, s)
		})
	}
}

// TestServerRestartsAfterKill9: a server that dies without Stop or Kill
// (kill -9, the OOM killer) is restarted on the same port with the same
// data, and the restart is logged.
func TestServerRestartsAfterKill9(t *testing.T) {
	t.Parallel()
	for _, k := range kinds() {
		t.Run(k.name, func(t *testing.T) {
			t.Parallel()
			var logs syncBuffer
			s := startKind(t, k, k.dir(t), slog.New(slog.NewTextHandler(&logs, nil)))
			k.write(t, s)
			url, pid := s.URL(), s.PID()

			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(time.Minute)
			for s.PID() == pid {
				if time.Now().After(deadline) {
					t.Fatalf("%s not restarted a minute after kill -9; log:\n%s", k.name, logs.String())
				}
				time.Sleep(pollInterval)
			}
			if s.URL() != url {
				t.Errorf("URL after the restart = %s, want %s", s.URL(), url)
			}
			k.check(t, s)
			want := "server restarted\" server=" + k.process + " pid=" + strconv.Itoa(s.PID())
			if !strings.Contains(logs.String(), want) {
				t.Errorf("log lacks %q:\n%s", want, logs.String())
			}
			select {
			case <-s.Failed():
				t.Errorf("Failed closed after a successful restart: %v", s.Err())
			default:
			}
		})
	}
}

// TestRedisGivesUpAfterFastFailures: a server that cannot be restarted
// (here its data folder is gone) is tried a few times, then reported
// through Failed and Err, so that `conveyor up` can exit instead of running
// on without it.
func TestRedisGivesUpAfterFastFailures(t *testing.T) {
	t.Parallel()
	var logs syncBuffer
	dir := t.TempDir()
	r, err := StartRedis(t.Context(), RedisConfig{
		Dir:        dir,
		AppendOnly: off(),
		Logger:     slog.New(slog.NewTextHandler(&logs, nil)),
		restart:    restartPolicy{firstDelay: time.Millisecond, attempts: 3},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := r.Stop(context.Background()); err != nil {
			t.Errorf("Stop: %v", err)
		}
	})
	if err := r.Err(); err != nil {
		t.Errorf("Err of a running server = %v, want nil", err)
	}
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(r.PID(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-r.Failed():
	case <-time.After(time.Minute):
		t.Fatalf("Failed not closed a minute after kill -9 of a server that cannot restart; log:\n%s", logs.String())
	}
	err = r.Err()
	t.Log(err)
	if !errors.Is(err, ErrDown) || !strings.Contains(err.Error(), "redis-server died and 3 restarts in a row failed") {
		t.Errorf("Err() = %v, want ErrDown saying redis could not be restarted in 3 attempts", err)
	}
	if n := strings.Count(logs.String(), "server restart failed"); n != 3 {
		t.Errorf("%d failed restarts logged, want 3:\n%s", n, logs.String())
	}
}
