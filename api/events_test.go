package api_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
)

// emailData returns the data of a valid email.requested.
func emailData(to string) string {
	return fmt.Sprintf(`{"email_id":%q,"to":%q,"subject":"Hello","body":"Hi","requested_at":"2026-03-04T05:06:07Z"}`,
		events.NewID(), to)
}

// emailDataAt returns the data of an email.requested requested at at
// (RFC 3339), which may be out of range.
func emailDataAt(to, at string) string {
	return fmt.Sprintf(`{"email_id":%q,"to":%q,"subject":"Hello","body":"Hi","requested_at":%q}`,
		events.NewID(), to, at)
}

// withMember returns the JSON object obj with member ("name":value) added.
func withMember(obj, member string) string {
	return strings.TrimSuffix(obj, "}") + "," + member + "}"
}

// eventBody returns a POST /v1/events body.
func eventBody(typ, id, data string) string {
	if id == "" {
		return fmt.Sprintf(`{"type":%q,"data":%s}`, typ, data)
	}
	return fmt.Sprintf(`{"type":%q,"id":%q,"data":%s}`, typ, id, data)
}

// acceptedEvent is the answer to an accepted event.
type acceptedEvent struct {
	EventID   string     `json:"event_id"`
	Duplicate bool       `json:"duplicate"`
	DeliverAt *time.Time `json:"deliver_at"`
}

func wantAcceptedEvent(t testing.TB, r response) acceptedEvent {
	t.Helper()
	wantStatus(t, r, http.StatusAccepted)
	a := decodeJSON[acceptedEvent](t, r)
	if !events.IsUUID(a.EventID) {
		t.Fatalf("body %s, want an event_id", r.body)
	}
	return a
}

// countIDs counts the entries of the stream of eventType per event id.
func (e *env) countIDs(t testing.TB, eventType string) map[string]int {
	t.Helper()
	n := map[string]int{}
	for _, en := range e.entries(t, eventType) {
		n[en.ID]++
	}
	return n
}

func TestPostEvent_accepted(t *testing.T) {
	t.Parallel()

	t.Run("without id", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t)
		data := emailData("ann@example.com")
		a := wantAcceptedEvent(t, e.postJSON(t, "/v1/events", eventBody(events.TypeEmailRequested, "", data)))
		if a.Duplicate {
			t.Errorf("first event reported as a duplicate")
		}
		es := e.entries(t, events.TypeEmailRequested)
		if len(es) != 1 || es[0].ID != a.EventID || es[0].Meta[bus.MetaEventType] != events.TypeEmailRequested {
			t.Fatalf("stream holds %d entries (first %+v), want one with id %s", len(es), es, a.EventID)
		}
		var want, got events.EmailRequested
		if err := json.Unmarshal([]byte(data), &want); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(es[0].Payload, &got); err != nil {
			t.Fatal(err)
		}
		if got.EmailID != want.EmailID || got.To != want.To || got.Subject != want.Subject || got.Body != want.Body ||
			!got.RequestedAt.Equal(want.RequestedAt) {
			t.Errorf("published %+v, want %+v", got, want)
		}
	})

	t.Run("given id, repeated", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t)
		id := events.NewID()
		body := eventBody(events.TypeEmailRequested, id, emailData("ann@example.com"))
		first := wantAcceptedEvent(t, e.postJSON(t, "/v1/events", body))
		if first.EventID != id || first.Duplicate {
			t.Errorf("first answer %+v, want event_id %s, not a duplicate", first, id)
		}
		for range 2 {
			again := wantAcceptedEvent(t, e.postJSON(t, "/v1/events", body))
			if again.EventID != id || !again.Duplicate {
				t.Errorf("repeat answered %+v, want event_id %s, duplicate", again, id)
			}
		}
		if n := e.countIDs(t, events.TypeEmailRequested); len(n) != 1 || n[id] != 1 {
			t.Errorf("stream ids %v, want %s once", n, id)
		}
	})

	t.Run("delayed", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t)
		before := time.Now()
		r := e.postJSON(t, "/v1/events", `{"type":"email.requested","delay":"1h","data":`+emailData("ann@example.com")+`}`)
		a := wantAcceptedEvent(t, r)
		if a.DeliverAt == nil || a.DeliverAt.Before(before.Add(59*time.Minute)) || a.DeliverAt.After(time.Now().Add(61*time.Minute)) {
			t.Errorf("deliver_at %v, want in about an hour", a.DeliverAt)
		}
		e.noEntries(t, events.TypeEmailRequested)
		if n, err := e.rdb.ZCard(t.Context(), bus.DelayedSet(e.prefix+events.TypeEmailRequested)).Result(); err != nil || n != 1 {
			t.Errorf("%d held-back events (%v), want 1", n, err)
		}
	})

	t.Run("zero delay publishes now", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t)
		r := e.postJSON(t, "/v1/events", `{"type":"email.requested","delay":"0s","data":`+emailData("ann@example.com")+`}`)
		a := wantAcceptedEvent(t, r)
		if a.DeliverAt != nil {
			t.Errorf("deliver_at %v, want none", a.DeliverAt)
		}
		if got := e.countIDs(t, events.TypeEmailRequested); !sameCounts(got, map[string]int{a.EventID: 1}) {
			t.Errorf("stream ids %v, want %s once", got, a.EventID)
		}
	})

	t.Run("data member in another case", func(t *testing.T) {
		t.Parallel()
		// encoding/json matches member names without regard to case, so
		// "TO" is the field to, not an unknown member.
		e := newEnv(t)
		data := fmt.Sprintf(`{"email_id":%q,"TO":"ann@example.com","subject":"Hello","body":"Hi","requested_at":"2026-03-04T05:06:07Z"}`, events.NewID())
		wantAcceptedEvent(t, e.postJSON(t, "/v1/events", eventBody(events.TypeEmailRequested, "", data)))
	})
}

