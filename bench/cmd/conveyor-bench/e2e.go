package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"golang.org/x/sync/errgroup"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/cache"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/projector"
	"github.com/conveyor/conveyor/store"
)

// End-to-end rows: an event is published (as the API does after
// validation), a handler in its own consumer group consumes it and
// publishes a completion event, and the real projector commits both to
// Postgres and invalidates the cache. Everything runs in this process,
// with one Redis client per role as separate processes would have.

const (
	handlerGroup       = "email-sender"
	handlerConcurrency = 64   // `conveyor handler` default
	projectorConc      = 1024 // `conveyor projector` default
	producers          = 4
	producerBatch      = 250
	maxBacklog         = 50_000
	latencyRate        = 1000 // events per second
)

// tracker counts the events the projector applied: Apply returns once the
// event's transaction is committed and the cache keys it made stale are
// invalidated. An email is complete once both of its events
// (email.requested, email.sent) are applied.
//
// In latency mode (timed) it follows each email by key, to time it. In
// throughput mode it only counts the events of each type, with no lock
// and no map, so that the bench's own bookkeeping costs the measured
// process next to nothing: completions are then the smaller of the two
// counts, which is at least the true number and exceeds it only by the
// emails one of whose events is applied ahead of the other (the producers
// use it to bound the backlog, and the report counts inbox rows).
type tracker struct {
	timed bool

	// Throughput mode: events applied per type.
	requested, sent atomic.Int64

	// Latency mode.
	mu     sync.Mutex
	visits map[string]*visit // keys being timed
	first  []time.Duration   // accept -> first event applied
	second []time.Duration   // accept -> both events applied
	// timedDone counts keys applied twice.
	timedDone atomic.Int64
}

type visit struct {
	accepted time.Time
	record   bool // false during the warm-up
	n        int
}

func newTracker(timed bool) *tracker {
	return &tracker{timed: timed, visits: map[string]*visit{}}
}

// completed returns how many emails are complete (see tracker).
func (t *tracker) completed() int64 {
	if t.timed {
		return t.timedDone.Load()
	}
	return min(t.requested.Load(), t.sent.Load())
}

// expect starts timing key from accepted.
func (t *tracker) expect(key string, accepted time.Time, record bool) {
	t.mu.Lock()
	t.visits[key] = &visit{accepted: accepted, record: record}
	t.mu.Unlock()
}

// count counts an event applied to the row of emailID (sent tells its
// type), if err (what Apply returned) is nil, and returns err.
func (t *tracker) count(emailID string, sent bool, err error) error {
	if err == nil {
		t.applied(emailID, sent)
	}
	return err
}

// applied counts an event applied to the row of emailID.
func (t *tracker) applied(emailID string, sent bool) {
	if !t.timed {
		if sent {
			t.sent.Add(1)
		} else {
			t.requested.Add(1)
		}
		return
	}
	now := time.Now()
	key := store.EmailKey(emailID)
	t.mu.Lock()
	defer t.mu.Unlock()
	v, ok := t.visits[key]
	if !ok {
		return // not published by the latency producer
	}
	v.n++
	if v.n == 1 && v.record {
		t.first = append(t.first, now.Sub(v.accepted))
	}
	if v.n == 2 {
		if v.record {
			t.second = append(t.second, now.Sub(v.accepted))
		}
		delete(t.visits, key)
		t.timedDone.Add(1)
	}
}

// pipeline is the running e2e path.
type pipeline struct {
	pub     *bus.Publisher // the API's publisher
	tracker *tracker
	prefix  string
	cancel  context.CancelFunc
	done    chan error
	closers []func()
}

