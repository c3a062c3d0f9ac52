package bus_test

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
)

// The entries of a dead consumer are claimed while the live one works
// through a backlog, not only once the backlog is drained: a due claim gets
// the next free window slots before the next read.
func TestDeadConsumersEntriesAreClaimedUnderBacklog(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	const backlog, workers = 2000, 4
	if err := f.rdb.XGroupCreateMkStream(ctx, f.topic, f.group, "0").Err(); err != nil {
		t.Fatal(err)
	}
	msgs := make([]*message.Message, backlog)
	for i := range msgs {
		msgs[i] = message.NewMessage(watermill.NewUUID(), []byte(strconv.Itoa(i)))
	}
	if err := f.pub.Publish(f.topic, msgs...); err != nil {
		t.Fatal(err)
	}
	ch := f.subscribe(f.subscriber("alive", func(c *bus.SubscriberConfig) {
		c.MaxInFlight = workers
		c.ClaimMinIdle = 300 * time.Millisecond
		c.ClaimInterval = 100 * time.Millisecond
	}))

	var handled atomic.Int64
	var mu sync.Mutex
	positions := map[string]int64{} // event id → position handled at
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for handled.Load() < backlog {
				select {
				case m, ok := <-ch:
					if !ok {
						return
					}
					time.Sleep(4 * time.Millisecond)
					mu.Lock()
					positions[m.UUID] = handled.Add(1)
					mu.Unlock()
					m.Ack()
				case <-time.After(100 * time.Millisecond):
				}
			}
		}()
	}
	// Once the live consumer is under way (its first claim done, its
	// window full), "dead" reads a few entries and dies: from now on they
	// can only come back through a claim.
	eventually(t, "live consumer under way", func() bool { return handled.Load() >= 20 })
	xs, err := f.rdb.XReadGroup(ctx, &redis.XReadGroupArgs{Group: f.group, Consumer: "dead", Streams: []string{f.topic, ">"}, Count: 5}).Result()
	if err != nil {
		t.Fatal(err)
	}
	var orphans []string
	for _, x := range xs[0].Messages {
		m, err := bus.UnmarshalForTest(x)
		if err != nil {
			t.Fatal(err)
		}
		orphans = append(orphans, m.UUID)
	}
	eventually(t, "whole backlog handled", func() bool { return handled.Load() >= backlog })
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	// The orphans are idle for ClaimMinIdle (0.3s) after about 25 of 2,000
	// entries; the backlog takes 2s at least (4 workers, 4ms an entry).
	// Claimed at the next ClaimInterval, they come about 300-500 entries
	// later; left to the end, they come last.
	got := make([]int64, 0, len(orphans))
	for _, id := range orphans {
		got = append(got, positions[id])
	}
	t.Logf("entries of the dead consumer handled at positions %v of %d", got, backlog)
	for _, id := range orphans {
		pos, ok := positions[id]
		if !ok {
			t.Fatalf("entry %s of the dead consumer was never handled", id)
		}
		if pos > backlog/2 {
			t.Errorf("entry %s of the dead consumer handled at position %d of %d; want it claimed before the second half of the backlog", id, pos, backlog)
		}
	}
}

// failFirstXPending fails the first XPENDING, without sending it.
type failFirstXPending struct{ failed atomic.Bool }

func (h *failFirstXPending) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *failFirstXPending) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if strings.EqualFold(cmd.Name(), "xpending") && h.failed.CompareAndSwap(false, true) {
			err := errors.New("connection reset (injected)")
			cmd.SetErr(err)
			return err
		}
		return next(ctx, cmd)
	}
}
func (h *failFirstXPending) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// A restarted consumer whose first look-up of its pending entries' delivery
// counts fails reads those entries again on the retry: they are not skipped
// (and left to a claim after ClaimMinIdle).
func TestOwnPendingEntriesSurviveAFailedDeliveryCountLookup(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	if err := f.rdb.XGroupCreateMkStream(ctx, f.topic, f.group, "0").Err(); err != nil {
		t.Fatal(err)
	}
	ids := f.publish(3)
	// "stable" read them and stopped before handling them.
	if err := f.rdb.XReadGroup(ctx, &redis.XReadGroupArgs{Group: f.group, Consumer: "stable", Streams: []string{f.topic, ">"}, Count: 10}).Err(); err != nil {
		t.Fatal(err)
	}
	hook := &failFirstXPending{}
	// ClaimMinIdle is an hour: only the own-pending read can bring them back.
	ch := f.subscribe(f.subscriber("stable", func(c *bus.SubscriberConfig) {
		c.Client = hookedClient(t, f, hook)
		c.ClaimMinIdle = time.Hour
		c.HeartbeatInterval = time.Minute
	}))
	got := map[string]bool{}
	for len(got) < len(ids) {
		m := receive(t, ch)
		got[m.UUID] = true
		m.Ack()
	}
	if !hook.failed.Load() {
		t.Fatal("no XPENDING failed: the test did not test the retry")
	}
	eventually(t, "nothing pending", func() bool { return pendingCount(t, f.rdb, f.topic, f.group) == 0 })
}
