package bus_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
)

// entryAt returns the id of an entry appended at t (by Redis's clock).
func entryAt(t time.Time) string { return fmt.Sprintf("%d-0", t.UnixMilli()) }

// groupOf returns the status of group on stream.
func groupOf(t *testing.T, st bus.Status, stream, group string) bus.GroupStatus {
	t.Helper()
	for _, s := range st.Streams {
		for _, g := range s.Groups {
			if s.Stream == stream && g.Group == group {
				return g
			}
		}
	}
	t.Fatalf("no group %s on %s in %+v", group, stream, st)
	return bus.GroupStatus{}
}

// aged reports whether an age in seconds is about want: not younger (the
// entries' ids come from Redis's clock, read before them), and older by
// less than a slow test run could add.
func aged(got, want float64) bool { return got >= want-1 && got < want+30 }

// Inspect gives each group the age of its oldest entry not yet delivered
// and of its oldest pending entry, from the ids' times and Redis's clock:
// deleted entries do not count, a heartbeat (XCLAIM JUSTID) that resets a
// pending entry's idle time leaves its age, a group that read everything
// waits for nothing, and the group's retry stream counts too.
func TestInspectOldestWaitingAndPending(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	topo := groupsOnTopic(t, f, f.group)
	now, err := f.rdb.Time(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	gone, first, second := entryAt(now.Add(-300*time.Second)), entryAt(now.Add(-180*time.Second)), entryAt(now.Add(-60*time.Second))
	for _, id := range []string{gone, first, second} {
		if err := f.rdb.XAdd(ctx, &redis.XAddArgs{Stream: f.topic, ID: id, Values: []string{"k", "v"}}).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.rdb.XDel(ctx, f.topic, gone).Err(); err != nil {
		t.Fatal(err)
	}
	read := func(n int64) {
		t.Helper()
		if err := f.rdb.XReadGroup(ctx, &redis.XReadGroupArgs{Group: f.group, Consumer: "c", Streams: []string{f.topic, ">"}, Count: n}).Err(); err != nil {
			t.Fatal(err)
		}
	}
	check := func(step string, waiting, pending float64) {
		t.Helper()
		st, err := bus.Inspect(ctx, f.rdb, topo)
		if err != nil {
			t.Fatal(err)
		}
		g := groupOf(t, st, f.topic, f.group)
		if !aged(g.OldestWaitingSeconds, waiting) || !aged(g.OldestPendingSeconds, pending) {
			t.Errorf("%s: oldest waiting %vs, oldest pending %vs; want about %vs and %vs",
				step, g.OldestWaitingSeconds, g.OldestPendingSeconds, waiting, pending)
		}
		if waiting == 0 && g.OldestWaitingSeconds != 0 || pending == 0 && g.OldestPendingSeconds != 0 {
			t.Errorf("%s: oldest waiting %vs, oldest pending %vs; want 0 for none", step, g.OldestWaitingSeconds, g.OldestPendingSeconds)
		}
	}

	check("the first entry deleted, none read", 180, 0)
	read(1)
	check("one read", 60, 180)
	// A heartbeat re-claims the consumer's own entry: its idle time
	// starts again, its age does not.
	if err := f.rdb.XClaimJustID(ctx, &redis.XClaimArgs{Stream: f.topic, Group: f.group, Consumer: "c", Messages: []string{first}}).Err(); err != nil {
		t.Fatal(err)
	}
	check("one read, then re-claimed", 60, 180)

	reg := prometheus.NewRegistry()
	reg.MustRegister(bus.NewStatusCollector(f.rdb, topo))
	labels := map[string]string{"stream": f.topic, "consumer_group": f.group}
	if v, ok := gathered(t, reg, "conveyor_group_oldest_waiting_seconds", labels); !ok || !aged(v, 60) {
		t.Errorf("conveyor_group_oldest_waiting_seconds = %v (present %v), want about 60", v, ok)
	}
	if v, ok := gathered(t, reg, "conveyor_group_oldest_pending_seconds", labels); !ok || !aged(v, 180) {
		t.Errorf("conveyor_group_oldest_pending_seconds = %v (present %v), want about 180", v, ok)
	}

	read(10)
	check("all read", 0, 180)
	if err := f.rdb.XAck(ctx, f.topic, f.group, first).Err(); err != nil {
		t.Fatal(err)
	}
	check("the first acknowledged", 0, 60)
	if err := f.rdb.XAck(ctx, f.topic, f.group, second).Err(); err != nil {
		t.Fatal(err)
	}
	check("all acknowledged", 0, 0)
	if v, ok := gathered(t, reg, "conveyor_group_oldest_waiting_seconds", labels); !ok || v != 0 {
		t.Errorf("conveyor_group_oldest_waiting_seconds = %v (present %v) with nothing waiting, want 0", v, ok)
	}
	if v, ok := gathered(t, reg, "conveyor_group_oldest_pending_seconds", labels); !ok || v != 0 {
		t.Errorf("conveyor_group_oldest_pending_seconds = %v (present %v) with nothing pending, want 0", v, ok)
	}

	// A retry moved into the group's retry stream 30 s ago.
	retry := bus.RetryStream(f.topic, f.group)
	if err := f.rdb.XAdd(ctx, &redis.XAddArgs{Stream: retry, ID: entryAt(now.Add(-30 * time.Second)), Values: []string{"k", "v"}}).Err(); err != nil {
		t.Fatal(err)
	}
	check("a retry waiting", 30, 0)
	if err := f.rdb.XReadGroup(ctx, &redis.XReadGroupArgs{Group: f.group, Consumer: "c", Streams: []string{retry, ">"}}).Err(); err != nil {
		t.Fatal(err)
	}
	check("a retry pending", 0, 30)
}

// Members of a delay set or of a group's retry set that were not events,
// set aside in their lists, are counted in Inspect and the collector.
func TestInspectCountsUnreadableMembers(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	topo := groupsOnTopic(t, f, f.group)
	// The delay set's are set aside by MoveDue, as the scheduler does.
	delayed := bus.DelayedSet(f.topic)
	for _, m := range []string{"garbage", "more garbage"} {
		if err := f.rdb.ZAdd(ctx, delayed, redis.Z{Score: 1, Member: m}).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if m, err := bus.MoveDue(ctx, f.rdb, f.topic, 10); err != nil || m.SetAside != 2 {
		t.Fatalf("MoveDue set aside %d (%v), want 2", m.SetAside, err)
	}
	if err := f.rdb.RPush(ctx, bus.UnreadableKey(bus.RetrySet(f.topic, f.group)), "garbage").Err(); err != nil {
		t.Fatal(err)
	}
	st, err := bus.Inspect(ctx, f.rdb, topo)
	if err != nil {
		t.Fatal(err)
	}
	if n := st.Streams[0].DelayedUnreadable; n != 2 {
		t.Errorf("DelayedUnreadable = %d, want 2", n)
	}
	if n := groupOf(t, st, f.topic, f.group).RetryUnreadable; n != 1 {
		t.Errorf("RetryUnreadable = %d, want 1", n)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(bus.NewStatusCollector(f.rdb, topo))
	for _, tt := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{name: "conveyor_delayed_unreadable", labels: map[string]string{"stream": f.topic}, want: 2},
		{name: "conveyor_group_retry_unreadable", labels: map[string]string{"stream": f.topic, "consumer_group": f.group}, want: 1},
	} {
		if got, ok := gathered(t, reg, tt.name, tt.labels); !ok || got != tt.want {
			t.Errorf("%s%v = %v (present %v), want %v", tt.name, tt.labels, got, ok, tt.want)
		}
	}
}

// roundTrips counts the commands and pipelines a client sends.
type roundTrips struct{ n atomic.Int64 }

func (r *roundTrips) DialHook(next redis.DialHook) redis.DialHook { return next }

func (r *roundTrips) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		r.n.Add(1)
		return next(ctx, cmd)
	}
}

func (r *roundTrips) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		r.n.Add(1)
		return next(ctx, cmds)
	}
}

