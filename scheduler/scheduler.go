package scheduler

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
)

// Job is the work of a built-in schedule at one tick. It must be
// idempotent: a tick's job runs once, but a failed job is only retried by
// the next tick.
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
		if !known[name] {
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
			Help: "Schedule ticks handled by this replica, by schedule and result (fired, already_fired, error).",
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

// Run fires schedules and moves delayed events until ctx ends.
func (sc *Scheduler) Run(ctx context.Context) error {
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc.moveDelayed(ctx)
	}()
	sc.catchUp(ctx, time.Now())
	sc.tickLoop(ctx)
	<-done
	return nil
}

func (sc *Scheduler) tickLoop(ctx context.Context) {
	active := make([]*Schedule, 0, len(sc.schedules))
	for _, s := range sc.schedules {
		if s.enabled() {
			active = append(active, s)
		}
	}
	if len(active) == 0 {
		<-ctx.Done()
		return
	}
	next := make(map[*Schedule]time.Time, len(active))
	now := time.Now()
	for _, s := range active {
		next[s] = s.next(now)
	}
	for {
		soonest := time.Time{}
		for _, t := range next {
			if soonest.IsZero() || t.Before(soonest) {
				soonest = t
			}
		}
		timer := time.NewTimer(time.Until(soonest))
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-timer.C:
		}
		now := time.Now()
		for _, s := range active {
			for !next[s].After(now) {
				sc.fire(ctx, s, next[s])
				next[s] = s.next(next[s])
			}
		}
	}
}

// catchUp fires, for catch_up schedules, the ticks missed since the last
// recorded one (at most CatchUpLimit, the most recent), and reports skipped
// ticks of skip schedules.
func (sc *Scheduler) catchUp(ctx context.Context, now time.Time) {
	for _, s := range sc.schedules {
		if !s.enabled() {
			continue
		}
		raw, err := sc.cfg.Redis.HGet(ctx, stateKey(s.Name), "last_tick").Result()
		if err != nil {
			continue // never fired, or Redis unavailable: nothing to catch up
		}
		last, err := time.Parse(time.RFC3339Nano, raw)
		if err != nil {
			continue
		}
		var missed []time.Time
		for t := s.next(last); !t.After(now); t = s.next(t) {
			missed = append(missed, t)
			if len(missed) > 10_000 {
				missed = missed[1:]
			}
		}
		if len(missed) == 0 {
			continue
		}
		if s.Missed == MissedSkip {
			sc.log.Info("skipping missed ticks", "schedule", s.Name, "missed", len(missed), "since", last)
			continue
		}
		if len(missed) > s.CatchUpLimit {
			sc.log.Warn("too many missed ticks; catching up the most recent only", "schedule", s.Name,
				"missed", len(missed), "catch_up_limit", s.CatchUpLimit)
			missed = missed[len(missed)-s.CatchUpLimit:]
		}
		for _, t := range missed {
			sc.fire(ctx, s, t)
		}
	}
}

// fire handles one tick: publish (or run the job) unless another replica
// already did.
func (sc *Scheduler) fire(ctx context.Context, s *Schedule, tick time.Time) {
	key := s.tickKey(tick)
	ttl := s.markerTTL(tick)
	var (
		won     bool
		outcome string
		err     error
	)
	if s.job != nil {
		won, err = sc.cfg.Redis.SetNX(ctx, jobKey(key), sc.cfg.Identity, ttl).Result()
		if err == nil && won {
			jctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
			err = s.job(jctx, tick)
			cancel()
		}
		outcome = "ok"
	} else {
		var ev events.Event
		if ev, err = s.event(tick); err == nil {
			won, _, err = sc.cfg.Publisher.PublishOnce(ctx, key, ttl, ev,
				bus.WithID(s.tickID(tick)), bus.WithOccurredAt(tick))
		}
		outcome = "published"
	}
	switch {
	case err != nil:
		sc.fired.WithLabelValues(s.Name, "error").Inc()
		sc.log.Error("schedule tick failed", "schedule", s.Name, "tick", tick, "error", err)
		if won || s.job == nil {
			sc.record(ctx, s, tick, "error: "+err.Error())
		}
	case won:
		sc.fired.WithLabelValues(s.Name, "fired").Inc()
		sc.log.Debug("schedule fired", "schedule", s.Name, "tick", tick)
		sc.record(ctx, s, tick, outcome)
	default:
		sc.fired.WithLabelValues(s.Name, "already_fired").Inc()
	}
}

func (sc *Scheduler) record(ctx context.Context, s *Schedule, tick time.Time, outcome string) {
	err := sc.cfg.Redis.HSet(ctx, stateKey(s.Name),
		"last_tick", tick.UTC().Format(time.RFC3339Nano),
		"last_fired_at", time.Now().UTC().Format(time.RFC3339Nano),
		"outcome", outcome,
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
	for {
		wait := sc.cfg.DelayPoll
		for _, stream := range sc.cfg.Streams {
			n, next, err := bus.MoveDue(ctx, sc.cfg.Redis, stream, 1000)
			if err != nil {
				if ctx.Err() == nil {
					sc.log.Warn("move delayed events", "stream", stream, "error", err)
				}
				continue
			}
			if n > 0 {
				sc.moved.Add(float64(n))
				if n == 1000 {
					wait = 0
				}
			}
			if !next.IsZero() {
				wait = min(wait, max(time.Until(next), 0))
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
