package bus_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill-redisstream/pkg/redisstream"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/internal/testenv"
)

// fixture is one test's topic, group and Redis.
type fixture struct {
	t     *testing.T
	rdb   *redis.Client
	topic string
	group string
	pub   *bus.Publisher
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	return &fixture{t: t, rdb: rdb, topic: prefix + "topic", group: prefix + "g", pub: pub}
}

func (f *fixture) subscriber(consumer string, mod func(*bus.SubscriberConfig)) *bus.Subscriber {
	f.t.Helper()
	cfg := bus.SubscriberConfig{
		Client:        f.rdb,
		ConsumerGroup: f.group,
		Consumer:      consumer,
		BlockTime:     50 * time.Millisecond,
		ClaimMinIdle:  time.Second,
		Retry:         bus.RetryPolicy{MaxAttempts: 3, MinBackoff: 20 * time.Millisecond, MaxBackoff: 50 * time.Millisecond},
		DrainTimeout:  2 * time.Second,
		Logger:        testLogger(),
	}
	if mod != nil {
		mod(&cfg)
	}
	s, err := bus.NewSubscriber(cfg)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { _ = s.Close() })
	return s
}

func (f *fixture) publish(n int) []string {
	f.t.Helper()
	ids := make([]string, n)
	for i := range ids {
		msg := message.NewMessage(watermill.NewUUID(), []byte(strconv.Itoa(i)))
		if err := f.pub.Publish(f.topic, msg); err != nil {
			f.t.Fatal(err)
		}
		ids[i] = msg.UUID
	}
	return ids
}

func (f *fixture) subscribe(s *bus.Subscriber) <-chan *message.Message {
	f.t.Helper()
	ch, err := s.Subscribe(f.t.Context(), f.topic)
	if err != nil {
		f.t.Fatal(err)
	}
	return ch
}

// receive reads one message or fails after a generous bound (a liveness
// bound, not a timing assertion).
func receive(t *testing.T, ch <-chan *message.Message) *message.Message {
	t.Helper()
	select {
	case m, ok := <-ch:
		if !ok {
			t.Fatal("channel closed")
		}
		return m
	case <-time.After(30 * time.Second):
		t.Fatal("no message within 30s")
	}
	return nil
}

// eventually polls cond until it holds or 30s pass.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within 30s: %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func pendingCount(t *testing.T, rdb *redis.Client, stream, group string) int64 {
	t.Helper()
	p, err := rdb.XPending(context.Background(), stream, group).Result()
	if err != nil {
		t.Fatal(err)
	}
	return p.Count
}

func TestWireFormatCompatibleWithWatermillRedisstream(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	// Published by the stock watermill-redisstream publisher...
	stock, err := redisstream.NewPublisher(redisstream.PublisherConfig{Client: f.rdb}, watermill.NopLogger{})
	if err != nil {
		t.Fatal(err)
	}
	in := message.NewMessage(watermill.NewUUID(), []byte(`{"x":1}`))
	in.Metadata.Set("event_type", "thing.happened")
	in.Metadata.Set("correlation_id", "c-1")
	if err := stock.Publish(f.topic, in); err != nil {
		t.Fatal(err)
	}
	// ...is read by ours.
	ch := f.subscribe(f.subscriber("c1", nil))
	got := receive(t, ch)
	got.Ack()
	if got.UUID != in.UUID || string(got.Payload) != string(in.Payload) ||
		got.Metadata.Get("event_type") != "thing.happened" || got.Metadata.Get("correlation_id") != "c-1" {
		t.Fatalf("stock → ours: got %s %q %v", got.UUID, got.Payload, got.Metadata)
	}

	// Published by ours is decoded by the stock unmarshaller.
	out := message.NewMessage(watermill.NewUUID(), []byte("payload"))
	out.Metadata.Set("k", "v")
	if err := f.pub.Publish(f.topic+"-2", out); err != nil {
		t.Fatal(err)
	}
	xs, err := f.rdb.XRange(t.Context(), f.topic+"-2", "-", "+").Result()
	if err != nil || len(xs) != 1 {
		t.Fatalf("xrange: %v %v", xs, err)
	}
	dec, err := redisstream.DefaultMarshallerUnmarshaller{}.Unmarshal(xs[0].Values)
	if err != nil {
		t.Fatal(err)
	}
	if dec.UUID != out.UUID || string(dec.Payload) != "payload" || dec.Metadata.Get("k") != "v" {
		t.Fatalf("ours → stock: got %s %q %v", dec.UUID, dec.Payload, dec.Metadata)
	}
}

