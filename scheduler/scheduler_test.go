package scheduler_test

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/internal/testenv"
	"github.com/conveyor/conveyor/scheduler"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

const emailSchedule = `
schedules:
  - name: %s
    cron: "@every 1s"
    event: email.requested
    data:
      email_id: "${tick_id}"
      to: ops@example.com
      subject: "Tick ${tick_time}"
      body: "Scheduled."
      requested_at: "${tick_time}"
`

func TestBadSchedulesAreStartupErrorsNamingTheSchedule(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	tests := []struct {
		name string
		yaml string
		want []string
	}{
		{name: "bad cron", yaml: "schedules:\n  - {name: nightly, cron: \"61 * * * *\", event: email.requested}\n", want: []string{`"nightly"`, "invalid cron"}},
		{name: "bad zone", yaml: "schedules:\n  - {name: berlin, cron: \"@hourly\", timezone: Mars/Olympus, event: email.requested}\n", want: []string{`"berlin"`, "timezone"}},
		{name: "unknown event", yaml: "schedules:\n  - {name: x, cron: \"@hourly\", event: nope.happened}\n", want: []string{`"x"`, "unknown event type"}},
		{name: "bad data", yaml: "schedules:\n  - {name: report, cron: \"@hourly\", event: email.requested, data: {to: nobody}}\n", want: []string{`"report"`, "data"}},
		{name: "bad policy", yaml: "schedules:\n  - {name: p, cron: \"@hourly\", event: email.requested, missed: sometimes}\n", want: []string{`"p"`, "missed"}},
		{name: "cron never fires", yaml: "schedules:\n  - {name: feb30, cron: \"0 0 30 2 *\", event: email.requested}\n", want: []string{`"feb30"`, "never fires"}},
		{name: "unknown builtin", yaml: "builtin:\n  nope: {enabled: false}\n", want: []string{`"nope"`}},
		{name: "two problems at once", yaml: "schedules:\n  - {name: a, cron: bad, event: email.requested}\n  - {name: b, cron: \"@daily\", event: nope}\n", want: []string{`"a"`, `"b"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f, err := scheduler.ParseFile([]byte(tt.yaml), "test.yaml")
			if err == nil {
				_, err = scheduler.New(scheduler.Config{Redis: rdb, Publisher: pub, File: f, Logger: logger()})
			}
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
	// The file of README configures built-ins; a replica without a
	// database runs none, and still takes the file.
	readme := "builtin:\n  blob-retention: {cron: \"@daily\"}\n  stuck-documents: {enabled: false}\n"
	if f, err := scheduler.ParseFile([]byte(readme), "readme.yaml"); err != nil {
		t.Errorf("README's file: %v", err)
	} else if _, err := scheduler.New(scheduler.Config{Redis: rdb, Publisher: pub, File: f, Logger: logger()}); err != nil {
		t.Errorf("a scheduler without built-ins refuses README's file: %v", err)
	}
	if _, err := scheduler.ParseFile([]byte("schedules:\n  - {name: a, crn: x}\n"), "typo.yaml"); err == nil || !strings.Contains(err.Error(), "crn") {
		t.Errorf("an unknown key must be an error naming it: %v", err)
	}
}

// Two schedulers on one Redis, one schedule: every tick is published once,
// with the tick's derived id, and the two replicas share the work.
func TestEveryTickFiresOnceAcrossReplicas(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	name := "tick-" + strings.Trim(strings.ReplaceAll(prefix, ":", "-"), "-")
	file, err := scheduler.ParseFile([]byte(strings.ReplaceAll(emailSchedule, "%s", name)), "s.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	for i := 0; i < 2; i++ {
		pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, StreamPrefix: prefix})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = pub.Close() })
		sc, err := scheduler.New(scheduler.Config{Redis: rdb, Publisher: pub, File: file, Logger: logger(), Identity: "r" + string(rune('0'+i))})
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = sc.Run(ctx)
		}()
	}
	time.Sleep(4500 * time.Millisecond)
	cancel()
	wg.Wait()

	xs, err := rdb.XRange(t.Context(), prefix+events.TypeEmailRequested, "-", "+").Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(xs) < 3 {
		t.Fatalf("%d ticks published in 4.5s of a 1s schedule", len(xs))
	}
	seen := map[string]bool{}
	subjects := map[string]bool{}
	for _, x := range xs {
		id := x.Values["_watermill_message_uuid"].(string)
		if seen[id] {
			t.Fatalf("tick event %s published twice", id)
		}
		seen[id] = true
		var req events.EmailRequested
		if err := json.Unmarshal([]byte(x.Values["payload"].(string)), &req); err != nil {
			t.Fatal(err)
		}
		if subjects[req.Subject] || !events.IsUUID(req.EmailID) {
			t.Fatalf("tick %q published twice or without a per-tick email id: %+v", req.Subject, req)
		}
		subjects[req.Subject] = true
	}
}

// A delayed event is moved into its stream when due, not before, and once
// even with several schedulers moving.
func TestDelayedEventsMoveOnceWhenDue(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, StreamPrefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })
	stream := prefix + events.TypeEmailRequested
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	for i := 0; i < 3; i++ {
		sc, err := scheduler.New(scheduler.Config{Redis: rdb, Publisher: pub, Streams: []string{stream}, Logger: logger()})
		if err != nil {
			t.Fatal(err)
		}
		go func() { _ = sc.Run(ctx) }()
	}
	due := map[string]time.Time{}
	start := time.Now()
	for i := 0; i < 200; i++ {
		at := start.Add(time.Duration(200+i*7) * time.Millisecond)
		ev := &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "s", Body: "b", RequestedAt: start}
		id, err := pub.PublishAt(t.Context(), at, ev)
		if err != nil {
			t.Fatal(err)
		}
		due[id] = at
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		n, _ := rdb.XLen(t.Context(), stream).Result()
		if n >= int64(len(due)) || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // a duplicate would show up now
	xs, err := rdb.XRange(t.Context(), stream, "-", "+").Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(xs) != len(due) {
		t.Fatalf("%d entries for %d delayed events", len(xs), len(due))
	}
	for _, x := range xs {
		id := x.Values["_watermill_message_uuid"].(string)
		ms, _, _ := strings.Cut(x.ID, "-")
		var movedMS int64
		_ = json.Unmarshal([]byte(ms), &movedMS)
		if movedMS < due[id].UnixMilli() {
			t.Errorf("event %s moved %dms before it was due", id, due[id].UnixMilli()-movedMS)
		}
	}
}

// TestFileValidate checks a schedules file as New does, without Redis.
func TestFileValidate(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name, yaml, wantErr string
	}{
		{name: "good", yaml: fmt.Sprintf(emailSchedule, "report") + "builtin:\n  inbox-retention: {cron: \"* * * * *\"}\n"},
		{name: "bad cron", yaml: "schedules:\n  - {name: report, cron: \"0 25 * * *\", event: email.requested}\n", wantErr: `"report"`},
		{name: "unknown builtin", yaml: "builtin:\n  no-such-job: {cron: \"* * * * *\"}\n", wantErr: `"no-such-job"`},
		{name: "bad builtin cron", yaml: "builtin:\n  blob-retention: {cron: \"61 * * * *\"}\n", wantErr: `"blob-retention"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f, err := scheduler.ParseFile([]byte(tt.yaml), "test.yaml")
			if err != nil {
				t.Fatal(err)
			}
			err = f.Validate()
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Errorf("Validate = %v, want an error naming %s", err, tt.wantErr)
			}
		})
	}
}

