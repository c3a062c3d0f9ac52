// Package scheduler fires periodic events (cron) and moves delayed events
// into their streams when they come due.
//
// Any number of scheduler replicas may run: there is no leader. Every
// replica computes every tick; each firing is keyed by (schedule, tick time)
// and published with an atomic set-if-absent plus append in Redis, so
// exactly one replica publishes each tick, and a replica killed at any point
// neither loses the tick (the others fire it) nor doubles it. The event id
// is derived from the same key, so even a re-fired tick would be absorbed
// downstream.
//
// scheduler must not import api, handlers or projector.
package scheduler

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/robfig/cron/v3"
	"go.yaml.in/yaml/v3"

	"github.com/conveyor/conveyor/events"
)

// Missed-tick policies: what happens to ticks that fell while no replica
// ran, and to ticks that came due at once because the replica was paused
// or its clock stepped, or while a failed tick was retried.
const (
	// MissedSkip drops them: missed ticks do not fire, and of ticks due at
	// once only the latest does.
	MissedSkip = "skip"
	// MissedCatchUp fires them, oldest first, up to CatchUpLimit (the most
	// recent). A tick whose firing fails (Redis unavailable) is retried
	// while no more than CatchUpLimit ticks wait, while a skip schedule
	// gives it up when its next tick is due. No tick fires later than its
	// marker certainly lives (maxAge).
	MissedCatchUp = "catch_up"
)

// Schedule is one periodic event.
type Schedule struct {
	// Name identifies the schedule; it is part of every tick's key, so
	// renaming a schedule makes a new one.
	Name string `yaml:"name"`
	// Cron is a cron expression with an optional seconds field
	// ("*/5 * * * *" or "0 */5 * * * *"), or a descriptor such as
	// "@hourly" or "@every 30s". "@every d" ticks at the multiples of d
	// since the Unix epoch.
	Cron string `yaml:"cron"`
	// Timezone is an IANA zone name; defaults to UTC.
	Timezone string `yaml:"timezone"`
	// Event is the event type published at each tick.
	Event string `yaml:"event"`
	// Data is the event payload. In string values, ${tick_id} becomes a
	// UUID unique to the tick (for ids such as email_id) and ${tick_time}
	// the tick's time in RFC 3339. The id of what the event creates
	// (perTickIDs: email_id, doc_id) must contain ${tick_id}; left out, it
	// is set to what ${tick_id} gives.
	Data map[string]any `yaml:"data"`
	// Missed is skip (default) or catch_up.
	Missed string `yaml:"missed"`
	// CatchUpLimit bounds how many missed ticks catch_up fires. Defaults
	// to 10.
	CatchUpLimit int `yaml:"catch_up_limit"`
	// Enabled turns a schedule off when false. Defaults to true.
	Enabled *bool `yaml:"enabled"`

	sched cron.Schedule
	loc   *time.Location
	// wall, set for an expression that fires at fixed times of day, is
	// its spec matched against the wall clock of wallLoc (see wallNext).
	wall    *cron.SpecSchedule
	wallLoc *time.Location
	// job, if set, runs instead of publishing an event (built-in
	// maintenance).
	job Job
}

var cronParser = cron.NewParser(cron.SecondOptional | cron.Minute | cron.Hour | cron.Dom | cron.Month | cron.Dow | cron.Descriptor)

// File is the YAML of SCHEDULES_FILE.
type File struct {
	Schedules []Schedule `yaml:"schedules"`
	// Builtin adjusts the built-in schedules by name: turn one off with
	// enabled: false, or change its cron.
	Builtin map[string]BuiltinOverride `yaml:"builtin"`
}

// BuiltinOverride changes a built-in schedule.
type BuiltinOverride struct {
	Enabled *bool  `yaml:"enabled"`
	Cron    string `yaml:"cron"`
}

// LoadFile reads and parses a schedules file. Unknown keys are errors, so a
// typo does not silently disable a setting.
func LoadFile(path string) (File, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return File{}, fmt.Errorf("schedules file: %w", err)
	}
	return ParseFile(b, path)
}

// ParseFile parses the YAML of a schedules file.
func ParseFile(b []byte, name string) (File, error) {
	var f File
	dec := yaml.NewDecoder(strings.NewReader(string(b)))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil && err.Error() != "EOF" {
		return File{}, fmt.Errorf("schedules file %s: %w", name, err)
	}
	return f, nil
}