// A message that keeps failing is retried with backoff through the retry
// set while the messages behind it are processed, then dead-lettered with
// its error and attempt count.
func TestFailingMessageRetriesWithoutBlockingThenDeadLetters(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ch := f.subscribe(f.subscriber("c1", func(c *bus.SubscriberConfig) { c.MaxInFlight = 4 }))
	ids := f.publish(20)
	poison := ids[0]

	okSeen := map[string]bool{}
	var attempts []string
	for len(okSeen) < 19 || len(attempts) < 3 {
		m := receive(t, ch)
		if m.UUID == poison {
			attempts = append(attempts, m.Metadata.Get(bus.MetaAttempt))
			bus.RecordFailure(m, errors.New("boom"))
			m.Nack()
			continue
		}
		okSeen[m.UUID] = true
		m.Ack()
	}
	if fmt.Sprint(attempts) != "[ 2 3]" {
		t.Fatalf("attempt metadata = %q, want first attempt unset, then 2 and 3", attempts)
	}
	dl := bus.NewDeadLetters(f.rdb)
	eventually(t, "poison message dead-lettered", func() bool {
		n, _ := dl.Count(t.Context(), f.group)
		return n == 1
	})
	list, err := dl.List(t.Context(), f.group, "", 10)
	if err != nil {
		t.Fatal(err)
	}
	d := list[0]
	if d.EventID != poison || d.Error != "boom" || d.Attempts != 3 || d.Stream != f.topic || d.FirstFailedAt.IsZero() {
		t.Fatalf("dead letter = %+v", d)
	}
	eventually(t, "nothing pending", func() bool {
		return pendingCount(t, f.rdb, f.topic, f.group) == 0 &&
			pendingCount(t, f.rdb, bus.RetryStream(f.topic, f.group), f.group) == 0
	})
}

func TestPermanentErrorDeadLettersAtOnce(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ch := f.subscribe(f.subscriber("c1", nil))
	id := f.publish(1)[0]
	m := receive(t, ch)
	bus.RecordFailure(m, bus.Permanent(errors.New("bad input")))
	m.Nack()
	dl := bus.NewDeadLetters(f.rdb)
	eventually(t, "dead-lettered", func() bool { n, _ := dl.Count(t.Context(), f.group); return n == 1 })
	list, _ := dl.List(t.Context(), f.group, "", 1)
	if list[0].EventID != id || list[0].Attempts != 1 {
		t.Fatalf("dead letter = %+v", list[0])
	}
	select {
	case m := <-ch:
		t.Fatalf("permanent failure was redelivered: %s", m.UUID)
	case <-time.After(300 * time.Millisecond):
	}
}

// failFirstXAck fails, without sending them, the first pipelines holding
// an XACK once the group's dead-letter stream has an entry: more than
// writeDeadLetter's own quick tries.
type failFirstXAck struct {
	rdb    *redis.Client
	dlq    string
	failed atomic.Int32
}

func (h *failFirstXAck) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (h *failFirstXAck) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (h *failFirstXAck) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, c := range cmds {
			if strings.EqualFold(c.Name(), "xack") && h.failed.Load() < 5 {
				if n, _ := h.rdb.XLen(ctx, h.dlq).Result(); n > 0 && h.failed.Add(1) <= 5 {
					err := errors.New("connection lost (injected)")
					for _, c := range cmds {
						c.SetErr(err)
					}
					return err
				}
			}
		}
		return next(ctx, cmds)
	}
}

