package scheduler_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/internal/testenv"
	"github.com/conveyor/conveyor/scheduler"
)

// scheduleFile returns a file with one email schedule named name.
func scheduleFile(t *testing.T, name, cron, missed string) scheduler.File {
	t.Helper()
	y := strings.ReplaceAll(emailSchedule, "%s", name)
	y = strings.Replace(y, `"@every 1s"`, `"`+cron+`"`, 1)
	if missed != "" {
		y += "    missed: " + missed + "\n"
	}
	f, err := scheduler.ParseFile([]byte(y), "s.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// uniqueName returns a schedule name no other test uses: schedule state
// and markers are not under the test's prefix.
func uniqueName(prefix string) string {
	return "tick-" + strings.Trim(strings.ReplaceAll(prefix, ":", "-"), "-")
}

func newScheduler(t *testing.T, rdb redis.UniversalClient, prefix string, cfg scheduler.Config) *scheduler.Scheduler {
	t.Helper()
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, StreamPrefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	cfg.Redis, cfg.Publisher = rdb, pub
	if cfg.Logger == nil {
		cfg.Logger = logger()
	}
	sc, err := scheduler.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return sc
}

// publishedTicks returns the tick of every email.requested entry under
// prefix, in stream order, read from the subject "Tick <tick time>".
func publishedTicks(t *testing.T, rdb redis.UniversalClient, prefix string) []time.Time {
	t.Helper()
	xs, err := rdb.XRange(context.Background(), prefix+events.TypeEmailRequested, "-", "+").Result()
	if err != nil {
		t.Fatal(err)
	}
	var ticks []time.Time
	for _, x := range xs {
		var req events.EmailRequested
		if err := json.Unmarshal([]byte(x.Values["payload"].(string)), &req); err != nil {
			t.Fatal(err)
		}
		tick, err := time.Parse(time.RFC3339, strings.TrimPrefix(req.Subject, "Tick "))
		if err != nil {
			t.Fatalf("subject %q: %v", req.Subject, err)
		}
		ticks = append(ticks, tick)
	}
	return ticks
}

// wantContiguous fails unless ticks are every tick of a period-long
// schedule from first to last, each once.
func wantContiguous(t *testing.T, ticks []time.Time, period time.Duration, first, last time.Time) {
	t.Helper()
	sorted := slices.Clone(ticks)
	slices.SortFunc(sorted, func(a, b time.Time) int { return a.Compare(b) })
	var want []time.Time
	for tick := first; !tick.After(last); tick = tick.Add(period) {
		want = append(want, tick)
	}
	if !slices.EqualFunc(sorted, want, time.Time.Equal) {
		t.Fatalf("published ticks\n%v\nwant every tick from %s to %s once:\n%v", sorted, first, last, want)
	}
}

func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting: %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Two replicas started 1.3s apart compute the same "@every 2s" ticks, so
// each tick is published once. Were ticks counted from each replica's
// start, one replica would tick on odd seconds and the other on even ones,
// and every period would be published twice.
func TestEveryTicksAreTheSameInReplicasStartedApart(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	file := scheduleFile(t, uniqueName(prefix), "@every 2s", "")
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	// Start 100ms after a whole second, so that the second replica starts
	// 400ms after the next one, well clear of both whole seconds.
	time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(1100 * time.Millisecond)))
	for i, delay := range []time.Duration{0, 1300 * time.Millisecond} {
		time.Sleep(delay)
		sc := newScheduler(t, rdb, prefix, scheduler.Config{File: file, Identity: fmt.Sprintf("r%d", i)})
		wg.Go(func() { _ = sc.Run(ctx) })
	}
	time.Sleep(4300 * time.Millisecond)
	cancel()
	wg.Wait()

	perPeriod := map[int64]int{}
	for _, tick := range publishedTicks(t, rdb, prefix) {
		if tick.UnixNano()%int64(2*time.Second) != 0 {
			t.Errorf("tick %s is not a multiple of 2s since the Unix epoch", tick)
		}
		perPeriod[tick.Unix()/2]++
	}
	if len(perPeriod) < 2 {
		t.Fatalf("ticks published in %d periods of 2s, want at least 2", len(perPeriod))
	}
	for p, n := range perPeriod {
		if n != 1 {
			t.Errorf("%d ticks published in the 2s period from %s, want 1", n, time.Unix(2*p, 0).UTC())
		}
	}
}

// Fault modes of faults.
const (
	healthy int32 = iota
	redisDown
	publishFails
)

// faults is a Redis client hook that fails every command (redisDown), or
// only the publish script (publishFails), as a lost connection would, and
// can delay the next HGET once.
type faults struct {
	mode      atomic.Int32
	hgetDelay atomic.Int64
}

func lostConnection() error { return &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET} }

