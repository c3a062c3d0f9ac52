package scheduler

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/idem"
)

// Job is the work of a built-in schedule at one tick. It must be
// idempotent: a tick's job runs once, but a failed job is only retried by
// the next tick. It runs on its schedule's own goroutine, so it delays
// no other schedule, and under its schedule's run lock, so that two runs
// never overlap, in one replica or across replicas.
type Job func(ctx context.Context, tick time.Time) error

// Builtin is a built-in maintenance schedule.
type Builtin struct {
	Name string
	Cron string
	Job  Job
}

// Config configures a Scheduler.
type Config struct {
	// Redis is the main Redis. Required; never closed here.
	Redis redis.UniversalClient
	// Publisher publishes ticks. Required.
	Publisher *bus.Publisher
	// File holds the user's schedules and built-in overrides.
	File File
	// Builtins are the built-in schedules; File.Builtin may turn them off
	// or change their cron.
	Builtins []Builtin
	// Streams whose delay sets are moved into them when due. Defaults to
	// none.
	Streams []string
	// DelayPoll bounds how late a delayed event may be moved. Defaults to
	// 100ms.
	DelayPoll time.Duration
	// Identity names this replica in the recorded state. Defaults to the
	// host name and pid.
	Identity string
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Registerer, if set, receives metrics.
	Registerer prometheus.Registerer
}

// Scheduler fires schedules and moves delayed events.
type Scheduler struct {
	cfg       Config
	schedules []*Schedule
	log       *slog.Logger
	fired     *prometheus.CounterVec
	moved     prometheus.Counter
	// clock is the time of the fire loop; tests replace it.
	clock clock
	// token marks the tick claims and run locks this Scheduler holds:
	// its identity, which several schedulers may share, and a random part.
	token string
	// lease is how long a built-in job's run lock lives unless renewed.
	lease time.Duration
	// locks holds the run locks of built-in jobs, by schedule name.
	locks *idem.Store
}

// New validates every schedule (reporting every problem, each naming its
// schedule) and returns a Scheduler.
func New(cfg Config) (*Scheduler, error) {
	if cfg.DelayPoll == 0 {
		cfg.DelayPoll = 100 * time.Millisecond
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Identity == "" {
		host, _ := os.Hostname()
		cfg.Identity = fmt.Sprintf("%s/%d", host, os.Getpid())
	}
	var errs []error
	if cfg.Redis == nil {
		errs = append(errs, errors.New("scheduler: Redis is required"))
	}
	if cfg.Publisher == nil {
		errs = append(errs, errors.New("scheduler: Publisher is required"))
	}
	active, err := cfg.File.schedules(cfg.Builtins, cfg.Logger)
	if err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	sc := &Scheduler{
		cfg:       cfg,
		schedules: active,
		log:       cfg.Logger.With("component", "scheduler"),
		fired: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "conveyor_schedule_ticks_total",
			Help: "Schedule ticks handled by this replica, by schedule and result (fired, already_fired, error: a failed attempt or job, lost: a tick given up after failed attempts, skipped: a tick not fired because it came too late for its missed policy or its marker, or its built-in job was still running).",
		}, []string{"schedule", "result"}),
		moved: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "conveyor_delayed_events_moved_total",
			Help: "Delayed events this replica moved into their streams.",
		}),
		clock: realClock{},
		token: cfg.Identity + "#" + rand.Text(),
		lease: jobLease,
	}
	if sc.locks, err = idem.New(idem.Config{Redis: cfg.Redis, Prefix: lockPrefix}); err != nil {
		return nil, err
	}
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(sc.fired, sc.moved)
	}
	return sc, nil
}