// startPipeline starts the handler, the projector and stream retention on
// streams named with prefix.
func startPipeline(ctx context.Context, b *bench, prefix string, timed bool) (p *pipeline, err error) {
	p = &pipeline{prefix: prefix, done: make(chan error, 1)}
	defer func() {
		if err != nil {
			p.close()
		}
	}()
	client := func() (*redis.Client, error) {
		c, err := newRedis(b.env.redisURL, 0)
		if err == nil {
			p.closers = append(p.closers, func() { _ = c.Close() })
		}
		return c, err
	}
	apiRdb, err := client()
	if err != nil {
		return p, err
	}
	handlerRdb, err := client()
	if err != nil {
		return p, err
	}
	projRdb, err := client()
	if err != nil {
		return p, err
	}

	topology := map[string][]string{handlerGroup: {prefix + events.TypeEmailRequested}}
	for _, t := range events.Types() {
		topology[projector.Group] = append(topology[projector.Group], prefix+t)
	}
	if err := bus.EnsureGroups(ctx, apiRdb, topology); err != nil {
		return p, err
	}
	if p.pub, err = bus.NewPublisher(bus.PublisherConfig{Client: apiRdb, Source: "api", StreamPrefix: prefix, Logger: b.log}); err != nil {
		return p, err
	}
	p.closers = append(p.closers, func() { _ = p.pub.Close() })
	hpub, err := bus.NewPublisher(bus.PublisherConfig{Client: handlerRdb, Source: "handler", StreamPrefix: prefix, Logger: b.log})
	if err != nil {
		return p, err
	}
	p.closers = append(p.closers, func() { _ = hpub.Close() })

	hrouter, err := bus.NewRouter(bus.RouterConfig{
		Client: handlerRdb, Consumer: "bench-handler-1", StreamPrefix: prefix, Concurrency: handlerConcurrency,
		DrainTimeout: 5 * time.Second, Logger: b.log,
	})
	if err != nil {
		return p, err
	}
	// A no-op email sender: it publishes the completion event with a
	// derived id, as the real one does after sending.
	if err := bus.Handle(hrouter, handlerGroup, func(ctx context.Context, ev *events.EmailRequested) error {
		env, _ := bus.EnvelopeFrom(ctx)
		_, err := hpub.PublishEvent(ctx, &events.EmailSent{
			EmailID: ev.EmailID, To: ev.To, Attempts: max(1, bus.Attempt(ctx)), SentAt: time.Now().UTC(),
		}, bus.WithID(events.DerivedID(env.ID, "sent")))
		return err
	}); err != nil {
		return p, err
	}

	c, err := cache.New(cache.Config{Redis: projRdb, Logger: b.log})
	if err != nil {
		return p, err
	}
	p.tracker = newTracker(timed)
	proj, err := projector.New(projector.Config{Store: b.env.st, Cache: c, Logger: b.log})
	if err != nil {
		return p, err
	}
	prouter, err := bus.NewRouter(bus.RouterConfig{
		Client: projRdb, Consumer: "bench-projector-1", StreamPrefix: prefix, Concurrency: projectorConc,
		DrainTimeout: 5 * time.Second, Logger: b.log,
	})
	if err != nil {
		proj.Close()
		return p, err
	}
	// The projector's handlers of the two event types this path publishes,
	// as proj.Register adds them, each counting what it applied.
	err = errors.Join(
		bus.HandleAsync(prouter, projector.Group, func(ctx context.Context, ev *events.EmailRequested, done func(error)) {
			proj.ApplyAsync(ctx, ev, func(err error) { done(p.tracker.count(ev.EmailID, false, err)) })
		}),
		bus.HandleAsync(prouter, projector.Group, func(ctx context.Context, ev *events.EmailSent, done func(error)) {
			proj.ApplyAsync(ctx, ev, func(err error) { done(p.tracker.count(ev.EmailID, true, err)) })
		}),
	)
	if err != nil {
		proj.Close()
		return p, err
	}
	ret, err := bus.NewRetention(bus.RetentionConfig{Client: projRdb, Topology: topology, Logger: b.log})
	if err != nil {
		proj.Close()
		return p, err
	}

	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	p.cancel = cancel
	go func() {
		g, gctx := errgroup.WithContext(rctx)
		g.Go(func() error { return hrouter.Run(gctx) })
		g.Go(func() error { return prouter.Run(gctx) })
		g.Go(func() error { return ret.Run(gctx) })
		err := g.Wait()
		proj.Close()
		p.done <- err
	}()
	return p, nil
}

// stop stops the routers (they drain) and the projector.
func (p *pipeline) stop() error {
	if p.cancel == nil {
		return nil
	}
	p.cancel()
	p.cancel = nil
	err := <-p.done
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	return err
}

func (p *pipeline) close() {
	_ = p.stop()
	for i := len(p.closers) - 1; i >= 0; i-- {
		p.closers[i]()
	}
}

