package scheduler

import (
	"context"
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
)

// Job is the work of a built-in schedule at one tick. It must be
// idempotent: a tick's job runs once, but a failed job is only retried by
// the next tick. It runs on its schedule's own goroutine, so it delays
// no other schedule.
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
	var all []*Schedule
	names := map[string]bool{}
	known := map[string]bool{}
	for _, b := range cfg.Builtins {
		known[b.Name] = true
		s := &Schedule{Name: b.Name, Cron: b.Cron, Missed: MissedSkip, job: b.Job}
		if o, ok := cfg.File.Builtin[b.Name]; ok {
			s.Enabled = o.Enabled
			if o.Cron != "" {
				s.Cron = o.Cron
			}
		}
		all = append(all, s)
	}
	for name := range cfg.File.Builtin {
		switch {
		case known[name]:
		case name == BuiltinStuckDocuments, name == BuiltinBlobRetention, name == BuiltinInboxRetention:
			// A built-in this replica does not run (it has no database):
			// the same file serves the replicas that do.
			cfg.Logger.Warn("the schedules file configures a built-in schedule this scheduler does not run", "builtin", name)
		default:
			errs = append(errs, fmt.Errorf("builtin schedule %q does not exist", name))
		}
	}
	for i := range cfg.File.Schedules {
		s := cfg.File.Schedules[i]
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
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	sc := &Scheduler{
		cfg:       cfg,
		schedules: active,
		log:       cfg.Logger.With("component", "scheduler"),
		fired: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "conveyor_schedule_ticks_total",
			Help: "Schedule ticks handled by this replica, by schedule and result (fired, already_fired, error: a failed attempt or job, lost: a tick given up after failed attempts).",
		}, []string{"schedule", "result"}),
		moved: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "conveyor_delayed_events_moved_total",
			Help: "Delayed events this replica moved into their streams.",
		}),
	}
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(sc.fired, sc.moved)
	}
	return sc, nil
}

func stateKey(name string) string { return "conveyor:schedule:" + name }
func jobKey(key string) string    { return "conveyor:schedule-job:" + key }

// markerTTL keeps a tick's marker long enough for every replica that could
// still try the tick, and not much longer.
func (s *Schedule) markerTTL(now time.Time) time.Duration {
	a := s.next(now)
	period := s.next(a).Sub(a)
	ttl := period * time.Duration(s.CatchUpLimit+2)
	return min(max(ttl, 10*time.Minute), 7*24*time.Hour)
}

// jobTimeout bounds one run of a built-in job.
const jobTimeout = 10 * time.Minute

// A tick that failed is retried after retryMin, doubling up to retryMax:
// soon enough that a brief Redis outage delays ticks by about its length,
// rarely enough that a long one costs little.
const (
	retryMin = 250 * time.Millisecond
	retryMax = 5 * time.Second
)

// recordTimeout bounds writing a schedule's state, which is done even
// while shutting down so that a fired tick is not caught up again.
const recordTimeout = 5 * time.Second