// schedules validates the file's schedules and its overrides of builtins,
// reporting every problem (each naming its schedule), and returns the
// schedules to run: builtins (as overridden) and the file's.
func (f File) schedules(builtins []Builtin, log *slog.Logger) ([]*Schedule, error) {
	var errs []error
	var all []*Schedule
	names := map[string]bool{}
	known := map[string]bool{}
	for _, b := range builtins {
		known[b.Name] = true
		s := &Schedule{Name: b.Name, Cron: b.Cron, Missed: MissedSkip, job: b.Job}
		if o, ok := f.Builtin[b.Name]; ok {
			s.Enabled = o.Enabled
			if o.Cron != "" {
				s.Cron = o.Cron
			}
		}
		all = append(all, s)
	}
	for name := range f.Builtin {
		switch {
		case known[name]:
		case name == BuiltinStuckDocuments, name == BuiltinBlobRetention, name == BuiltinInboxRetention:
			// A built-in this replica does not run (it has no database):
			// the same file serves the replicas that do.
			log.Warn("the schedules file configures a built-in schedule this scheduler does not run", "builtin", name)
		default:
			errs = append(errs, fmt.Errorf("builtin schedule %q does not exist", name))
		}
	}
	for i := range f.Schedules {
		s := f.Schedules[i]
		all = append(all, &s)
	}
	var active []*Schedule
	for _, s := range all {
		if err := s.prepare(); err != nil {
			errs = append(errs, err)
			continue
		}
		if names[s.Name] {
			errs = append(errs, fmt.Errorf("schedule %q: defined twice", s.Name))
			continue
		}
		names[s.Name] = true
		active = append(active, s)
	}
	return active, errors.Join(errs...)
}

// Validate checks a schedules file as New would, without Redis: a
// command can refuse a bad file before it waits for its servers.
func (f File) Validate() error {
	var builtins []Builtin
	for _, name := range []string{BuiltinStuckDocuments, BuiltinBlobRetention, BuiltinInboxRetention} {
		builtins = append(builtins, Builtin{Name: name, Cron: "@every 1m", Job: func(context.Context, time.Time) error { return nil }})
	}
	_, err := f.schedules(builtins, slog.New(slog.DiscardHandler))
	return err
}

func stateKey(name string) string { return "conveyor:schedule:" + name }
func jobKey(key string) string    { return "conveyor:schedule-job:" + key }
func lockKey(name string) string  { return lockPrefix + name }

// lockPrefix names the run locks of built-in jobs (idem locks).
const lockPrefix = "conveyor:schedule-lock:"

// Tick markers live between minMarkerTTL and maxMarkerTTL.
const (
	minMarkerTTL = 10 * time.Minute
	maxMarkerTTL = 2 * 366 * 24 * time.Hour
)

// markerTTL keeps a tick's marker twice as long as any replica may fire
// the tick (maxAge), and not much longer: the margin covers replicas whose
// clocks run somewhat behind Redis's or each other's.
func (s *Schedule) markerTTL(tick time.Time) time.Duration {
	a := s.next(tick)
	period := s.next(a).Sub(a)
	n := time.Duration(2 * (s.CatchUpLimit + 2))
	ttl := maxMarkerTTL
	if period < maxMarkerTTL/n {
		ttl = period * n
	}
	return min(max(ttl, minMarkerTTL), maxMarkerTTL)
}

// maxAge is how late a tick may be fired: half its marker's life, so that
// a replica that fires it finds the marker of any replica that fired it
// before; past that, firing it could publish it twice. It covers
// CatchUpLimit+2 periods, so catch-up is not cut short.
func (s *Schedule) maxAge(tick time.Time) time.Duration { return s.markerTTL(tick) / 2 }

// keep is how many due ticks the missed policy fires: the latest, or the
// CatchUpLimit most recent.
func (s *Schedule) keep() int {
	if s.Missed == MissedCatchUp {
		return s.CatchUpLimit
	}
	return 1
}

// jobTimeout bounds one run of a built-in job.
const jobTimeout = 10 * time.Minute

// jobLease is how long a built-in job's run lock lives unless renewed. It
// is renewed every third of that while the job runs, so a replica that
// dies mid-run holds its job off for at most a minute.
const jobLease = time.Minute

// errLockLost ends a built-in job whose run lock could not be renewed.
var errLockLost = errors.New("run lock lost: another replica may run the job now")

// A tick that failed is retried after retryMin, doubling up to retryMax:
// soon enough that a brief Redis outage delays ticks by about its length,
// rarely enough that a long one costs little.
const (
	retryMin = 250 * time.Millisecond
	retryMax = 5 * time.Second
)

// maxSleep bounds each wait for the next tick. A wait counts elapsed time,
// which a suspended machine or a wall clock stepped forward do not advance:
// waking at least every minute to read the clock again bounds how late
// such a change makes a tick.
const maxSleep = time.Minute

