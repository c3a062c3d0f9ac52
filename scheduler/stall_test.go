package scheduler_test

import (
	"context"
	"log/slog"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/internal/testenv"
	"github.com/conveyor/conveyor/scheduler"
)

// emailFile returns a file with one email schedule named name, with extra
// YAML lines (indented as its keys) appended.
func emailFile(t *testing.T, name, cron string, extra ...string) scheduler.File {
	t.Helper()
	y := strings.ReplaceAll(emailSchedule, "%s", name)
	y = strings.Replace(y, `"@every 1s"`, `"`+cron+`"`, 1)
	for _, e := range extra {
		y += "    " + e + "\n"
	}
	f, err := scheduler.ParseFile([]byte(y), "s.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// fakeTimed returns a scheduler on rdb, publishing under prefix, that
// reads clock.
func fakeTimed(t *testing.T, rdb *redis.Client, prefix string, clock *scheduler.FakeClock, cfg scheduler.Config) *scheduler.Scheduler {
	t.Helper()
	sc := newScheduler(t, rdb, prefix, cfg)
	scheduler.UseClock(sc, clock)
	return sc
}

func sortedTicks(ticks []time.Time) []time.Time {
	ticks = slices.Clone(ticks)
	slices.SortFunc(ticks, time.Time.Compare)
	return ticks
}

// A process that stalls (SIGSTOP, a paused VM, a suspended machine) finds
// every tick that came due meanwhile due at once. It fires them as its
// missed policy says, never all: a "@every 1s" schedule stalled 40s must
// not publish 40 events at once. Nor does it fire a tick older than half
// its marker's life, which another replica may have fired.
func TestABacklogAfterAStallFollowsTheMissedPolicy(t *testing.T) {
	t.Parallel()
	at := func(s string) time.Time {
		tm, err := time.Parse(time.RFC3339, s)
		if err != nil {
			t.Fatal(err)
		}
		return tm
	}
	tests := []struct {
		name  string
		cron  string
		extra []string
		start time.Time
		stall time.Duration
		want  []time.Time
	}{
		{
			name: "skip fires the latest tick", cron: "@every 1s",
			start: at("2030-01-01T00:00:00Z").Add(500 * time.Millisecond), stall: 40 * time.Second,
			want: []time.Time{at("2030-01-01T00:00:40Z")},
		},
		{
			name: "catch_up fires the catch_up_limit most recent", cron: "@every 1s", extra: []string{"missed: catch_up", "catch_up_limit: 3"},
			start: at("2030-01-01T00:00:00Z").Add(500 * time.Millisecond), stall: 40 * time.Second,
			want: []time.Time{at("2030-01-01T00:00:38Z"), at("2030-01-01T00:00:39Z"), at("2030-01-01T00:00:40Z")},
		},
		{
			// A yearly marker lives two years at most: ticks more than a
			// year old are not fired, though catch_up_limit allows 3.
			name: "no tick older than half its marker's life", cron: "@yearly", extra: []string{"missed: catch_up", "catch_up_limit: 3"},
			start: at("2030-06-01T00:00:00Z"), stall: 3 * 365 * 24 * time.Hour,
			want: []time.Time{at("2033-01-01T00:00:00Z")},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			rdb := testenv.Redis(t)
			prefix := testenv.Prefix(t)
			clock := scheduler.NewFakeClock(tt.start)
			sc := fakeTimed(t, rdb, prefix, clock, scheduler.Config{File: emailFile(t, uniqueName(prefix), tt.cron, tt.extra...)})
			stop := running(t, sc)
			defer stop()

			clock.WaitSleepers(t, 1)
			clock.Advance(tt.stall) // stopped meanwhile: the wait ends late
			clock.WaitSleepers(t, 1)
			stop()
			if got := sortedTicks(publishedTicks(t, rdb, prefix)); !slices.EqualFunc(got, tt.want, time.Time.Equal) {
				t.Errorf("published after a stall of %s:\n%v\nwant\n%v", tt.stall, got, tt.want)
			}
		})
	}
}

// Two replicas; one is stopped for 11 minutes while the other publishes
// every tick. When it resumes, it publishes no tick a second time, though
// the markers of the oldest ticks it missed have expired, and it does not
// log them as errors or lost, nor record them as its own.
func TestAReplicaResumedAfterAStallPublishesNoTickTwice(t *testing.T) {
	t.Parallel()
	for _, missed := range []string{"skip", "catch_up"} {
		t.Run(missed, func(t *testing.T) {
			t.Parallel()
			rdb := testenv.Redis(t)
			prefix := testenv.Prefix(t)
			name := uniqueName(prefix)
			file := emailFile(t, name, "@every 10s", "missed: "+missed)
			start := time.Date(2030, 1, 1, 0, 0, 5, 0, time.UTC)
			aClock, bClock := scheduler.NewFakeClock(start), scheduler.NewFakeClock(start)
			a := fakeTimed(t, rdb, prefix, aClock, scheduler.Config{File: file, Identity: "a"})
			var logs logBuffer
			b := fakeTimed(t, rdb, prefix, bClock, scheduler.Config{File: file, Identity: "b",
				Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))})
			defer running(t, a)()
			defer running(t, b)()
			aClock.WaitSleepers(t, 1)
			bClock.WaitSleepers(t, 1)

			const ticks = 66 // 11 minutes
			for range ticks {
				aClock.Advance(10 * time.Second)
				aClock.WaitSleepers(t, 1)
			}
			first, last := start.Add(5*time.Second), start.Add(5*time.Second+(ticks-1)*10*time.Second)
			wantContiguous(t, publishedTicks(t, rdb, prefix), 10*time.Second, first, last)
			// Redis expires the markers of the ticks older than their TTL.
			now := aClock.Now()
			expired := 0
			for tick := first; !tick.After(last); tick = tick.Add(10 * time.Second) {
				if key, ttl := scheduler.TickMarker(t, a, name, tick); now.Sub(tick) >= ttl {
					if err := rdb.Del(t.Context(), key).Err(); err != nil {
						t.Fatal(err)
					}
					expired++
				}
			}
			if expired == 0 {
				t.Fatal("no marker expired: the test tests nothing")
			}

			bClock.Advance(11 * time.Minute) // b resumes
			bClock.WaitSleepers(t, 1)
			wantContiguous(t, publishedTicks(t, rdb, prefix), 10*time.Second, first, last)
			if n := logs.count("level=ERROR") + logs.count("level=WARN"); n > 0 {
				t.Errorf("the resumed replica logged %d warnings or errors:\n%s", n, logs.buf.String())
			}
			wantState(t, rdb, name, last, "a", "published")
		})
	}
}