// TestFileValidateChecksDataAsTheAPIDoes: a schedule's data is refused, with
// an error naming the member, when it fixes the id of what its event
// creates (consumers deduplicate on that id, so only the first tick would
// take effect: an email.requested schedule would send one email and then
// report every later one sent), or when it has a member the event does not
// have (dropped in silence otherwise). An id left out is filled in per tick,
// and events that report on an existing email or document may name it.
func TestFileValidateChecksDataAsTheAPIDoes(t *testing.T) {
	t.Parallel()
	const fixed = "0190d4c6-8a0a-7cc8-b3a1-5d1f9ac4e2b7"
	email := func(extra string) string {
		return "schedules:\n  - name: digest\n    cron: \"@daily\"\n    event: email.requested\n" +
			"    data: {to: ops@example.com, subject: s, body: b, requested_at: \"${tick_time}\"" + extra + "}\n"
	}
	for _, tt := range []struct {
		name, yaml string
		want       []string // empty: accepted
	}{
		{name: "fixed email_id", yaml: email(", email_id: " + fixed),
			want: []string{`"digest"`, "data.email_id", "${tick_id}", "email.sent"}},
		{name: "fixed email_id in other letter case", yaml: email(", EMAIL_ID: " + fixed),
			want: []string{`"digest"`, "data.EMAIL_ID", "${tick_id}"}},
		{name: "fixed email_id of a scheduled email", yaml: "schedules:\n  - {name: later, cron: \"@daily\", event: email.scheduled, " +
			"data: {email_id: " + fixed + ", to: ops@example.com, send_at: \"${tick_time}\", scheduled_at: \"${tick_time}\"}}\n",
			want: []string{`"later"`, "data.email_id", "${tick_id}"}},
		{name: "fixed doc_id", yaml: "schedules:\n  - {name: upload, cron: \"@daily\", event: document.uploaded, data: {doc_id: " + fixed +
			", filename: a.txt, size: 1, sha256: " + strings.Repeat("a", 64) + ", blob_key: " + strings.Repeat("a", 64) + ", uploaded_at: \"${tick_time}\"}}\n",
			want: []string{`"upload"`, "data.doc_id", "${tick_id}"}},
		{name: "unknown member", yaml: email(", email_id: \"${tick_id}\", cc: boss@example.com"),
			want: []string{`"digest"`, "cc", "not a known field"}},
		{name: "email_id per tick", yaml: email(", email_id: \"${tick_id}\"")},
		{name: "email_id left out", yaml: email("")},
		{name: "a report on an existing email names it", yaml: "schedules:\n  - {name: report, cron: \"@daily\", event: email.sent, " +
			"data: {email_id: " + fixed + ", attempts: 1, sent_at: \"${tick_time}\"}}\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f, err := scheduler.ParseFile([]byte(tt.yaml), "test.yaml")
			if err != nil {
				t.Fatal(err)
			}
			err = f.Validate()
			if len(tt.want) == 0 {
				if err != nil {
					t.Fatalf("Validate = %v, want it accepted", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate accepted it, want an error naming %q", tt.want)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Validate = %q, lacks %q", err, w)
				}
			}
		})
	}
}
