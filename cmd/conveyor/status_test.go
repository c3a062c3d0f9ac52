package main_test

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/embedded"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/handlers"
	"github.com/conveyor/conveyor/internal/harness"
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

// conveyor status shows, per group, how old its oldest entry not yet
// delivered and its oldest pending entry are (from their ids, on Redis's
// clock), and the members of delay and retry sets set aside as
// unreadable, with the command that lists them.
func TestStatusShowsOldestEntriesAndUnreadableMembers(t *testing.T) {
	t.Parallel()
	off := false
	r := testenv.StartRedis(t, embedded.RedisConfig{AppendOnly: &off})
	env := []string{"REDIS_URL=" + r.URL()}
	rdb := redis.NewClient(&redis.Options{Addr: r.Addr()})
	t.Cleanup(func() { _ = rdb.Close() })
	ctx := t.Context()
	harness.Binary(t) // built before the entries' ages start to count

	stream, group := events.TypeDocumentUploaded, handlers.DocumentGroup
	if err := rdb.XGroupCreateMkStream(ctx, stream, group, "0").Err(); err != nil {
		t.Fatal(err)
	}
	now, err := rdb.Time(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	// Added 120 s and 60 s ago; the first is read, and pending.
	for _, age := range []time.Duration{120 * time.Second, 60 * time.Second} {
		id := fmt.Sprintf("%d-0", now.Add(-age).UnixMilli())
		if err := rdb.XAdd(ctx, &redis.XAddArgs{Stream: stream, ID: id, Values: []string{"k", "v"}}).Err(); err != nil {
			t.Fatal(err)
		}
	}
	if err := rdb.XReadGroup(ctx, &redis.XReadGroupArgs{Group: group, Consumer: "c", Streams: []string{stream, ">"}, Count: 1}).Err(); err != nil {
		t.Fatal(err)
	}
	delayedAside := bus.UnreadableKey(bus.DelayedSet(events.TypeEmailRequested))
	retryAside := bus.UnreadableKey(bus.RetrySet(stream, group))
	if err := rdb.RPush(ctx, delayedAside, "garbage").Err(); err != nil {
		t.Fatal(err)
	}
	if err := rdb.RPush(ctx, retryAside, "garbage", "more garbage").Err(); err != nil {
		t.Fatal(err)
	}

	t.Run("text", func(t *testing.T) {
		stdout, stderr, code := conveyor(t, env, "status")
		if code != 0 {
			t.Fatalf("conveyor status: exit %d\n%s%s", code, stdout, stderr)
		}
		if !strings.Contains(stdout, "OLDEST WAITING") || !strings.Contains(stdout, "OLDEST PENDING") {
			t.Errorf("no OLDEST WAITING and OLDEST PENDING columns:\n%s", stdout)
		}
		// STREAM LENGTH DELAYED OVERDUE GROUP PENDING OLDEST-PENDING LAG OLDEST-WAITING …
		row := false
		for _, line := range strings.Split(stdout, "\n") {
			if f := strings.Fields(line); len(f) > 8 && f[0] == stream && f[4] == group {
				row = true
				// Generous: the run may take a while.
				if !regexp.MustCompile(`^[23]m\d\ds$`).MatchString(f[6]) || !regexp.MustCompile(`^[12]m\d\ds$`).MatchString(f[8]) {
					t.Errorf("row %q: oldest pending %s, oldest waiting %s; want about 2m00s and 1m00s", line, f[6], f[8])
				}
			}
		}
		if !row {
			t.Errorf("no row for %s of %s:\n%s", group, stream, stdout)
		}
		for _, want := range []string{
			"unreadable delayed events of " + events.TypeEmailRequested + ": 1 set aside",
			"LRANGE '" + delayedAside + "' 0 -1",
			"unreadable retries of " + group + " on " + stream + ": 2 set aside",
			"LRANGE '" + retryAside + "' 0 -1",
		} {
			if !strings.Contains(stdout, want) {
				t.Errorf("output lacks %q:\n%s", want, stdout)
			}
		}
		if n := strings.Count(stdout, "LRANGE"); n != 2 {
			t.Errorf("%d lists of unreadable members shown, want the 2 that are not empty:\n%s", n, stdout)
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
		seen := 0
		for _, s := range st.Streams {
			want := int64(0)
			if s.Stream == events.TypeEmailRequested {
				want = 1
			}
			if s.DelayedUnreadable != want {
				t.Errorf("%s: delayed_unreadable %d, want %d", s.Stream, s.DelayedUnreadable, want)
			}
			for _, g := range s.Groups {
				if s.Stream != stream || g.Group != group {
					continue
				}
				seen++
				if g.OldestPendingSeconds < 119 || g.OldestPendingSeconds > 180 || g.OldestWaitingSeconds < 59 || g.OldestWaitingSeconds > 120 {
					t.Errorf("oldest pending %vs, oldest waiting %vs; want about 120 and 60", g.OldestPendingSeconds, g.OldestWaitingSeconds)
				}
				if g.RetryUnreadable != 2 {
					t.Errorf("retry_unreadable %d, want 2", g.RetryUnreadable)
				}
			}
		}
		if seen != 1 {
			t.Errorf("%d groups %s of %s in %s", seen, group, stream, stdout)
		}
		for _, key := range []string{`"oldest_waiting_seconds":`, `"oldest_pending_seconds":`, `"delayed_unreadable":0`, `"retry_unreadable":0`} {
			if !strings.Contains(stdout, key) {
				t.Errorf("JSON lacks %s: %s", key, stdout)
			}
		}
	})
}