// recordTimeout bounds writing a schedule's state, which is done even
// while shutting down so that a fired tick is not caught up again.
const recordTimeout = 5 * time.Second

// clock is the time of the fire loop. Tests replace it to stall the
// process or step its clock without waiting.
type clock interface {
	Now() time.Time
	// Sleep waits for d to elapse and reports whether ctx is still alive.
	// Like a timer, it counts elapsed time, not the wall clock.
	Sleep(ctx context.Context, d time.Duration) bool
}

type realClock struct{}

func (realClock) Now() time.Time                                  { return time.Now() }
func (realClock) Sleep(ctx context.Context, d time.Duration) bool { return sleep(ctx, d) }

// Run fires schedules and moves delayed events until ctx ends. It returns
// once every running built-in job has returned.
func (sc *Scheduler) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	wg.Go(func() { sc.moveDelayed(ctx) })
	// Catch-up fires the missed ticks up to start and each schedule's loop
	// the ticks after it; one start time for both leaves no tick between.
	start := sc.clock.Now()
	for _, s := range sc.schedules {
		if s.enabled() {
			wg.Go(func() { sc.runSchedule(ctx, s, start) })
		}
	}
	wg.Wait()
	<-ctx.Done()
	return nil
}

// runSchedule fires the ticks of one schedule after start, and its missed
// ticks up to start, until ctx ends. Each schedule has a goroutine of its
// own, so a long built-in job or a tick being retried delays only the
// later ticks of its own schedule.
//
// Ticks are fired oldest first. A tick whose firing fails stays first and
// is retried with a growing delay, so ticks that fall during a brief Redis
// outage are fired after it. Whenever more ticks are due than the missed
// policy fires, the oldest are given up: all but the latest (skip), or all
// but the CatchUpLimit most recent (catch_up). That holds for a tick being
// retried as for a backlog of ticks that came due while the process was
// paused or its clock stepped forward, which is not published at once. And
// a tick older than maxAge is never fired, since another replica's marker
// for it may be gone and firing it could publish it twice.
func (sc *Scheduler) runSchedule(ctx context.Context, s *Schedule, start time.Time) {
	pending := sc.missed(ctx, s, start)
	next := s.next(start)
	var (
		lastErr  error // why pending[0] failed; nil while it has not
		attempts int   // failed attempts at pending[0]
		backoff  time.Duration
		skipped  skippedTicks // given up before any attempt
	)
	// shed gives up, oldest first, the ticks that must not be fired at now.
	shed := func(now time.Time) {
		for len(pending) > 0 {
			why := s.giveUpReason(pending, now)
			if why == "" {
				return
			}
			if attempts > 0 {
				sc.giveUp(ctx, s, pending[0], why, attempts, lastErr)
				lastErr, attempts = nil, 0
			} else {
				skipped.add(pending[0])
			}
			pending = pending[1:]
		}
	}
	for {
		now := sc.clock.Now()
		for !next.IsZero() && !next.After(now) {
			pending = append(pending, next)
			next = s.next(next)
			if len(pending) > s.keep()+1 {
				shed(now) // a long backlog is never held whole
			}
		}
		shed(now)
		if skipped.n > 0 {
			sc.reportSkipped(ctx, s, skipped)
			skipped = skippedTicks{}
		}
		var wait time.Duration
		switch {
		case len(pending) > 0:
			tick := pending[0]
			ran, err := sc.fire(ctx, s, tick)
			if ctx.Err() != nil {
				return
			}
			if err == nil {
				pending = pending[1:]
				lastErr, attempts, backoff = nil, 0, 0
				if ran {
					pending, next = sc.skipWhileRan(s, pending, next)
				}
				continue
			}
			if sc.handledElsewhere(ctx, s, tick) {
				// Another replica fired it (or this one, whose reply was
				// lost): nothing is lost and there is nothing to retry.
				sc.fired.WithLabelValues(s.Name, "already_fired").Inc()
				sc.log.Debug("schedule tick failed here, but it was fired", "schedule", s.Name, "tick", tick, "error", err)
				pending = pending[1:]
				lastErr, attempts, backoff = nil, 0, 0
				continue
			}
			lastErr = err
			attempts++
			sc.fired.WithLabelValues(s.Name, "error").Inc()
			if attempts == 1 {
				sc.log.Warn("schedule tick failed; retrying", "schedule", s.Name, "tick", tick, "error", err)
				sc.recordFailure(ctx, s, tick, err)
			} else {
				sc.log.Debug("schedule tick failed again", "schedule", s.Name, "tick", tick,
					"attempts", attempts, "error", err)
			}
			backoff = min(max(2*backoff, retryMin), retryMax)
			wait = backoff
			if !next.IsZero() {
				wait = min(wait, next.Sub(sc.clock.Now()))
			}
		case next.IsZero():
			// Only a cron expression whose next match is more than five
			// years away gets here (29 February after 2096): prepare
			// refuses one that never matches.
			sc.log.Error("schedule has no tick within five years; it stops firing", "schedule", s.Name, "cron", s.Cron)
			return
		default:
			wait = next.Sub(now)
		}
		if !sc.clock.Sleep(ctx, min(wait, maxSleep)) {
			return
		}
	}
}