// A dead letter written whose acknowledgement failed is not written again:
// only the acknowledgement is retried.
func TestDeadLetterAckRetriedAlone(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	hook := &failFirstXAck{rdb: f.rdb, dlq: bus.DeadLetterStream(f.group)}
	ch := f.subscribe(f.subscriber("c1", func(c *bus.SubscriberConfig) { c.Client = hookedClient(t, f, hook) }))
	f.publish(1)
	m := receive(t, ch)
	bus.RecordFailure(m, bus.Permanent(errors.New("bad input")))
	m.Nack()
	eventually(t, "acknowledged", func() bool {
		return hook.failed.Load() >= 5 && pendingCount(t, f.rdb, f.topic, f.group) == 0
	})
	if n, err := bus.NewDeadLetters(f.rdb).Count(t.Context(), f.group); err != nil || n != 1 {
		t.Fatalf("%d dead letters (%v), want the one", n, err)
	}
}

// Entries that cannot be decoded go to the dead-letter stream with all
// their fields, and the entries behind them still arrive.
func TestUndecodableEntriesAreDeadLetteredAndDoNotStall(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ch := f.subscribe(f.subscriber("c1", nil))
	ctx := t.Context()
	garbage := []map[string]any{
		{"foo": "bar"},
		{"_watermill_message_uuid": "x", "metadata": "\xff\x00garbage"},
		{"_watermill_message_uuid": ""},
	}
	for _, g := range garbage {
		if err := f.rdb.XAdd(ctx, &redis.XAddArgs{Stream: f.topic, Values: g}).Err(); err != nil {
			t.Fatal(err)
		}
	}
	ids := f.publish(5)
	for range ids {
		receive(t, ch).Ack()
	}
	dl := bus.NewDeadLetters(f.rdb)
	eventually(t, "3 dead letters", func() bool { n, _ := dl.Count(ctx, f.group); return n == 3 })
	list, _ := dl.List(ctx, f.group, "", 10)
	if list[0].Raw["foo"] != "bar" || list[0].Error == "" {
		t.Fatalf("first dead letter = %+v", list[0])
	}
	// Fields are kept byte for byte, UTF-8 or not.
	if got := list[1].Raw["metadata"]; got != "\xff\x00garbage" {
		t.Fatalf("second dead letter's metadata field = %q, want the bytes as written", got)
	}
	eventually(t, "nothing pending", func() bool { return pendingCount(t, f.rdb, f.topic, f.group) == 0 })
}

// An entry is acknowledged only once its dead letter is written: when the
// dead-letter stream refuses the write (here a key of another type; out of
// memory under maxmemory is the common case), the entry stays pending, for
// the claim loop to bring back, and the entries after it still flow.
func TestDeadLetterRefusedKeepsTheEntryPending(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	if err := f.rdb.Set(ctx, bus.DeadLetterStream(f.group), "not a stream", 0).Err(); err != nil {
		t.Fatal(err)
	}
	ch := f.subscribe(f.subscriber("c1", nil))
	bad, err := f.rdb.XAdd(ctx, &redis.XAddArgs{Stream: f.topic, Values: map[string]any{"foo": "bar"}}).Result()
	if err != nil {
		t.Fatal(err)
	}
	f.publish(1)
	// Entries are handed out in order: once the next one arrives, the
	// dead letter of the undecodable one was tried.
	receive(t, ch).Ack()
	p, err := f.rdb.XPendingExt(ctx, &redis.XPendingExtArgs{Stream: f.topic, Group: f.group, Start: bad, End: bad, Count: 1}).Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(p) != 1 {
		t.Fatalf("undecodable entry %s is not pending although its dead letter was refused", bad)
	}
}

// Between two beats an entry's idle time reaches 1.5×HeartbeatInterval
// (the heartbeat looks every HeartbeatInterval/2 for entries idle that
// long): a HeartbeatInterval that lets it reach ClaimMinIdle is refused.
func TestHeartbeatMustBeatTheClaim(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	for _, tt := range []struct {
		beat time.Duration
		ok   bool
	}{{6 * time.Second, true}, {7 * time.Second, false}, {10 * time.Second, false}} {
		s, err := bus.NewSubscriber(bus.SubscriberConfig{Client: rdb, ConsumerGroup: "g", Consumer: "c",
			ClaimMinIdle: 10 * time.Second, HeartbeatInterval: tt.beat, Logger: testLogger()})
		if err == nil {
			_ = s.Close()
		}
		if (err == nil) != tt.ok || (err != nil && !strings.Contains(err.Error(), "HeartbeatInterval")) {
			t.Errorf("HeartbeatInterval %s with ClaimMinIdle 10s: %v, want accepted %v", tt.beat, err, tt.ok)
		}
	}
}