// TestPostEvent_onceMarkerOutlivesDelivery: a client-chosen id is
// remembered for eventIDTTL (7 days) after the event is delivered, so that
// a retry while an event is held back for up to MaxDelay (30 days) does
// not publish it twice.
func TestPostEvent_onceMarkerOutlivesDelivery(t *testing.T) {
	t.Parallel()
	const day = 24 * time.Hour
	tests := []struct {
		name  string
		batch bool
		// extra are the members that hold the event back, if any.
		extra string
		// ahead is how far ahead the event is delivered.
		ahead time.Duration
		// deliverAt: the event has a deliver_at ahead from when the
		// subtest runs, which may be long after the table is made.
		deliverAt bool
	}{
		{name: "now", ahead: 0},
		{name: "delay of 30 days", extra: `"delay":"720h",`, ahead: 30 * day},
		{name: "deliver_at 20 days ahead", deliverAt: true, ahead: 20 * day},
		{name: "batch, now", batch: true, ahead: 0},
		{name: "batch, delay of 30 days", batch: true, extra: `"delay":"720h",`, ahead: 30 * day},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			id := events.NewID()
			extra := tt.extra
			if tt.deliverAt {
				extra = `"deliver_at":"` + time.Now().Add(tt.ahead).UTC().Format(time.RFC3339) + `",`
			}
			body := `{"type":"email.requested","id":"` + id + `",` + extra + `"data":` + emailData("ann@example.com") + `}`
			if tt.batch {
				if a := e.postBatch(t, body); a.Accepted != 1 {
					t.Fatalf("answer %+v, want it accepted", a)
				}
			} else {
				wantAcceptedEvent(t, e.postJSON(t, "/v1/events", body))
			}
			ttl, err := e.rdb.PTTL(t.Context(), bus.OnceKey(e.prefix+events.TypeEmailRequested, id)).Result()
			if err != nil {
				t.Fatal(err)
			}
			want := 7*day + tt.ahead
			// deliver_at has whole seconds; the request took a moment.
			if ttl > want+time.Second || ttl < want-time.Minute {
				t.Errorf("the id is remembered for %v, want %v", ttl, want)
			}
		})
	}
}