// giveUpReason says why pending[0] must not be fired at now, or returns ""
// if it may be.
func (s *Schedule) giveUpReason(pending []time.Time, now time.Time) string {
	switch head := pending[0]; {
	case now.Sub(head) > s.maxAge(head):
		return "its marker may have expired"
	case s.Missed == MissedCatchUp && len(pending) > s.CatchUpLimit:
		return "more ticks wait than catch_up_limit"
	case s.Missed == MissedSkip && len(pending) > 1:
		return "the next tick is due"
	}
	return ""
}

// giveUp drops a tick whose attempts failed. It is lost unless another
// replica fired it meanwhile.
func (sc *Scheduler) giveUp(ctx context.Context, s *Schedule, tick time.Time, why string, attempts int, lastErr error) {
	if sc.handledElsewhere(ctx, s, tick) {
		sc.fired.WithLabelValues(s.Name, "already_fired").Inc()
		sc.log.Debug("schedule tick given up here, but it was fired", "schedule", s.Name, "tick", tick,
			"attempts", attempts, "error", lastErr)
		return
	}
	sc.fired.WithLabelValues(s.Name, "lost").Inc()
	sc.log.Error("schedule tick given up: "+why, "schedule", s.Name, "tick", tick,
		"attempts", attempts, "error", lastErr)
	sc.recordFailure(ctx, s, tick, fmt.Errorf("given up (%s) after %d attempts: %v", why, attempts, lastErr))
}

// skippedTicks counts ticks given up before any attempt.
type skippedTicks struct {
	n           int
	first, last time.Time
}

func (k *skippedTicks) add(tick time.Time) {
	if k.n == 0 {
		k.first = tick
	}
	k.n++
	k.last = tick
}

// reportSkipped logs ticks the missed policy gave up: ticks that came due
// while this replica was paused, or whose clock stepped forward, or
// missed ticks too old to catch up. If another replica recorded a later
// tick meanwhile, it kept the schedule going and nothing was missed.
func (sc *Scheduler) reportSkipped(ctx context.Context, s *Schedule, k skippedTicks) {
	sc.fired.WithLabelValues(s.Name, "skipped").Add(float64(k.n))
	args := []any{"schedule", s.Name, "missed", s.Missed, "skipped", k.n, "first", k.first, "last", k.last}
	rctx, cancel := context.WithTimeout(ctx, recordTimeout)
	defer cancel()
	if last, err := sc.lastTick(rctx, s); err == nil && !last.Before(k.last) {
		sc.log.Info("schedule ticks came due while this replica could not fire them; another replica did", args...)
		return
	}
	sc.log.Warn("schedule ticks came late (process paused, clock stepped); skipped as the missed policy says", args...)
}

// skipWhileRan skips the ticks that came due while this replica ran the
// schedule's job: they found the job running, and, as on the other
// replicas, which find its run lock taken, are skipped rather than run
// one after another once it ends.
func (sc *Scheduler) skipWhileRan(s *Schedule, pending []time.Time, next time.Time) ([]time.Time, time.Time) {
	end := sc.clock.Now()
	n := 0
	for len(pending) > 0 && !pending[0].After(end) {
		pending = pending[1:]
		n++
	}
	for !next.IsZero() && !next.After(end) {
		next = s.next(next)
		n++
	}
	if n > 0 {
		sc.fired.WithLabelValues(s.Name, "skipped").Add(float64(n))
		sc.log.Debug("built-in job ran past its next ticks; skipped them", "schedule", s.Name, "skipped", n)
	}
	return pending, next
}