// Entries a crashed consumer held are claimed by a live one after
// ClaimMinIdle, not after minutes.
func TestEntriesOfADeadConsumerAreClaimed(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	if err := f.rdb.XGroupCreateMkStream(ctx, f.topic, f.group, "0").Err(); err != nil {
		t.Fatal(err)
	}
	ids := f.publish(10)
	// "dead" reads everything and never acks: a kill -9 after the read.
	if err := f.rdb.XReadGroup(ctx, &redis.XReadGroupArgs{Group: f.group, Consumer: "dead", Streams: []string{f.topic, ">"}, Count: 100}).Err(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	ch := f.subscribe(f.subscriber("alive", nil))
	got := map[string]bool{}
	for len(got) < len(ids) {
		m := receive(t, ch)
		got[m.UUID] = true
		m.Ack()
	}
	t.Logf("recovered %d entries of a dead consumer in %s (ClaimMinIdle 1s)", len(ids), time.Since(start))
	eventually(t, "nothing pending", func() bool { return pendingCount(t, f.rdb, f.topic, f.group) == 0 })
}

// A restarted consumer (same name) re-reads its own pending entries at once.
func TestRestartedConsumerRereadsItsPendingEntries(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ids := f.publish(3)
	s1 := f.subscriber("stable", func(c *bus.SubscriberConfig) {
		c.DrainTimeout = 100 * time.Millisecond
		c.ClaimMinIdle = time.Hour
		c.HeartbeatInterval = time.Minute
	})
	ch := f.subscribe(s1)
	held := receive(t, ch) // handed out, never acked
	if err := s1.Close(); err != nil {
		t.Fatal(err)
	}
	if held.Context().Err() == nil {
		t.Fatal("message context not cancelled by Close after the drain timeout")
	}
	// ClaimMinIdle is an hour: only the own-pending read can bring it back.
	ch2 := f.subscribe(f.subscriber("stable", func(c *bus.SubscriberConfig) { c.ClaimMinIdle = time.Hour; c.HeartbeatInterval = time.Minute }))
	got := map[string]bool{}
	for len(got) < len(ids) {
		m := receive(t, ch2)
		got[m.UUID] = true
		m.Ack()
	}
	if !got[held.UUID] {
		t.Fatal("held message not redelivered")
	}
}

// A job slower than ClaimMinIdle is kept by heartbeats: another live
// consumer never gets it, so it runs once.
func TestHeartbeatKeepsSlowJobFromBeingStolen(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	// Heartbeats every ClaimMinIdle/3 keep the entry's idle time under a
	// second, so b could claim the job only if a's heartbeat stalled for
	// another second. b looks for idle entries every 100 ms: it would
	// claim the job soon after it went idle.
	const minIdle = 2 * time.Second
	fast := func(c *bus.SubscriberConfig) {
		c.ClaimMinIdle = minIdle
		c.ClaimInterval = 100 * time.Millisecond
	}
	a := f.subscribe(f.subscriber("a", fast))
	f.publish(1)
	m := receive(t, a)
	b := f.subscribe(f.subscriber("b", fast))
	select {
	case stolen := <-b:
		t.Fatalf("slow job stolen by b: %s", stolen.UUID)
	case <-time.After(3 * minIdle):
	}
	m.Ack()
	eventually(t, "acked", func() bool { return pendingCount(t, f.rdb, f.topic, f.group) == 0 })
}

// An entry whose consumer crashes every time (delivered over and over,
// never acked) is dead-lettered instead of crashing replicas forever.
func TestCrashLoopingEntryIsDeadLettered(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	if err := f.rdb.XGroupCreateMkStream(ctx, f.topic, f.group, "0").Err(); err != nil {
		t.Fatal(err)
	}
	id := f.publish(1)[0]
	// Three consumers take it in turn and "crash".
	xs, err := f.rdb.XReadGroup(ctx, &redis.XReadGroupArgs{Group: f.group, Consumer: "crash-0", Streams: []string{f.topic, ">"}}).Result()
	if err != nil {
		t.Fatal(err)
	}
	entry := xs[0].Messages[0].ID
	for i := 1; i < 3; i++ {
		if err := f.rdb.XClaim(ctx, &redis.XClaimArgs{Stream: f.topic, Group: f.group, Consumer: fmt.Sprintf("crash-%d", i), Messages: []string{entry}}).Err(); err != nil {
			t.Fatal(err)
		}
	}
	ch := f.subscribe(f.subscriber("alive", func(c *bus.SubscriberConfig) { c.MaxDeliveries = 3 }))
	dl := bus.NewDeadLetters(f.rdb)
	eventually(t, "crash-looping entry dead-lettered", func() bool { n, _ := dl.Count(ctx, f.group); return n == 1 })
	list, _ := dl.List(ctx, f.group, "", 1)
	if list[0].EventID != id {
		t.Fatalf("dead letter = %+v", list[0])
	}
	select {
	case m := <-ch:
		t.Fatalf("crash-looping entry delivered: %s", m.UUID)
	case <-time.After(200 * time.Millisecond):
	}
}

// A lost group (Redis restarted empty, or deleted) is re-created and
// consumption goes on.
func TestLostGroupIsRecreated(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	ch := f.subscribe(f.subscriber("c1", nil))
	f.publish(1)
	receive(t, ch).Ack()
	if err := f.rdb.Del(ctx, f.topic, bus.RetryStream(f.topic, f.group)).Err(); err != nil {
		t.Fatal(err)
	}
	eventually(t, "group re-created", func() bool {
		groups, err := f.rdb.XInfoGroups(ctx, f.topic).Result()
		return err == nil && len(groups) == 1
	})
	ids := f.publish(2)
	got := map[string]bool{}
	for len(got) < 2 {
		m := receive(t, ch)
		got[m.UUID] = true
		m.Ack()
	}
	if !got[ids[0]] || !got[ids[1]] {
		t.Fatalf("got %v, want %v", got, ids)
	}
}

// Close lets a running handler finish, flushes its ack, and only then
// returns: nothing is left pending and nothing is redelivered.
func TestCloseWaitsForRunningHandlersAndFlushesAcks(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	s := f.subscriber("c1", func(c *bus.SubscriberConfig) { c.MaxInFlight = 8 })
	ch := f.subscribe(s)
	f.publish(8)
	var msgs []*message.Message
	for i := 0; i < 8; i++ {
		msgs = append(msgs, receive(t, ch))
	}
	var acked atomic.Int32
	var wg sync.WaitGroup
	for _, m := range msgs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(300 * time.Millisecond) // still working when Close starts
			if m.Context().Err() != nil {
				t.Error("handler context cancelled before the drain timeout")
			}
			m.Ack()
			acked.Add(1)
		}()
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if acked.Load() != 8 {
		t.Fatalf("acked %d", acked.Load())
	}
	if n := pendingCount(t, f.rdb, f.topic, f.group); n != 0 {
		t.Fatalf("%d entries still pending after Close: acks were dropped", n)
	}
}

