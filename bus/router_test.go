package bus_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
)

func newRouter(t *testing.T, f *fixture, drain time.Duration) *bus.Router {
	t.Helper()
	r, err := bus.NewRouter(bus.RouterConfig{
		Client: f.rdb, Consumer: "c1", StreamPrefix: f.topic + ":", DrainTimeout: drain, Logger: testLogger(),
		Retry: bus.RetryPolicy{MaxAttempts: 2, MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond},
	})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// routerPublisher publishes to the streams of newRouter's routers.
// newMiddlewareRouter returns a Router with the middleware mw and quick
// retries (3 attempts).
func newMiddlewareRouter(t *testing.T, f *fixture, mw message.HandlerMiddleware) *bus.Router {
	t.Helper()
	r, err := bus.NewRouter(bus.RouterConfig{
		Client: f.rdb, Consumer: "c1", StreamPrefix: f.topic + ":", DrainTimeout: 5 * time.Second, Logger: testLogger(),
		Retry:       bus.RetryPolicy{MaxAttempts: 3, MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond},
		Middlewares: []message.HandlerMiddleware{mw},
	})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func routerPublisher(t *testing.T, f *fixture) *bus.Publisher {
	t.Helper()
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: f.rdb, StreamPrefix: f.topic + ":"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	return pub
}

// runRouter runs r until stop, which fails the test if Run failed.
func runRouter(t *testing.T, r *bus.Router) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	return func() {
		t.Helper()
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
}

// A shutdown that races the start (SIGTERM right after launch) stops the
// router at once; it must not wait out the drain timeout for handlers that
// never started.
func TestRouterStoppedWhileStarting(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	for i := 0; i < 5; i++ {
		r := newRouter(t, f, time.Minute)
		for _, group := range []string{"a", "b", "c"} {
			if err := bus.Handle(r, f.group+group, func(context.Context, *events.EmailSent) error { return nil }); err != nil {
				t.Fatal(err)
			}
			if err := bus.Handle(r, f.group+group, func(context.Context, *events.EmailFailed) error { return nil }); err != nil {
				t.Fatal(err)
			}
		}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- r.Run(ctx) }()
		if i%2 == 0 {
			cancel() // before or while the handlers subscribe
		} else {
			<-r.Running()
			cancel()
		}
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("run %d: %v", i, err)
			}
		case <-time.After(30 * time.Second): // half the drain timeout
			t.Fatalf("run %d: router still closing 30s after a shutdown during start", i)
		}
	}
}