// A replica whose publish fails, for a tick another replica published,
// neither logs the tick as failed or lost nor records it as its failure.
func TestATickAnotherReplicaPublishedIsNotLost(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	name := uniqueName(prefix)
	file := emailFile(t, name, "@every 1s")
	start := time.Date(2030, 1, 1, 0, 0, 0, 500_000_000, time.UTC)
	aClock, bClock := scheduler.NewFakeClock(start), scheduler.NewFakeClock(start)
	a := fakeTimed(t, rdb, prefix, aClock, scheduler.Config{File: file, Identity: "a"})
	flaky, f := faultyClient(t, rdb)
	f.mode.Store(publishFails)
	var logs logBuffer
	b := fakeTimed(t, flaky, prefix, bClock, scheduler.Config{File: file, Identity: "b",
		Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))})
	defer running(t, a)()
	defer running(t, b)()
	aClock.WaitSleepers(t, 1)
	bClock.WaitSleepers(t, 1)

	for range 3 {
		aClock.Advance(time.Second)
		aClock.WaitSleepers(t, 1)
		bClock.Advance(time.Second)
		bClock.WaitSleepers(t, 1)
	}
	last := start.Add(2500 * time.Millisecond)
	wantContiguous(t, publishedTicks(t, rdb, prefix), time.Second, start.Add(500*time.Millisecond), last)
	if n := logs.count("level=ERROR") + logs.count("level=WARN"); n > 0 {
		t.Errorf("the replica whose publish failed logged %d warnings or errors:\n%s", n, logs.buf.String())
	}
	wantState(t, rdb, name, last, "a", "published")
}

// wantState checks the recorded state of schedule name.
func wantState(t *testing.T, rdb *redis.Client, name string, lastTick time.Time, firedBy, outcome string) {
	t.Helper()
	st, err := rdb.HGetAll(t.Context(), "conveyor:schedule:"+name).Result()
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := time.Parse(time.RFC3339Nano, st["last_tick"]); !got.Equal(lastTick) || st["fired_by"] != firedBy || st["outcome"] != outcome {
		t.Errorf("state last_tick=%s fired_by=%q outcome=%q, want %s, %q, %q", st["last_tick"], st["fired_by"], st["outcome"],
			lastTick.Format(time.RFC3339Nano), firedBy, outcome)
	}
}

