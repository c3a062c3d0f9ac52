package bus_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
)

// onceBefore runs run once, right before the first command of the
// client it hooks that match selects: a change made by another client
// between two commands of the code under test.
type onceBefore struct {
	match func(redis.Cmder) bool
	run   func(ctx context.Context) error
	fired atomic.Bool
	err   error
}

func (h *onceBefore) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *onceBefore) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}
func (h *onceBefore) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if h.match(cmd) && h.fired.CompareAndSwap(false, true) {
			h.err = h.run(ctx)
		}
		return next(ctx, cmd)
	}
}

// hookedClient returns a client of the fixture's Redis with hook.
func hookedClient(t *testing.T, f *fixture, hook redis.Hook) *redis.Client {
	opt := *f.rdb.Options()
	c := redis.NewClient(&opt)
	t.Cleanup(func() { _ = c.Close() })
	c.AddHook(hook)
	return c
}

// readAsGroup reads up to n new entries of the fixture's topic for group.
func readAsGroup(t *testing.T, f *fixture, group string, n int64) []redis.XMessage {
	t.Helper()
	xs, err := f.rdb.XReadGroup(t.Context(), &redis.XReadGroupArgs{Group: group, Consumer: "c", Streams: []string{f.topic, ">"}, Count: n}).Result()
	if err != nil {
		t.Fatal(err)
	}
	return xs[0].Messages
}