// permanentReply reports whether err is Redis answering with an error that
// asking again does not change (WRONGTYPE, NOPERM), as opposed to a lost
// connection or a Redis that is loading, failing over or busy.
func permanentReply(err error) bool {
	var reply redis.Error
	if !errors.As(err, &reply) {
		return false
	}
	for _, transient := range []string{"LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY", "CLUSTERDOWN"} {
		if strings.HasPrefix(reply.Error(), transient) {
			return false
		}
	}
	return true
}

// sleep waits for d and reports whether ctx is still alive.
func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// lastTick reads the last tick recorded for s; redis.Nil if there is none.
func (sc *Scheduler) lastTick(ctx context.Context, s *Schedule) (time.Time, error) {
	raw, err := sc.cfg.Redis.HGet(ctx, stateKey(s.Name), "last_tick").Result()
	if err != nil {
		return time.Time{}, err
	}
	return time.Parse(time.RFC3339Nano, raw)
}

// missed returns, for a catch_up schedule, the ticks since the last
// recorded one up to start (at most CatchUpLimit, the most recent), and
// reports skipped ticks of a skip schedule.
func (sc *Scheduler) missed(ctx context.Context, s *Schedule, start time.Time) []time.Time {
	// Redis unavailable at start (a whole system restarting): the last
	// tick is read again until it answers, so that a catch_up schedule
	// still catches up; nothing can be fired before anyway.
	var last time.Time
	for backoff := time.Duration(0); ; {
		var err error
		last, err = sc.lastTick(ctx, s)
		if errors.Is(err, redis.Nil) {
			return nil // never fired: nothing to catch up
		}
		if err == nil {
			break
		}
		var parse *time.ParseError
		if errors.As(err, &parse) {
			return nil
		}
		if permanentReply(err) {
			// Redis answered, with an error (a key of another type, no
			// permission): asking again changes nothing.
			sc.log.Error("read the last tick of a schedule; not catching up", "schedule", s.Name, "error", err)
			return nil
		}
		if backoff == 0 {
			sc.log.Warn("read the last tick of a schedule; retrying", "schedule", s.Name, "error", err)
		}
		backoff = min(max(2*backoff, retryMin), retryMax)
		if !sc.clock.Sleep(ctx, backoff) {
			return nil
		}
	}
	var missed []time.Time
	for t := s.next(last); !t.IsZero() && !t.After(start); t = s.next(t) {
		if ctx.Err() != nil {
			return nil
		}
		missed = append(missed, t)
		if len(missed) > 10_000 {
			missed = missed[1:]
		}
	}
	if len(missed) == 0 {
		return nil
	}
	if s.Missed == MissedSkip {
		sc.log.Info("skipping missed ticks", "schedule", s.Name, "missed", len(missed), "since", last)
		return nil
	}
	if len(missed) > s.CatchUpLimit {
		sc.log.Warn("too many missed ticks; catching up the most recent only", "schedule", s.Name,
			"missed", len(missed), "catch_up_limit", s.CatchUpLimit)
		missed = missed[len(missed)-s.CatchUpLimit:]
	}
	return missed
}