// A typed handler gets the decoded event and its envelope; an event that
// does not decode or validate is dead-lettered without calling it; a
// follow-up published from the handler records its cause.
func TestTypedHandler(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	r := newRouter(t, f, 5*time.Second)
	pub := routerPublisher(t, f)
	got := make(chan events.Envelope, 10)
	followUp := events.NewID()
	err := bus.Handle(r, f.group, func(ctx context.Context, ev *events.EmailRequested) error {
		env, _ := bus.EnvelopeFrom(ctx)
		got <- env
		_, err := pub.PublishEvent(ctx, &events.EmailSent{EmailID: ev.EmailID, To: ev.To, Attempts: 1, SentAt: time.Now()}, bus.WithID(followUp))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	stop := runRouter(t, r)

	// Not a valid email.requested: dead-lettered, the handler never runs.
	bad := message.NewMessage(watermill.NewUUID(), []byte(`{"to":"nobody"}`))
	bad.Metadata.Set(bus.MetaEventType, events.TypeEmailRequested)
	if err := pub.Publish(f.topic+":"+events.TypeEmailRequested, bad); err != nil {
		t.Fatal(err)
	}
	req := &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "s", Body: "b", RequestedAt: time.Now()}
	id, err := pub.PublishEvent(t.Context(), req, bus.WithCorrelationID("corr-1"))
	if err != nil {
		t.Fatal(err)
	}
	var env events.Envelope
	select {
	case env = <-got:
	case <-time.After(30 * time.Second):
		t.Fatal("handler not called")
	}
	if env.ID != id || env.Type != events.TypeEmailRequested || env.Version != 1 || env.CorrelationID != "corr-1" || env.Attempt != 1 || env.Source != "conveyor" {
		t.Fatalf("envelope = %+v", env)
	}
	dl := bus.NewDeadLetters(f.rdb)
	eventually(t, "bad event dead-lettered", func() bool { n, _ := dl.Count(t.Context(), f.group); return n == 1 })
	list, _ := dl.List(t.Context(), f.group, "", 1)
	if list[0].EventID != bad.UUID || list[0].Attempts != 1 {
		t.Fatalf("dead letter = %+v (a decode failure is permanent: one attempt)", list[0])
	}
	var xs []redis.XMessage
	eventually(t, "follow-up published", func() bool {
		xs, _ = f.rdb.XRange(t.Context(), f.topic+":"+events.TypeEmailSent, "-", "+").Result()
		return len(xs) > 0
	})
	if len(xs) != 1 {
		t.Fatalf("follow-up published %d times", len(xs))
	}
	follow, err := bus.UnmarshalForTest(xs[0])
	if err != nil {
		t.Fatal(err)
	}
	if follow.UUID != followUp || follow.Metadata.Get(bus.MetaCausationID) != id || follow.Metadata.Get(bus.MetaCorrelationID) != "corr-1" {
		t.Fatalf("follow-up metadata = %v", follow.Metadata)
	}
	stop()
}

// A typed handler takes entries of its own version of the event and those
// without a version (a plain Watermill publisher's), which it reads as its
// own; an entry of a version it does not handle is dead-lettered, and the
// handler never runs for it.
func TestTypedHandlerVersions(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	r := newRouter(t, f, 5*time.Second)
	pub := routerPublisher(t, f)
	got := make(chan *events.EmailRequested, 10)
	if err := bus.Handle(r, f.group, func(ctx context.Context, ev *events.EmailRequested) error {
		got <- ev
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	stop := runRouter(t, r)
	defer stop()

	entry := func(version string) (*message.Message, *events.EmailRequested) {
		ev := &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "s", Body: "b", RequestedAt: time.Now().UTC()}
		payload, err := json.Marshal(ev)
		if err != nil {
			t.Fatal(err)
		}
		msg := message.NewMessage(watermill.NewUUID(), payload)
		msg.Metadata.Set(bus.MetaEventType, events.TypeEmailRequested)
		if version != "" {
			msg.Metadata.Set(bus.MetaEventVersion, version)
		}
		return msg, ev
	}
	stream := f.topic + ":" + events.TypeEmailRequested
	future, _ := entry("99")
	if err := pub.Publish(stream, future); err != nil {
		t.Fatal(err)
	}
	plain, want := entry("")
	if err := pub.Publish(stream, plain); err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-got:
		if ev.EmailID != want.EmailID || !ev.RequestedAt.Equal(want.RequestedAt) {
			t.Fatalf("handled %+v, want the entry without a version, %+v", ev, want)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the entry without a version was not handled")
	}
	dl := bus.NewDeadLetters(f.rdb)
	eventually(t, "the entry of version 99 dead-lettered", func() bool { n, _ := dl.Count(t.Context(), f.group); return n == 1 })
	list, _ := dl.List(t.Context(), f.group, "", 1)
	if list[0].EventID != future.UUID || list[0].Attempts != 1 || !strings.Contains(list[0].Error, "unknown event type") {
		t.Fatalf("dead letter = %+v, want %s after one attempt, as an unknown event type", list[0], future.UUID)
	}
	select {
	case ev := <-got:
		t.Fatalf("handler ran again, for %+v", ev)
	default:
	}
}

// An entry whose event_version is present but not a version ("v2", "2.0",
// " 2") is dead-lettered at once, naming it, and its handler never runs:
// read as no version, it would be decoded as the handler's own version
// while its producer says it is another. So it is whether the handler is
// synchronous, asynchronous or behind a middleware.
func TestMalformedVersionIsDeadLettered(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name   string
		router func(*testing.T, *fixture) *bus.Router
		async  bool
	}{
		{name: "handle", router: func(t *testing.T, f *fixture) *bus.Router { return newRouter(t, f, 5*time.Second) }},
		{name: "handle async", async: true, router: func(t *testing.T, f *fixture) *bus.Router { return newRouter(t, f, 5*time.Second) }},
		{name: "middleware", router: func(t *testing.T, f *fixture) *bus.Router {
			return newMiddlewareRouter(t, f, func(h message.HandlerFunc) message.HandlerFunc { return h })
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t)
			r := tt.router(t, f)
			pub := routerPublisher(t, f)
			got := make(chan *events.EmailRequested, 10)
			var err error
			if tt.async {
				err = bus.HandleAsync(r, f.group, func(ctx context.Context, ev *events.EmailRequested, done func(error)) {
					got <- ev
					done(nil)
				})
			} else {
				err = bus.Handle(r, f.group, func(ctx context.Context, ev *events.EmailRequested) error {
					got <- ev
					return nil
				})
			}
			if err != nil {
				t.Fatal(err)
			}
			stop := runRouter(t, r)
			defer stop()

			stream := f.topic + ":" + events.TypeEmailRequested
			publish := func(version string) string {
				ev := &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "s", Body: "b", RequestedAt: time.Now().UTC()}
				payload, err := json.Marshal(ev)
				if err != nil {
					t.Fatal(err)
				}
				msg := message.NewMessage(watermill.NewUUID(), payload)
				msg.Metadata.Set(bus.MetaEventType, events.TypeEmailRequested)
				msg.Metadata.Set(bus.MetaEventVersion, version)
				if err := pub.Publish(stream, msg); err != nil {
					t.Fatal(err)
				}
				return ev.EmailID
			}
			bad := map[string]string{} // event id to version
			for _, v := range []string{"v2", "2.0", " 2"} {
				bad[publish(v)] = v
			}
			good := publish("1")
			select {
			case ev := <-got:
				if ev.EmailID != good {
					t.Fatalf("handled %s, of version %q; want only the entry of version 1", ev.EmailID, bad[ev.EmailID])
				}
			case <-time.After(30 * time.Second):
				t.Fatal("the entry of version 1 was not handled")
			}
			dl := bus.NewDeadLetters(f.rdb)
			eventually(t, "the entries of malformed versions dead-lettered", func() bool {
				n, _ := dl.Count(t.Context(), f.group)
				return n == int64(len(bad))
			})
			list, err := dl.List(t.Context(), f.group, "", 10)
			if err != nil {
				t.Fatal(err)
			}
			for _, d := range list {
				v := d.Metadata[bus.MetaEventVersion]
				if d.Attempts != 1 || !strings.Contains(d.Error, fmt.Sprintf("event_version %q is not a version", v)) {
					t.Errorf("dead letter of version %q: attempts %d, error %q; want one attempt, naming the version", v, d.Attempts, d.Error)
				}
			}
			select {
			case ev := <-got:
				t.Fatalf("handler ran for %s, of version %q", ev.EmailID, bad[ev.EmailID])
			default:
			}
		})
	}
}

