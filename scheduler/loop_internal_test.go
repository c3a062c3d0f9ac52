package scheduler

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/internal/testenv"
)

// A schedule with no next tick (prepare refuses one that never fires, but
// robfig also answers the zero time for a match more than five years away)
// neither stops the other schedules nor keeps Run from returning when its
// context ends.
func TestAScheduleWithNoNextTickStopsAlone(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	name := "tick-" + strings.Trim(strings.ReplaceAll(prefix, ":", "-"), "-")
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, StreamPrefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	file, err := ParseFile([]byte(`
schedules:
  - name: `+name+`
    cron: "@every 1s"
    event: email.requested
    data: {email_id: "${tick_id}", to: ops@example.com, subject: "Tick ${tick_time}", body: "b", requested_at: "${tick_time}"}
`), "s.yaml")
	if err != nil {
		t.Fatal(err)
	}
	// Discarded: a spinning loop would log without end.
	sc, err := New(Config{Redis: rdb, Publisher: pub, File: file, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	never, err := cronParser.Parse("0 0 30 2 *")
	if err != nil {
		t.Fatal(err)
	}
	sc.schedules = append([]*Schedule{{Name: name + "-feb30", Cron: "0 0 30 2 *", Event: events.TypeEmailRequested,
		Missed: MissedSkip, CatchUpLimit: 10, sched: never, loc: time.UTC}}, sc.schedules...)

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = sc.Run(ctx)
	}()
	deadline := time.Now().Add(5 * time.Second)
	for n := int64(0); n == 0; n, _ = rdb.XLen(t.Context(), prefix+events.TypeEmailRequested).Result() {
		if time.Now().After(deadline) {
			t.Error("the working schedule published nothing")
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after its context ended")
	}
}
