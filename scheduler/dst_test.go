package scheduler_test

import (
	"slices"
	"testing"
	"time"

	"github.com/conveyor/conveyor/internal/testenv"
	"github.com/conveyor/conveyor/scheduler"
)

// A schedule at a fixed time of day fires once a day across daylight
// saving changes, as cron users expect: a time the clock skips fires at the
// first instant after the gap, a time the clock shows twice fires the first
// time only. Schedules that fire every minute or hour, or every d, fire by
// elapsed time, through the changes as on any other day.
func TestFixedTimeSchedulesFireOnceADayAcrossDaylightSaving(t *testing.T) {
	t.Parallel()
	rdb := testenv.Redis(t)
	prefix := testenv.Prefix(t)
	at := func(s string) time.Time {
		tm, err := time.Parse(time.RFC3339, s)
		if err != nil {
			t.Fatal(err)
		}
		return tm
	}
	// every returns the instants after from, up to to, d apart.
	every := func(from, to time.Time, d time.Duration) []time.Time {
		var ticks []time.Time
		for tick := from.Add(d); !tick.After(to); tick = tick.Add(d) {
			ticks = append(ticks, tick)
		}
		return ticks
	}
	tests := []struct {
		name     string
		cron     string
		timezone string
		from, to time.Time
		want     []time.Time
	}{
		{
			name: "skipped time, with seconds", cron: "0 30 2 * * *", timezone: "Europe/Berlin",
			from: at("2026-03-28T00:00:00+01:00"), to: at("2026-03-31T00:00:00+02:00"),
			want: []time.Time{at("2026-03-28T02:30:00+01:00"), at("2026-03-29T03:00:00+02:00"), at("2026-03-30T02:30:00+02:00")},
		},
		{
			name: "skipped time", cron: "30 2 * * *", timezone: "Europe/Berlin",
			from: at("2026-03-28T00:00:00+01:00"), to: at("2026-03-31T00:00:00+02:00"),
			want: []time.Time{at("2026-03-28T02:30:00+01:00"), at("2026-03-29T03:00:00+02:00"), at("2026-03-30T02:30:00+02:00")},
		},
		{
			name: "repeated time, with seconds", cron: "0 30 2 * * *", timezone: "Europe/Berlin",
			from: at("2026-10-24T00:00:00+02:00"), to: at("2026-10-27T00:00:00+01:00"),
			want: []time.Time{at("2026-10-24T02:30:00+02:00"), at("2026-10-25T02:30:00+02:00"), at("2026-10-26T02:30:00+01:00")},
		},
		{
			name: "repeated time", cron: "30 2 * * *", timezone: "Europe/Berlin",
			from: at("2026-10-24T00:00:00+02:00"), to: at("2026-10-27T00:00:00+01:00"),
			want: []time.Time{at("2026-10-24T02:30:00+02:00"), at("2026-10-25T02:30:00+02:00"), at("2026-10-26T02:30:00+01:00")},
		},
		{
			// From within the second pass of the repeated hour: 02:45 has
			// fired, in the first.
			name: "repeated time, asked within the repeat", cron: "45 2 * * *", timezone: "Europe/Berlin",
			from: at("2026-10-25T02:40:00+01:00"), to: at("2026-10-27T00:00:00+01:00"),
			want: []time.Time{at("2026-10-26T02:45:00+01:00")},
		},
		{
			name: "repeated time, New York", cron: "30 1 * * *", timezone: "America/New_York",
			from: at("2026-10-31T00:00:00-04:00"), to: at("2026-11-03T00:00:00-05:00"),
			want: []time.Time{at("2026-10-31T01:30:00-04:00"), at("2026-11-01T01:30:00-04:00"), at("2026-11-02T01:30:00-05:00")},
		},
		{
			name: "every minute, through the skipped hour", cron: "* * * * *", timezone: "Europe/Berlin",
			from: at("2026-03-29T01:00:00+01:00"), to: at("2026-03-29T04:00:00+02:00"),
			want: every(at("2026-03-29T01:00:00+01:00"), at("2026-03-29T04:00:00+02:00"), time.Minute),
		},
		{
			name: "every minute, through the repeated hour", cron: "* * * * *", timezone: "Europe/Berlin",
			from: at("2026-10-25T01:00:00+02:00"), to: at("2026-10-25T04:00:00+01:00"),
			want: every(at("2026-10-25T01:00:00+02:00"), at("2026-10-25T04:00:00+01:00"), time.Minute),
		},
		{
			name: "hourly, through the repeated hour", cron: "@hourly", timezone: "Europe/Berlin",
			from: at("2026-10-25T01:00:00+02:00"), to: at("2026-10-25T04:00:00+01:00"),
			want: every(at("2026-10-25T01:00:00+02:00"), at("2026-10-25T04:00:00+01:00"), time.Hour),
		},
		{
			name: "every d", cron: "@every 30m", timezone: "Europe/Berlin",
			from: at("2026-10-25T01:00:00+02:00"), to: at("2026-10-25T04:00:00+01:00"),
			want: every(at("2026-10-25T01:00:00+02:00"), at("2026-10-25T04:00:00+01:00"), 30*time.Minute),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			name := uniqueName(prefix) // its ticks are only computed
			f := emailFile(t, name, tt.cron, "timezone: "+tt.timezone)
			sc := newScheduler(t, rdb, prefix, scheduler.Config{File: f})
			if got := scheduler.Ticks(t, sc, name, tt.from, tt.to); !slices.EqualFunc(got, tt.want, time.Time.Equal) {
				t.Errorf("ticks from %s to %s:\n%v\nwant\n%v", tt.from, tt.to, got, tt.want)
			}
		})
	}
}