func TestDeadLetterReplayAndPurge(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	var fail atomic.Bool
	fail.Store(true)
	ch := f.subscribe(f.subscriber("c1", nil))
	ids := f.publish(3)
	dl := bus.NewDeadLetters(f.rdb)
	go func() {
		for m := range ch {
			if fail.Load() {
				bus.RecordFailure(m, bus.Permanent(errors.New("not yet")))
				m.Nack()
			} else {
				m.Ack()
			}
		}
	}()
	eventually(t, "3 dead letters", func() bool { n, _ := dl.Count(ctx, f.group); return n == 3 })
	list, err := dl.List(ctx, f.group, "", 10)
	if err != nil {
		t.Fatal(err)
	}
	// Workers fail the three concurrently, so they are dead-lettered in
	// any order; each must be there once.
	var listed []string
	for _, d := range list {
		listed = append(listed, d.EventID)
	}
	if !slices.Equal(slices.Sorted(slices.Values(listed)), slices.Sorted(slices.Values(ids))) {
		t.Fatalf("dead letters of %v, want %v", listed, ids)
	}
	one, err := dl.Get(ctx, f.group, list[0].ID)
	if err != nil || one.EventID != list[0].EventID || one.Error != "not yet" {
		t.Fatalf("get: %+v %v", one, err)
	}
	if _, err := dl.Get(ctx, f.group, "0-1"); !errors.Is(err, bus.ErrDeadLetterNotFound) {
		t.Fatalf("get unknown: %v", err)
	}
	groups, err := dl.Groups(ctx)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, g := range groups {
		found = found || g == f.group
	}
	if !found {
		t.Fatalf("Groups() = %v lacks %s", groups, f.group)
	}

	fail.Store(false)
	n, err := dl.Replay(ctx, f.group, list[0].ID, list[1].ID)
	if err != nil || n != 2 {
		t.Fatalf("replay: %d %v", n, err)
	}
	eventually(t, "replayed entries processed", func() bool {
		return pendingCount(t, f.rdb, bus.RetryStream(f.topic, f.group), f.group) == 0 && func() bool {
			n, _ := dl.Count(ctx, f.group)
			return n == 1
		}()
	})
	n, err = dl.Purge(ctx, f.group)
	if err != nil || n != 1 {
		t.Fatalf("purge: %d %v", n, err)
	}
	if c, _ := dl.Count(ctx, f.group); c != 0 {
		t.Fatalf("%d dead letters left after purge", c)
	}
}