// prepare validates a schedule and parses its expression and zone. Every
// error names the schedule.
func (s *Schedule) prepare() error {
	var errs []error
	fail := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("schedule %q: "+format, append([]any{s.Name}, args...)...))
	}
	if s.Name == "" {
		errs = append(errs, errors.New("a schedule has no name"))
	} else if strings.ContainsAny(s.Name, " \t{}") {
		fail("name must not contain spaces or braces")
	}
	s.loc = time.UTC
	if s.Timezone != "" {
		loc, err := time.LoadLocation(s.Timezone)
		if err != nil {
			fail("unknown timezone %q", s.Timezone)
		} else {
			s.loc = loc
		}
	}
	if s.Cron == "" {
		fail("cron is required")
	} else if sched, err := cronParser.Parse(s.Cron); err != nil {
		fail("invalid cron expression %q: %v", s.Cron, err)
	} else {
		s.sched = sched
		if spec, ok := sched.(*cron.SpecSchedule); ok && fixedTimeOfDay(s.Cron) {
			wall := *spec
			s.wallLoc = s.loc
			if spec.Location != time.Local { // CRON_TZ=... in the expression
				s.wallLoc = spec.Location
			}
			wall.Location = time.UTC
			s.wall = &wall
		}
		// An expression such as "0 0 30 2 *" parses but matches no date;
		// it would never fire, so it is surely a mistake.
		if s.next(time.Now()).IsZero() {
			fail("cron expression %q never fires", s.Cron)
		}
	}
	switch s.Missed {
	case "":
		s.Missed = MissedSkip
	case MissedSkip, MissedCatchUp:
	default:
		fail("missed must be skip or catch_up, not %q", s.Missed)
	}
	if s.CatchUpLimit == 0 {
		s.CatchUpLimit = 10
	}
	if s.CatchUpLimit < 0 {
		fail("catch_up_limit must be positive")
	}
	if s.job == nil {
		if events.LatestVersion(s.Event) == 0 {
			fail("unknown event type %q (known: %s)", s.Event, strings.Join(events.Types(), ", "))
		} else {
			if id, ok := perTickIDs[s.Event]; ok {
				for _, k := range s.idKeys(id.field) {
					if v, isString := s.Data[k].(string); !isString || !strings.Contains(v, "${tick_id}") {
						fail("data.%s must contain ${tick_id}, or be left out to get a new id at every tick: %s", k, id.why)
					}
				}
			}
			if _, err := s.event(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)); err != nil {
				fail("data: %v", err)
			}
		}
	}
	return errors.Join(errs...)
}

// perTickIDs names, by event type, the member of data that identifies what
// the event creates, and why a fixed value there is refused. Consumers
// deduplicate on that id, so a schedule that gives every tick the same one
// would act on its first tick only; the events that merely report on an
// existing email or document (email.sent, document.processed, ...) name it
// on purpose and are not listed.
var perTickIDs = map[string]struct{ field, why string }{
	events.TypeEmailRequested: {"email_id", "the email sender sends each email_id once (its sent mark lasts 7 days), " +
		"so every later tick would send nothing and still publish email.sent"},
	events.TypeEmailScheduled: {"email_id", "every tick would name the same email, " +
		"which keeps the status its first tick gave it"},
	events.TypeDocumentUploaded: {"doc_id", "every tick would name the same document, " +
		"whose record each tick would overwrite instead of adding its own"},
}

