package scheduler

import (
	"log/slog"
	"testing"
	"time"

	"github.com/conveyor/conveyor/events"
)

// An email.requested schedule that leaves email_id out gets one per tick:
// new at every tick, so each tick's email is sent, and the same whenever
// one tick is built again (another replica, a tick fired again), so that
// the email sender still sends a repeated tick once. It is the id
// ${tick_id} gives.
func TestLeftOutEmailIDIsTheTicks(t *testing.T) {
	t.Parallel()
	f, err := ParseFile([]byte(`
schedules:
  - name: digest
    cron: "@hourly"
    event: email.requested
    data: {to: ops@example.com, subject: "Digest ${tick_id}", body: b, requested_at: "${tick_time}"}
`), "s.yaml")
	if err != nil {
		t.Fatal(err)
	}
	active, err := f.schedules(nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	s := active[0]
	emailID := func(tick time.Time) (id, subject string) {
		t.Helper()
		ev, err := s.event(tick)
		if err != nil {
			t.Fatal(err)
		}
		req := ev.(*events.EmailRequested)
		return req.EmailID, req.Subject
	}
	first := time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC)
	a, subject := emailID(first)
	again, _ := emailID(first)
	b, _ := emailID(first.Add(time.Hour))
	if !events.IsUUID(a) || a != again || a == b {
		t.Fatalf("email ids: %s and %s for one tick, %s for the next; want one UUID per tick", a, again, b)
	}
	if subject != "Digest "+a {
		t.Errorf("subject %q: ${tick_id} is not the email id %s", subject, a)
	}
}