// TestKilledConnectionsLoseNothing kills the subscriber's connections to
// Redis (its own read connection and the pool's) again and again while
// entries flow: every entry is still handled, and none stays pending.
func TestKilledConnectionsLoseNothing(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	opt := f.rdb.Options()
	named := *opt
	named.ClientName = strings.ReplaceAll(f.group, ":", "-")
	client := redis.NewClient(&named)
	t.Cleanup(func() { _ = client.Close() })
	s := f.subscriber("c1", func(c *bus.SubscriberConfig) {
		c.Client = client
		c.BatchSize = 10
		c.MaxInFlight = 16
	})
	ch := f.subscribe(s)
	const n = 3000
	want := map[string]bool{}
	for _, id := range f.publish(n) {
		want[id] = true
	}
	ctx, stop := context.WithCancel(t.Context())
	killed := make(chan int, 1)
	go func() {
		kills := 0
		defer func() { killed <- kills }()
		for ctx.Err() == nil {
			time.Sleep(15 * time.Millisecond)
			list, err := f.rdb.ClientList(ctx).Result()
			if err != nil {
				continue
			}
			for _, l := range strings.Split(list, "\n") {
				id, ok := strings.CutPrefix(strings.Fields(l + " x")[0], "id=")
				if ok && strings.Contains(l, " name="+named.ClientName+" ") {
					if f.rdb.Do(ctx, "CLIENT", "KILL", "ID", id).Err() == nil {
						kills++
					}
				}
			}
		}
	}()
	got := map[string]bool{}
	for len(got) < n {
		m := receive(t, ch)
		got[m.UUID] = true
		m.Ack()
	}
	stop()
	k := <-killed
	if k < 3 {
		t.Fatalf("only %d connections killed while %d entries were handled; the test proves little", k, n)
	}
	for id := range want {
		if !got[id] {
			t.Fatalf("entry %s never handled", id)
		}
	}
	t.Logf("%d connections killed", k)
	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Close still waiting after 30s: a delivery was never finished (an ack lost?)")
	}
	if p := pendingCount(t, f.rdb, f.topic, f.group); p != 0 {
		t.Fatalf("%d entries still pending after Close", p)
	}
}

// pendingOf is how many entries of stream consumer holds in group.
func pendingOf(t *testing.T, rdb *redis.Client, stream, group, consumer string) int {
	t.Helper()
	p, err := rdb.XPending(context.Background(), stream, group).Result()
	if err != nil {
		t.Fatal(err)
	}
	return int(p.Consumers[consumer])
}

// handOver starts a second replica, b, which must get the n entries a did
// not read, then acks the messages a held.
func handOver(t *testing.T, f *fixture, n int, held []*message.Message) {
	t.Helper()
	b := f.subscribe(f.subscriber("b", nil))
	for range n {
		receive(t, b).Ack()
	}
	for _, m := range held {
		m.Ack()
	}
}

