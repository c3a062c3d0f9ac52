package main_test

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/embedded"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/internal/testenv"
)

// conveyor status shows the delayed events of each stream (and how many
// are past their time), and the cap of the dead-letter streams, saying
// when one is at it and drops its oldest dead letters.
func TestStatusShowsDelayedEventsAndTheDeadLetterCap(t *testing.T) {
	t.Parallel()
	off := false
	r := testenv.StartRedis(t, embedded.RedisConfig{AppendOnly: &off})
	env := []string{"REDIS_URL=" + r.URL()}
	rdb := redis.NewClient(&redis.Options{Addr: r.Addr()})
	t.Cleanup(func() { _ = rdb.Close() })
	ctx := t.Context()

	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	soon := time.Now().Add(100 * time.Millisecond)
	for _, at := range []time.Time{soon, time.Now().Add(time.Hour)} {
		ev := &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "s", Body: "b", RequestedAt: time.Now()}
		if _, err := pub.PublishAt(ctx, at, ev); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(time.Until(soon) + 10*time.Millisecond) // no scheduler runs: one is overdue
	// email-sender's dead letters fill their stream to the cap.
	for n := 0; n < bus.DefaultDeadLetterMaxLen; {
		pipe := rdb.Pipeline()
		for i := 0; i < 10_000 && n < bus.DefaultDeadLetterMaxLen; i, n = i+1, n+1 {
			pipe.XAdd(ctx, &redis.XAddArgs{Stream: bus.DeadLetterStream("email-sender"), Values: []string{"error", fmt.Sprint("dead ", n)}})
		}
		if _, err := pipe.Exec(ctx); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("text", func(t *testing.T) {
		stdout, stderr, code := conveyor(t, env, "status")
		if code != 0 {
			t.Fatalf("conveyor status: exit %d\n%s%s", code, stdout, stderr)
		}
		rows := 0
		for _, line := range strings.Split(stdout, "\n") {
			if f := strings.Fields(line); len(f) > 4 && f[0] == events.TypeEmailRequested {
				rows++
				if f[2] != "2" || f[3] != "1" {
					t.Errorf("row %q: delayed %s, overdue %s; want 2 and 1", line, f[2], f[3])
				}
			}
		}
		if rows == 0 || !strings.Contains(stdout, "DELAYED") || !strings.Contains(stdout, "OVERDUE") {
			t.Errorf("no delayed events shown for %s:\n%s", events.TypeEmailRequested, stdout)
		}
		for _, want := range []string{
			"dead letters of email-sender: 100000 (cap 100,000)\n  at the cap: each new dead letter of email-sender drops the oldest\n",
			"dead letters of document-processor: 0 (cap 100,000)\n",
		} {
			if !strings.Contains(stdout, want) {
				t.Errorf("output lacks %q:\n%s", want, stdout)
			}
		}
		if strings.Contains(stdout, "dead letter of document-processor drops") {
			t.Errorf("document-processor's dead letters said to be at the cap:\n%s", stdout)
		}
	})

	t.Run("json", func(t *testing.T) {
		stdout, stderr, code := conveyor(t, env, "status", "--json")
		if code != 0 {
			t.Fatalf("conveyor status --json: exit %d\n%s%s", code, stdout, stderr)
		}
		var st bus.Status
		if err := json.Unmarshal([]byte(stdout), &st); err != nil {
			t.Fatalf("%v\n%s", err, stdout)
		}
		if st.DeadLetterCap != bus.DefaultDeadLetterMaxLen || st.DeadLetters["email-sender"] != bus.DefaultDeadLetterMaxLen {
			t.Errorf("dead letters %v, cap %d; want email-sender at the cap %d", st.DeadLetters, st.DeadLetterCap, bus.DefaultDeadLetterMaxLen)
		}
		found := false
		for _, s := range st.Streams {
			if s.Stream == events.TypeEmailRequested {
				found = true
				if s.Delayed != 2 || s.DelayedOverdue != 1 {
					t.Errorf("%s: delayed %d, overdue %d; want 2 and 1", s.Stream, s.Delayed, s.DelayedOverdue)
				}
			}
		}
		if !found {
			t.Errorf("no stream %s in %s", events.TypeEmailRequested, stdout)
		}
		for _, key := range []string{`"delayed":`, `"delayed_overdue":`, `"dead_letter_cap":`} {
			if !strings.Contains(stdout, key) {
				t.Errorf("JSON lacks %s: %s", key, stdout)
			}
		}
	})
}