func TestPostEvent_refused(t *testing.T) {
	t.Parallel()
	valid := emailData("ann@example.com")
	tests := []struct {
		name        string
		contentType string
		body        string
		status      int
		code        string
		wantFields  []string
		// dataFields: every field named is in the data.
		dataFields bool
		// short: the answer stays under 1 KB, however long the input it
		// names.
		short bool
	}{
		{name: "unknown type", body: eventBody("document.shredded", "", `{}`), status: 400, code: "unknown_event_type"},
		{name: "internal type", body: eventBody(events.TypeDocumentProcessed, "", `{"doc_id":"`+events.NewID()+`"}`),
			status: 400, code: "event_type_not_accepted"},
		{name: "internal upload type", body: eventBody(events.TypeDocumentUploaded, "", `{}`), status: 400, code: "event_type_not_accepted"},
		{name: "internal email.sent", body: eventBody(events.TypeEmailSent, "", `{}`), status: 400, code: "event_type_not_accepted"},
		{name: "missing type", body: `{"data":` + valid + `}`, status: 422, code: "validation_failed", wantFields: []string{"type"}},
		{name: "missing data", body: `{"type":"email.requested"}`, status: 422, code: "validation_failed", wantFields: []string{"data"}},
		{name: "invalid data", body: eventBody(events.TypeEmailRequested, "", `{"email_id":"x","subject":"a\nb"}`),
			status: 422, code: "validation_failed", wantFields: []string{"data.email_id", "data.to", "data.subject", "data.body", "data.requested_at"}, dataFields: true},
		{name: "data field of the wrong JSON type", body: eventBody(events.TypeEmailRequested, "", `{"to":5}`),
			status: 422, code: "validation_failed", wantFields: []string{"data.to"}, dataFields: true},
		{name: "data not an object", body: eventBody(events.TypeEmailRequested, "", `"hello"`),
			status: 422, code: "validation_failed", wantFields: []string{"data"}, dataFields: true},
		{name: "bad id", body: eventBody(events.TypeEmailRequested, "not-a-uuid", valid), status: 422, code: "validation_failed", wantFields: []string{"id"}},
		{name: "unknown member", body: `{"type":"email.requested","data":` + valid + `,"priority":1}`,
			status: 422, code: "validation_failed", wantFields: []string{"priority"}},
		{name: "type of the wrong JSON type", body: `{"type":1,"data":` + valid + `}`, status: 422, code: "validation_failed", wantFields: []string{"type"}},
		{name: "deliver_at not a time", body: `{"type":"email.requested","deliver_at":"soon","data":` + valid + `}`,
			status: 422, code: "validation_failed", wantFields: []string{"deliver_at"}},
		{name: "deliver_at too far ahead", body: `{"type":"email.requested","deliver_at":"2999-01-01T00:00:00Z","data":` + valid + `}`,
			status: 422, code: "validation_failed", wantFields: []string{"deliver_at"}},
		{name: "delay not a duration", body: `{"type":"email.requested","delay":"a while","data":` + valid + `}`,
			status: 422, code: "validation_failed", wantFields: []string{"delay"}},
		{name: "deliver_at and delay", body: `{"type":"email.requested","delay":"1m","deliver_at":"2030-01-01T00:00:00Z","data":` + valid + `}`,
			status: 422, code: "validation_failed", wantFields: []string{"delay"}},
		{name: "negative delay", body: `{"type":"email.requested","delay":"-5h","data":` + valid + `}`,
			status: 422, code: "validation_failed", wantFields: []string{"delay"}},
		{name: "unknown data member send_at", body: eventBody(events.TypeEmailRequested, "", withMember(valid, `"send_at":"2027-01-01T00:00:00Z"`)),
			status: 422, code: "validation_failed", wantFields: []string{"data.send_at"}, dataFields: true},
		{name: "unknown data member cc", body: eventBody(events.TypeEmailRequested, "", withMember(valid, `"cc":"b@example.com"`)),
			status: 422, code: "validation_failed", wantFields: []string{"data.cc"}, dataFields: true},
		{name: "unknown data member html", body: eventBody(events.TypeEmailRequested, "", withMember(valid, `"html":"<p>Hi</p>"`)),
			status: 422, code: "validation_failed", wantFields: []string{"data.html"}, dataFields: true},
		{name: "unknown data member docId", body: eventBody(events.TypeEmailRequested, "", withMember(valid, `"docId":"`+events.NewID()+`"`)),
			status: 422, code: "validation_failed", wantFields: []string{"data.docId"}, dataFields: true},
		{name: "unknown data member and invalid data", body: eventBody(events.TypeEmailRequested, "", `{"cc":"b@example.com","to":"nobody"}`),
			status: 422, code: "validation_failed", wantFields: []string{"data.cc", "data.to", "data.email_id"}, dataFields: true},
		{name: "time in year 0", body: eventBody(events.TypeEmailRequested, "", emailDataAt("ann@example.com", "0000-06-01T00:00:00Z")),
			status: 422, code: "validation_failed", wantFields: []string{"data.requested_at"}, dataFields: true},
		{name: "time in year 0 in UTC", body: eventBody(events.TypeEmailRequested, "", emailDataAt("ann@example.com", "0001-01-01T00:00:00+01:00")),
			status: 422, code: "validation_failed", wantFields: []string{"data.requested_at"}, dataFields: true},
		{name: "time in year 10000 in UTC", body: eventBody(events.TypeEmailRequested, "", emailDataAt("ann@example.com", "9999-12-31T23:00:00-05:00")),
			status: 422, code: "validation_failed", wantFields: []string{"data.requested_at"}, dataFields: true},
		{name: "address of 20 KB", body: eventBody(events.TypeEmailRequested, "", emailData(strings.Repeat("a", 20<<10)+"@example.com")),
			status: 422, code: "validation_failed", wantFields: []string{"data.to"}, dataFields: true},
		{name: "local part of 65 bytes", body: eventBody(events.TypeEmailRequested, "", emailData(strings.Repeat("a", 65)+"@example.com")),
			status: 422, code: "validation_failed", wantFields: []string{"data.to"}, dataFields: true},
		{name: "unknown type of 500 KB", body: eventBody(strings.Repeat("t", 500<<10), "", valid), status: 400, code: "unknown_event_type", short: true},
		{name: "unknown member of 500 KB", body: `{"type":"email.requested","data":` + valid + `,"` + strings.Repeat("m", 500<<10) + `":1}`,
			status: 422, code: "validation_failed", short: true},
		{name: "unknown data member of 500 KB", body: eventBody(events.TypeEmailRequested, "", withMember(valid, `"`+strings.Repeat("m", 500<<10)+`":1`)),
			status: 422, code: "validation_failed", dataFields: true, short: true},
		{name: "malformed JSON", body: `{"type":`, status: 400, code: "malformed_json"},
		{name: "a stray brace after the object", body: eventBody(events.TypeEmailRequested, "", valid) + "}", status: 400, code: "malformed_json"},
		{name: "not an object", body: `"email.requested"`, status: 400, code: "malformed_json"},
		{name: "text/plain", contentType: "text/plain", body: eventBody(events.TypeEmailRequested, "", valid), status: 415, code: "unsupported_media_type"},
		{name: "over 1 MiB", body: `{"type":"email.requested","data":{"body":"` + strings.Repeat("b", 1<<20) + `"}}`, status: 413, code: "too_large"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			ct := tt.contentType
			if ct == "" {
				ct = "application/json"
			}
			r := e.do(t, e.request(t, http.MethodPost, "/v1/events", strings.NewReader(tt.body), "Content-Type", ct))
			detail := wantError(t, r, tt.status, tt.code)
			for _, f := range tt.wantFields {
				if !detail.names(f) {
					t.Errorf("error.fields %v, want %q named", detail.fieldNames(), f)
				}
			}
			if tt.dataFields {
				for _, f := range detail.Fields {
					if f.Field != "data" && !strings.HasPrefix(f.Field, "data.") {
						t.Errorf("field %q of the data is not prefixed with data.", f.Field)
					}
				}
			}
			if tt.short && len(r.body) > 1<<10 {
				t.Errorf("answer of %d bytes echoes the input: %.300s…", len(r.body), r.body)
			}
			e.noEntries(t, events.Types()...)
		})
	}
}