func (f *faults) DialHook(next redis.DialHook) redis.DialHook { return next }

func (f *faults) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if d := time.Duration(f.hgetDelay.Load()); d > 0 && cmd.Name() == "hget" && f.hgetDelay.CompareAndSwap(int64(d), 0) {
			select {
			case <-time.After(d):
			case <-ctx.Done():
			}
		}
		mode := f.mode.Load()
		if mode == redisDown || mode == publishFails && (cmd.Name() == "evalsha" || cmd.Name() == "eval") {
			err := lostConnection()
			cmd.SetErr(err)
			return err
		}
		return next(ctx, cmd)
	}
}

func (f *faults) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if f.mode.Load() == redisDown {
			err := lostConnection()
			for _, c := range cmds {
				c.SetErr(err)
			}
			return err
		}
		return next(ctx, cmds)
	}
}

func faultyClient(t *testing.T, rdb *redis.Client) (*redis.Client, *faults) {
	t.Helper()
	opt := *rdb.Options()
	c := redis.NewClient(&opt)
	t.Cleanup(func() { _ = c.Close() })
	f := &faults{}
	c.AddHook(f)
	return c, f
}

// The ticks of a catch_up schedule that fall during a brief Redis outage
// are published once it ends, and last_tick never names a tick that
// failed, so catch-up after a restart would still cover it.
func TestTicksDuringABriefOutageArePublishedAfterIt(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name string
		mode int32
	}{
		{"redis down", redisDown},
		{"publishing fails", publishFails},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			rdb := testenv.Redis(t)
			prefix := testenv.Prefix(t)
			name := uniqueName(prefix)
			flaky, f := faultyClient(t, rdb)
			sc := newScheduler(t, flaky, prefix, scheduler.Config{File: scheduleFile(t, name, "@every 1s", "catch_up")})
			stop := running(t, sc)
			defer stop()

			waitFor(t, 5*time.Second, "a first tick", func() bool { return len(publishedTicks(t, rdb, prefix)) > 0 })
			first := publishedTicks(t, rdb, prefix)[0]
			f.mode.Store(tt.mode)
			outage := time.Now()
			time.Sleep(2500 * time.Millisecond)
			raw, err := rdb.HGet(t.Context(), "conveyor:schedule:"+name, "last_tick").Result()
			if err != nil {
				t.Fatal(err)
			}
			last, err := time.Parse(time.RFC3339Nano, raw)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.ContainsFunc(publishedTicks(t, rdb, prefix), last.Equal) {
				t.Errorf("last_tick is %s, a tick that was not published", raw)
			}
			f.mode.Store(healthy)
			end := time.Now()
			time.Sleep(2 * time.Second)
			stop()

			ticks := publishedTicks(t, rdb, prefix)
			lastTick := slices.MaxFunc(ticks, func(a, b time.Time) int { return a.Compare(b) })
			if !lastTick.After(end) {
				t.Fatalf("last tick %s published is not after the outage (%s to %s)", lastTick, outage, end)
			}
			wantContiguous(t, ticks, time.Second, first, lastTick)
		})
	}
}

// Catch-up and the first tick use one start time: a tick that falls while
// catch-up reads the last recorded tick (here slowed to 1.5s) is fired too.
func TestNoTickFallsBetweenCatchUpAndTheFirstTick(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	name := uniqueName(prefix)
	recorded := recordLastTick(t, rdb, name, 3*time.Second)
	slow, f := faultyClient(t, rdb)
	f.hgetDelay.Store(int64(1500 * time.Millisecond))
	sc := newScheduler(t, slow, prefix, scheduler.Config{File: scheduleFile(t, name, "@every 1s", "catch_up")})
	ctx, cancel := context.WithTimeout(t.Context(), 3500*time.Millisecond)
	defer cancel()
	_ = sc.Run(ctx)

	wantCaughtUp(t, rdb, prefix, recorded)
}

// A catch_up schedule whose scheduler starts while Redis is unavailable
// (the whole system restarting) catches up once Redis answers: the ticks
// since the last recorded one are all published.
func TestCatchUpWaitsForRedisAtStart(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	name := uniqueName(prefix)
	recorded := recordLastTick(t, rdb, name, 3*time.Second)
	flaky, f := faultyClient(t, rdb)
	f.mode.Store(redisDown)
	sc := newScheduler(t, flaky, prefix, scheduler.Config{File: scheduleFile(t, name, "@every 1s", "catch_up")})
	ctx, cancel := context.WithTimeout(t.Context(), 6*time.Second)
	defer cancel()
	go func() {
		time.Sleep(1500 * time.Millisecond)
		f.mode.Store(healthy)
	}()
	_ = sc.Run(ctx)

	wantCaughtUp(t, rdb, prefix, recorded)
}