// A replica that records an older tick after another recorded a newer one
// (it was slow) leaves last_tick, where catch-up starts, and the rest of
// the state as the newer one left them.
func TestRecordNeverMovesLastTickBack(t *testing.T) {
	t.Parallel()
	at := func(s string) time.Time {
		tm, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			t.Fatal(err)
		}
		return tm
	}
	tests := []struct {
		name           string
		first, second  time.Time
		lastTick       time.Time
		firedBy        string
		secondRecorded bool
	}{
		{name: "older second", first: at("2030-01-01T00:00:02Z"), second: at("2030-01-01T00:00:01Z"), lastTick: at("2030-01-01T00:00:02Z"), firedBy: "r1"},
		{name: "older second by its fraction", first: at("2030-01-01T00:00:01.5Z"), second: at("2030-01-01T00:00:01Z"), lastTick: at("2030-01-01T00:00:01.5Z"), firedBy: "r1"},
		{name: "older second, a year apart", first: at("2031-01-01T00:00:00Z"), second: at("2030-12-31T23:59:59Z"), lastTick: at("2031-01-01T00:00:00Z"), firedBy: "r1"},
		{name: "the same tick again", first: at("2030-01-01T00:00:02Z"), second: at("2030-01-01T00:00:02Z"), lastTick: at("2030-01-01T00:00:02Z"), firedBy: "r1"},
		{name: "newer second", first: at("2030-01-01T00:00:01Z"), second: at("2030-01-01T00:00:01.25Z"), lastTick: at("2030-01-01T00:00:01.25Z"), firedBy: "r2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			rdb := testenv.Redis(t)
			prefix := testenv.Prefix(t)
			name := uniqueName(prefix)
			t.Cleanup(func() { rdb.Del(context.Background(), "conveyor:schedule:"+name) })
			file := emailFile(t, name, "@every 1s")
			r1 := newScheduler(t, rdb, prefix, scheduler.Config{File: file, Identity: "r1"})
			r2 := newScheduler(t, rdb, prefix, scheduler.Config{File: file, Identity: "r2"})
			scheduler.Record(t, r1, name, tt.first)
			scheduler.Record(t, r2, name, tt.second)
			wantState(t, rdb, name, tt.lastTick, tt.firedBy, "published")
		})
	}
}

// A wait for a tick far ahead that a suspend or a clock step makes
// shorter in wall-clock time than in elapsed time ends within a minute of
// the tick: the scheduler reads the clock again at least every minute.
func TestAClockStepDuringALongWaitDelaysNoTickLong(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	start := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := scheduler.NewFakeClock(start)
	sc := fakeTimed(t, rdb, prefix, clock, scheduler.Config{File: emailFile(t, uniqueName(prefix), "0 0 3 * * *")})
	defer running(t, sc)()
	clock.WaitSleepers(t, 1)

	clock.Step(2*time.Hour + 59*time.Minute + 30*time.Second) // suspended, or the clock stepped
	clock.Advance(time.Minute)
	clock.WaitSleepers(t, 1)
	want := []time.Time{start.Add(3 * time.Hour)}
	if got := publishedTicks(t, rdb, prefix); !slices.EqualFunc(got, want, time.Time.Equal) {
		t.Fatalf("published %v a minute after the tick, want %v", got, want)
	}
}

