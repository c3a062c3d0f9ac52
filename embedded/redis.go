package embedded

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
)

// redisLogFile is the file in the data folder that receives the server's
// output unless the caller gives writers.
const redisLogFile = "redis.log"

// RedisConfig configures [StartRedis].
type RedisConfig struct {
	// Dir is the data folder: the append-only file, the log, the port of
	// the last run and the lock that keeps a second server off the folder
	// live there. It is created if missing. Required.
	Dir string

	// Port is the TCP port on 127.0.0.1. Zero reuses the port recorded in
	// Dir by a previous run if it is free, so that URLs stay the same from
	// one run to the next, and otherwise picks a free port.
	Port int

	// AppendOnly turns the append-only file (AOF) on, so that accepted
	// events survive a restart of Redis. Defaults to true. Tests that do not
	// restart Redis turn it off for speed.
	AppendOnly *bool

	// AppendFsync is how often the AOF is flushed to disk: "everysec" (the
	// default) loses at most about a second of writes if the machine
	// crashes, "always" loses nothing but makes every write wait for the
	// disk, and "no" leaves it to the operating system (typically up to 30
	// seconds). A crash of the Redis process alone loses nothing with any of
	// them, because the data has already been handed to the kernel.
	AppendFsync string

	// Binary is the redis-server to run, a path or a name looked up on PATH.
	// Defaults to "redis-server".
	Binary string

	// Logger receives notices such as an unexpected exit of the server.
	// Defaults to a logger that discards everything.
	Logger *slog.Logger

	// Stdout and Stderr receive the server's own output. Each one that is
	// nil defaults to the file redis.log in Dir.
	Stdout, Stderr io.Writer

	// restart says how a server that died is restarted; tests shorten it.
	restart restartPolicy
}

func (c *RedisConfig) setDefaults() {
	if c.AppendOnly == nil {
		on := true
		c.AppendOnly = &on
	}
	if c.AppendFsync == "" {
		c.AppendFsync = "everysec"
	}
	if c.Binary == "" {
		c.Binary = "redis-server"
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Validate reports every problem of the configuration at once.
func (c RedisConfig) Validate() error {
	var errs []error
	if c.Dir == "" {
		errs = append(errs, errors.New("redis: Dir is required"))
	}
	if c.Port < 0 || c.Port > 65535 {
		errs = append(errs, fmt.Errorf("redis: Port %d is not in 0..65535", c.Port))
	}
	switch c.AppendFsync {
	case "", "everysec", "always", "no":
	default:
		errs = append(errs, fmt.Errorf("redis: AppendFsync %q is not one of everysec, always, no", c.AppendFsync))
	}
	return errors.Join(errs...)
}

// Redis is a redis-server started by [StartRedis]. Its methods are safe for
// concurrent use.
type Redis struct {
	cfg    RedisConfig
	binary string
	dir    string
	port   int // fixed once StartRedis returns
	sup    *supervisor
}

// StartRedis starts redis-server in cfg.Dir and returns once it answers
// PING. ctx bounds the start only: the server runs until Stop or Kill, and
// is restarted if it dies meanwhile (see [Redis.Failed]).
//
// The data folder is locked while the server runs: an error wraps
// [ErrInUse] if another server holds it. An error wraps [ErrNotInstalled]
// if redis-server cannot be found, and quotes the server's output if it
// exited while starting.
func StartRedis(ctx context.Context, cfg RedisConfig) (*Redis, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("start redis: %w", err)
	}
	binary, err := findBinary(cfg.Binary, redisInstallHint)
	if err != nil {
		return nil, fmt.Errorf("start redis: %w", err)
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("start redis: %w", err)
	}
	if err := mkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("start redis: create data folder: %w", err)
	}
	r := &Redis{cfg: cfg, binary: binary, dir: dir}
	r.sup = &supervisor{
		name:     "redis-server",
		logger:   cfg.Logger,
		policy:   cfg.restart,
		lockPath: filepath.Join(dir, redisLockFile),
		lockWhat: "redis data folder " + dir,
		start:    r.start,
	}
	r.sup.policy.setDefaults()
	// Locked before the port is chosen: a recorded port taken by a
	// server on this folder must stop this start, not move it.
	lock, err := lockDir(ctx, r.sup.lockPath, r.sup.lockWhat)
	if err != nil {
		return nil, fmt.Errorf("start redis: %w", err)
	}
	p, err := r.startFirst(ctx, lock)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("start redis: %w", err), lock.release())
	}
	r.sup.begin(p, lock)
	cfg.Logger.Info("redis started", "addr", r.Addr(), "pid", p.pid(), "dir", dir)
	return r, nil
}

// redisLockFile is the lock file in the data folder (see dirLock).
const redisLockFile = "conveyor.lock"