// A group that acknowledges all it holds between the pass's look at the
// groups and its look at that group's pending entries has no oldest
// pending entry; the pass must still keep what the other groups need.
// (It used to take that as no limit at all, and the next group's mark as
// the only one: the stream was trimmed to nothing.)
func TestRetentionGroupDrainingDuringThePass(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	slow, draining, done := f.group+"-a", f.group+"-b", f.group+"-c"
	topo := groupsOnTopic(t, f, slow, draining, done)
	f.publish(3000)
	read := func(group string, n int64) []redis.XMessage { return readAsGroup(t, f, group, n) }
	slowMsgs := read(slow, 100) // 100 pending, 2900 unread
	read(draining, 10)          // 10 pending, acknowledged during the pass
	for _, m := range read(done, 3000) {
		if err := f.rdb.XAck(ctx, f.topic, done, m.ID).Err(); err != nil {
			t.Fatal(err)
		}
	}
	// Right before the pass's XPENDING of the draining group, the group
	// acknowledges what it holds (through the fixture's client).
	hook := &onceBefore{
		match: func(cmd redis.Cmder) bool {
			a := cmd.Args()
			return strings.EqualFold(cmd.Name(), "xpending") && len(a) == 3 && a[2] == draining
		},
		run: func(ctx context.Context) error {
			p, err := f.rdb.XPendingExt(ctx, &redis.XPendingExtArgs{Stream: f.topic, Group: draining, Start: "-", End: "+", Count: 10_000}).Result()
			for _, e := range p {
				err = errors.Join(err, f.rdb.XAck(ctx, f.topic, draining, e.ID).Err())
			}
			return err
		},
	}
	ret, err := bus.NewRetention(bus.RetentionConfig{Client: hookedClient(t, f, hook), Topology: topo, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ret.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	if !hook.fired.Load() || hook.err != nil {
		t.Fatalf("the group did not drain during the pass (fired %v, %v)", hook.fired.Load(), hook.err)
	}
	if n, err := f.rdb.XLen(ctx, f.topic).Result(); err != nil || n != 3000 {
		// Only what every group is past may go: the slow group holds
		// the very first entry.
		t.Fatalf("stream holds %d entries (%v); the slow group still needs all 3000", n, err)
	}
	kept, err := f.rdb.XRange(ctx, f.topic, slowMsgs[0].ID, slowMsgs[0].ID).Result()
	if err != nil || len(kept) != 1 {
		t.Fatalf("the slow group's first pending entry %s was trimmed (%v)", slowMsgs[0].ID, err)
	}
}

// Entries are trimmed only once every group is past them: a slow group
// keeps what it has not read or not acknowledged.
func TestRetentionTrimsOnlyWhatEveryGroupAcknowledged(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	fast, slow := f.group+"-fast", f.group+"-slow"
	topo := groupsOnTopic(t, f, fast, slow)
	f.publish(3000)
	read := func(group string, n int64) []redis.XMessage { return readAsGroup(t, f, group, n) }
	ack := func(group string, msgs []redis.XMessage) { ackAs(t, f, group, msgs) }
	ack(fast, read(fast, 3000))
	slowMsgs := read(slow, 2000)
	ack(slow, slowMsgs[:1000]) // 1000 acked, 1000 pending, 1000 unread
	ret, err := bus.NewRetention(bus.RetentionConfig{Client: f.rdb, Topology: topo, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ret.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	kept, err := f.rdb.XRange(ctx, f.topic, slowMsgs[1000].ID, slowMsgs[1000].ID).Result()
	if err != nil || len(kept) != 1 {
		t.Fatalf("the slow group's first pending entry %s was trimmed (%v)", slowMsgs[1000].ID, err)
	}
	n, _ := f.rdb.XLen(ctx, f.topic).Result()
	if n < 2000 {
		t.Fatalf("stream holds %d entries; the slow group still needs 2000", n)
	}
	if n == 3000 {
		t.Fatal("nothing was trimmed although 1000 entries were acknowledged by every group")
	}
	// Once the slow group is done, (nearly) everything goes: approximate
	// trimming keeps at most a partial node.
	ack(slow, slowMsgs[1000:])
	ack(slow, read(slow, 1000))
	if _, err := ret.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	if n, _ := f.rdb.XLen(ctx, f.topic).Result(); n > 200 {
		t.Fatalf("%d entries left after every group acknowledged everything", n)
	}
}

// oneGroupOneEntry is a fixture whose topic has one group and one entry.
func oneGroupOneEntry(t *testing.T) (*fixture, map[string][]string) {
	f := newFixture(t)
	topo := map[string][]string{f.group: {f.topic}}
	if err := bus.EnsureGroups(t.Context(), f.rdb, topo); err != nil {
		t.Fatal(err)
	}
	f.publish(1)
	return f, topo
}

func TestRetentionRemovesGoneConsumersOnly(t *testing.T) {
	t.Parallel()
	f, topo := oneGroupOneEntry(t)
	ctx := t.Context()
	// "holder" keeps a pending entry; "idle" has none.
	if err := f.rdb.XReadGroup(ctx, &redis.XReadGroupArgs{Group: f.group, Consumer: "holder", Streams: []string{f.topic, ">"}}).Err(); err != nil {
		t.Fatal(err)
	}
	if err := f.rdb.XGroupCreateConsumer(ctx, f.topic, f.group, "idle").Err(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // let both be idle longer than ConsumerIdle
	ret, _ := bus.NewRetention(bus.RetentionConfig{Client: f.rdb, Topology: topo, ConsumerIdle: 10 * time.Millisecond, Logger: testLogger()})
	if _, err := ret.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	cs, err := f.rdb.XInfoConsumers(ctx, f.topic, f.group).Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(cs) != 1 || cs[0].Name != "holder" {
		t.Fatalf("consumers after the pass: %+v (want only holder, which has a pending entry)", cs)
	}
}

// A consumer that looked gone but read an entry just before its removal
// (a replica back under its name) keeps it: its pending entries would be
// lost with it.
func TestRetentionKeepsAConsumerThatCameBack(t *testing.T) {
	t.Parallel()
	f, topo := oneGroupOneEntry(t)
	ctx := t.Context()
	if err := f.rdb.XGroupCreateConsumer(ctx, f.topic, f.group, "back").Err(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // idle longer than ConsumerIdle
	// Right before the pass's command that removes it (a script, or a
	// plain XGROUP DELCONSUMER), the consumer reads an entry.
	hook := &onceBefore{
		match: func(cmd redis.Cmder) bool {
			name := strings.ToLower(cmd.Name())
			return name == "evalsha" || name == "eval" ||
				name == "xgroup" && len(cmd.Args()) > 1 && strings.EqualFold(fmt.Sprint(cmd.Args()[1]), "delconsumer")
		},
		run: func(ctx context.Context) error {
			return f.rdb.XReadGroup(ctx, &redis.XReadGroupArgs{Group: f.group, Consumer: "back", Streams: []string{f.topic, ">"}}).Err()
		},
	}
	ret, err := bus.NewRetention(bus.RetentionConfig{Client: hookedClient(t, f, hook), Topology: topo, ConsumerIdle: 10 * time.Millisecond, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ret.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	if !hook.fired.Load() || hook.err != nil {
		t.Fatalf("the consumer did not read before its removal (fired %v, %v)", hook.fired.Load(), hook.err)
	}
	if n := pendingCount(t, f.rdb, f.topic, f.group); n != 1 {
		t.Fatalf("%d entries pending after the pass, want the 1 the consumer read", n)
	}
}

// Inspect reports no lag for a group that has read the last entry, even
// when Redis's own lag counter says otherwise (it does after an AOF
// replay).
func TestInspectLag(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	topo := groupsOnTopic(t, f, f.group)
	f.publish(5)
	st, err := bus.Inspect(ctx, f.rdb, topo)
	if err != nil {
		t.Fatal(err)
	}
	if g := st.Streams[0].Groups[0]; g.Lag != 5 || g.Pending != 0 {
		t.Fatalf("before reading: %+v, want lag 5", g)
	}
	if err := f.rdb.XReadGroup(ctx, &redis.XReadGroupArgs{Group: f.group, Consumer: "c", Streams: []string{f.topic, ">"}}).Err(); err != nil {
		t.Fatal(err)
	}
	st, _ = bus.Inspect(ctx, f.rdb, topo)
	if g := st.Streams[0].Groups[0]; g.Lag != 0 || g.Pending != 5 {
		t.Fatalf("after reading: %+v, want lag 0 and 5 pending", g)
	}
}

// A stream fed faster than one approximate XTRIM removes (10,000 entries by
// default) is still trimmed to (nearly) nothing in one pass once every
// group acknowledged everything.
func TestRetentionTrimsMoreThanOneXTrimRemoves(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	topo := groupsOnTopic(t, f, f.group)
	const n = 35_000
	pipe := f.rdb.Pipeline()
	for i := range n {
		pipe.XAdd(ctx, &redis.XAddArgs{Stream: f.topic, Values: []any{"i", i}})
	}
	if _, err := pipe.Exec(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := f.rdb.XReadGroup(ctx, &redis.XReadGroupArgs{Group: f.group, Consumer: "c", Streams: []string{f.topic, ">"}, Count: n, NoAck: true}).Result(); err != nil {
		t.Fatal(err)
	}
	ret, err := bus.NewRetention(bus.RetentionConfig{Client: f.rdb, Topology: topo, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	trimmed, err := ret.Pass(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if left, _ := f.rdb.XLen(ctx, f.topic).Result(); left > 200 {
		t.Fatalf("%d of %d entries left after one pass (%d trimmed), though every one was acknowledged", left, n, trimmed)
	}
}

// A group of the topology that is missing from its stream (deleted; it is
// made again from the stream's start) needs every entry: nothing is
// trimmed, however far the other groups are.
func TestRetentionKeepsEverythingForAMissingGroup(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	done, deleted := f.group+"-done", f.group+"-deleted"
	topo := groupsOnTopic(t, f, done, deleted)
	f.publish(1000)
	ackAs(t, f, done, readAsGroup(t, f, done, 1000))
	if err := f.rdb.XGroupDestroy(ctx, f.topic, deleted).Err(); err != nil {
		t.Fatal(err)
	}
	ret, err := bus.NewRetention(bus.RetentionConfig{Client: f.rdb, Topology: topo, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ret.Pass(ctx); err != nil {
		t.Fatal(err)
	}
	if n, _ := f.rdb.XLen(ctx, f.topic).Result(); n != 1000 {
		t.Fatalf("stream holds %d entries, want all 1000: the deleted group is made again from the start", n)
	}
}

// groupsOnTopic creates groups on the fixture's topic and returns their
// topology.
func groupsOnTopic(t *testing.T, f *fixture, groups ...string) map[string][]string {
	t.Helper()
	topo := map[string][]string{}
	for _, g := range groups {
		topo[g] = []string{f.topic}
	}
	if err := bus.EnsureGroups(t.Context(), f.rdb, topo); err != nil {
		t.Fatal(err)
	}
	return topo
}

// ackAs acknowledges msgs of the fixture's topic as group.
func ackAs(t *testing.T, f *fixture, group string, msgs []redis.XMessage) {
	t.Helper()
	for _, m := range msgs {
		if err := f.rdb.XAck(t.Context(), f.topic, group, m.ID).Err(); err != nil {
			t.Fatal(err)
		}
	}
}