// An entry whose payload is over bus.MaxPayloadBytes is dead-lettered at
// once as too large, without being decoded: the handler never runs, even
// though this one would decode (its bulk is a member the event does not
// have, which decoding ignores). Its dead letter keeps the first 64 KiB of
// the payload and records its size, and replay refuses it, since the rest
// is gone. An entry as large that cannot be decoded at all is kept
// truncated as well.
func TestOversizedPayloadIsDeadLetteredTruncated(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	r := newRouter(t, f, 5*time.Second)
	pub := routerPublisher(t, f)
	handled := make(chan string, 10)
	if err := bus.Handle(r, f.group, func(ctx context.Context, ev *events.EmailRequested) error {
		handled <- ev.EmailID
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	stream := f.topic + ":" + events.TypeEmailRequested
	t.Cleanup(func() { _ = f.rdb.Del(context.Background(), stream, bus.DeadLetterStream(f.group)).Err() })
	stop := runRouter(t, r)
	defer stop()

	const kept = 64 << 10
	ev := &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "s", Body: "b", RequestedAt: time.Now().UTC()}
	small, err := json.Marshal(ev)
	if err != nil {
		t.Fatal(err)
	}
	payload := string(small[:len(small)-1]) + `,"padding":"` + strings.Repeat("x", 5<<20) + `"}`
	big := message.NewMessage(watermill.NewUUID(), []byte(payload))
	big.Metadata.Set(bus.MetaEventType, events.TypeEmailRequested)
	big.Metadata.Set(bus.MetaEventVersion, "1")
	if err := pub.Publish(stream, big); err != nil {
		t.Fatal(err)
	}
	// Written straight into Redis, without the field that names the
	// message: undecodable, and as large.
	if err := f.rdb.XAdd(t.Context(), &redis.XAddArgs{Stream: stream, Values: []any{"payload", payload}}).Err(); err != nil {
		t.Fatal(err)
	}
	ok := &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "s", Body: "b", RequestedAt: time.Now().UTC()}
	if _, err := pub.PublishEvent(t.Context(), ok); err != nil {
		t.Fatal(err)
	}
	select {
	case id := <-handled:
		if id != ok.EmailID {
			t.Fatalf("handled %s; want only the event of a normal size, %s", id, ok.EmailID)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the event of a normal size was not handled")
	}

	dl := bus.NewDeadLetters(f.rdb)
	eventually(t, "both large entries dead-lettered", func() bool { n, _ := dl.Count(t.Context(), f.group); return n == 2 })
	list, err := dl.List(t.Context(), f.group, "", 2)
	if err != nil {
		t.Fatal(err)
	}
	letter, raw := list[0], list[1]
	if letter.Raw != nil {
		letter, raw = raw, letter
	}
	if letter.EventID != big.UUID || letter.EventType != events.TypeEmailRequested || letter.Attempts != 1 ||
		!strings.Contains(letter.Error, "too large") || !strings.Contains(letter.Error, fmt.Sprint(len(payload))) {
		t.Errorf("dead letter = id %s, type %s, %d attempts, error %q; want %s, one attempt, too large, naming its size",
			letter.EventID, letter.EventType, letter.Attempts, letter.Error, big.UUID)
	}
	if letter.Payload != payload[:kept] || letter.TruncatedFrom != int64(len(payload)) {
		t.Errorf("dead letter keeps %d bytes of the payload (its start: %v), truncated from %d; want the first %d, truncated from %d",
			len(letter.Payload), strings.HasPrefix(payload, letter.Payload), letter.TruncatedFrom, kept, len(payload))
	}
	if raw.Raw["payload"] != payload[:kept] || raw.TruncatedFrom != int64(len("payload")+len(payload)) ||
		!strings.Contains(raw.Error, "too large") {
		t.Errorf("undecodable dead letter keeps %d bytes of the payload, truncated from %d, error %q; want %d, from %d, too large",
			len(raw.Raw["payload"]), raw.TruncatedFrom, raw.Error, kept, len("payload")+len(payload))
	}
	select {
	case id := <-handled:
		t.Fatalf("handler ran for %s", id)
	default:
	}

	// Replayed, a truncated payload could only be dead-lettered again.
	n, err := dl.Replay(t.Context(), f.group)
	if n != 0 || !errors.Is(err, bus.ErrTruncated) || !strings.Contains(err.Error(), letter.ID) || !strings.Contains(err.Error(), raw.ID) {
		t.Errorf("replay of the truncated letters = %d, %v; want 0, refused, naming both", n, err)
	}
	if count, _ := dl.Count(t.Context(), f.group); count != 2 {
		t.Errorf("%d dead letters after the refused replay; want both kept", count)
	}
}

// unregistered is an event that package events does not know.
type unregistered struct{}

func (*unregistered) EventType() string { return "test.unregistered" }
func (*unregistered) EventVersion() int { return 1 }
func (*unregistered) Validate() error   { return nil }

// A handler of an event type (or version) that package events does not
// register is refused when it is registered, not at its first delivery.
func TestHandleRefusesAnUnregisteredEvent(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	r := newRouter(t, f, time.Second)
	err := bus.Handle(r, f.group, func(context.Context, *unregistered) error { return nil })
	if !errors.Is(err, events.ErrUnknownType) {
		t.Fatalf("Handle of an unregistered event: err = %v, want ErrUnknownType", err)
	}
	err = bus.HandleAsync(r, f.group, func(context.Context, *unregistered, func(error)) {})
	if !errors.Is(err, events.ErrUnknownType) {
		t.Fatalf("HandleAsync of an unregistered event: err = %v, want ErrUnknownType", err)
	}
}

// A handler that runs past HandlerTimeout has its context cancelled; its
// error sends the message to a retry.
func TestHandlerTimeout(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	r := newTimeoutRouter(t, f)
	var calls atomic.Int32
	second := make(chan int, 1)
	err := bus.Handle(r, f.group, func(ctx context.Context, ev *events.EmailSent) error {
		if calls.Add(1) == 1 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(30 * time.Second):
				return errors.New("the context was never cancelled")
			}
		}
		second <- bus.Attempt(ctx)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	stop := runRouter(t, r)
	defer stop()
	awaitRetryAfterTimeout(t, f, second)
}

// newTimeoutRouter returns a router whose handlers time out after 300ms.
func newTimeoutRouter(t *testing.T, f *fixture) *bus.Router {
	t.Helper()
	r, err := bus.NewRouter(bus.RouterConfig{
		Client: f.rdb, Consumer: "c1", StreamPrefix: f.topic + ":", Logger: testLogger(),
		ClaimMinIdle: 900 * time.Millisecond, HandlerTimeout: 300 * time.Millisecond, DrainTimeout: 5 * time.Second,
		Retry: bus.RetryPolicy{MaxAttempts: 3, MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond},
	})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// awaitRetryAfterTimeout publishes an email.sent to a router from
// newTimeoutRouter whose handler times out on the first attempt and sends
// its next attempt to second, and checks that the second call is attempt 2.
func awaitRetryAfterTimeout(t *testing.T, f *fixture, second <-chan int) {
	t.Helper()
	if _, err := routerPublisher(t, f).PublishEvent(t.Context(), &events.EmailSent{EmailID: events.NewID(), Attempts: 1, SentAt: time.Now()}); err != nil {
		t.Fatal(err)
	}
	select {
	case attempt := <-second:
		if attempt != 2 {
			t.Fatalf("second call on attempt %d", attempt)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the timed-out message was not retried")
	}
}

// Reading overlaps handing out, but never reads past the in-flight window:
// an entry read by this consumer and not yet handed out is not kept alive
// by the heartbeats, so another replica could claim it from under a busy
// consumer. With every handler busy, the consumer holds exactly its window
// in the stream's pending list; once they finish, everything is handled
// once.
func TestReadingStaysWithinTheWindow(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	const window, total = 8, 200
	r, err := bus.NewRouter(bus.RouterConfig{
		Client: f.rdb, Consumer: "c1", StreamPrefix: f.topic + ":", Concurrency: window, BatchSize: 100,
		DrainTimeout: 5 * time.Second, Logger: testLogger(),
	})
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	var running atomic.Int64
	var mu sync.Mutex
	seen := map[string]int{}
	err = bus.Handle(r, f.group, func(ctx context.Context, ev *events.EmailRequested) error {
		running.Add(1)
		select {
		case <-release:
		case <-ctx.Done():
			return ctx.Err()
		}
		mu.Lock()
		seen[ev.EmailID]++
		mu.Unlock()
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	pub := routerPublisher(t, f)
	evs := make([]events.Event, total)
	for i := range evs {
		evs[i] = &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "s", Body: "b", RequestedAt: time.Now()}
	}
	for _, res := range pub.PublishBatch(t.Context(), evs, nil) {
		if res.Err != nil {
			t.Fatal(res.Err)
		}
	}
	stream := f.topic + ":" + events.TypeEmailRequested
	held := func() int64 {
		p, err := f.rdb.XPending(t.Context(), stream, f.group).Result()
		if err != nil {
			t.Fatal(err)
		}
		return p.Consumers["c1"]
	}

	stop := runRouter(t, r)
	eventually(t, "every handler busy", func() bool { return running.Load() == window })
	// The reader keeps trying while the window is full.
	for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		if n := held(); n > window {
			t.Fatalf("consumer holds %d entries with a window of %d", n, window)
		}
	}
	if n := held(); n != window {
		t.Fatalf("consumer holds %d entries, want its window of %d", n, window)
	}
	close(release)
	eventually(t, "all handled and acked", func() bool {
		mu.Lock()
		n := len(seen)
		mu.Unlock()
		return n == total && held() == 0
	})
	stop()
	for id, n := range seen {
		if n != 1 {
			t.Errorf("%s handled %d times", id, n)
		}
	}
}

// Entries read but still waiting for a window slot are kept alive by the
// heartbeats like those being handled: another replica never claims them
// while their consumer is busy. A restarted consumer re-reads its pending
// entries of the stream and of its retry stream in one read (COUNT applies
// per stream), so with a window of one, one of them waits while the other
// runs for several times ClaimMinIdle, and a second replica claims whatever
// goes idle.
func TestWaitingEntriesAreNotClaimed(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	stream := f.topic + ":" + events.TypeEmailRequested
	retry := bus.RetryStream(stream, f.group)
	for _, st := range []string{stream, retry} {
		if err := f.rdb.XGroupCreateMkStream(ctx, st, f.group, "0").Err(); err != nil {
			t.Fatal(err)
		}
	}
	pub := routerPublisher(t, f)
	for range 2 {
		ev := &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "s", Body: "b", RequestedAt: time.Now()}
		if _, err := pub.PublishEvent(ctx, ev); err != nil {
			t.Fatal(err)
		}
	}
	// The second entry moves to the retry stream; c1 then holds both, as
	// after a crash.
	xs, err := f.rdb.XRange(ctx, stream, "-", "+").Result()
	if err != nil || len(xs) != 2 {
		t.Fatalf("entries %v, %v", xs, err)
	}
	if err := f.rdb.XAdd(ctx, &redis.XAddArgs{Stream: retry, Values: xs[1].Values}).Err(); err != nil {
		t.Fatal(err)
	}
	if err := f.rdb.XDel(ctx, stream, xs[1].ID).Err(); err != nil {
		t.Fatal(err)
	}
	read, err := f.rdb.XReadGroup(ctx, &redis.XReadGroupArgs{Group: f.group, Consumer: "c1", Streams: []string{stream, retry, ">", ">"}, Count: 10}).Result()
	if err != nil || len(read) != 2 {
		t.Fatalf("read %v, %v", read, err)
	}

	// Heartbeats every ClaimMinIdle/3 keep the entries' idle time under a
	// second, so c2 could claim one only if c1's heartbeat stalled for
	// another second.
	const minIdle = 2 * time.Second
	var mu sync.Mutex
	handled := map[string][]string{} // event id -> consumers
	calls := 0
	start := func(consumer string) (stop func()) {
		r, err := bus.NewRouter(bus.RouterConfig{
			Client: f.rdb, Consumer: consumer, StreamPrefix: f.topic + ":", Concurrency: 1,
			ClaimMinIdle: minIdle, DrainTimeout: 5 * time.Second, Logger: testLogger(),
		})
		if err != nil {
			t.Fatal(err)
		}
		err = bus.Handle(r, f.group, func(ctx context.Context, _ *events.EmailRequested) error {
			env, _ := bus.EnvelopeFrom(ctx)
			mu.Lock()
			handled[env.ID] = append(handled[env.ID], consumer)
			calls++
			first := calls == 1
			mu.Unlock()
			if !first {
				return nil
			}
			// The other entry waits for the window meanwhile.
			select {
			case <-time.After(3 * minIdle):
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		})
		if err != nil {
			t.Fatal(err)
		}
		rctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- r.Run(rctx) }()
		return func() {
			cancel()
			if err := <-done; err != nil {
				t.Error(err)
			}
		}
	}
	stop1 := start("c1")
	// c2 starts once c1 has re-read the entries it holds: until then they
	// stay idle since the read above, and another consumer may claim
	// them, as after a crash.
	eventually(t, "c1 handling an entry", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return calls > 0
	})
	stop2 := start("c2")
	eventually(t, "both handled and acked", func() bool {
		mu.Lock()
		n := len(handled)
		mu.Unlock()
		return n == 2 && pendingCount(t, f.rdb, stream, f.group)+pendingCount(t, f.rdb, retry, f.group) == 0
	})
	stop2()
	stop1()
	for id, by := range handled {
		if len(by) != 1 || by[0] != "c1" {
			t.Errorf("event %s handled by %v, want once by c1", id, by)
		}
	}
}

// Middleware sees each delivery as a Watermill message with its metadata,
// and the context it sets reaches the handler; a failure goes through the
// middleware to a retry, which carries the attempt.
func TestRouterMiddleware(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	type seen struct{ uuid, typ, attempt string }
	type key struct{}
	saw := make(chan seen, 10)
	mw := func(h message.HandlerFunc) message.HandlerFunc {
		return func(msg *message.Message) ([]*message.Message, error) {
			saw <- seen{msg.UUID, msg.Metadata.Get(bus.MetaEventType), msg.Metadata.Get(bus.MetaAttempt)}
			msg.SetContext(context.WithValue(msg.Context(), key{}, "from middleware"))
			return h(msg)
		}
	}
	r := newMiddlewareRouter(t, f, mw)
	pub := routerPublisher(t, f)
	envs := make(chan events.Envelope, 10)
	err := bus.Handle(r, f.group, func(ctx context.Context, ev *events.EmailRequested) error {
		if ctx.Value(key{}) != "from middleware" {
			t.Error("the middleware's context did not reach the handler")
		}
		env, _ := bus.EnvelopeFrom(ctx)
		envs <- env
		if env.Attempt == 1 {
			return errors.New("the first attempt fails")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	stop := runRouter(t, r)
	id, err := pub.PublishEvent(t.Context(), &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "s", Body: "b", RequestedAt: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	for attempt, wantMeta := range []string{"", "2"} {
		var s seen
		var env events.Envelope
		select {
		case s = <-saw:
			env = <-envs
		case <-time.After(30 * time.Second):
			t.Fatalf("attempt %d: middleware not called", attempt+1)
		}
		if s.uuid != id || s.typ != events.TypeEmailRequested || s.attempt != wantMeta {
			t.Fatalf("attempt %d: middleware saw %+v; want id %s, type %s, attempt %q", attempt+1, s, id, events.TypeEmailRequested, wantMeta)
		}
		if env.ID != id || env.Attempt != attempt+1 {
			t.Fatalf("attempt %d: handler's envelope = %+v", attempt+1, env)
		}
	}
	stream := f.topic + ":" + events.TypeEmailRequested
	eventually(t, "all acked", func() bool {
		return pendingCount(t, f.rdb, stream, f.group) == 0 && pendingCount(t, f.rdb, bus.RetryStream(stream, f.group), f.group) == 0
	})
	stop()
	select {
	case s := <-saw:
		t.Fatalf("middleware called again after success: %+v", s)
	default:
	}
}

// TestPayloadKeepsHTMLCharacters: '<', '>' and '&' reach the stream as they
// are, not as \u003c and the like (six bytes each), and decode back.
func TestPayloadKeepsHTMLCharacters(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	pub := routerPublisher(t, f)
	body := `<p>Your <a href='https://example.com/r?id=1&x=2'>report</a> & more</p>`
	req := &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "<b>&</b>", Body: body, RequestedAt: time.Now().UTC()}
	if _, err := pub.PublishEvent(t.Context(), req); err != nil {
		t.Fatal(err)
	}
	xs, err := f.rdb.XRange(t.Context(), f.topic+":"+events.TypeEmailRequested, "-", "+").Result()
	if err != nil || len(xs) != 1 {
		t.Fatalf("XRANGE = %d entries, %v; want 1", len(xs), err)
	}
	payload, _ := xs[0].Values["payload"].(string)
	if !strings.Contains(payload, body) || strings.Contains(payload, `\u00`) {
		t.Fatalf("payload %s does not hold the body as it is", payload)
	}
	ev, err := events.Decode(events.TypeEmailRequested, 1, []byte(payload))
	if err != nil {
		t.Fatal(err)
	}
	if got := ev.(*events.EmailRequested); got.Body != body || got.Subject != req.Subject {
		t.Errorf("decoded body %q, subject %q; want them unchanged", got.Body, got.Subject)
	}
}

// A router that stops hands back what it read ahead: the entries no worker
// started become claimable at once (their idle time is ClaimMinIdle, an
// hour here), while those whose handlers were still running at the drain
// timeout are not.
func TestRouterStopHandsBackWhatItReadAhead(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	r, err := bus.NewRouter(bus.RouterConfig{
		Client: f.rdb, Consumer: "c1", StreamPrefix: f.topic + ":", Logger: testLogger(),
		Concurrency: 2, BatchSize: 10, ReadAhead: time.Second, ClaimMinIdle: time.Hour,
		DrainTimeout: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int32
	stuck := make(chan struct{}, 2)
	err = bus.Handle(r, f.group, func(ctx context.Context, ev *events.EmailSent) error {
		if calls.Add(1) <= 100 {
			time.Sleep(time.Millisecond) // a pace that reads two whole batches ahead
			return nil
		}
		stuck <- struct{}{}
		<-ctx.Done()
		return ctx.Err()
	})
	if err != nil {
		t.Fatal(err)
	}
	pub := routerPublisher(t, f)
	evs := make([]events.Event, 200)
	for i := range evs {
		evs[i] = &events.EmailSent{EmailID: events.NewID(), Attempts: 1, SentAt: time.Now()}
	}
	for _, res := range pub.PublishBatch(t.Context(), evs, nil) {
		if res.Err != nil {
			t.Fatal(res.Err)
		}
	}
	stop := runRouter(t, r)
	for range 2 {
		select {
		case <-stuck:
		case <-time.After(30 * time.Second):
			t.Fatal("the handlers never got stuck")
		}
	}
	time.Sleep(300 * time.Millisecond)
	stream := f.topic + ":" + events.TypeEmailSent
	n := pendingOf(t, f.rdb, stream, f.group, "c1")
	if n <= 2 {
		t.Fatalf("c1 holds %d entries, want more than its 2 stuck ones: nothing was read ahead to hand back", n)
	}
	stop()
	back, kept := claimableNow(t, f.rdb, stream, f.group, "c1", time.Hour)
	// A stuck handler that fails at the stop may be retried before the
	// subscriber closes: its entry then leaves the pending list.
	if back != n-2 || kept > 2 {
		t.Fatalf("after the stop, %d entries claimable and %d not; want the %d read ahead claimable, and the 2 stuck ones not (or retried)",
			back, kept, n-2)
	}
}

// TestHardStopHandsBackCancelledHandlers: handlers still running when the
// drain times out are cancelled, and fail with the context's error; on
// their last attempt that failure must not dead-letter the entry, nor spend
// an attempt on an earlier one: the stop caused it, not the event. The
// entries stay pending and are delivered again.
func TestHardStopHandsBackCancelledHandlers(t *testing.T) {
	t.Parallel()
	// Many, so that some return their error while the stop is still
	// cancelling the others.
	const stuckN = 64
	f := newFixture(t)
	r, err := bus.NewRouter(bus.RouterConfig{
		Client: f.rdb, Consumer: "c1", StreamPrefix: f.topic + ":", Logger: testLogger(),
		Concurrency: stuckN, ClaimMinIdle: time.Hour, DrainTimeout: 100 * time.Millisecond,
		Retry: bus.RetryPolicy{MaxAttempts: 1},
	})
	if err != nil {
		t.Fatal(err)
	}
	stuck := make(chan struct{}, stuckN)
	err = bus.Handle(r, f.group, func(ctx context.Context, ev *events.EmailSent) error {
		stuck <- struct{}{}
		<-ctx.Done()
		return fmt.Errorf("send: %w", ctx.Err())
	})
	if err != nil {
		t.Fatal(err)
	}
	pub := routerPublisher(t, f)
	for range stuckN {
		if _, err := pub.PublishEvent(t.Context(), &events.EmailSent{EmailID: events.NewID(), Attempts: 1, SentAt: time.Now()}); err != nil {
			t.Fatal(err)
		}
	}
	stop := runRouter(t, r)
	for range stuckN {
		select {
		case <-stuck:
		case <-time.After(30 * time.Second):
			t.Fatal("the handlers never got stuck")
		}
	}
	stop()
	if dead, err := bus.NewDeadLetters(f.rdb).Count(t.Context(), f.group); err != nil || dead != 0 {
		t.Errorf("dead letters = %d, %v; want none: the stop cancelled the handlers", dead, err)
	}
	stream := f.topic + ":" + events.TypeEmailSent
	if n := pendingOf(t, f.rdb, stream, f.group, "c1"); n != stuckN {
		t.Errorf("c1 holds %d entries after the stop, want the %d cancelled ones, to be delivered again", n, stuckN)
	}
}