// lags describes where the backlog waits: entries not yet delivered (lag)
// and delivered but not acknowledged (pending) per group and stream.
func (p *pipeline) lags(ctx context.Context, rdb *redis.Client) string {
	var parts []string
	for _, t := range []string{events.TypeEmailRequested, events.TypeEmailSent} {
		groups, err := rdb.XInfoGroups(ctx, p.prefix+t).Result()
		if err != nil {
			continue
		}
		for _, g := range groups {
			parts = append(parts, fmt.Sprintf("%s on %s: lag %d, pending %d", g.Name, t, g.Lag, g.Pending))
		}
	}
	return strings.Join(parts, ", ")
}

// deadLetters counts entries in the dead-letter streams of both groups.
func deadLetters(ctx context.Context, rdb *redis.Client) int64 {
	var n int64
	for _, g := range []string{handlerGroup, projector.Group} {
		l, _ := rdb.XLen(ctx, bus.DeadLetterStream(g)).Result()
		n += l
	}
	return n
}

// countSent counts completion events in the projector's inbox.
func countSent(ctx context.Context, b *bench) (int64, error) {
	var n int64
	err := b.env.pgx.QueryRow(ctx, "SELECT count(*) FROM processed_events WHERE event_type = $1", events.TypeEmailSent).Scan(&n)
	return n, err
}

// e2eSlices is how many parts of the e2e window report their own rate.
const e2eSlices = 10

func runE2E(ctx context.Context, b *bench) error {
	p, err := startPipeline(ctx, b, "bench:e2e:", false)
	if err != nil {
		return err
	}
	defer p.close()

	// Producers keep a bounded backlog: they publish while fewer than
	// maxBacklog accepted events are not yet completed.
	var published, failed atomic.Int64
	pctx, stopProducers := context.WithCancel(ctx)
	g, gctx := errgroup.WithContext(pctx)
	for range producers {
		g.Go(func() error {
			evs := make([]events.Event, producerBatch)
			for gctx.Err() == nil {
				if published.Load()-p.tracker.completed() > maxBacklog {
					if err := sleep(gctx, time.Millisecond); err != nil {
						return nil
					}
					continue
				}
				for i := range evs {
					evs[i] = newEmail()
				}
				for _, r := range p.pub.PublishBatch(gctx, evs, nil) {
					switch {
					case r.Err == nil:
						published.Add(1)
					case gctx.Err() == nil:
						failed.Add(1)
						// Otherwise the producers were stopped mid-batch:
						// not a failure.
					}
				}
			}
			return nil
		})
	}

	warmup := 2 * b.opts.warmup
	if err := sleep(ctx, warmup); err != nil {
		stopProducers()
		return err
	}
	var w window
	prof, err := b.profiled("e2e", func() error {
		c0, err := countSent(ctx, b)
		if err != nil {
			return err
		}
		t0 := time.Now()
		cpu0 := b.cpuSnapshot(0)
		cmds0 := commandStats(ctx, b.env.rdb)
		done0 := p.tracker.completed()
		req0, sent0 := p.tracker.requested.Load(), p.tracker.sent.Load()
		// The rate of each tenth of the window, from the tracker: a
		// rate that falls as the tables grow shows here.
		var tenths []string
		last, lastT := done0, t0
		for i := 1; i <= e2eSlices; i++ {
			if err := sleep(ctx, time.Until(t0.Add(b.opts.e2eDuration*time.Duration(i)/e2eSlices))); err != nil {
				return err
			}
			c, now := p.tracker.completed(), time.Now()
			tenths = append(tenths, formatNum(float64(c-last)/now.Sub(lastT).Seconds()))
			last, lastT = c, now
		}
		t1 := time.Now()
		use := cpuBetween(cpu0, b.cpuSnapshot(0))
		cmds1 := commandStats(ctx, b.env.rdb)
		c1, err := countSent(ctx, b)
		if err != nil {
			return err
		}
		w = window{n: c1 - c0, elapsed: t1.Sub(t0), cpu: use}
		if s := perUnitByCommand(cmds0, cmds1, w.n, "event"); s != "" {
			b.note("e2e: %s.", s)
		}
		b.note("e2e: in the same window the projector's handlers saw %s email.requested and %s email.sent applied (the table counts inbox rows of email.sent).",
			formatNum(float64(p.tracker.requested.Load()-req0)), formatNum(float64(p.tracker.sent.Load()-sent0)))
		b.note("e2e: completions per second in each tenth of the window, in order: %s.", strings.Join(tenths, ", "))
		return nil
	})
	stopProducers()
	_ = g.Wait()
	if err != nil {
		return err
	}
	backlog := published.Load() - p.tracker.completed()
	lags := p.lags(ctx, b.env.rdb)
	if err := p.stop(); err != nil {
		return err
	}
	dlq := deadLetters(ctx, b.env.rdb)
	notes := fmt.Sprintf("one process: %d producers (PublishBatch of %d, backlog ≤ %s), handler concurrency %d, projector concurrency %d; %s; backlog at end %s (%s); %d publish failures; %d dead letters; %s",
		producers, producerBatch, formatNum(maxBacklog), handlerConcurrency, projectorConc, w, formatNum(float64(backlog)), lags, failed.Load(), dlq, w.cpuNotes("event"))
	base := line{what: "5. Conveyor e2e: publish → handler → email.sent → projector → Postgres", value: w.rate(), unit: "events/s",
		role: roleConveyor, profile: prof}
	l := base
	l.key, l.chart, l.notes, l.target = "e2e", "throughput", notes, target{atLeast, 25_000}
	b.add(l)
	l = base
	l.what, l.baseline, l.target = base.what+" vs asynq processing", "asynq.process", target{ratioAtLeast, 2.5}
	b.add(l)
	l = base
	l.what, l.baseline, l.target = base.what+" vs River work", "river.work", target{ratioAtLeast, 1.3}
	b.add(l)
	return nil
}