// fire handles one tick: publish it, or run its built-in job, unless
// another replica already did. It reports whether it ran the job, and
// returns an error only if the tick must be tried again because the claim
// or the publish failed. A job that fails after its claim is not retried,
// as the claim is taken (its next tick runs it again), nor is a tick whose
// data makes no valid event; those failures are recorded here and not
// returned.
func (sc *Scheduler) fire(ctx context.Context, s *Schedule, tick time.Time) (ran bool, err error) {
	if s.job != nil {
		return sc.runJob(ctx, s, tick)
	}
	key := s.tickKey(tick)
	ev, err := s.event(tick)
	if err != nil {
		// The schedule's data makes no valid event at this tick: trying
		// again would make the same one.
		sc.fired.WithLabelValues(s.Name, "error").Inc()
		sc.log.Error("schedule tick makes no valid event", "schedule", s.Name, "tick", tick, "error", err)
		sc.recordFailure(ctx, s, tick, err)
		return false, nil
	}
	won, _, err := sc.cfg.Publisher.PublishOnce(ctx, key, s.markerTTL(tick), ev,
		bus.WithID(s.tickID(tick)), bus.WithOccurredAt(tick))
	if err != nil {
		return false, err
	}
	if !won {
		sc.fired.WithLabelValues(s.Name, "already_fired").Inc()
		return false, nil
	}
	sc.fired.WithLabelValues(s.Name, "fired").Inc()
	sc.log.Debug("schedule fired", "schedule", s.Name, "tick", tick)
	sc.record(ctx, s, tick, "published")
	return false, nil
}

// handledElsewhere reports whether the tick's marker shows that it was
// fired: published, or its job claimed by another Scheduler. An unknown
// answer (Redis unavailable) is no.
func (sc *Scheduler) handledElsewhere(ctx context.Context, s *Schedule, tick time.Time) bool {
	ctx, cancel := context.WithTimeout(ctx, recordTimeout)
	defer cancel()
	if s.job != nil {
		owner, err := sc.cfg.Redis.Get(ctx, jobKey(s.tickKey(tick))).Result()
		return err == nil && owner != sc.token
	}
	// A marker means the event is in its stream (PublishOnce).
	n, err := sc.cfg.Redis.Exists(ctx, bus.OnceKey(sc.cfg.Publisher.Stream(s.Event), s.tickKey(tick))).Result()
	return err == nil && n > 0
}

// runJob claims a built-in job's tick and runs the job, holding the
// schedule's run lock. The claim makes each tick run once; the lock keeps
// runs from overlapping: a tick whose job still runs (a slow run of an
// earlier tick, here or in another replica) is skipped, not queued. It
// reports whether the job ran.
func (sc *Scheduler) runJob(ctx context.Context, s *Schedule, tick time.Time) (bool, error) {
	key := jobKey(s.tickKey(tick))
	won, err := sc.cfg.Redis.SetNX(ctx, key, sc.token, s.markerTTL(tick)).Result()
	if err != nil {
		return false, fmt.Errorf("claim tick %s: %w", key, err)
	}
	if !won {
		// Unless an earlier attempt of this Scheduler claimed it and then
		// failed to take the lock.
		owner, err := sc.cfg.Redis.Get(ctx, key).Result()
		if err != nil && !errors.Is(err, redis.Nil) {
			return false, fmt.Errorf("claim tick %s: %w", key, err)
		}
		if owner != sc.token {
			sc.fired.WithLabelValues(s.Name, "already_fired").Inc()
			return false, nil
		}
	}
	locked, err := sc.locks.LockAs(ctx, s.Name, sc.token, sc.lease)
	if err != nil {
		return false, fmt.Errorf("lock job %s: %w", s.Name, err)
	}
	if !locked {
		sc.fired.WithLabelValues(s.Name, "skipped").Inc()
		sc.log.Info("built-in job still running; skipping its tick", "schedule", s.Name, "tick", tick)
		return false, nil
	}
	err = sc.runLocked(ctx, s, tick)
	if err != nil {
		sc.fired.WithLabelValues(s.Name, "error").Inc()
		sc.log.Error("built-in job failed", "schedule", s.Name, "tick", tick, "error", err)
		sc.recordFailure(ctx, s, tick, err)
		return true, nil
	}
	sc.fired.WithLabelValues(s.Name, "fired").Inc()
	sc.record(ctx, s, tick, "ok")
	return true, nil
}

