package embedded

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// ErrDown is returned, wrapped, by Redis.Err and Postgres.Err once the
// server has died and could not be restarted. The wrapping error says what
// the last attempt ran into.
var ErrDown = errors.New("server down")

// restartPolicy says how a server that died without being asked to is
// restarted. The zero value of a field means its default.
type restartPolicy struct {
	// firstDelay is the wait before the first restart. It doubles with each
	// fast failure in a row, up to maxDelay. Defaults to 250ms and 10s.
	firstDelay, maxDelay time.Duration

	// stable is how long a server must run for its death not to count as
	// a fast failure. Defaults to a minute.
	stable time.Duration

	// attempts is how many restarts in a row may fail fast (fail to start,
	// or die within stable) before the supervisor gives up. Defaults to 5,
	// about 8 seconds of delays in all.
	attempts int

	// startTimeout bounds one restart, crash recovery included. Defaults to
	// 5 minutes.
	startTimeout time.Duration
}

func (p *restartPolicy) setDefaults() {
	if p.firstDelay == 0 {
		p.firstDelay = 250 * time.Millisecond
	}
	if p.maxDelay == 0 {
		p.maxDelay = 10 * time.Second
	}
	if p.stable == 0 {
		p.stable = time.Minute
	}
	if p.attempts == 0 {
		p.attempts = 5
	}
	if p.startTimeout == 0 {
		p.startTimeout = 5 * time.Minute
	}
}

// delay returns the wait before restart attempt n (1 for the first).
func (p *restartPolicy) delay(n int) time.Duration {
	d := p.firstDelay
	for i := 1; i < n && d < p.maxDelay; i++ {
		d *= 2
	}
	return min(d, p.maxDelay)
}

// supervisor runs one server process after another on the same port and
// data folder, for Redis and Postgres. It holds the lock on the data
// folder from the first start until Stop or Kill, and restarts the server
// when it dies without being asked to (kill -9, the OOM killer, a crash):
// `conveyor up` would otherwise run on without its Redis or PostgreSQL.
type supervisor struct {
	name   string // "redis-server" or "postgres", for logs and errors
	logger *slog.Logger
	policy restartPolicy

	// lockPath is the lock file of the data folder, which lockWhat names.
	lockPath, lockWhat string

	// start starts a server on the port and data folder of the first start,
	// passing it lock, and returns once it is ready.
	start func(ctx context.Context, lock *dirLock) (*process, error)

	// ops serialises stop, kill and restart, and guards lock, cancel and
	// halted.
	ops    sync.Mutex
	lock   *dirLock           // nil after Stop or Kill
	cancel context.CancelFunc // ends the watch goroutine; nil if none runs
	halted chan struct{}      // closed when the watch goroutine has returned

	// mu guards proc, failed and err. The watch goroutine takes it only
	// to publish a restarted process or its giving up.
	mu     sync.Mutex
	proc   *process
	failed chan struct{}
	err    error
}

// begin makes p, started with lock, the supervised server. The caller
// holds s.ops or owns s alone.
func (s *supervisor) begin(p *process, lock *dirLock) {
	s.lock = lock
	s.mu.Lock()
	s.proc = p
	if s.failed == nil || s.err != nil {
		s.failed, s.err = make(chan struct{}), nil
	}
	s.mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel, s.halted = cancel, make(chan struct{})
	go s.watch(ctx, p, lock, s.halted)
}

// halt ends supervision and waits for the watch goroutine, which ends a
// restart in progress (killing a half-started server). It must come
// before the server is stopped on purpose, or the watch would restart it.
// The caller holds s.ops.
func (s *supervisor) halt() {
	if s.cancel == nil {
		return
	}
	s.cancel()
	<-s.halted
	s.cancel, s.halted = nil, nil
}