// TestPostEvent_publishFails: a 503 leaves the id free, so the client's
// retry is published rather than taken for a duplicate.
func TestPostEvent_publishFails(t *testing.T) {
	t.Parallel()
	// The message says whether sending again is safe: a publish that
	// failed before anything was sent surely did not append; one that may
	// have sent something is appended once only under the event's own id.
	const (
		notPublished = "not published; send it again"
		sameID       = "may have been published; send it again with the same id"
		twice        = "sending it again may publish it twice"
	)
	tests := []struct {
		name    string
		client  func(t testing.TB) redis.UniversalClient
		body    func(id string) string
		message string
	}{
		{name: "closed client", client: closedRedis, message: notPublished, body: func(id string) string {
			return eventBody(events.TypeEmailRequested, id, emailData("ann@example.com"))
		}},
		{name: "nothing listening", client: deadRedis, message: sameID, body: func(id string) string {
			return eventBody(events.TypeEmailRequested, id, emailData("ann@example.com"))
		}},
		{name: "nothing listening, no id", client: deadRedis, message: twice, body: func(string) string {
			return eventBody(events.TypeEmailRequested, "", emailData("ann@example.com"))
		}},
		{name: "delayed, closed client", client: closedRedis, message: notPublished, body: func(id string) string {
			return `{"type":"email.requested","id":"` + id + `","delay":"1h","data":` + emailData("ann@example.com") + `}`
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, withPublisherRedis(tt.client(t)))
			id := events.NewID()
			for range 2 {
				detail := wantError(t, e.postJSON(t, "/v1/events", tt.body(id)), http.StatusServiceUnavailable, "unavailable")
				if !strings.Contains(detail.Message, tt.message) {
					t.Errorf("message %q, want it to say %q", detail.Message, tt.message)
				}
			}
			if keys := e.keys(t, "idem:*"); len(keys) != 0 {
				t.Errorf("records %v left behind", keys)
			}
		})
	}
}