// startFirst chooses the port, starts the server and records the port.
func (r *Redis) startFirst(ctx context.Context, lock *dirLock) (*process, error) {
	port, pinned, err := choosePort(r.dir, r.cfg.Port, r.cfg.Logger, "redis")
	if err != nil {
		return nil, err
	}
	var p *process
	for attempt := 1; ; attempt++ {
		r.port = port
		p, err = r.start(ctx, lock)
		if err == nil {
			break
		}
		if pinned || attempt == portAttempts || !errors.Is(err, errPortInUse) {
			return nil, err
		}
		if port, err = freePort(); err != nil {
			return nil, err
		}
	}
	if err := recordPort(r.dir, r.port); err != nil {
		return nil, errors.Join(err, p.kill())
	}
	return p, nil
}

// start runs a server on r.port and waits until it answers PING.
func (r *Redis) start(ctx context.Context, lock *dirLock) (*process, error) {
	appendOnly := "no"
	if *r.cfg.AppendOnly {
		appendOnly = "yes"
	}
	cmd := exec.Command(r.binary,
		"--port", strconv.Itoa(r.port),
		"--bind", "127.0.0.1",
		"--dir", r.dir,
		"--appendonly", appendOnly,
		"--appendfsync", r.cfg.AppendFsync,
		// Streams are the queue: evicting an entry would lose an event.
		"--maxmemory-policy", "noeviction",
		// The AOF is the persistence; RDB snapshots would only add forks.
		"--save", "",
		"--daemonize", "no",
		// Bound to 127.0.0.1 already; protected mode would only reject
		// clients when no password is set, which is the case here.
		"--protected-mode", "no",
	)
	cmd.Dir = r.dir
	out, err := newOutput(filepath.Join(r.dir, redisLogFile), r.cfg.Stdout, r.cfg.Stderr)
	if err != nil {
		return nil, err
	}
	// SIGTERM makes Redis flush the AOF and exit.
	p, err := startProcess("redis-server", cmd, out, syscall.SIGTERM, nil, lock, r.cfg.Logger)
	if err != nil {
		return nil, err
	}
	if err := p.waitReady(ctx, r.port, r.ping); err != nil {
		return nil, err
	}
	return p, nil
}

// ping sends one PING on a fresh connection.
func (r *Redis) ping(ctx context.Context) error {
	c := redis.NewClient(&redis.Options{
		Addr:        r.Addr(),
		DialTimeout: time.Second,
		ReadTimeout: time.Second,
		MaxRetries:  -1,
		PoolSize:    1,
		// Keep the probe to PING: no CLIENT SETINFO or maintenance
		// notification handshake, which Redis 7.0 does not know.
		DisableIdentity:          true,
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled},
	})
	err := c.Ping(ctx).Err()
	return errors.Join(err, c.Close())
}

// URL returns the URL of the server, redis://127.0.0.1:PORT/0.
func (r *Redis) URL() string { return "redis://" + r.Addr() + "/0" }

// Addr returns the address of the server, 127.0.0.1:PORT.
func (r *Redis) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(r.port)) }

// PID returns the process id of the server started last. It keeps its
// value after Stop and Kill, so that a caller can check the process is gone.
func (r *Redis) PID() int { return r.sup.pid() }

// Failed returns a channel that is closed when the server has died and
// could not be restarted; Err then says why. A server that dies without
// Stop or Kill is restarted on the same port and data, with a growing
// delay, and each restart is logged; only when several restarts in a row
// fail, or die soon after starting, does it stay down. A caller that
// cannot work without the server, such as `conveyor up`, should stop when
// the channel is closed. Stop and Kill do not close it; after it is
// closed, a successful Restart replaces it.
func (r *Redis) Failed() <-chan struct{} { return r.sup.failedChan() }

// Err returns why the server is down for good, wrapping [ErrDown], once
// Failed is closed, and nil before.
func (r *Redis) Err() error { return r.sup.failErr() }

// Stop shuts the server down gracefully: SIGTERM, on which Redis flushes
// the AOF, then a wait for it and everything it started to exit. If ctx
// ends first, the server is killed and the error wraps ctx.Err(). Stop
// releases the data folder. Stopping a server that is not running does
// nothing.
func (r *Redis) Stop(ctx context.Context) error {
	if err := r.sup.stop(ctx); err != nil {
		return fmt.Errorf("redis on port %d: %w", r.port, err)
	}
	return nil
}

// Kill sends SIGKILL to the server and everything it started, and waits
// until they are gone, the way a crash would end them, but it is not
// restarted. Writes already handed to the kernel (see
// RedisConfig.AppendFsync) survive. Kill releases the data folder.
func (r *Redis) Kill() error {
	if err := r.sup.kill(); err != nil {
		return fmt.Errorf("redis on port %d: %w", r.port, err)
	}
	return nil
}

// Restart starts the server again on the same port and data folder, after
// Stop or Kill (a running server is stopped first), and returns once it
// answers PING, which it does only after loading the AOF.
func (r *Redis) Restart(ctx context.Context) error {
	p, err := r.sup.restart(ctx)
	if err != nil {
		return fmt.Errorf("restart redis: %w", err)
	}
	r.cfg.Logger.Info("redis restarted", "addr", r.Addr(), "pid", p.pid())
	return nil
}