// Run fires schedules and moves delayed events until ctx ends. It returns
// once every running built-in job has returned.
func (sc *Scheduler) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	wg.Go(func() { sc.moveDelayed(ctx) })
	// Catch-up fires the missed ticks up to start and each schedule's loop
	// the ticks after it; one start time for both leaves no tick between.
	start := time.Now()
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
// outage are fired after it. It is given up when the next tick is due
// (skip) or when more than CatchUpLimit ticks wait (catch_up), and in any
// case after half its marker's lifetime, since past that another replica's
// marker for it may be gone and a retry could publish it twice.
func (sc *Scheduler) runSchedule(ctx context.Context, s *Schedule, start time.Time) {
	pending := sc.missed(ctx, s, start)
	next := s.next(start)
	var (
		lastErr  error // why pending[0] failed; nil while it has not
		attempts int   // failed attempts at pending[0]
		backoff  time.Duration
	)
	for {
		now := time.Now()
		for !next.IsZero() && !next.After(now) {
			pending = append(pending, next)
			next = s.next(next)
		}
		for len(pending) > 0 {
			head, why := pending[0], ""
			switch {
			case s.Missed == MissedCatchUp && len(pending) > s.CatchUpLimit:
				why = "more ticks wait than catch_up_limit"
			case lastErr == nil:
			case now.After(head.Add(s.markerTTL(head) / 2)):
				why = "its marker may have expired"
			case s.Missed == MissedSkip && len(pending) > 1:
				why = "the next tick is due"
			}
			if why == "" {
				break
			}
			sc.fired.WithLabelValues(s.Name, "lost").Inc()
			sc.log.Error("schedule tick given up: "+why, "schedule", s.Name, "tick", head,
				"attempts", attempts, "error", lastErr)
			sc.recordFailure(ctx, s, head, fmt.Errorf("given up (%s) after %d attempts: %v", why, attempts, lastErr))
			pending = pending[1:]
			lastErr, attempts = nil, 0
		}
		for len(pending) > 0 {
			err := sc.fire(ctx, s, pending[0])
			if ctx.Err() != nil {
				return
			}
			if err != nil {
				lastErr = err
				attempts++
				sc.fired.WithLabelValues(s.Name, "error").Inc()
				if attempts == 1 {
					sc.log.Warn("schedule tick failed; retrying", "schedule", s.Name, "tick", pending[0], "error", err)
					sc.recordFailure(ctx, s, pending[0], err)
				} else {
					sc.log.Debug("schedule tick failed again", "schedule", s.Name, "tick", pending[0],
						"attempts", attempts, "error", err)
				}
				break
			}
			pending = pending[1:]
			lastErr, attempts = nil, 0
		}
		wait := time.Until(next)
		switch {
		case len(pending) > 0:
			backoff = min(max(2*backoff, retryMin), retryMax)
			if next.IsZero() || backoff < wait {
				wait = backoff
			}
		case next.IsZero():
			// Only a cron expression whose next match is more than five
			// years away gets here (29 February after 2096): prepare
			// refuses one that never matches.
			sc.log.Error("schedule has no tick within five years; it stops firing", "schedule", s.Name, "cron", s.Cron)
			return
		default:
			backoff = 0
		}
		if !sleep(ctx, wait) {
			return
		}
	}
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

// missed returns, for a catch_up schedule, the ticks since the last
// recorded one up to start (at most CatchUpLimit, the most recent), and
// reports skipped ticks of a skip schedule.
func (sc *Scheduler) missed(ctx context.Context, s *Schedule, start time.Time) []time.Time {
	// Redis unavailable at start (a whole system restarting): the last
	// tick is read again until it answers, so that a catch_up schedule
	// still catches up; nothing can be fired before anyway.
	var raw string
	for backoff := time.Duration(0); ; {
		var err error
		raw, err = sc.cfg.Redis.HGet(ctx, stateKey(s.Name), "last_tick").Result()
		if errors.Is(err, redis.Nil) {
			return nil // never fired: nothing to catch up
		}
		if err == nil {
			break
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
		if !sleep(ctx, backoff) {
			return nil
		}
	}
	last, err := time.Parse(time.RFC3339Nano, raw)
	if err != nil {
		return nil
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

// fire handles one tick: publish it (or claim it and run the job) unless
// another replica already did. It returns an error only if the tick must
// be tried again because the claim or the publish failed. A job that
// fails after its claim is not retried, as the claim is taken (its next
// tick runs it again), nor is a tick whose data makes no valid event; those
// failures are recorded here and not returned.
func (sc *Scheduler) fire(ctx context.Context, s *Schedule, tick time.Time) error {
	key := s.tickKey(tick)
	ttl := s.markerTTL(tick)
	if s.job != nil {
		won, err := sc.cfg.Redis.SetNX(ctx, jobKey(key), sc.cfg.Identity, ttl).Result()
		if err != nil {
			return fmt.Errorf("claim tick %s: %w", key, err)
		}
		if !won {
			sc.fired.WithLabelValues(s.Name, "already_fired").Inc()
			return nil
		}
		jctx, cancel := context.WithTimeout(ctx, jobTimeout)
		err = s.job(jctx, tick)
		cancel()
		if err != nil {
			sc.fired.WithLabelValues(s.Name, "error").Inc()
			sc.log.Error("built-in job failed", "schedule", s.Name, "tick", tick, "error", err)
			sc.recordFailure(ctx, s, tick, err)
			return nil
		}
		sc.fired.WithLabelValues(s.Name, "fired").Inc()
		sc.record(ctx, s, tick, "ok")
		return nil
	}
	ev, err := s.event(tick)
	if err != nil {
		// The schedule's data makes no valid event at this tick: trying
		// again would make the same one.
		sc.fired.WithLabelValues(s.Name, "error").Inc()
		sc.log.Error("schedule tick makes no valid event", "schedule", s.Name, "tick", tick, "error", err)
		sc.recordFailure(ctx, s, tick, err)
		return nil
	}
	won, _, err := sc.cfg.Publisher.PublishOnce(ctx, key, ttl, ev,
		bus.WithID(s.tickID(tick)), bus.WithOccurredAt(tick))
	if err != nil {
		return err
	}
	if !won {
		sc.fired.WithLabelValues(s.Name, "already_fired").Inc()
		return nil
	}
	sc.fired.WithLabelValues(s.Name, "fired").Inc()
	sc.log.Debug("schedule fired", "schedule", s.Name, "tick", tick)
	sc.record(ctx, s, tick, "published")
	return nil
}

// record notes a tick fired by this replica. last_tick is where catch-up
// starts, so only a tick that was handled may set it.
func (sc *Scheduler) record(ctx context.Context, s *Schedule, tick time.Time, outcome string) {
	sc.writeState(ctx, s,
		"last_tick", tick.UTC().Format(time.RFC3339Nano),
		"last_fired_at", time.Now().UTC().Format(time.RFC3339Nano),
		"outcome", outcome,
		"fired_by", sc.cfg.Identity,
	)
}

// recordFailure notes a failed tick for operators, leaving last_tick, so
// that catch-up after a restart still covers the tick.
func (sc *Scheduler) recordFailure(ctx context.Context, s *Schedule, tick time.Time, err error) {
	sc.writeState(ctx, s,
		"outcome", fmt.Sprintf("error at tick %s: %v", tick.UTC().Format(time.RFC3339Nano), err),
		"fired_by", sc.cfg.Identity,
	)
}

func (sc *Scheduler) writeState(ctx context.Context, s *Schedule, fields ...any) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), recordTimeout)
	defer cancel()
	if err := sc.cfg.Redis.HSet(ctx, stateKey(s.Name), fields...).Err(); err != nil {
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
	now := time.Now()
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