// batchResult is one result of a batch.
type batchResult struct {
	EventID   string          `json:"event_id"`
	Status    int             `json:"status"`
	DeliverAt *time.Time      `json:"deliver_at"`
	Error     json.RawMessage `json:"error"`
}

type batchAnswer struct {
	Accepted int           `json:"accepted"`
	Rejected int           `json:"rejected"`
	Results  []batchResult `json:"results"`
}

// postBatch posts events (each a JSON object) as one batch.
func (e *env) postBatch(t testing.TB, evs ...string) batchAnswer {
	t.Helper()
	r := e.postJSON(t, "/v1/events/batch", `{"events":[`+strings.Join(evs, ",")+`]}`)
	wantStatus(t, r, http.StatusOK)
	a := decodeJSON[batchAnswer](t, r)
	if len(a.Results) != len(evs) {
		t.Fatalf("%d results for %d events: %s", len(a.Results), len(evs), r.body)
	}
	for i, res := range a.Results {
		if res.Status == http.StatusAccepted {
			if len(res.Error) != 0 || !events.IsUUID(res.EventID) {
				t.Errorf("result %d: %s %s, want an event_id and no error", i, res.EventID, res.Error)
			}
			continue
		}
		if _, problem := checkErrorShape([]byte(`{"error":` + string(res.Error) + `}`)); problem != "" {
			t.Errorf("result %d: error %s: %s", i, res.Error, problem)
		}
	}
	return a
}