// Inspect reads in a fixed number of round trips however many streams and
// groups there are: /metrics runs it on every scrape of every replica.
func TestInspectRoundTrips(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	for _, tt := range []struct {
		name    string
		streams int
	}{
		{name: "one stream", streams: 1},
		{name: "five streams", streams: 5},
	} {
		t.Run(tt.name, func(t *testing.T) {
			topo := map[string][]string{}
			for i := range tt.streams {
				s := fmt.Sprintf("%s%d:%d", f.topic, tt.streams, i)
				topo[f.group+"-a"] = append(topo[f.group+"-a"], s)
				topo[f.group+"-b"] = append(topo[f.group+"-b"], s)
				if err := f.rdb.XAdd(ctx, &redis.XAddArgs{Stream: s, Values: []string{"k", "v"}}).Err(); err != nil {
					t.Fatal(err)
				}
			}
			if err := bus.EnsureGroups(ctx, f.rdb, topo); err != nil {
				t.Fatal(err)
			}
			rdb := redis.NewClient(f.rdb.Options())
			t.Cleanup(func() { _ = rdb.Close() })
			var rt roundTrips
			rdb.AddHook(&rt)
			// Counted on a second run: a new connection's set-up
			// (HELLO, CLIENT SETINFO) is not Inspect's.
			for range 2 {
				rt.n.Store(0)
				if _, err := bus.Inspect(ctx, rdb, topo); err != nil {
					t.Fatal(err)
				}
			}
			if n := rt.n.Load(); n > 2 {
				t.Errorf("Inspect made %d round trips to Redis, want at most 2", n)
			}
		})
	}
}

// A key of another type under one of the names Inspect reads (a stray SET
// on the delay set's name, say) leaves that figure at zero, in either round
// trip, and the rest of the status is still read: one wrong key does not
// blank every stream's and group's figures.
func TestInspectToleratesKeysOfAnotherType(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	topo := groupsOnTopic(t, f, f.group)
	if err := f.rdb.XAdd(ctx, &redis.XAddArgs{Stream: f.topic, Values: []string{"k", "v"}}).Err(); err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{
		bus.DelayedSet(f.topic), bus.UnreadableKey(bus.DelayedSet(f.topic)), // first round trip
		bus.RetrySet(f.topic, f.group), // second
	} {
		if err := f.rdb.Set(ctx, key, "x", time.Hour).Err(); err != nil {
			t.Fatal(err)
		}
	}
	st, err := bus.Inspect(ctx, f.rdb, topo)
	if err != nil {
		t.Fatalf("Inspect: %v", err)
	}
	if s := st.Streams[0]; s.Length != 1 || s.Delayed != 0 || s.DelayedUnreadable != 0 {
		t.Errorf("stream %+v: want length 1, nothing delayed", s)
	}
	if g := groupOf(t, st, f.topic, f.group); g.Lag != 1 || g.Retrying != 0 {
		t.Errorf("group %+v: want lag 1, nothing retrying", g)
	}
}