// work handles n messages of ch, each taking d.
func work(t *testing.T, ch <-chan *message.Message, n int, d time.Duration) {
	t.Helper()
	for range n {
		m := receive(t, ch)
		time.Sleep(d)
		m.Ack()
	}
}

// A replica whose handlers are busy with slow jobs reads nothing past its
// window: the entries behind them go to an idle replica at once.
func TestSlowJobsReadNothingAhead(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	small := func(c *bus.SubscriberConfig) { c.MaxInFlight, c.BatchSize = 2, 10 }
	a := f.subscribe(f.subscriber("a", small))
	ids := f.publish(20)
	held := []*message.Message{receive(t, a), receive(t, a)}
	time.Sleep(300 * time.Millisecond) // many pace samples and block times
	if n := pendingOf(t, f.rdb, f.topic, f.group, "a"); n != 2 {
		t.Fatalf("a holds %d entries with 2 slow jobs in a window of 2, want 2: it read ahead behind slow jobs", n)
	}
	handOver(t, f, len(ids)-len(held), held)
	eventually(t, "nothing pending", func() bool { return pendingCount(t, f.rdb, f.topic, f.group) == 0 })
}

// Fast handlers read ahead at most two batches past the window (one per read
// lane); when the jobs turn slow, the replica stops reading, and the rest
// goes to another one.
func TestReadAheadStopsWhenJobsTurnSlow(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ahead := func(c *bus.SubscriberConfig) {
		c.MaxInFlight, c.BatchSize = 2, 10
		c.ReadAhead = time.Second // a fast pace reads two whole batches ahead
	}
	a := f.subscribe(f.subscriber("a", ahead))
	ids := f.publish(200)
	// About 1ms a job for 100 jobs: many pace samples of about 1,000/s,
	// so a read-ahead of min(2×BatchSize, 1,000/s × 1s) = 20.
	work(t, a, 100, time.Millisecond)
	held := []*message.Message{receive(t, a), receive(t, a)}
	time.Sleep(300 * time.Millisecond)
	n := pendingOf(t, f.rdb, f.topic, f.group, "a")
	if n <= 2 || n > 2+20 {
		t.Fatalf("a holds %d entries with 2 slow jobs, want 3 to 22 (the window and up to two batches read ahead while the jobs were fast)", n)
	}
	time.Sleep(200 * time.Millisecond)
	if again := pendingOf(t, f.rdb, f.topic, f.group, "a"); again != n {
		t.Fatalf("a went on reading while its jobs were stuck: it held %d, then %d", n, again)
	}
	t.Logf("a read %d entries ahead before its jobs turned slow", n-2)
	handOver(t, f, len(ids)-100-n, held)
	for range n - 2 {
		receive(t, a).Ack()
	}
	eventually(t, "nothing pending", func() bool { return pendingCount(t, f.rdb, f.topic, f.group) == 0 })
}

// When jobs that were fast turn slow but still finish, the read-ahead
// falls with their pace: once what was read ahead is worked off, the
// replica holds only its window again.
func TestReadAheadFallsWhenJobsSlowDown(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ahead := func(c *bus.SubscriberConfig) {
		c.MaxInFlight, c.BatchSize = 2, 10
		// About 1,000 jobs/s read 20 ahead (1,000/s × 20ms, and the cap
		// of 2×BatchSize); one job in 60ms reads nothing ahead (17/s ×
		// 20ms < 1).
		c.ReadAhead = 20 * time.Millisecond
	}
	a := f.subscribe(f.subscriber("a", ahead))
	f.publish(200)
	work(t, a, 100, time.Millisecond)
	work(t, a, 25, 60*time.Millisecond) // more than what was read ahead
	held := []*message.Message{receive(t, a), receive(t, a)}
	time.Sleep(300 * time.Millisecond)
	if n := pendingOf(t, f.rdb, f.topic, f.group, "a"); n != 2 {
		t.Fatalf("a holds %d entries with 2 slow jobs after its jobs slowed down, want 2: the read-ahead did not fall with the pace", n)
	}
	for _, m := range held {
		m.Ack()
	}
	for range 200 - 100 - 25 - len(held) {
		receive(t, a).Ack()
	}
	eventually(t, "nothing pending", func() bool { return pendingCount(t, f.rdb, f.topic, f.group) == 0 })
}