// watch waits for p to die and restarts it with backoff, until ctx ends
// or restarts fail fast policy.attempts times in a row.
func (s *supervisor) watch(ctx context.Context, p *process, lock *dirLock, halted chan struct{}) {
	defer close(halted)
	started := time.Now()
	failures := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.done:
		}
		if time.Since(started) >= s.policy.stable {
			failures = 0
		}
		// The reaper has logged the exit. Kill what is left of its group
		// (PostgreSQL backends of a killed postmaster) before the restart.
		cause := fmt.Errorf("%s (pid %d) exited unexpectedly: %s", s.name, p.pid(), exitStatus(p.waitErr))
		if err := p.kill(); err != nil {
			cause = errors.Join(cause, err)
		}
		for {
			failures++
			if failures > s.policy.attempts {
				s.giveUp(fmt.Errorf("%w: %s died and %d restarts in a row failed: %w", ErrDown, s.name, s.policy.attempts, cause))
				return
			}
			delay := s.policy.delay(failures)
			s.logger.Warn("restarting server", "server", s.name, "attempt", failures, "delay", delay)
			select {
			case <-ctx.Done():
				return
			case <-time.After(delay):
			}
			startCtx, cancel := context.WithTimeout(ctx, s.policy.startTimeout)
			np, err := s.start(startCtx, lock)
			cancel()
			if err == nil {
				// Published even if ctx has ended meanwhile, so that the
				// Stop or Kill that ended it stops this one.
				s.mu.Lock()
				s.proc = np
				s.mu.Unlock()
				s.logger.Info("server restarted", "server", s.name, "pid", np.pid(), "attempt", failures)
				p, started = np, time.Now()
				break
			}
			if ctx.Err() != nil {
				return
			}
			s.logger.Warn("server restart failed", "server", s.name, "attempt", failures, "error", err)
			cause = err
		}
	}
}

// giveUp records err and closes failed.
func (s *supervisor) giveUp(err error) {
	s.mu.Lock()
	s.err = err
	close(s.failed)
	s.mu.Unlock()
	// The error itself goes to whoever watches Failed; the attempts have
	// been logged.
	s.logger.Error("server is down and could not be restarted; giving up", "server", s.name, "attempts", s.policy.attempts)
}

// current returns the server started last, nil if none.
func (s *supervisor) current() *process {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.proc
}

// pid returns the pid of the server started last, 0 if none.
func (s *supervisor) pid() int {
	if p := s.current(); p != nil {
		return p.pid()
	}
	return 0
}

// failedChan and failErr implement Failed and Err.
func (s *supervisor) failedChan() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.failed
}

func (s *supervisor) failErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// stop ends supervision, stops the server (see process.stop) and releases
// the lock on the data folder.
func (s *supervisor) stop(ctx context.Context) error {
	s.ops.Lock()
	defer s.ops.Unlock()
	s.halt()
	var err error
	if p := s.current(); p != nil {
		err = p.stop(ctx)
	}
	// Even if the stop failed: a process of the server that is left holds
	// its own descriptor of the lock, which keeps the folder locked.
	return errors.Join(err, s.unlock())
}

// kill ends supervision, kills the server (see process.kill) and releases
// the lock on the data folder.
func (s *supervisor) kill() error {
	s.ops.Lock()
	defer s.ops.Unlock()
	s.halt()
	var err error
	if p := s.current(); p != nil {
		err = p.kill()
	}
	return errors.Join(err, s.unlock())
}

func (s *supervisor) unlock() error {
	err := s.lock.release()
	s.lock = nil
	return err
}

// restart stops the server if it runs, takes the lock on the data folder
// again if Stop or Kill released it, starts a new server and supervises
// it. If the start fails, the lock stays taken until Stop or Kill.
func (s *supervisor) restart(ctx context.Context) (*process, error) {
	s.ops.Lock()
	defer s.ops.Unlock()
	s.halt()
	if p := s.current(); p != nil {
		if err := p.stop(ctx); err != nil {
			return nil, err
		}
	}
	lock := s.lock
	if lock == nil {
		var err error
		if lock, err = lockDir(ctx, s.lockPath, s.lockWhat); err != nil {
			return nil, err
		}
		s.lock = lock
	}
	p, err := s.start(ctx, lock)
	if err != nil {
		return nil, err
	}
	s.begin(p, lock)
	return p, nil
}