// runLocked runs the job of s, whose run lock this Scheduler holds,
// renewing the lock while it runs and releasing it after. A run whose lock
// cannot be renewed in time is cancelled, as another replica may start
// one.
func (sc *Scheduler) runLocked(ctx context.Context, s *Schedule, tick time.Time) error {
	jctx, lost := context.WithCancelCause(ctx)
	defer lost(nil)
	jctx, cancel := context.WithTimeout(jctx, jobTimeout)
	defer cancel()
	stopRenewing := sc.keepLock(jctx, s, lost)
	err := s.job(jctx, tick)
	if cause := context.Cause(jctx); errors.Is(cause, errLockLost) {
		err = errors.Join(err, cause)
	}
	stopRenewing()
	// Released even while shutting down, so that another replica need not
	// wait for the lease to run out.
	uctx, ucancel := context.WithTimeout(context.WithoutCancel(ctx), recordTimeout)
	defer ucancel()
	if uerr := sc.locks.Unlock(uctx, s.Name, sc.token); uerr != nil {
		sc.log.Warn("release the run lock of a built-in job; it expires by itself", "schedule", s.Name,
			"lease", sc.lease, "error", uerr)
	}
	return err
}

// keepLock renews the run lock of s every third of its lease until the
// returned stop is called. It cancels the run (lost) when the lock is
// another's, or when it could not be renewed for so long that it may
// expire before the next renewal. The lease runs in Redis's time, so this
// counts real time.
func (sc *Scheduler) keepLock(ctx context.Context, s *Schedule, lost context.CancelCauseFunc) (stop func()) {
	every := sc.lease / 3
	renewed := time.Now() // only the renewing goroutine reads and writes it
	return idem.Renew(ctx, every, func(ctx context.Context) error {
		err := sc.locks.Extend(ctx, s.Name, sc.token, sc.lease)
		if err == nil {
			renewed = time.Now()
		}
		return err
	}, func(err error) {
		switch {
		case errors.Is(err, idem.ErrClaimLost):
			sc.log.Warn("built-in job lost its run lock; cancelling it", "schedule", s.Name)
			lost(errLockLost)
		case time.Since(renewed)+every >= sc.lease:
			sc.log.Warn("renew the run lock of a built-in job; cancelling it", "schedule", s.Name, "error", err)
			lost(fmt.Errorf("%w: %w", errLockLost, err))
		default:
			sc.log.Debug("renew the run lock of a built-in job; retrying", "schedule", s.Name, "error", err)
		}
	})
}

// recordScript records a fired tick in a schedule's state (KEYS[1]):
// last_tick = ARGV[1] and the field-value pairs after it, unless the state
// already records this tick or a later one. A replica that fires an older
// tick after another fired a newer one (it was slow, or its clock is
// behind) must not move last_tick back: catch-up would fire the ticks
// between again. Ticks are RFC 3339 in UTC, compared by their fields.
var recordScript = redis.NewScript(`
local function order(t)
  local y, mo, d, h, mi, s, frac = string.match(t, '^(%d%d%d%d)-(%d%d)-(%d%d)T(%d%d):(%d%d):(%d%d)%.?(%d*)Z$')
  if not y then
    return nil
  end
  return tonumber(y .. mo .. d .. h .. mi .. s), tonumber(string.sub(frac .. '000000000', 1, 9))
end
local cur = redis.call('HGET', KEYS[1], 'last_tick')
if cur then
  local cs, cf = order(cur)
  local ns, nf = order(ARGV[1])
  if cs and ns and (cs > ns or (cs == ns and cf >= nf)) then
    return 0
  end
end
redis.call('HSET', KEYS[1], 'last_tick', unpack(ARGV))
return 1`)

// record notes a tick fired by this replica. last_tick is where catch-up
// starts, so only a tick that was handled may set it, and only forward.
func (sc *Scheduler) record(ctx context.Context, s *Schedule, tick time.Time, outcome string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), recordTimeout)
	defer cancel()
	err := recordScript.Run(ctx, sc.cfg.Redis, []string{stateKey(s.Name)},
		tick.UTC().Format(time.RFC3339Nano),
		"last_fired_at", sc.clock.Now().UTC().Format(time.RFC3339Nano),
		"outcome", outcome,
		"fired_by", sc.cfg.Identity,
	).Err()
	if err != nil {
		sc.log.Warn("record schedule state", "schedule", s.Name, "error", err)
	}
}

// recordFailure notes a failed tick for operators, leaving last_tick, so
// that catch-up after a restart still covers the tick.
func (sc *Scheduler) recordFailure(ctx context.Context, s *Schedule, tick time.Time, err error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), recordTimeout)
	defer cancel()
	err = sc.cfg.Redis.HSet(ctx, stateKey(s.Name),
		"outcome", fmt.Sprintf("error at tick %s: %v", tick.UTC().Format(time.RFC3339Nano), err),
		"fired_by", sc.cfg.Identity,
	).Err()
	if err != nil {
		sc.log.Warn("record schedule state", "schedule", s.Name, "error", err)
	}
}

