package bus_test

import (
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/embedded"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/internal/testenv"
)

// gathered returns the value of the gauge or counter name with labels, and
// whether reg has it.
func gathered(t *testing.T, reg prometheus.Gatherer, name string, labels map[string]string) (float64, bool) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	return findMetric(mfs, name, labels)
}

func findMetric(mfs []*dto.MetricFamily, name string, labels map[string]string) (float64, bool) {
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			have := map[string]string{}
			for _, lp := range m.GetLabel() {
				have[lp.GetName()] = lp.GetValue()
			}
			for k, v := range labels {
				if have[k] != v {
					continue metrics
				}
			}
			if m.Counter != nil {
				return m.GetCounter().GetValue(), true
			}
			return m.GetGauge().GetValue(), true
		}
	}
	return 0, false
}

// A scrape while Redis is down or hung still serves the process's other
// metrics, within the collector's timeout, and says the bus state is
// missing with conveyor_status_up 0.
func TestStatusCollectorWithoutRedis(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		cut  func(t *testing.T, r *embedded.Redis)
	}{
		{name: "stopped", cut: func(t *testing.T, r *embedded.Redis) {
			if err := r.Stop(t.Context()); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "hung", cut: func(t *testing.T, r *embedded.Redis) {
			pid := r.PID()
			if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
				t.Fatal(err)
			}
			// Before the server's own cleanup, which stops it.
			t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGCONT) })
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			off := false
			r := testenv.StartRedis(t, embedded.RedisConfig{AppendOnly: &off})
			// go-redis's default timeouts and retries, without
			// ContextTimeoutEnabled (cmd/conveyor sets it): the collector
			// must keep to its time even on such a client.
			opt, err := redis.ParseURL(r.URL())
			if err != nil {
				t.Fatal(err)
			}
			opt.DialTimeout = 3 * time.Second
			rdb := redis.NewClient(opt)
			t.Cleanup(func() { _ = rdb.Close() })
			topo := map[string][]string{"g": {"s"}}
			if err := bus.EnsureGroups(t.Context(), rdb, topo); err != nil {
				t.Fatal(err)
			}
			reg := prometheus.NewRegistry()
			other := prometheus.NewCounter(prometheus.CounterOpts{Name: "other_total", Help: "Another metric of the process."})
			other.Inc()
			reg.MustRegister(other, bus.NewStatusCollector(rdb, topo))
			if up, _ := gathered(t, reg, "conveyor_status_up", nil); up != 1 {
				t.Fatalf("conveyor_status_up = %v with Redis up, want 1", up)
			}

			tt.cut(t, r)
			start := time.Now()
			mfs, err := reg.Gather()
			took := time.Since(start)
			if err != nil {
				t.Fatalf("gather without Redis: %v", err)
			}
			if v, ok := findMetric(mfs, "other_total", nil); !ok || v != 1 {
				t.Errorf("other_total = %v (present %v), want 1", v, ok)
			}
			if up, ok := findMetric(mfs, "conveyor_status_up", nil); !ok || up != 0 {
				t.Errorf("conveyor_status_up = %v (present %v), want 0", up, ok)
			}
			if _, ok := findMetric(mfs, "conveyor_stream_length", nil); ok {
				t.Errorf("conveyor_stream_length served without Redis")
			}
			// The collector gives up after 2s; without a bound of its
			// own, a hung Redis holds the scrape for 10s.
			if took > 5*time.Second {
				t.Errorf("scrape took %v", took)
			}
		})
	}
}

// Entries dead-lettered before they are handed out (undecodable, or
// delivered too often) are counted as dead_lettered, once each.
func TestDeadLettersBeforeDeliveryAreCounted(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		// add puts the entry to dead-letter into f.topic.
		add func(t *testing.T, f *fixture)
	}{
		{name: "undecodable", add: func(t *testing.T, f *fixture) {
			if err := f.rdb.XAdd(t.Context(), &redis.XAddArgs{Stream: f.topic, Values: map[string]any{"foo": "bar"}}).Err(); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "delivered too often", add: func(t *testing.T, f *fixture) {
			// As in TestCrashLoopingEntryIsDeadLettered: three consumers
			// take it in turn and "crash".
			ctx := t.Context()
			f.publish(1)
			xs, err := f.rdb.XReadGroup(ctx, &redis.XReadGroupArgs{Group: f.group, Consumer: "crash-0", Streams: []string{f.topic, ">"}}).Result()
			if err != nil {
				t.Fatal(err)
			}
			for i := 1; i < 3; i++ {
				if err := f.rdb.XClaim(ctx, &redis.XClaimArgs{Stream: f.topic, Group: f.group, Consumer: fmt.Sprintf("crash-%d", i), Messages: []string{xs[0].Messages[0].ID}}).Err(); err != nil {
					t.Fatal(err)
				}
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t)
			if err := f.rdb.XGroupCreateMkStream(t.Context(), f.topic, f.group, "0").Err(); err != nil {
				t.Fatal(err)
			}
			tt.add(t, f)
			reg := prometheus.NewRegistry()
			m := bus.NewMetrics(reg)
			ch := f.subscribe(f.subscriber("alive", func(c *bus.SubscriberConfig) { c.Metrics, c.MaxDeliveries = m, 3 }))
			// A good entry behind it, to know the subscriber went past it.
			f.publish(1)
			receive(t, ch).Ack()
			dead := map[string]string{"consumer_group": f.group, "outcome": "dead_lettered"}
			eventually(t, "dead letter counted", func() bool { n, _ := gathered(t, reg, "conveyor_messages_finished_total", dead); return n >= 1 })
			eventually(t, "nothing pending", func() bool { return pendingCount(t, f.rdb, f.topic, f.group) == 0 })
			if n, _ := bus.NewDeadLetters(f.rdb).Count(t.Context(), f.group); n != 1 {
				t.Fatalf("%d dead letters, want 1", n)
			}
			if n, _ := gathered(t, reg, "conveyor_messages_finished_total", dead); n != 1 {
				t.Fatalf("conveyor_messages_finished_total{outcome=dead_lettered} = %v, want 1", n)
			}
		})
	}
}