// A built-in job that runs long delays no user schedule, and Run returns
// only after the job has.
func TestABuiltinJobDelaysNoOtherSchedule(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	name := uniqueName(prefix)
	started := make(chan struct{}, 1)
	var finished atomic.Bool
	job := func(ctx context.Context, _ time.Time) error {
		select {
		case started <- struct{}{}:
		default:
		}
		<-ctx.Done()
		time.Sleep(300 * time.Millisecond) // a job finishing its work
		finished.Store(true)
		return nil
	}
	sc := newScheduler(t, rdb, prefix, scheduler.Config{
		File:     scheduleFile(t, name, "@every 1s", ""),
		Builtins: []scheduler.Builtin{{Name: name + "-job", Cron: "@every 1s", Job: job}},
	})
	stop := running(t, sc)
	defer stop()

	select {
	case <-started:
	case <-time.After(5 * time.Second):
		t.Fatal("the job never started")
	}
	jobStart := time.Now()
	waitFor(t, 6*time.Second, "two ticks of the user schedule while the job runs", func() bool {
		n := 0
		for _, tick := range publishedTicks(t, rdb, prefix) {
			if tick.After(jobStart) {
				n++
			}
		}
		return n >= 2
	})
	stop()
	if !finished.Load() {
		t.Error("Run returned while the job was still running")
	}
}

// running runs sc until the returned stop is called, which waits for Run
// to return.
func running(t *testing.T, sc *scheduler.Scheduler) (stop func()) {
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = sc.Run(ctx)
	}()
	return func() { cancel(); <-done }
}

// logBuffer collects log lines from several goroutines.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) count(s string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Count(b.buf.String(), s)
}

// During a Redis outage the move of delayed events backs off and says so
// once per stream, instead of trying and logging every poll; once Redis is
// back, due events move again.
func TestDelayedMovesBackOffDuringAnOutage(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	flaky, f := faultyClient(t, rdb)
	var logs logBuffer
	streams := []string{prefix + events.TypeEmailRequested, prefix + events.TypeDocumentUploaded}
	sc := newScheduler(t, flaky, prefix, scheduler.Config{
		Streams: streams, DelayPoll: 20 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo})),
	})
	f.mode.Store(redisDown)
	stop := running(t, sc)
	defer stop()
	time.Sleep(1500 * time.Millisecond) // 75 polls
	if n := logs.count("move delayed events"); n != len(streams) {
		t.Errorf("%d warnings in a 1.5 s outage, want one per stream (%d)", n, len(streams))
	}
	f.mode.Store(healthy)

	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, StreamPrefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	ev := &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "s", Body: "b", RequestedAt: time.Now()}
	if _, err := pub.PublishAt(t.Context(), time.Now(), ev); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the due event moved after the outage", func() bool {
		n, _ := rdb.XLen(t.Context(), streams[0]).Result()
		return n == 1
	})
	waitFor(t, 10*time.Second, "the log of moving again", func() bool {
		return logs.count("moving delayed events again") == len(streams)
	})
}

// A schedule whose state Redis refuses to read (a key of another type)
// fires without catching up, instead of asking again forever.
func TestStateRedisRefusesDoesNotStopASchedule(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	name := uniqueName(prefix)
	if err := rdb.Set(t.Context(), "conveyor:schedule:"+name, "not a hash", 0).Err(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Del(context.Background(), "conveyor:schedule:"+name) })
	sc := newScheduler(t, rdb, prefix, scheduler.Config{File: scheduleFile(t, name, "@every 1s", "catch_up")})
	stop := running(t, sc)
	defer stop()
	waitFor(t, 10*time.Second, "a tick", func() bool { return len(publishedTicks(t, rdb, prefix)) > 0 })
}

// recordLastTick records, as the schedule name's last fired tick, the
// whole second ago before now, and returns it.
func recordLastTick(t *testing.T, rdb *redis.Client, name string, ago time.Duration) time.Time {
	t.Helper()
	recorded := time.Now().Truncate(time.Second).Add(-ago).UTC()
	if err := rdb.HSet(t.Context(), "conveyor:schedule:"+name, "last_tick", recorded.Format(time.RFC3339Nano)).Err(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rdb.Del(context.Background(), "conveyor:schedule:"+name) })
	return recorded
}

// wantCaughtUp checks that every second after recorded, up to the last
// tick published under prefix, was published.
func wantCaughtUp(t *testing.T, rdb *redis.Client, prefix string, recorded time.Time) {
	t.Helper()
	ticks := publishedTicks(t, rdb, prefix)
	if len(ticks) == 0 {
		t.Fatal("nothing published")
	}
	wantContiguous(t, ticks, time.Second, recorded.Add(time.Second), slices.MaxFunc(ticks, func(a, b time.Time) int { return a.Compare(b) }))
}
