package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/embedded"
	"github.com/conveyor/conveyor/store"
)

// env is the Redis and PostgreSQL every row shares.
type env struct {
	redisURL, dbURL string
	// started reports whether the servers are ours (started here) rather
	// than given by REDIS_URL / DATABASE_URL.
	startedRedis, startedPG bool
	redis                   *embedded.Redis
	pg                      *embedded.Postgres
	tmp                     string

	rdb               *redis.Client // admin connection: resets, counters
	pgx               *pgxpool.Pool // admin connection: resets, counts
	st                *store.Store  // the product's store on the migrated database
	log               *slog.Logger  // warnings of the product's components
	out               io.Writer     // server output
	pgFsync, redisAOF string
}

// startEnv starts (or connects to) Redis and PostgreSQL and migrates the
// database with the product's migrations.
func startEnv(ctx context.Context, o options, log *slog.Logger, out io.Writer) (e *env, err error) {
	e = &env{log: log, out: out}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	if e.tmp, err = os.MkdirTemp("", "conveyor-bench-"); err != nil {
		return e, err
	}
	// PostgreSQL runs as an unprivileged user when we are root, and must
	// be able to enter the folder.
	if err = os.Chmod(e.tmp, 0o755); err != nil {
		return e, err
	}
	e.redisURL = os.Getenv("REDIS_URL")
	if e.redisURL == "" {
		off := false
		e.redis, err = embedded.StartRedis(ctx, embedded.RedisConfig{
			Dir: filepath.Join(e.tmp, "redis"), AppendOnly: &off, Logger: log, Stdout: out, Stderr: out,
		})
		if err != nil {
			return e, err
		}
		e.redisURL, e.startedRedis, e.redisAOF = e.redis.URL(), true, "off"
	}
	e.dbURL = os.Getenv("DATABASE_URL")
	if e.dbURL == "" {
		on := true
		e.pg, err = embedded.StartPostgres(ctx, embedded.PostgresConfig{
			Dir: filepath.Join(e.tmp, "pg"), Database: "bench", Fsync: &on, Logger: log,
		})
		if err != nil {
			return e, err
		}
		e.dbURL, e.startedPG, e.pgFsync = e.pg.URL(), true, "on"
	}
	if e.rdb, err = newRedis(e.redisURL, 8); err != nil {
		return e, err
	}
	if e.redisAOF == "" {
		e.redisAOF = configGet(ctx, e.rdb, "appendonly") + ", appendfsync " + configGet(ctx, e.rdb, "appendfsync")
	}
	if e.pgx, err = pgxpool.New(ctx, e.dbURL); err != nil {
		return e, fmt.Errorf("connect to postgres: %w", err)
	}
	if e.pgFsync == "" {
		_ = e.pgx.QueryRow(ctx, "SHOW fsync").Scan(&e.pgFsync)
	}
	if e.st, err = store.Open(store.Config{URL: e.dbURL}); err != nil {
		return e, err
	}
	if _, err = e.st.Migrate(ctx); err != nil {
		return e, fmt.Errorf("migrate: %w", err)
	}
	return e, nil
}

func configGet(ctx context.Context, rdb *redis.Client, key string) string {
	m, err := rdb.ConfigGet(ctx, key).Result()
	if err != nil {
		return "?"
	}
	return m[key]
}

// newRedis returns a client configured like the product's (a pool of at
// least 128 connections).
func newRedis(url string, minPool int) (*redis.Client, error) {
	opt, err := redis.ParseURL(url)
	if err != nil {
		return nil, fmt.Errorf("parse redis url: %w", err)
	}
	opt.PoolSize = max(opt.PoolSize, 128, minPool)
	opt.MinIdleConns = 4
	opt.DialTimeout = 3 * time.Second
	return redis.NewClient(opt), nil
}

// reset gives the next row an empty Redis database and empty tables.
func (e *env) reset(ctx context.Context) error {
	if err := e.rdb.FlushDB(ctx).Err(); err != nil {
		return fmt.Errorf("flush redis: %w", err)
	}
	var river bool
	if err := e.pgx.QueryRow(ctx, "SELECT to_regclass('river_job') IS NOT NULL").Scan(&river); err != nil {
		return err
	}
	tables := "processed_events, emails, documents"
	if river {
		tables += ", river_job"
	}
	if _, err := e.pgx.Exec(ctx, "TRUNCATE "+tables); err != nil {
		return fmt.Errorf("truncate: %w", err)
	}
	_, err := e.pgx.Exec(ctx, "CHECKPOINT")
	return err
}

// versions describes the servers for the report.
func (e *env) versions(ctx context.Context) (redisVersion, pgVersion string) {
	redisVersion = "?"
	if info, err := e.rdb.Info(ctx, "server").Result(); err == nil {
		for _, l := range strings.Split(info, "\n") {
			if v, ok := strings.CutPrefix(strings.TrimSpace(l), "redis_version:"); ok {
				redisVersion = v
			}
		}
	}
	pgVersion = "?"
	_ = e.pgx.QueryRow(ctx, "SHOW server_version").Scan(&pgVersion)
	return redisVersion, pgVersion
}

// close stops what startEnv started, servers last.
func (e *env) close() {
	if e.st != nil {
		_ = e.st.Close()
	}
	if e.pgx != nil {
		e.pgx.Close()
	}
	if e.rdb != nil {
		_ = e.rdb.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var errs []error
	if e.pg != nil {
		errs = append(errs, e.pg.Stop(ctx))
	}
	if e.redis != nil {
		errs = append(errs, e.redis.Stop(ctx))
	}
	if err := errors.Join(errs...); err != nil {
		e.log.Warn("stop servers", "error", err)
	}
	if e.tmp != "" {
		_ = os.RemoveAll(e.tmp)
	}
}
