package bus

import (
	"context"
	"testing"
	"time"

	"github.com/conveyor/conveyor/internal/testenv"
)

// TestHandOutTimeFollowsWaits: the deliverer reads the clock once for
// entries it hands out in a row, but again after waiting for the window,
// so HandlerTimeout counts from each entry's own hand-out. Here the window
// has one slot and a batch two entries: the second is handed out only
// once the first finishes, 250ms later, and its start says so.
func TestHandOutTimeFollowsWaits(t *testing.T) {
	s, err := NewSubscriber(SubscriberConfig{Client: testenv.Redis(t), ConsumerGroup: "g", Consumer: "a", MaxInFlight: 1})
	if err != nil {
		t.Fatal(err)
	}
	out := make(chan *delivery)
	sub := &subscription{s: s, topic: "t", dout: out, managed: true, stop: make(chan struct{}), base: context.Background()}
	fields := func(uuid string) []string { return []string{fieldUUID, uuid, fieldPayload, "{}"} }
	b := &readBatch{
		res:  []streamEntries{{stream: "t", entries: []entry{{id: "1-1", fields: fields("u1")}, {id: "1-2", fields: fields("u2")}}}},
		keys: []entryKey{{"t", "1-1"}, {"t", "1-2"}},
	}
	sub.queued.Add(2)
	before := time.Now().UnixNano()
	done := make(chan struct{})
	go func() {
		defer close(done)
		sub.deliverAll(t.Context(), b)
	}()

	first := <-out
	if first.start < before {
		t.Errorf("first entry's start is %v before the hand-out began", time.Duration(before-first.start))
	}
	time.Sleep(250 * time.Millisecond)
	freed := time.Now().UnixNano()
	s.finish(first, outcomeHandedBack) // gives its slot back
	second := <-out
	if second.start < freed {
		t.Errorf("second entry's start is %v before its window slot was free: the clock was not read again after the wait",
			time.Duration(freed-second.start))
	}
	s.finish(second, outcomeHandedBack)
	<-done
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// TestTimeoutSkipsHandlersThatReturned: the heartbeat times out handlers
// still at work past HandlerTimeout, not deliveries acked by their handler
// whose ack is waiting for the next write (it used to log "handler timed
// out" for those, after they had succeeded). Acking frees the slot
// (complete), which the test does by hand.
func TestTimeoutSkipsHandlersThatReturned(t *testing.T) {
	s, err := NewSubscriber(SubscriberConfig{Client: testenv.Redis(t), ConsumerGroup: "g", Consumer: "a", HandlerTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	long := time.Now().Add(-time.Minute).UnixNano()
	newDelivery := func(id string) *delivery {
		ctx, cancel := context.WithCancel(context.Background())
		d := &delivery{stream: "t", id: id, ctx: ctx, cancel: cancel, start: long}
		d.beat.Store(time.Now().UnixNano()) // no heartbeat due
		return d
	}
	running, returned := newDelivery("1-1"), newDelivery("1-2")
	returned.freed.Store(true)
	s.mu.Lock()
	s.inflight[entryKey{"t", "1-1"}] = running
	s.inflight[entryKey{"t", "1-2"}] = returned
	s.mu.Unlock()

	s.heartbeat()

	s.mu.Lock()
	clear(s.inflight)
	s.mu.Unlock()
	if !running.expired.Load() || running.ctx.Err() == nil {
		t.Error("a handler running for a minute with a 1s timeout was not timed out")
	}
	if returned.expired.Load() || returned.ctx.Err() != nil {
		t.Error("a delivery whose handler returned was timed out")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}
