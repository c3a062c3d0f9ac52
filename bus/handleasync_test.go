package bus_test

import (
	"context"
	"errors"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
)

// An asynchronous handler's workers do not wait for it: it holds a whole
// window of started events before it answers any, from another goroutine.
// The window still bounds them: nothing more is started until some are
// done. Each outcome counts once: done(nil) acks, an error retries, a
// Permanent error dead-letters, a panic before done retries, and a second
// call of done is ignored.
func TestHandleAsync(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	// More than the workers (one per CPU), so that workers which waited
	// for done could not start a whole window.
	window := max(8, 4*runtime.GOMAXPROCS(0))
	r, err := bus.NewRouter(bus.RouterConfig{
		Client: f.rdb, Consumer: "c1", StreamPrefix: f.topic + ":", Concurrency: window, DrainTimeout: 5 * time.Second,
		Logger: testLogger(), Retry: bus.RetryPolicy{MaxAttempts: 3, MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond},
	})
	if err != nil {
		t.Fatal(err)
	}
	type started struct {
		ev   *events.EmailSent
		env  events.Envelope
		done func(error)
	}
	starts := make(chan started, 100)
	err = bus.HandleAsync(r, f.group, func(ctx context.Context, ev *events.EmailSent, done func(error)) {
		env, _ := bus.EnvelopeFrom(ctx)
		if ev.MessageID == "panic" && env.Attempt == 1 {
			panic("before done")
		}
		starts <- started{ev, env, done}
	})
	if err != nil {
		t.Fatal(err)
	}
	stop := runRouter(t, r)
	pub := routerPublisher(t, f)
	n := 3 * window
	for i := 0; i < n; i++ {
		if _, err := pub.PublishEvent(t.Context(), &events.EmailSent{EmailID: events.NewID(), Attempts: 1, SentAt: time.Now()}); err != nil {
			t.Fatal(err)
		}
	}
	next := func(what string) started {
		t.Helper()
		select {
		case s := <-starts:
			return s
		case <-time.After(30 * time.Second):
			t.Fatalf("%s: no event started within 30s", what)
			return started{}
		}
	}
	// A full window starts with none done: the workers (fewer than the
	// window) handed each over and went on.
	var held []started
	for len(held) < window {
		held = append(held, next("window"))
	}
	select {
	case s := <-starts:
		t.Fatalf("event %s started beyond the window of %d", s.env.ID, window)
	case <-time.After(300 * time.Millisecond):
	}
	// Answered from another goroutine, each twice: the second is ignored.
	var wg sync.WaitGroup
	for _, s := range held {
		wg.Go(func() {
			s.done(nil)
			s.done(errors.New("a second call"))
		})
	}
	wg.Wait()
	stream := f.topic + ":" + events.TypeEmailSent
	// A second done that counted would nack: the entry would wait in the
	// retry set, then start again.
	time.Sleep(100 * time.Millisecond)
	if n, err := f.rdb.ZCard(t.Context(), bus.RetrySet(stream, f.group)).Result(); err != nil || n != 0 {
		t.Fatalf("retry set holds %d entries (%v) after every event was done once", n, err)
	}
	seen := map[string]int{}
	for _, s := range held {
		seen[s.env.ID]++
	}
	for len(seen) < n {
		s := next("the rest")
		seen[s.env.ID]++
		s.done(nil)
	}
	eventually(t, "all acked", func() bool {
		return pendingCount(t, f.rdb, stream, f.group) == 0 && pendingCount(t, f.rdb, bus.RetryStream(stream, f.group), f.group) == 0
	})
	select {
	case s := <-starts:
		t.Fatalf("event %s (attempt %d) started again after all were acked", s.env.ID, s.env.Attempt)
	case <-time.After(300 * time.Millisecond):
	}
	for id, c := range seen {
		if c != 1 {
			t.Fatalf("event %s started %d times; want once (a second done must not nack it)", id, c)
		}
	}

	// Outcomes other than success: a retried error, a dead letter, and a
	// panic before done.
	fail, err := pub.PublishEvent(t.Context(), &events.EmailSent{EmailID: events.NewID(), MessageID: "fail", Attempts: 1, SentAt: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	dead, err := pub.PublishEvent(t.Context(), &events.EmailSent{EmailID: events.NewID(), MessageID: "dead", Attempts: 1, SentAt: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	panicked, err := pub.PublishEvent(t.Context(), &events.EmailSent{EmailID: events.NewID(), MessageID: "panic", Attempts: 1, SentAt: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	attempts := map[string][]int{}
	for len(attempts[fail]) < 2 || len(attempts[dead]) < 1 || len(attempts[panicked]) < 1 {
		s := next("outcomes")
		attempts[s.env.ID] = append(attempts[s.env.ID], s.env.Attempt)
		switch {
		case s.env.ID != fail && s.env.ID != dead && s.env.ID != panicked:
			t.Fatalf("event %s started again", s.env.ID)
		case s.ev.MessageID == "fail" && s.env.Attempt == 1:
			go s.done(errors.New("try again"))
		case s.ev.MessageID == "dead":
			go s.done(bus.Permanent(errors.New("never")))
		default:
			go s.done(nil)
		}
	}
	dl := bus.NewDeadLetters(f.rdb)
	eventually(t, "dead-lettered", func() bool { c, _ := dl.Count(t.Context(), f.group); return c == 1 })
	eventually(t, "all acked", func() bool {
		return pendingCount(t, f.rdb, stream, f.group) == 0 && pendingCount(t, f.rdb, bus.RetryStream(stream, f.group), f.group) == 0
	})
	stop()
	if got := attempts[fail]; len(got) != 2 || got[0] != 1 || got[1] != 2 {
		t.Fatalf("failed event's attempts = %v; want [1 2]", got)
	}
	if got := attempts[panicked]; len(got) != 1 || got[0] != 2 {
		t.Fatalf("panicked event's attempts = %v; want [2] (the first panicked before it started)", got)
	}
	if got := attempts[dead]; len(got) != 1 {
		t.Fatalf("dead-lettered event's attempts = %v; want one", got)
	}
	list, _ := dl.List(t.Context(), f.group, "", 10)
	if len(list) != 1 || list[0].EventID != dead {
		t.Fatalf("dead letters = %+v; want only %s", list, dead)
	}
}

// With middleware, an asynchronous handler's outcome is returned to the
// middleware, which sees it as a synchronous handler's.
func TestHandleAsyncWithMiddleware(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	outcomes := make(chan error, 10)
	mw := func(h message.HandlerFunc) message.HandlerFunc {
		return func(msg *message.Message) ([]*message.Message, error) {
			out, err := h(msg)
			outcomes <- err
			return out, err
		}
	}
	r := newMiddlewareRouter(t, f, mw)
	err := bus.HandleAsync(r, f.group, func(ctx context.Context, ev *events.EmailSent, done func(error)) {
		go func() {
			time.Sleep(20 * time.Millisecond)
			if bus.Attempt(ctx) == 1 {
				done(errors.New("the first attempt fails"))
			} else {
				done(nil)
			}
		}()
	})
	if err != nil {
		t.Fatal(err)
	}
	stop := runRouter(t, r)
	if _, err := routerPublisher(t, f).PublishEvent(t.Context(), &events.EmailSent{EmailID: events.NewID(), Attempts: 1, SentAt: time.Now()}); err != nil {
		t.Fatal(err)
	}
	for attempt := 1; attempt <= 2; attempt++ {
		select {
		case err := <-outcomes:
			if (err != nil) != (attempt == 1) {
				t.Fatalf("attempt %d: middleware saw %v", attempt, err)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("attempt %d: middleware saw no outcome", attempt)
		}
	}
	stream := f.topic + ":" + events.TypeEmailSent
	eventually(t, "all acked", func() bool {
		return pendingCount(t, f.rdb, stream, f.group) == 0 && pendingCount(t, f.rdb, bus.RetryStream(stream, f.group), f.group) == 0
	})
	stop()
}

// An asynchronous handler's context is cancelled at HandlerTimeout, as a
// synchronous one's is: the work it handed over ends the delivery with
// the context's error, which sends the event to a retry.
func TestHandleAsyncTimeout(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	r := newTimeoutRouter(t, f)
	second := make(chan int, 1)
	err := bus.HandleAsync(r, f.group, func(ctx context.Context, ev *events.EmailSent, done func(error)) {
		if bus.Attempt(ctx) > 1 {
			second <- bus.Attempt(ctx)
			done(nil)
			return
		}
		go func() { // the work handed over: it only ends with the context
			select {
			case <-ctx.Done():
				done(ctx.Err())
			case <-time.After(30 * time.Second):
				done(errors.New("the context was never cancelled"))
			}
		}()
	})
	if err != nil {
		t.Fatal(err)
	}
	stop := runRouter(t, r)
	defer stop()
	awaitRetryAfterTimeout(t, f, second)
}