// Inspect and the collector show a stream's delayed events, and those past
// their time that no scheduler moved yet; and the dead-letter cap.
func TestInspectDelayedEventsAndDeadLetterCap(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	prefix := testenv.Prefix(t)
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: f.rdb, StreamPrefix: prefix, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	stream := pub.Stream(events.TypeEmailRequested)
	topo := map[string][]string{f.group: {stream}}
	if err := bus.EnsureGroups(ctx, f.rdb, topo); err != nil {
		t.Fatal(err)
	}
	// Far enough ahead that the first look, before it, is not delayed past
	// it on a busy machine.
	soon := time.Now().Add(2 * time.Second)
	for _, at := range []time.Time{soon, time.Now().Add(time.Hour)} {
		ev := &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "s", Body: "b", RequestedAt: time.Now()}
		if _, err := pub.PublishAt(ctx, at, ev); err != nil {
			t.Fatal(err)
		}
	}
	delayed := func() (held, overdue int64) {
		t.Helper()
		st, err := bus.Inspect(ctx, f.rdb, topo)
		if err != nil {
			t.Fatal(err)
		}
		if st.DeadLetterCap != bus.DefaultDeadLetterMaxLen {
			t.Fatalf("DeadLetterCap = %d, want %d", st.DeadLetterCap, bus.DefaultDeadLetterMaxLen)
		}
		return st.Streams[0].Delayed, st.Streams[0].DelayedOverdue
	}
	if held, overdue := delayed(); held != 2 || overdue != 0 {
		t.Fatalf("before their time: %d delayed, %d overdue; want 2 and 0", held, overdue)
	}
	time.Sleep(time.Until(soon) + 10*time.Millisecond)
	if held, overdue := delayed(); held != 2 || overdue != 1 {
		t.Fatalf("one past its time: %d delayed, %d overdue; want 2 and 1", held, overdue)
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(bus.NewStatusCollector(f.rdb, topo))
	for _, tt := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{name: "conveyor_delayed_events", labels: map[string]string{"stream": stream}, want: 2},
		{name: "conveyor_delayed_events_overdue", labels: map[string]string{"stream": stream}, want: 1},
		{name: "conveyor_dead_letters_cap", labels: map[string]string{"consumer_group": f.group}, want: bus.DefaultDeadLetterMaxLen},
		{name: "conveyor_status_up", want: 1},
	} {
		if got, ok := gathered(t, reg, tt.name, tt.labels); !ok || got != tt.want {
			t.Errorf("%s%v = %v (present %v), want %v", tt.name, tt.labels, got, ok, tt.want)
		}
	}

	if m, err := bus.MoveDue(ctx, f.rdb, stream, 10); err != nil || m.N != 1 {
		t.Fatalf("MoveDue = %d, %v; want 1", m.N, err)
	}
	if held, overdue := delayed(); held != 1 || overdue != 0 {
		t.Fatalf("after MoveDue: %d delayed, %d overdue; want 1 and 0", held, overdue)
	}
}

// TestInspectShowsMissingAndUnlistedGroups: a group of the topology that
// Redis lacks (deleted) is marked missing, and a group Redis has that no
// role reads (retired, renamed: it keeps entries from being trimmed) is
// listed and marked.
func TestInspectShowsMissingAndUnlistedGroups(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	kept, deleted, legacy := f.group+"-kept", f.group+"-deleted", f.group+"-legacy"
	topo := map[string][]string{kept: {f.topic}, deleted: {f.topic}}
	if err := bus.EnsureGroups(ctx, f.rdb, topo); err != nil {
		t.Fatal(err)
	}
	if err := f.rdb.XGroupDestroy(ctx, f.topic, deleted).Err(); err != nil {
		t.Fatal(err)
	}
	if err := f.rdb.XGroupCreate(ctx, f.topic, legacy, "0").Err(); err != nil {
		t.Fatal(err)
	}
	st, err := bus.Inspect(ctx, f.rdb, topo)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bus.GroupStatus{}
	for _, s := range st.Streams {
		if s.Stream != f.topic {
			continue
		}
		for _, g := range s.Groups {
			got[g.Group] = g
		}
	}
	if g, ok := got[kept]; !ok || g.Missing || g.Unlisted {
		t.Errorf("%s: %+v (listed %v), want neither missing nor unlisted", kept, g, ok)
	}
	if g, ok := got[deleted]; !ok || !g.Missing {
		t.Errorf("%s: %+v (listed %v), want it marked missing", deleted, g, ok)
	}
	if g, ok := got[legacy]; !ok || !g.Unlisted || g.Missing {
		t.Errorf("%s: %+v (listed %v), want it listed and marked unlisted", legacy, g, ok)
	}
}