// Two replicas run a built-in job whose run outlasts its period: its runs
// never overlap. A tick that finds it still running, on the other replica,
// is skipped (and said so at info), not run alongside nor queued; the run
// lock is renewed while the job runs, however long it runs, and released
// when it ends, so the next tick runs it.
func TestBuiltinJobRunsNeverOverlap(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	name := uniqueName(prefix) + "-job"
	t.Cleanup(func() { rdb.Del(context.Background(), scheduler.RunLock(name)) })
	var active, maxActive, runs atomic.Int32
	started := make(chan struct{}, 10)
	release := make(chan struct{})
	job := func(ctx context.Context, _ time.Time) error {
		n := active.Add(1)
		defer active.Add(-1)
		for m := maxActive.Load(); n > m && !maxActive.CompareAndSwap(m, n); m = maxActive.Load() {
		}
		runs.Add(1)
		started <- struct{}{}
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil
	}
	clock := scheduler.NewFakeClock(time.Date(2030, 1, 1, 0, 0, 0, 500_000_000, time.UTC))
	const lease = 3 * time.Second
	var logs logBuffer
	for _, id := range []string{"x", "y"} {
		sc := fakeTimed(t, rdb, prefix, clock, scheduler.Config{
			Builtins: []scheduler.Builtin{{Name: name, Cron: "@every 1s", Job: job}},
			Identity: id,
			Logger:   slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo})),
		})
		// The lock is renewed every second (a third of the lease), each
		// try given a second: only a renewal stalled for two seconds
		// loses it.
		scheduler.UseJobLease(sc, lease)
		defer running(t, sc)()
	}
	waitStarted := func() {
		t.Helper()
		select {
		case <-started:
		case <-time.After(10 * time.Second):
			t.Fatal("the job did not start")
		}
	}
	clock.WaitSleepers(t, 2)

	clock.Advance(time.Second) // one replica runs the job
	waitStarted()
	clock.WaitSleepers(t, 1) // the other found the tick taken
	// The job runs past its first lease, so its lock lives only as long
	// as it is renewed.
	testenv.WaitRenewed(t, rdb, scheduler.RunLock(name), lease, 2)
	clock.Advance(time.Second) // the job still runs
	for clock.Sleepers() < 1 && runs.Load() == 1 {
		time.Sleep(time.Millisecond)
	}
	if n := runs.Load(); n != 1 {
		t.Fatalf("%d runs of the job at once", n)
	}
	close(release)
	clock.WaitSleepers(t, 2)

	clock.Advance(time.Second) // the job is free again
	waitStarted()
	clock.WaitSleepers(t, 2)
	if n, m := runs.Load(), maxActive.Load(); n != 2 || m != 1 {
		t.Errorf("%d runs, %d at most at once; want 2, one at a time", n, m)
	}
	if n := logs.count("level=INFO msg=\"built-in job still running; skipping its tick\""); n != 1 {
		t.Errorf("%d ticks skipped for the job still running, want 1:\n%s", n, logs.buf.String())
	}
	if n := logs.count("level=ERROR") + logs.count("level=WARN"); n > 0 {
		t.Errorf("%d warnings or errors:\n%s", n, logs.buf.String())
	}
	if n, err := rdb.Exists(t.Context(), scheduler.RunLock(name)).Result(); err != nil || n != 0 {
		t.Errorf("run lock left after the runs: %d, %v", n, err)
	}
}

// On a single replica too, the ticks that came due while its job ran are
// skipped once the run ends, not run one after another behind it.
func TestTicksDueWhileTheJobRanAreNotQueued(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	name := uniqueName(prefix) + "-job"
	var runs atomic.Int32
	release := make(chan struct{})
	job := func(ctx context.Context, _ time.Time) error {
		if runs.Add(1) == 1 {
			select {
			case <-release:
			case <-ctx.Done():
			}
		}
		return nil
	}
	clock := scheduler.NewFakeClock(time.Date(2030, 1, 1, 0, 0, 0, 500_000_000, time.UTC))
	sc := fakeTimed(t, rdb, prefix, clock, scheduler.Config{
		Builtins: []scheduler.Builtin{{Name: name, Cron: "@every 1s", Job: job}},
	})
	defer running(t, sc)()
	clock.WaitSleepers(t, 1)
	clock.Advance(time.Second)
	for runs.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	clock.Advance(3 * time.Second) // three ticks come due while it runs
	close(release)
	clock.WaitSleepers(t, 1)
	if n := runs.Load(); n != 1 {
		t.Fatalf("%d runs, want 1: the ticks due during the run were queued", n)
	}
	clock.Advance(time.Second)
	clock.WaitSleepers(t, 1)
	if n := runs.Load(); n != 2 {
		t.Fatalf("%d runs after the next tick, want 2", n)
	}
}

// A job whose run lock another replica took (this one could not renew it
// in time) is cancelled, so that two runs overlap as little as possible.
func TestAJobThatLostItsRunLockIsCancelled(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	name := uniqueName(prefix) + "-job"
	t.Cleanup(func() { rdb.Del(context.Background(), scheduler.RunLock(name)) })
	started := make(chan struct{}, 1)
	cancelled := make(chan error, 1)
	job := func(ctx context.Context, _ time.Time) error {
		started <- struct{}{}
		<-ctx.Done()
		cancelled <- context.Cause(ctx)
		return ctx.Err()
	}
	clock := scheduler.NewFakeClock(time.Date(2030, 1, 1, 0, 0, 0, 500_000_000, time.UTC))
	sc := fakeTimed(t, rdb, prefix, clock, scheduler.Config{
		Builtins: []scheduler.Builtin{{Name: name, Cron: "@every 1s", Job: job}},
		Logger:   slog.New(slog.DiscardHandler),
	})
	scheduler.UseJobLease(sc, 300*time.Millisecond)
	defer running(t, sc)()
	clock.WaitSleepers(t, 1)
	clock.Advance(time.Second)
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("the job did not start")
	}
	if err := rdb.Set(t.Context(), scheduler.RunLock(name), "another replica", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	select {
	case cause := <-cancelled:
		if cause == nil || !strings.Contains(cause.Error(), "run lock lost") {
			t.Errorf("job cancelled by %v, want the lost run lock", cause)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the job whose run lock was taken went on")
	}
}
