package api_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"testing"

	"github.com/conveyor/conveyor/events"
)

// FuzzPostEvent posts arbitrary bodies to POST /v1/events, the way in for
// other services' input. Whatever the body, the API never answers 5xx (its
// Redis is up), every 4xx has the one JSON error shape, and a 202 carries an
// event id.
func FuzzPostEvent(f *testing.F) {
	id := "0190a0c0-0000-7000-8000-000000000001"
	for _, seed := range []string{
		eventBody(events.TypeEmailRequested, "", emailData("ann@example.com")),
		eventBody(events.TypeEmailRequested, id, emailData("ann@example.com")),
		eventBody(events.TypeEmailRequested, id, emailData("ann@example.com")),
		`{"type":"email.requested","delay":"90s","data":` + emailData("ann@example.com") + `}`,
		`{"type":"email.requested","deliver_at":"2001-01-01T00:00:00Z","data":` + emailData("ann@example.com") + `}`,
		`{"type":"email.requested","deliver_at":"9999-12-31T23:59:59Z","data":{}}`,
		`{"type":"email.requested","delay":"-9223372036854775807ns","data":{}}`,
		`{"type":"email.requested","data":{"email_id":"` + id + `","to":"a@b.c","subject":"\u0000","body":"\ud800","requested_at":"2026-01-01T00:00:00Z"}}`,
		`{"type":"document.processed","data":{}}`,
		`{"type":"no.such","data":{}}`,
		`{"type":"email.requested","id":"ZZZZZZZZ-0000-7000-8000-000000000001","data":{}}`,
		`{"type":"email.requested","data":null}`,
		`{"type":"email.requested","data":[]}`,
		`{"type":"email.requested","data":"x"}`,
		`{"type":"email.requested","data":{"to":1e400}}`,
		`{"type":null}`,
		`{"events":[]}`,
		`[]`,
		`null`,
		`"`,
		`{`,
		``,
		"\xff\xfe",
		`{"type":"email.requested","data":{}} trailing`,
	} {
		f.Add([]byte(seed))
	}
	e := newEnv(f)
	f.Fuzz(func(t *testing.T, body []byte) {
		req := e.request(t, http.MethodPost, "/v1/events", bytes.NewReader(body), "Content-Type", "application/json")
		r := e.do(t, req)
		switch {
		case r.status >= 500:
			t.Fatalf("status %d for body %q: %s", r.status, body, r.body)
		case r.status >= 400:
			if ct := r.header.Get("Content-Type"); ct != "application/json" {
				t.Fatalf("status %d with Content-Type %q for body %q", r.status, ct, body)
			}
			if _, problem := checkErrorShape(r.body); problem != "" {
				t.Fatalf("status %d for body %q: error body %s: %s", r.status, body, r.body, problem)
			}
		case r.status == http.StatusAccepted:
			var a struct {
				EventID string `json:"event_id"`
			}
			if err := json.Unmarshal(r.body, &a); err != nil || !events.IsUUID(a.EventID) {
				t.Fatalf("202 for body %q without an event_id: %s", body, r.body)
			}
		default:
			t.Fatalf("status %d for body %q: %s", r.status, body, r.body)
		}
	})
}