func TestPostEventBatch(t *testing.T) {
	t.Parallel()

	t.Run("mixed events, duplicates within and across batches", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t)
		x, y, z := events.NewID(), events.NewID(), events.NewID()
		a := e.postBatch(t,
			eventBody(events.TypeEmailRequested, "", emailData("a@example.com")),
			eventBody(events.TypeEmailRequested, x, emailData("x@example.com")),
			eventBody("no.such.type", "", `{}`),
			eventBody(events.TypeDocumentProcessed, "", `{}`),
			eventBody(events.TypeEmailRequested, "", `{"to":"nobody"}`),
			eventBody(events.TypeEmailRequested, "bad-id", emailData("b@example.com")),
			eventBody(events.TypeEmailRequested, x, emailData("x@example.com")),
			eventBody(events.TypeEmailRequested, y, emailData("y@example.com")),
		)
		wantStatuses := []int{202, 202, 400, 400, 422, 422, 202, 202}
		for i, res := range a.Results {
			if res.Status != wantStatuses[i] {
				t.Errorf("result %d: status %d %s, want %d", i, res.Status, res.Error, wantStatuses[i])
			}
		}
		if a.Accepted != 4 || a.Rejected != 4 {
			t.Errorf("accepted %d, rejected %d, want 4 and 4", a.Accepted, a.Rejected)
		}
		if a.Results[1].EventID != x || a.Results[6].EventID != x || a.Results[7].EventID != y {
			t.Errorf("results %+v, want the given ids back", a.Results)
		}
		if detail, _ := checkErrorShape([]byte(`{"error":` + string(a.Results[4].Error) + `}`)); !detail.names("data.to") {
			t.Errorf("invalid data result %s, want data.to named", a.Results[4].Error)
		}

		// A second batch repeats x and y and adds z.
		b := e.postBatch(t,
			eventBody(events.TypeEmailRequested, y, emailData("y@example.com")),
			eventBody(events.TypeEmailRequested, z, emailData("z@example.com")),
			eventBody(events.TypeEmailRequested, x, emailData("x@example.com")),
		)
		for i, res := range b.Results {
			if res.Status != http.StatusAccepted {
				t.Errorf("second batch result %d: %d %s, want 202", i, res.Status, res.Error)
			}
		}
		// A single post of z is a duplicate too.
		if d := wantAcceptedEvent(t, e.postJSON(t, "/v1/events", eventBody(events.TypeEmailRequested, z, emailData("z@example.com")))); !d.Duplicate {
			t.Errorf("z posted again: %+v, want a duplicate", d)
		}

		want := map[string]int{a.Results[0].EventID: 1, x: 1, y: 1, z: 1}
		if got := e.countIDs(t, events.TypeEmailRequested); !sameCounts(got, want) {
			t.Errorf("stream ids %v, want each of %v once", got, want)
		}
	})

	t.Run("delayed event in a batch", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t)
		a := e.postBatch(t,
			`{"type":"email.requested","delay":"1h","data":`+emailData("later@example.com")+`}`,
			eventBody(events.TypeEmailRequested, "", emailData("now@example.com")),
		)
		if a.Accepted != 2 {
			t.Fatalf("answer %+v, want both accepted", a)
		}
		if got := e.countIDs(t, events.TypeEmailRequested); !sameCounts(got, map[string]int{a.Results[1].EventID: 1}) {
			t.Errorf("stream ids %v, want only the undelayed %s", got, a.Results[1].EventID)
		}
		if n, err := e.rdb.ZCard(t.Context(), bus.DelayedSet(e.prefix+events.TypeEmailRequested)).Result(); err != nil || n != 1 {
			t.Errorf("%d held-back events (%v), want 1", n, err)
		}
	})

	t.Run("refused whole", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t)
		one := eventBody(events.TypeEmailRequested, "", emailData("a@example.com"))
		tests := []struct {
			name   string
			ct     string
			body   string
			status int
			code   string
			field  string
		}{
			{name: "more than MaxBatch", body: `{"events":[` + strings.Repeat(one+",", maxBatch) + one + `]}`, status: 422, code: "validation_failed", field: "events"},
			{name: "empty", body: `{"events":[]}`, status: 422, code: "validation_failed", field: "events"},
			{name: "no events member", body: `{}`, status: 422, code: "validation_failed", field: "events"},
			{name: "events not an array", body: `{"events":{}}`, status: 422, code: "validation_failed", field: "events"},
			{name: "malformed JSON", body: `{"events":[`, status: 400, code: "malformed_json"},
			{name: "a stray bracket after the object", body: `{"events":[` + one + `]}]`, status: 400, code: "malformed_json"},
			{name: "wrong content type", ct: "text/plain", body: `{"events":[` + one + `]}`, status: 415, code: "unsupported_media_type"},
			{name: "over 1 MiB", body: `{"events":[{"type":"email.requested","data":{"body":"` + strings.Repeat("b", 1<<20) + `"}}]}`,
				status: 413, code: "too_large"},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				ct := tt.ct
				if ct == "" {
					ct = "application/json"
				}
				r := e.do(t, e.request(t, http.MethodPost, "/v1/events/batch", strings.NewReader(tt.body), "Content-Type", ct))
				detail := wantError(t, r, tt.status, tt.code)
				if tt.field != "" && !detail.names(tt.field) {
					t.Errorf("error.fields %v, want %q named", detail.fieldNames(), tt.field)
				}
			})
		}
		e.noEntries(t, events.Types()...)
	})

	t.Run("publishing fails", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, withPublisherRedis(closedRedis(t)))
		x := events.NewID()
		evs := []string{
			eventBody(events.TypeEmailRequested, "", emailData("a@example.com")),
			eventBody(events.TypeEmailRequested, x, emailData("x@example.com")),
			`{"type":"email.requested","delay":"1h","data":` + emailData("later@example.com") + `}`,
			eventBody(events.TypeEmailRequested, x, emailData("x@example.com")),
		}
		a := e.postBatch(t, evs...)
		// Nothing was published: no result may claim it was.
		for i, res := range a.Results {
			if res.Status != http.StatusServiceUnavailable {
				t.Errorf("result %d: status %d, want 503", i, res.Status)
			}
		}
		if a.Accepted != 0 || a.Rejected != len(evs) {
			t.Errorf("accepted %d, rejected %d, want 0 and %d", a.Accepted, a.Rejected, len(evs))
		}
		if keys := e.keys(t, "idem:*"); len(keys) != 0 {
			t.Errorf("records %v left behind: the retry would be taken for a duplicate", keys)
		}
	})
}