// moveDelayed moves due delayed events into their streams, polling at
// least every DelayPoll.
func (sc *Scheduler) moveDelayed(ctx context.Context) {
	if len(sc.cfg.Streams) == 0 {
		return
	}
	// A stream whose move fails (Redis unavailable) is tried again after a
	// delay that doubles up to retryMax, and its failure is logged once
	// until it moves again, rather than every poll; the other streams keep
	// their pace.
	type failure struct {
		backoff  time.Duration
		retryAt  time.Time
		loggedAt time.Time
	}
	failing := map[string]*failure{}
	for {
		wait := sc.cfg.DelayPoll
		for _, stream := range sc.cfg.Streams {
			f := failing[stream]
			if f != nil && time.Now().Before(f.retryAt) {
				wait = min(wait, time.Until(f.retryAt))
				continue
			}
			m, err := bus.MoveDue(ctx, sc.cfg.Redis, stream, 1000)
			if m.SetAside > 0 {
				sc.log.Error("delayed members that are not events were set aside", "stream", stream,
					"count", m.SetAside, "list", bus.UnreadableKey(bus.DelayedSet(stream)))
			}
			if err != nil {
				if f == nil {
					f = &failure{}
					failing[stream] = f
				}
				// Once, then every few minutes while it lasts.
				if ctx.Err() == nil && time.Since(f.loggedAt) >= 5*time.Minute {
					f.loggedAt = time.Now()
					sc.log.Warn("move delayed events; retrying", "stream", stream, "error", err)
				}
				f.backoff = min(max(2*f.backoff, sc.cfg.DelayPoll), retryMax)
				f.retryAt = time.Now().Add(f.backoff)
				continue
			}
			if f != nil {
				delete(failing, stream)
				sc.log.Info("moving delayed events again", "stream", stream)
			}
			if m.N > 0 {
				sc.moved.Add(float64(m.N))
			}
			if m.N+m.SetAside == 1000 {
				wait = 0
			}
			if !m.Next.IsZero() {
				wait = min(wait, max(time.Until(m.Next), 0))
			}
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// Info describes a schedule for operators.
type Info struct {
	Name        string    `json:"name"`
	Cron        string    `json:"cron"`
	Timezone    string    `json:"timezone"`
	What        string    `json:"what"`
	Missed      string    `json:"missed"`
	Enabled     bool      `json:"enabled"`
	Next        time.Time `json:"next,omitzero"`
	LastTick    time.Time `json:"last_tick,omitzero"`
	LastFiredAt time.Time `json:"last_fired_at,omitzero"`
	Outcome     string    `json:"outcome,omitempty"`
	FiredBy     string    `json:"fired_by,omitempty"`
}

// List returns every schedule with its next fire time and its last firing.
func (sc *Scheduler) List(ctx context.Context) ([]Info, error) {
	now := sc.clock.Now()
	var out []Info
	for _, s := range sc.schedules {
		in := Info{Name: s.Name, Cron: s.Cron, Timezone: s.loc.String(), Missed: s.Missed, Enabled: s.enabled()}
		if s.job != nil {
			in.What = "built-in job"
		} else {
			in.What = "publishes " + s.Event
		}
		if in.Enabled {
			in.Next = s.next(now)
		}
		st, err := sc.cfg.Redis.HGetAll(ctx, stateKey(s.Name)).Result()
		if err != nil {
			return nil, fmt.Errorf("state of schedule %s: %w", s.Name, err)
		}
		in.LastTick, _ = time.Parse(time.RFC3339Nano, st["last_tick"])
		in.LastFiredAt, _ = time.Parse(time.RFC3339Nano, st["last_fired_at"])
		in.Outcome, in.FiredBy = st["outcome"], st["fired_by"]
		out = append(out, in)
	}
	sort.Slice(out, func(i, j int) bool { return strings.Compare(out[i].Name, out[j].Name) < 0 })
	return out, nil
}
