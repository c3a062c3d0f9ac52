package bus_test

import (
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/internal/testenv"
)

// TestMoveDueSetsAsideWhatIsNotAnEvent: a due member of a delay set that is
// not an event (garbage, or a list XADD refuses) is set aside, reported,
// and does not stop the events due after it: left in place, as the
// earliest due, it blocked every one behind it for good.
func TestMoveDueSetsAsideWhatIsNotAnEvent(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	rdb, prefix, pub := delayFixture(t)
	ev := &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "s", Body: "b", RequestedAt: time.Now().UTC()}
	if _, err := pub.PublishAt(ctx, time.Now().Add(time.Hour), ev); err != nil {
		t.Fatal(err)
	}
	stream := prefix + events.TypeEmailRequested
	set := bus.DelayedSet(stream)
	held, err := rdb.ZRange(ctx, set, 0, -1).Result()
	if err != nil || len(held) != 1 {
		t.Fatalf("delay set holds %d members (%v), want the event", len(held), err)
	}
	// The event is due now, a minute after the two bad members.
	if err := rdb.ZAdd(ctx, set, redis.Z{Score: float64(time.Now().Add(-time.Minute).UnixMilli()), Member: held[0]}).Err(); err != nil {
		t.Fatal(err)
	}
	past := float64(time.Now().Add(-time.Hour).UnixMilli())
	// Not msgpack of fields: garbage; an odd list; a list with a list in
	// it; a list longer than Lua's unpack takes.
	long := []byte{0xdc, 0x23, 0x28} // array16 of 9,000 "x"
	for range 9000 {
		long = append(long, 0xa1, 'x')
	}
	bad := []string{"garbage", "\x93\xa1a\xa1b\xa1c", "\x92\xa1a\x91\xa1b", string(long)}
	for _, m := range bad {
		if err := rdb.ZAdd(ctx, set, redis.Z{Score: past, Member: m}).Err(); err != nil {
			t.Fatal(err)
		}
	}
	m, err := bus.MoveDue(ctx, rdb, stream, 100)
	if err != nil {
		t.Fatalf("MoveDue: %v", err)
	}
	if m.N != 1 || m.SetAside != len(bad) {
		t.Errorf("moved %d and set aside %d, want the one event moved and the %d unreadable members set aside", m.N, m.SetAside, len(bad))
	}
	if n, _ := rdb.XLen(ctx, stream).Result(); n != 1 {
		t.Errorf("stream holds %d entries, want the event", n)
	}
	if n, _ := rdb.ZCard(ctx, set).Result(); n != 0 {
		t.Errorf("delay set holds %d members, want none", n)
	}
	if aside, _ := rdb.LRange(ctx, bus.UnreadableKey(set), 0, -1).Result(); len(aside) != len(bad) {
		t.Errorf("set aside %d members, want the %d unreadable ones", len(aside), len(bad))
	}
}

// TestCancelDelayed withdraws one held-back event, found by its id among
// those held until its time; another held until then, and one held until
// another time, stay.
func TestCancelDelayed(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	rdb, prefix, pub := delayFixture(t)
	at := time.Now().Add(time.Hour).Truncate(time.Millisecond)
	var ids []string
	for _, when := range []time.Time{at, at, at.Add(time.Minute)} {
		ev := &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "s", Body: "b", RequestedAt: time.Now().UTC()}
		id, err := pub.PublishAt(ctx, when, ev, bus.WithID(ev.EmailID))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	set := bus.DelayedSet(prefix + events.TypeEmailRequested)
	if ok, err := pub.CancelDelayed(ctx, events.TypeEmailRequested, ids[2], at); err != nil || ok {
		t.Errorf("CancelDelayed of an event held until another time = %v, %v; want not found", ok, err)
	}
	if ok, err := pub.CancelDelayed(ctx, events.TypeEmailRequested, ids[1], at); err != nil || !ok {
		t.Fatalf("CancelDelayed = %v, %v; want found", ok, err)
	}
	if n, _ := rdb.ZCard(ctx, set).Result(); n != 2 {
		t.Errorf("delay set holds %d events, want the 2 not withdrawn", n)
	}
	if ok, err := pub.CancelDelayed(ctx, events.TypeEmailRequested, ids[1], at); err != nil || ok {
		t.Errorf("second CancelDelayed = %v, %v; want not found", ok, err)
	}
}

// delayFixture returns the test's Redis, a stream prefix of its own and a
// Publisher on them.
func delayFixture(t *testing.T) (*redis.Client, string, *bus.Publisher) {
	t.Helper()
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, StreamPrefix: prefix, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	return rdb, prefix, pub
}