// idKeys returns the keys of Data that decode into the member field.
// encoding/json matches member names without regard to case, so "Email_ID"
// sets email_id as well, and must be checked as well.
func (s *Schedule) idKeys(field string) []string {
	var keys []string
	for k := range s.Data {
		if strings.EqualFold(k, field) {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	return keys
}

func (s *Schedule) enabled() bool { return s.Enabled == nil || *s.Enabled }

// next returns the first tick strictly after t, or the zero time if the
// schedule has none within five years.
func (s *Schedule) next(t time.Time) time.Time {
	if every, ok := s.sched.(cron.ConstantDelaySchedule); ok {
		// robfig counts "@every" from the time it is asked, so replicas
		// started at different times would compute different ticks, their
		// tick keys would never collide, and each would publish its own.
		// The multiples of the period since the Unix epoch are the same in
		// every replica and across restarts.
		return alignedNext(t, every.Delay)
	}
	if s.wall != nil {
		return s.wallNext(t)
	}
	return s.sched.Next(t.In(s.loc))
}

// fixedTimeOfDay reports whether a cron expression fires at fixed times of
// day: neither its minute nor its hour field is a wildcard ("*", "*/n",
// "?"), as in "30 2 * * *" or "@daily". As in Vixie cron, only those are
// adjusted around daylight saving changes; an expression such as "* * * *
// *" or "@hourly" fires by the clock as it goes, every minute or hour that
// passes.
func fixedTimeOfDay(expr string) bool {
	fields := strings.Fields(expr)
	if len(fields) > 0 && (strings.HasPrefix(fields[0], "TZ=") || strings.HasPrefix(fields[0], "CRON_TZ=")) {
		fields = fields[1:]
	}
	var minute, hour string
	switch {
	case len(fields) == 1 && strings.HasPrefix(fields[0], "@"):
		// @yearly, @monthly, @weekly, @daily: midnight; @hourly: every hour.
		return fields[0] != "@hourly"
	case len(fields) == 5:
		minute, hour = fields[0], fields[1]
	case len(fields) == 6:
		minute, hour = fields[1], fields[2]
	default:
		return false
	}
	wild := func(f string) bool { return strings.HasPrefix(f, "*") || strings.HasPrefix(f, "?") }
	return !wild(minute) && !wild(hour)
}

// wallNext is next for an expression that fires at fixed times of day, so
// that it fires once on the days daylight saving time begins and ends, as
// cron users expect: robfig matches instants, so "30 2 * * *" in
// Europe/Berlin would not fire on the day 02:30 does not exist and fire
// twice on the day it exists twice. Ticks are matched against wall-clock
// times instead, each then fired at the first instant that shows it, or,
// if the clock skips it, at the end of the skipped hour.
func (s *Schedule) wallNext(t time.Time) time.Time {
	// The wall clock reading of t, as a time in UTC (no daylight saving).
	w := t.In(s.wallLoc)
	y, mo, d := w.Date()
	h, mi, sec := w.Clock()
	w = time.Date(y, mo, d, h, mi, sec, w.Nanosecond(), time.UTC)
	for {
		// After the clock went back, the next wall time may have shown
		// first before t: it has fired then, so the one after is next.
		if w = s.wall.Next(w); w.IsZero() {
			return w
		}
		if at := firstInstant(w, s.wallLoc); at.After(t) {
			return at
		}
	}
}

// firstInstant returns the first instant whose wall clock in loc reads w
// (w's fields, read in UTC). When the clock skips w (it moves forward past
// it), it returns the instant it moves: the first instant after the gap.
func firstInstant(w time.Time, loc *time.Location) time.Time {
	// Zone offsets are within a day of UTC: every instant that can read w
	// is within two days of w read in UTC.
	horizon := w.Add(48 * time.Hour)
	at := w.Add(-48 * time.Hour).In(loc)
	prevOff, first := 0, true
	for {
		_, off := at.Zone()
		start, end := at.ZoneBounds()
		shift := time.Duration(off) * time.Second
		// The instant of this zone period that reads w, if any.
		if c := w.Add(-shift); (start.IsZero() || !c.Before(start)) && (end.IsZero() || c.Before(end)) {
			return c.In(loc)
		}
		// A forward change at start skipped the wall times from start in
		// the previous offset up to start in this one.
		if !first && off > prevOff && !w.Before(start.Add(time.Duration(prevOff)*time.Second)) && w.Before(start.Add(shift)) {
			return start
		}
		if end.IsZero() || end.After(horizon) {
			// Not reached: every wall time is read or skipped.
			return time.Date(w.Year(), w.Month(), w.Day(), w.Hour(), w.Minute(), w.Second(), w.Nanosecond(), loc)
		}
		prevOff, first, at = off, false, end
	}
}

// alignedNext returns the first multiple of d since the Unix epoch strictly
// after t, in UTC.
func alignedNext(t time.Time, d time.Duration) time.Time {
	n := t.UnixNano()
	r := n % int64(d)
	if r < 0 {
		r += int64(d)
	}
	// Adding d to a time, not to nanoseconds, cannot overflow.
	return time.Unix(0, n-r).UTC().Add(d)
}

// tickKey identifies one firing of the schedule.
func (s *Schedule) tickKey(tick time.Time) string {
	return s.Name + "@" + tick.UTC().Format(time.RFC3339Nano)
}

// tickID is the event id of a tick: derived from its key, so it is the same
// in every replica.
func (s *Schedule) tickID(tick time.Time) string {
	return events.DerivedIDAt(tick, s.tickKey(tick))
}

// event builds the tick's event from Data.
//
// Data is decoded strictly, as the API decodes what clients send: a member
// the event does not have (a misspelt "subjet", an unsupported "cc") is an
// error naming it, not dropped in silence at every tick.
func (s *Schedule) event(tick time.Time) (events.Event, error) {
	tickID := events.DerivedIDAt(tick, s.tickKey(tick)+"/data")
	data := substitute(s.Data, map[string]string{
		"${tick_id}":   tickID,
		"${tick_time}": tick.UTC().Format(time.RFC3339),
	}).(map[string]any)
	// Left out, the id of what the event creates is the tick's own: the
	// same in every replica and when a tick is fired again, so that
	// consumers still deduplicate a repeat, and new at every tick.
	if id, ok := perTickIDs[s.Event]; ok && len(s.idKeys(id.field)) == 0 {
		data[id.field] = tickID
	}
	raw, err := json.Marshal(data)
	if err != nil {
		return nil, err
	}
	return events.DecodeStrict(s.Event, 0, raw)
}

func substitute(v any, repl map[string]string) any {
	switch x := v.(type) {
	case string:
		for k, r := range repl {
			x = strings.ReplaceAll(x, k, r)
		}
		return x
	case map[string]any:
		out := make(map[string]any, len(x))
		for k, e := range x {
			out[k] = substitute(e, repl)
		}
		return out
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = substitute(e, repl)
		}
		return out
	default:
		return v
	}
}