// Close hands back what a replica read ahead and never handed out: the
// other replicas can claim it at once, not after ClaimMinIdle, which is
// an hour here. The entries whose handlers were still at work at the
// drain timeout are not handed back early.
func TestCloseHandsBackWhatItReadAhead(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	slowClaims := func(c *bus.SubscriberConfig) {
		c.ClaimMinIdle = time.Hour
		c.ClaimInterval = 50 * time.Millisecond
		c.HeartbeatInterval = time.Minute
	}
	aSub := f.subscriber("a", func(c *bus.SubscriberConfig) {
		slowClaims(c)
		c.MaxInFlight, c.BatchSize = 2, 10
		c.ReadAhead = time.Second // a fast pace reads two whole batches ahead
		c.DrainTimeout = 100 * time.Millisecond
	})
	a := f.subscribe(aSub)
	f.publish(200)
	// Fast jobs until a holds at least three entries read ahead (a busy
	// machine can leave it with fewer at a given moment), so that some
	// are still read ahead once two are held. The acks of the jobs done
	// are written within a millisecond: then a's pending entries are
	// those it read ahead.
	worked := 0
	readAhead := func() int {
		time.Sleep(5 * time.Millisecond)
		return pendingOf(t, f.rdb, f.topic, f.group, "a")
	}
	for worked < 100 || readAhead() < 3 {
		if worked >= 150 {
			t.Fatalf("after %d fast jobs a holds %d entries: it never read ahead", worked, pendingOf(t, f.rdb, f.topic, f.group, "a"))
		}
		work(t, a, 10, time.Millisecond)
		worked += 10
	}
	held := []*message.Message{receive(t, a), receive(t, a)} // never acked
	time.Sleep(300 * time.Millisecond)
	n := pendingOf(t, f.rdb, f.topic, f.group, "a")
	if n <= len(held) {
		t.Fatalf("a holds %d entries, want more than the %d it handed out: nothing was read ahead to hand back", n, len(held))
	}
	if err := aSub.Close(); err != nil {
		t.Fatal(err)
	}
	back, kept := claimableNow(t, f.rdb, f.topic, f.group, "a", time.Hour)
	if back != n-len(held) || kept != len(held) {
		t.Fatalf("after Close, %d entries claimable and %d not; want the %d read ahead claimable and the %d held not",
			back, kept, n-len(held), len(held))
	}
	// b claims the handed-back entries at once (its ClaimMinIdle is an hour
	// too) and reads the rest.
	b := f.subscribe(f.subscriber("b", slowClaims))
	for range 200 - worked - len(held) {
		receive(t, b).Ack()
	}
	eventually(t, "only the held entries pending", func() bool { return pendingCount(t, f.rdb, f.topic, f.group) == int64(len(held)) })
	if got := pendingOf(t, f.rdb, f.topic, f.group, "a"); got != len(held) {
		t.Fatalf("a holds %d entries, want the %d whose handlers were at work", got, len(held))
	}
}

// claimableNow splits consumer's pending entries on stream into those idle
// for at least minIdle (claimable now by a replica with that ClaimMinIdle)
// and those idle for less than a minute, failing t for any other. The
// entries claimable must have been delivered once: a hand-back leaves the
// delivery counts alone.
func claimableNow(t *testing.T, rdb *redis.Client, stream, group, consumer string, minIdle time.Duration) (claimable, recent int) {
	t.Helper()
	pending, err := rdb.XPendingExt(t.Context(), &redis.XPendingExtArgs{
		Stream: stream, Group: group, Start: "-", End: "+", Count: 1000, Consumer: consumer,
	}).Result()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pending {
		switch {
		case p.Idle >= minIdle:
			claimable++
			if p.RetryCount != 1 {
				t.Errorf("entry %s claimable with delivery count %d, want 1: it was never handed out", p.ID, p.RetryCount)
			}
		case p.Idle < time.Minute:
			recent++
		default:
			t.Errorf("entry %s idle for %s", p.ID, p.Idle)
		}
	}
	return claimable, recent
}