func sameCounts(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// A malformed member of a batch fails alone; an id in capitals is the same
// id as in lower case.
func TestBatchMalformedMemberAndIDCase(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	id := events.NewID()
	good := func(eventID string) string {
		return `{"type":"email.requested","id":"` + eventID + `","data":{"email_id":"` + events.NewID() +
			`","to":"a@example.com","subject":"s","body":"b","requested_at":"2026-01-01T00:00:00Z"}}`
	}
	a := e.postBatch(t, good(strings.ToUpper(id)), `{"type":5}`, good(id))
	if a.Results[0].Status != http.StatusAccepted || a.Results[1].Status/100 != 4 || a.Results[2].Status != http.StatusAccepted {
		t.Fatalf("results = %+v", a.Results)
	}
	if a.Results[0].EventID != id || a.Results[2].EventID != id {
		t.Fatalf("ids %q and %q, want both %q", a.Results[0].EventID, a.Results[2].EventID, id)
	}
	if n := len(e.entries(t, events.TypeEmailRequested)); n != 1 {
		t.Fatalf("%d entries; the id in capitals and in lower case are one event", n)
	}
}

// TestPostEventBatch_results: a refused member's event_id is its id in the
// canonical form an accepted one's has, and a held-back member's result
// carries deliver_at as the answer of POST /v1/events does.
func TestPostEventBatch_results(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	upper := strings.ToUpper(events.NewID())
	upper2 := strings.ToUpper(events.NewID())
	later := events.NewID()
	before := time.Now()
	a := e.postBatch(t,
		eventBody(events.TypeEmailRequested, upper, `{"to":"nobody"}`),
		eventBody(events.TypeEmailRequested, "bad-id", emailData("a@example.com")),
		`{"type":"email.requested","id":"`+upper2+`","delay":"-5h","data":`+emailData("a@example.com")+`}`,
		`{"type":"email.requested","id":"`+later+`","delay":"1h","data":`+emailData("later@example.com")+`}`,
		eventBody(events.TypeEmailRequested, "", emailData("now@example.com")),
		eventBody(events.TypeEmailRequested, "", withMember(emailData("a@example.com"), `"cc":"b@example.com"`)),
		eventBody(strings.Repeat("t", 100<<10), "", emailData("a@example.com")),
	)
	tests := []struct {
		name      string
		status    int
		eventID   string // "*": any UUID
		deliverAt bool
		field     string
	}{
		{name: "invalid data, id in capitals", status: 422, eventID: strings.ToLower(upper), field: "data.to"},
		{name: "id not a UUID", status: 422, eventID: "", field: "id"},
		{name: "negative delay, id in capitals", status: 422, eventID: strings.ToLower(upper2), field: "delay"},
		{name: "held back", status: 202, eventID: later, deliverAt: true},
		{name: "now", status: 202, eventID: "*"},
		{name: "unknown data member", status: 422, field: "data.cc"},
		{name: "unknown type of 100 KB", status: 400},
	}
	for i, tt := range tests {
		res := a.Results[i]
		if res.Status != tt.status {
			t.Errorf("%s: status %d %s, want %d", tt.name, res.Status, res.Error, tt.status)
		}
		if tt.eventID == "*" && !events.IsUUID(res.EventID) || tt.eventID != "*" && res.EventID != tt.eventID {
			t.Errorf("%s: event_id %q, want %q", tt.name, res.EventID, tt.eventID)
		}
		switch {
		case !tt.deliverAt && res.DeliverAt != nil:
			t.Errorf("%s: deliver_at %v, want none", tt.name, res.DeliverAt)
		case tt.deliverAt && (res.DeliverAt == nil || res.DeliverAt.Before(before.Add(59*time.Minute)) || res.DeliverAt.After(time.Now().Add(61*time.Minute))):
			t.Errorf("%s: deliver_at %v, want in about an hour", tt.name, res.DeliverAt)
		}
		if tt.field != "" {
			if detail, _ := checkErrorShape([]byte(`{"error":` + string(res.Error) + `}`)); !detail.names(tt.field) {
				t.Errorf("%s: error %s, want %s named", tt.name, res.Error, tt.field)
			}
		}
		if len(res.Error) > 1<<10 {
			t.Errorf("%s: error of %d bytes echoes the input: %.300s…", tt.name, len(res.Error), res.Error)
		}
	}

	// Sent again, the held-back event is published before: 202 without
	// deliver_at, as POST /v1/events answers a duplicate.
	b := e.postBatch(t, `{"type":"email.requested","id":"`+later+`","delay":"1h","data":`+emailData("later@example.com")+`}`)
	if res := b.Results[0]; res.Status != http.StatusAccepted || res.EventID != later || res.DeliverAt != nil {
		t.Errorf("held-back event again: %+v, want 202 with its id and no deliver_at", res)
	}
	if d := wantAcceptedEvent(t, e.postJSON(t, "/v1/events", `{"type":"email.requested","id":"`+later+`","delay":"1h","data":`+emailData("later@example.com")+`}`)); !d.Duplicate || d.DeliverAt != nil {
		t.Errorf("held-back event posted again: %+v, want a duplicate without deliver_at", d)
	}
}

// TestPostEvent_publishSentTwiceIsNotADuplicate: the Redis client sends the
// hold of a new event with its own id a second time, as after a connection
// that broke once Redis had run it. The second run finds the marker of the
// first: the event is answered as held back (with deliver_at), not as a
// duplicate, and is held once. A real second request with the id is a
// duplicate.
func TestPostEvent_publishSentTwiceIsNotADuplicate(t *testing.T) {
	t.Parallel()
	script := &rerunFirst{match: func(cmd redis.Cmder) bool {
		name := cmdArgs(cmd)[0]
		return name == "eval" || name == "evalsha"
	}}
	e := newEnv(t, withPublisherRedis(hookedRedis(t, script)))
	id := events.NewID()
	body := `{"type":"email.requested","id":"` + id + `","delay":"1h","data":` + emailData("ann@example.com") + `}`
	first := wantAcceptedEvent(t, e.postJSON(t, "/v1/events", body))
	if !script.ran() {
		t.Fatal("the hold was not sent twice")
	}
	if first.Duplicate || first.DeliverAt == nil || first.EventID != id {
		t.Errorf("first answer %+v, want event %s held back, not a duplicate", first, id)
	}
	if n, err := e.rdb.ZCard(t.Context(), bus.DelayedSet(e.prefix+events.TypeEmailRequested)).Result(); err != nil || n != 1 {
		t.Errorf("%d held-back events (%v), want 1", n, err)
	}
	if again := wantAcceptedEvent(t, e.postJSON(t, "/v1/events", body)); !again.Duplicate || again.DeliverAt != nil {
		t.Errorf("second request: %+v, want a duplicate without deliver_at", again)
	}
}

// TestPostEventBatch_repeatGetsTheWholeResult: a repeated id within a batch
// gets the result of its first copy, deliver_at included.
func TestPostEventBatch_repeatGetsTheWholeResult(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ev := `{"type":"email.requested","id":"` + events.NewID() + `","delay":"1h","data":` + emailData("ann@example.com") + `}`
	a := e.postBatch(t, ev, ev)
	if a.Accepted != 2 || a.Results[0].DeliverAt == nil {
		t.Fatalf("answer %+v, want both accepted, the first held back", a)
	}
	first, repeat := a.Results[0], a.Results[1]
	if repeat.EventID != first.EventID || repeat.Status != first.Status || string(repeat.Error) != string(first.Error) ||
		repeat.DeliverAt == nil || !repeat.DeliverAt.Equal(*first.DeliverAt) {
		t.Errorf("repeat's result %+v, want the first copy's %+v", repeat, first)
	}
	if n, err := e.rdb.ZCard(t.Context(), bus.DelayedSet(e.prefix+events.TypeEmailRequested)).Result(); err != nil || n != 1 {
		t.Errorf("%d held-back events (%v), want 1", n, err)
	}
}