func runLatency(ctx context.Context, b *bench) error {
	p, err := startPipeline(ctx, b, "bench:latency:", true)
	if err != nil {
		return err
	}
	defer p.close()
	var failed atomic.Int64
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	interval := time.Second / latencyRate
	var prof, cpu string
	prof, err = b.profiled("latency", func() error {
		cpu0 := b.cpuSnapshot(0)
		defer func() { cpu = cpuNote(cpu0, b.cpuSnapshot(0)) }()
		start := time.Now()
		warmEnd := start.Add(b.opts.warmup)
		end := warmEnd.Add(b.opts.duration)
		for i := 0; ; i++ {
			next := start.Add(time.Duration(i) * interval)
			if !next.Before(end) {
				break
			}
			if d := time.Until(next); d > 0 {
				if err := sleep(ctx, d); err != nil {
					return err
				}
			}
			ev := newEmail()
			accepted := time.Now()
			p.tracker.expect(store.EmailKey(ev.EmailID), accepted, accepted.After(warmEnd))
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				return ctx.Err()
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				if _, err := p.pub.PublishEvent(ctx, ev); err != nil {
					failed.Add(1)
				}
			}()
		}
		wg.Wait()
		// Let the last events through.
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) {
			p.tracker.mu.Lock()
			left := len(p.tracker.visits)
			p.tracker.mu.Unlock()
			if left == 0 {
				break
			}
			if err := sleep(ctx, 10*time.Millisecond); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	p.tracker.mu.Lock()
	first := sortDurations(append([]time.Duration(nil), p.tracker.first...))
	second := sortDurations(append([]time.Duration(nil), p.tracker.second...))
	pending := len(p.tracker.visits)
	p.tracker.mu.Unlock()
	if len(first) == 0 {
		return errors.New("no event became visible")
	}
	notes := fmt.Sprintf("%d events at %d/s, paced; from the publish call to the projector's commit (the first Apply of the email's events to return); %d not visible within 5 s; %d publish failures; %s",
		len(first), latencyRate, pending, failed.Load(), cpu)
	// Over several rounds, a median combines to the median round and a
	// tail to the worst one.
	add := func(what string, v time.Duration, tgt target, n string, worst bool) {
		b.add(line{what: what, value: ms(v), unit: "ms", target: tgt, role: roleConveyor, chart: "latency", notes: n, profile: prof, worst: worst})
	}
	add("6. e2e latency accept → read model committed, p50", percentile(first, 50), target{atMost, 5}, notes, false)
	add("6. e2e latency accept → read model committed, p99", percentile(first, 99), target{atMost, 50}, "", true)
	add("6. e2e latency accept → read model committed, max", first[len(first)-1], target{}, "", true)
	if len(second) > 0 {
		add("6. e2e latency accept → email.sent committed too, p50", percentile(second, 50), target{}, "both events of the email committed (two hops + projection)", false)
		add("6. e2e latency accept → email.sent committed too, p99", percentile(second, 99), target{}, "", true)
	}
	return p.stop()
}
