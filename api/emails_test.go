package api_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/api"
	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/store"
)

// emailFields are the members of every email read.
var emailFields = []string{"email_id", "status", "to", "subject", "doc_id", "attempts", "send_at", "sent_at",
	"failed_at", "error", "message_id"}

// email is an email read; pointers are null members.
type email struct {
	EmailID   string     `json:"email_id"`
	Status    string     `json:"status"`
	To        *string    `json:"to"`
	Subject   *string    `json:"subject"`
	DocID     *string    `json:"doc_id"`
	Attempts  int        `json:"attempts"`
	SendAt    *time.Time `json:"send_at"`
	SentAt    *time.Time `json:"sent_at"`
	FailedAt  *time.Time `json:"failed_at"`
	Error     *string    `json:"error"`
	MessageID *string    `json:"message_id"`
}

// readEmail GETs an email, checks it has every member and decodes it.
func (e *env) readEmail(t testing.TB, id string) email {
	t.Helper()
	r := e.get(t, "/v1/emails/"+id)
	wantStatus(t, r, http.StatusOK)
	var members map[string]json.RawMessage
	if err := json.Unmarshal(r.body, &members); err != nil {
		t.Fatalf("decode %s: %v", r.body, err)
	}
	for _, name := range emailFields {
		if _, ok := members[name]; !ok {
			t.Errorf("email has no member %q: %s", name, r.body)
		}
	}
	return decodeJSON[email](t, r)
}

// wantAcceptedEmail checks a 202 answer to an email request and returns
// the email_id.
func wantAcceptedEmail(t testing.TB, r response) string {
	t.Helper()
	wantStatus(t, r, http.StatusAccepted)
	body := decodeJSON[map[string]any](t, r)
	id, _ := body["email_id"].(string)
	if !events.IsUUID(id) || body["status"] != store.EmailQueued || len(body) != 2 {
		t.Fatalf(`body %s, want {"email_id":<uuid>,"status":"queued"}`, r.body)
	}
	if loc := r.header.Get("Location"); loc != "/v1/emails/"+id {
		t.Errorf("Location = %q, want /v1/emails/%s", loc, id)
	}
	return id
}

func TestPostEmail_accepted(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		contentType string
		body        string
		wantTo      string
		wantSubject string
		wantBody    string
	}{
		{name: "plain", contentType: "application/json",
			body:   `{"to":"ann@example.com","subject":"Hello","body":"Hi Ann"}`,
			wantTo: "ann@example.com", wantSubject: "Hello", wantBody: "Hi Ann"},
		{name: "no Content-Type", body: `{"to":"ann@example.com","subject":"Hello","body":"Hi"}`,
			wantTo: "ann@example.com", wantSubject: "Hello", wantBody: "Hi"},
		{name: "charset parameter", contentType: "application/json; charset=utf-8",
			body:   `{"to":" Ann <ann@example.com> ","subject":"Grüße","body":"line 1\nline 2"}`,
			wantTo: "Ann <ann@example.com>", wantSubject: "Grüße", wantBody: "line 1\nline 2"},
		{name: "white space after the object", contentType: "application/json",
			body:   " {\"to\":\"ann@example.com\",\"subject\":\"Hello\",\"body\":\"Hi\"}\r\n \t\n",
			wantTo: "ann@example.com", wantSubject: "Hello", wantBody: "Hi"},
		{name: "send_at in the past sends now", contentType: "application/json",
			body:   `{"to":"ann@example.com","subject":"Late","body":"b","send_at":"2001-02-03T04:05:06Z"}`,
			wantTo: "ann@example.com", wantSubject: "Late", wantBody: "b"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			var header []string
			if tt.contentType != "" {
				header = []string{"Content-Type", tt.contentType}
			}
			id := wantAcceptedEmail(t, e.do(t, e.request(t, http.MethodPost, "/v1/emails", strings.NewReader(tt.body), header...)))

			es := e.entries(t, events.TypeEmailRequested)
			if len(es) != 1 {
				t.Fatalf("%d email.requested entries, want 1", len(es))
			}
			var ev events.EmailRequested
			if err := json.Unmarshal(es[0].Payload, &ev); err != nil {
				t.Fatal(err)
			}
			if ev.EmailID != id || ev.To != tt.wantTo || ev.Subject != tt.wantSubject || ev.Body != tt.wantBody {
				t.Errorf("event %+v, want email_id %s to %q subject %q body %q", ev, id, tt.wantTo, tt.wantSubject, tt.wantBody)
			}
			if es[0].Meta[bus.MetaEventType] != events.TypeEmailRequested || es[0].Meta[bus.MetaEventID] != es[0].ID {
				t.Errorf("envelope %v", es[0].Meta)
			}

			got := e.readEmail(t, id)
			if got.EmailID != id || got.Status != store.EmailQueued || got.To == nil || *got.To != tt.wantTo ||
				got.Subject == nil || *got.Subject != tt.wantSubject || got.SentAt != nil {
				t.Errorf("read %+v, want %s queued to %q", got, id, tt.wantTo)
			}
		})
	}
}

func TestPostEmail_refused(t *testing.T) {
	t.Parallel()
	valid := map[string]any{"to": "ann@example.com", "subject": "Hello", "body": "Hi"}
	// with returns the valid request with changes; a nil value removes
	// the member.
	with := func(changes map[string]any) string {
		m := map[string]any{}
		for k, v := range valid {
			m[k] = v
		}
		for k, v := range changes {
			if v == nil {
				delete(m, k)
			} else {
				m[k] = v
			}
		}
		b, _ := json.Marshal(m)
		return string(b)
	}
	tests := []struct {
		name        string
		contentType string
		body        string
		status      int
		code        string
		wantFields  []string
	}{
		{name: "missing to", body: with(map[string]any{"to": nil}), status: 422, code: "validation_failed", wantFields: []string{"to"}},
		{name: "invalid to", body: with(map[string]any{"to": "not an address"}), status: 422, code: "validation_failed", wantFields: []string{"to"}},
		{name: "to without a domain", body: with(map[string]any{"to": "ann@"}), status: 422, code: "validation_failed", wantFields: []string{"to"}},
		{name: "header injection in to", body: with(map[string]any{"to": "ann@example.com\r\nBcc: eve@example.com"}),
			status: 422, code: "validation_failed", wantFields: []string{"to"}},
		{name: "missing subject", body: with(map[string]any{"subject": nil}), status: 422, code: "validation_failed", wantFields: []string{"subject"}},
		{name: "blank subject", body: with(map[string]any{"subject": "   "}), status: 422, code: "validation_failed", wantFields: []string{"subject"}},
		{name: "subject with CR", body: with(map[string]any{"subject": "Hi\rBcc: eve@example.com"}), status: 422, code: "validation_failed", wantFields: []string{"subject"}},
		{name: "subject with LF", body: with(map[string]any{"subject": "Hi\nthere"}), status: 422, code: "validation_failed", wantFields: []string{"subject"}},
		{name: "subject too long", body: with(map[string]any{"subject": strings.Repeat("s", events.MaxSubjectBytes+1)}),
			status: 422, code: "validation_failed", wantFields: []string{"subject"}},
		{name: "missing body", body: with(map[string]any{"body": nil}), status: 422, code: "validation_failed", wantFields: []string{"body"}},
		{name: "NUL in body", body: with(map[string]any{"body": "a\x00b"}), status: 422, code: "validation_failed", wantFields: []string{"body"}},
		{name: "everything missing", body: `{}`, status: 422, code: "validation_failed", wantFields: []string{"to", "subject", "body"}},
		{name: "unknown field", body: with(map[string]any{"cc": "eve@example.com"}), status: 422, code: "validation_failed", wantFields: []string{"cc"}},
		{name: "to of the wrong JSON type", body: with(map[string]any{"to": 5}), status: 422, code: "validation_failed", wantFields: []string{"to"}},
		{name: "subject of the wrong JSON type", body: with(map[string]any{"subject": []string{"a"}}), status: 422, code: "validation_failed", wantFields: []string{"subject"}},
		{name: "send_at of the wrong JSON type", body: with(map[string]any{"send_at": 5}), status: 422, code: "validation_failed", wantFields: []string{"send_at"}},
		{name: "send_at not a time", body: with(map[string]any{"send_at": "tomorrow"}), status: 422, code: "validation_failed", wantFields: []string{"send_at"}},
		{name: "send_at too far ahead", body: with(map[string]any{"send_at": time.Now().Add(365 * 24 * time.Hour)}),
			status: 422, code: "validation_failed", wantFields: []string{"send_at"}},
		{name: "malformed JSON", body: `{"to":`, status: 400, code: "malformed_json"},
		{name: "empty body", body: ``, status: 400, code: "malformed_json"},
		{name: "two objects", body: with(nil) + with(nil), status: 400, code: "malformed_json"},
		{name: "a stray brace after the object", body: with(nil) + "}", status: 400, code: "malformed_json"},
		{name: "a stray bracket after the object", body: with(nil) + " \n]", status: 400, code: "malformed_json"},
		{name: "not an object", body: `["ann@example.com"]`, status: 400, code: "malformed_json"},
		{name: "text/plain", contentType: "text/plain", body: with(nil), status: 415, code: "unsupported_media_type"},
		{name: "form", contentType: "application/x-www-form-urlencoded", body: "to=ann@example.com", status: 415, code: "unsupported_media_type"},
		{name: "body over 1 MiB", body: with(map[string]any{"body": strings.Repeat("b", 1<<20)}), status: 413, code: "too_large"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t)
			ct := tt.contentType
			if ct == "" {
				ct = "application/json"
			}
			r := e.do(t, e.request(t, http.MethodPost, "/v1/emails", strings.NewReader(tt.body), "Content-Type", ct))
			detail := wantError(t, r, tt.status, tt.code)
			for _, f := range tt.wantFields {
				if !detail.names(f) {
					t.Errorf("error.fields %v, want %q named", detail.fieldNames(), f)
				}
			}
			if tt.wantFields == nil && len(detail.Fields) != 0 {
				t.Errorf("error.fields %v, want none", detail.fieldNames())
			}
			e.noEntries(t, events.TypeEmailRequested, events.TypeEmailScheduled)
			if keys := e.keys(t, "idem:accepted:*"); len(keys) != 0 {
				t.Errorf("accepted markers %v left behind", keys)
			}
		})
	}
}

func TestPostEmail_publishFails(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		client func(t testing.TB) redis.UniversalClient
		body   string
		// maybe is whether the email may have been accepted all the same
		// (a write may have landed before the connection broke): without
		// a key to retry under, the answer must say so.
		maybe bool
	}{
		{name: "closed client", client: closedRedis, body: `{"to":"ann@example.com","subject":"s","body":"b"}`},
		{name: "nothing listening", client: deadRedis, body: `{"to":"ann@example.com","subject":"s","body":"b"}`, maybe: true},
		{name: "scheduled, closed client", client: closedRedis,
			body: `{"to":"ann@example.com","subject":"s","body":"b","send_at":"` + time.Now().Add(time.Hour).Format(time.RFC3339) + `"}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, withPublisherRedis(tt.client(t)))
			r := e.postJSON(t, "/v1/emails", tt.body)
			wantError(t, r, http.StatusServiceUnavailable, "unavailable")
			if got := strings.Contains(string(r.body), "may have been accepted"); got != tt.maybe {
				t.Errorf("body %s: says the email may have been accepted: %v, want %v", r.body, got, tt.maybe)
			}
			if keys := e.keys(t, "idem:*"); len(keys) != 0 {
				t.Errorf("records %v left behind", keys)
			}
		})
	}
}

func TestPostEmail_scheduled(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	sendAt := time.Now().Add(time.Hour).UTC().Truncate(time.Second)
	r := e.postJSON(t, "/v1/emails", `{"to":"ann@example.com","subject":"Later","body":"b","send_at":"`+sendAt.Format(time.RFC3339)+`"}`)
	wantStatus(t, r, http.StatusAccepted)
	type scheduled struct {
		EmailID string    `json:"email_id"`
		Status  string    `json:"status"`
		SendAt  time.Time `json:"send_at"`
	}
	body := decodeJSON[scheduled](t, r)
	if !events.IsUUID(body.EmailID) || body.Status != store.EmailScheduled || !body.SendAt.Equal(sendAt) {
		t.Fatalf("body %s, want a scheduled email_id with send_at %s", r.body, sendAt)
	}
	if loc := r.header.Get("Location"); loc != "/v1/emails/"+body.EmailID {
		t.Errorf("Location = %q", loc)
	}
	// Held back, not in the stream yet; its schedule is announced.
	e.noEntries(t, events.TypeEmailRequested)
	if n, err := e.rdb.ZCard(t.Context(), bus.DelayedSet(e.prefix+events.TypeEmailRequested)).Result(); err != nil || n != 1 {
		t.Errorf("%d held-back email.requested (%v), want 1", n, err)
	}
	es := e.entries(t, events.TypeEmailScheduled)
	if len(es) != 1 {
		t.Fatalf("%d email.scheduled entries, want 1", len(es))
	}
	var ev events.EmailScheduled
	if err := json.Unmarshal(es[0].Payload, &ev); err != nil || ev.EmailID != body.EmailID || !ev.SendAt.Equal(sendAt) {
		t.Errorf("email.scheduled %s (%v), want email %s at %s", es[0].Payload, err, body.EmailID, sendAt)
	}
	got := e.readEmail(t, body.EmailID)
	if got.Status != store.EmailScheduled || got.SendAt == nil || !got.SendAt.Equal(sendAt) {
		t.Errorf("read %+v, want scheduled at %s", got, sendAt)
	}
}

func TestPostEmail_idempotencyKey(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	req := `{"to":"ann@example.com","subject":"Once","body":"only once"}`
	first := e.postJSON(t, "/v1/emails", req, "Idempotency-Key", "email-1")
	id := wantAcceptedEmail(t, first)
	if first.header.Get("Idempotent-Replayed") != "" {
		t.Errorf("first answer says Idempotent-Replayed")
	}
	again := e.postJSON(t, "/v1/emails", req, "Idempotency-Key", "email-1")
	if got := wantAcceptedEmail(t, again); got != id {
		t.Errorf("retry answered %s, want %s", got, id)
	}
	if again.header.Get("Idempotent-Replayed") != "true" {
		t.Errorf("Idempotent-Replayed = %q, want true", again.header.Get("Idempotent-Replayed"))
	}
	// The same request encoded again (members in another order, other
	// white space) is the same request.
	reencoded := e.postJSON(t, "/v1/emails", "{ \"body\": \"only once\",\n  \"subject\": \"Once\", \"to\": \"ann@example.com\" }", "Idempotency-Key", "email-1")
	if got := wantAcceptedEmail(t, reencoded); got != id {
		t.Errorf("retry encoded again answered %s, want %s", got, id)
	}

	other := e.postJSON(t, "/v1/emails", `{"to":"eve@example.com","subject":"Once","body":"only once"}`, "Idempotency-Key", "email-1")
	wantError(t, other, http.StatusUnprocessableEntity, "idempotency_key_reused")

	if n := len(e.entries(t, events.TypeEmailRequested)); n != 1 {
		t.Errorf("%d email.requested entries, want 1", n)
	}

	// A refused request leaves the key free for the corrected one.
	bad := e.postJSON(t, "/v1/emails", `{"to":"nope","subject":"s","body":"b"}`, "Idempotency-Key", "email-2")
	wantError(t, bad, http.StatusUnprocessableEntity, "validation_failed")
	wantAcceptedEmail(t, e.postJSON(t, "/v1/emails", `{"to":"ann@example.com","subject":"s","body":"b"}`, "Idempotency-Key", "email-2"))
}

// TestPostEmail_claimSentTwiceByTheClient: the Redis client sends the
// claim of the Idempotency-Key (SET NX) again, as after a connection that
// broke once Redis had run it, and the second attempt finds the request's
// own placeholder. The request still holds its key: it is accepted, not
// answered 409 with its key blocked for the lease, and a retry replays it.
func TestPostEmail_claimSentTwiceByTheClient(t *testing.T) {
	t.Parallel()
	claim := &rerunFirst{match: func(cmd redis.Cmder) bool {
		args := cmdArgs(cmd)
		return args[0] == "set" && strings.Contains(args[1], "key:email:") && slices.ContainsFunc(args[3:], func(a string) bool { return strings.EqualFold(a, "nx") })
	}}
	e := newEnv(t, withIdemRedis(hookedRedis(t, claim)))
	req := `{"to":"ann@example.com","subject":"Once","body":"only once"}`
	first := e.postJSON(t, "/v1/emails", req, "Idempotency-Key", "twice-1")
	if !claim.ran() {
		t.Fatal("the claim was not sent twice")
	}
	id := wantAcceptedEmail(t, first)
	again := e.postJSON(t, "/v1/emails", req, "Idempotency-Key", "twice-1")
	if got := wantAcceptedEmail(t, again); got != id {
		t.Errorf("retry answered %s, want %s", got, id)
	}
	if again.header.Get("Idempotent-Replayed") != "true" || strings.TrimSpace(string(again.body)) != strings.TrimSpace(string(first.body)) {
		t.Errorf("retry answered %s (Idempotent-Replayed %q), want the replay of %s", again.body, again.header.Get("Idempotent-Replayed"), first.body)
	}
	if n := len(e.entries(t, events.TypeEmailRequested)); n != 1 {
		t.Errorf("%d email.requested entries, want 1", n)
	}
}

// TestPostEmail_keyHeldToWhatWasDecoded: the decoder matches member names
// without regard to case, the last match winning, so these two bodies,
// one JSON value with its members in another order, are emails to two
// different recipients. Under one Idempotency-Key the second is refused as
// another request, not answered with the first one's replay.
func TestPostEmail_keyHeldToWhatWasDecoded(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	toBob := `{"to":"ann@example.com","TO":"bob@example.com","subject":"s","body":"b"}`
	toAnn := `{"TO":"bob@example.com","to":"ann@example.com","subject":"s","body":"b"}`
	id := wantAcceptedEmail(t, e.postJSON(t, "/v1/emails", toBob, "Idempotency-Key", "case-1"))
	wantError(t, e.postJSON(t, "/v1/emails", toAnn, "Idempotency-Key", "case-1"), http.StatusUnprocessableEntity, "idempotency_key_reused")
	es := e.entries(t, events.TypeEmailRequested)
	if len(es) != 1 {
		t.Fatalf("%d email.requested entries, want 1", len(es))
	}
	var ev events.EmailRequested
	if err := json.Unmarshal(es[0].Payload, &ev); err != nil || ev.EmailID != id || ev.To != "bob@example.com" {
		t.Errorf("published %s (%v), want email %s to bob@example.com", es[0].Payload, err, id)
	}
	// The same request encoded again, its send_at in another zone, is
	// still the same request.
	at := time.Now().Add(time.Hour).UTC().Truncate(time.Second)
	utc := `{"to":"ann@example.com","subject":"s","body":"b","send_at":"` + at.Format(time.RFC3339) + `"}`
	berlin := `{"send_at":"` + at.In(time.FixedZone("CEST", 2*3600)).Format(time.RFC3339) + `","body":"b","subject":"s","to":"ann@example.com"}`
	first := e.postJSON(t, "/v1/emails", utc, "Idempotency-Key", "case-2")
	wantStatus(t, first, http.StatusAccepted)
	again := e.postJSON(t, "/v1/emails", berlin, "Idempotency-Key", "case-2")
	wantStatus(t, again, http.StatusAccepted)
	if again.header.Get("Idempotent-Replayed") != "true" {
		t.Errorf("the request encoded again answered %s, want the replay of %s", again.body, first.body)
	}
}

// TestPostEmail_scheduledKeyOutlivesSendAt: under an Idempotency-Key, an
// email scheduled 20 days ahead keeps its record, and the markers that
// make its writes once, until 7 days after send_at, not 7 days after the
// request: a retry on day 8 must not schedule it a second time.
func TestPostEmail_scheduledKeyOutlivesSendAt(t *testing.T) {
	t.Parallel()
	const day = 24 * time.Hour
	e := newEnv(t)
	sendAt := time.Now().Add(20 * day).UTC().Truncate(time.Second)
	req := `{"to":"ann@example.com","subject":"Later","body":"b","send_at":"` + sendAt.Format(time.RFC3339) + `"}`
	r := e.postJSON(t, "/v1/emails", req, "Idempotency-Key", "far-1")
	wantStatus(t, r, http.StatusAccepted)
	id, _ := decodeJSON[map[string]any](t, r)["email_id"].(string)
	keys := map[string]string{
		"the key's record":        e.prefix + "idem:key:email:far-1",
		"the held email's marker": bus.OnceKey(e.prefix+events.TypeEmailRequested, id),
	}
	notices, err := e.rdb.Keys(t.Context(), bus.OnceKey(e.prefix+events.TypeEmailScheduled, "*")).Result()
	if err != nil || len(notices) != 1 {
		t.Fatalf("%d markers of email.scheduled (%v), want 1", len(notices), err)
	}
	keys["the notice's marker"] = notices[0]
	want := 7*day + time.Until(sendAt)
	for name, key := range keys {
		ttl, err := e.rdb.PTTL(t.Context(), key).Result()
		if err != nil {
			t.Fatal(err)
		}
		if ttl < want-time.Minute || ttl > want+time.Minute {
			t.Errorf("%s is kept %v, want until 7 days after send_at (%v)", name, ttl.Round(time.Second), want.Round(time.Second))
		}
	}
	// A retry replays the first answer; nothing is held back twice.
	again := e.postJSON(t, "/v1/emails", req, "Idempotency-Key", "far-1")
	wantStatus(t, again, http.StatusAccepted)
	if again.header.Get("Idempotent-Replayed") != "true" {
		t.Errorf("retry answered %s, want the replay of %s", again.body, r.body)
	}
	if n, err := e.rdb.ZCard(t.Context(), bus.DelayedSet(e.prefix+events.TypeEmailRequested)).Result(); err != nil || n != 1 {
		t.Errorf("%d held-back email.requested (%v), want 1", n, err)
	}
}

func TestGetEmail(t *testing.T) {
	t.Parallel()
	e := newEnv(t)

	t.Run("errors", func(t *testing.T) {
		t.Parallel()
		wantError(t, e.get(t, "/v1/emails/"+events.NewID()), http.StatusNotFound, "not_found")
		wantError(t, e.get(t, "/v1/emails/12345"), http.StatusBadRequest, "malformed_id")
	})

	t.Run("projected row", func(t *testing.T) {
		t.Parallel()
		id, docID := events.NewID(), events.NewID()
		e.project(t, func(ctx context.Context, tx *store.Tx) error {
			if err := tx.ApplyEmailsRequested(ctx, []*events.EmailRequested{{EmailID: id, To: "ann@example.com",
				Subject: "Your document", Body: "done", DocID: docID, RequestedAt: at}}); err != nil {
				return err
			}
			return tx.ApplyEmailsSent(ctx, []*events.EmailSent{{EmailID: id, To: "ann@example.com",
				MessageID: "<m1@example.com>", Attempts: 2, SentAt: at.Add(time.Second)}})
		})
		got := e.readEmail(t, id)
		if got.EmailID != id || got.Status != store.EmailSent || got.To == nil || *got.To != "ann@example.com" ||
			got.Subject == nil || *got.Subject != "Your document" || got.DocID == nil || *got.DocID != docID ||
			got.Attempts != 2 || got.SentAt == nil || !got.SentAt.Equal(at.Add(time.Second)) ||
			got.MessageID == nil || *got.MessageID != "<m1@example.com>" || got.Error != nil || got.FailedAt != nil {
			t.Errorf("read %+v", got)
		}
	})

	t.Run("right after the 202, in capitals too", func(t *testing.T) {
		t.Parallel()
		id := wantAcceptedEmail(t, e.postJSON(t, "/v1/emails", `{"to":"ann@example.com","subject":"s","body":"b"}`))
		for _, ref := range []string{id, strings.ToUpper(id)} {
			if got := e.readEmail(t, ref); got.EmailID != id || got.Status != store.EmailQueued {
				t.Errorf("read %s: %+v, want %s queued", ref, got, id)
			}
		}
	})
}

// TestPostEmail_scheduledRetryAfterUnknownOutcome: a scheduled email whose
// writes failed with an unknown outcome is retried with the same
// Idempotency-Key on another replica. The retry finishes the first
// attempt: the same email_id, the email held back once, one email.scheduled.
func TestPostEmail_scheduledRetryAfterUnknownOutcome(t *testing.T) {
	t.Parallel()
	sendAt := time.Now().Add(time.Hour).UTC().Truncate(time.Second)
	req := `{"to":"ann@example.com","subject":"Later","body":"b","send_at":"` + sendAt.Format(time.RFC3339) + `"}`
	for _, heldBefore := range []bool{false, true} {
		t.Run(fmt.Sprintf("first hold landed %v", heldBefore), func(t *testing.T) {
			t.Parallel()
			down := newEnv(t, withPublisherRedis(deadRedis(t)))
			wantError(t, down.postJSON(t, "/v1/emails", req, "Idempotency-Key", "later-1"), http.StatusServiceUnavailable, "unavailable")
			up := newEnv(t, withSharedState(down))
			rec := preparedRecord(t, up, "key:email:later-1")
			if rec.Pending.DeliverAt == nil || !rec.Pending.DeliverAt.Equal(sendAt) || rec.Pending.Then == nil {
				t.Fatalf("prepared record %+v, want the email held until %s and its notice", rec.Pending, sendAt)
			}
			if heldBefore {
				ev, err := events.Decode(rec.Pending.EventType, 0, rec.Pending.Payload)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := up.publisher.PublishAt(t.Context(), sendAt, ev, bus.WithID(rec.Pending.EventID), bus.WithOnce(time.Hour)); err != nil {
					t.Fatal(err)
				}
			}
			var ids []string
			for range 2 {
				r := up.postJSON(t, "/v1/emails", req, "Idempotency-Key", "later-1")
				wantStatus(t, r, http.StatusAccepted)
				if r.header.Get("Idempotent-Replayed") != "true" {
					t.Errorf("retry not marked as a replay")
				}
				ids = append(ids, decodeJSON[map[string]any](t, r)["email_id"].(string))
			}
			if ids[0] != rec.Pending.EventID || ids[1] != ids[0] {
				t.Errorf("retries answered %v, want the prepared email %s", ids, rec.Pending.EventID)
			}
			if n, err := up.rdb.ZCard(t.Context(), bus.DelayedSet(up.prefix+events.TypeEmailRequested)).Result(); err != nil || n != 1 {
				t.Errorf("%d held-back email.requested (%v), want 1", n, err)
			}
			up.noEntries(t, events.TypeEmailRequested)
			if es := up.entries(t, events.TypeEmailScheduled); len(es) != 1 {
				t.Errorf("%d email.scheduled entries, want 1", len(es))
			}
			got := up.readEmail(t, ids[0])
			if got.Status != store.EmailScheduled {
				t.Errorf("read %+v, want scheduled", got)
			}
		})
	}
}

// TestPostEmail_scheduledNoticeRetried: under an Idempotency-Key, the
// email is held back but its email.scheduled notice is refused for a
// moment (the stream's key holds a string). The API tries the notice
// again instead of answering 503 for an email that will be sent.
func TestPostEmail_scheduledNoticeRetried(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	stream := e.refuseAppends(t, events.TypeEmailScheduled)
	cleared := make(chan error, 1)
	go func() {
		time.Sleep(300 * time.Millisecond)
		cleared <- e.rdb.Del(context.Background(), stream).Err()
	}()
	sendAt := time.Now().Add(time.Hour).UTC().Truncate(time.Second)
	req := `{"to":"ann@example.com","subject":"Later","body":"b","send_at":"` + sendAt.Format(time.RFC3339) + `"}`
	r := e.postJSON(t, "/v1/emails", req, "Idempotency-Key", "notice-1")
	if err := <-cleared; err != nil {
		t.Fatal(err)
	}
	wantStatus(t, r, http.StatusAccepted)
	if n, err := e.rdb.ZCard(t.Context(), bus.DelayedSet(e.prefix+events.TypeEmailRequested)).Result(); err != nil || n != 1 {
		t.Errorf("%d held-back email.requested (%v), want 1", n, err)
	}
	if es := e.entries(t, events.TypeEmailScheduled); len(es) != 1 {
		t.Errorf("%d email.scheduled entries, want 1", len(es))
	}
}

// faultyPublisher is a real Publisher whose PublishAt reports a lost
// connection after it held the event back (so the outcome looks unknown),
// and whose CancelDelayed fails, as when Redis goes away mid-request.
type faultyPublisher struct {
	api.Publisher
	lostAfterHold bool
	// movedAlready makes CancelDelayed find nothing, without an error, as
	// after the scheduler moved the email into its stream.
	movedAlready bool
}

var errRedisGone = errors.New("read tcp 127.0.0.1:6379: connection reset by peer")

func (p faultyPublisher) PublishAt(ctx context.Context, at time.Time, ev events.Event, opts ...bus.PublishOption) (string, error) {
	id, err := p.Publisher.PublishAt(ctx, at, ev, opts...)
	if err == nil && p.lostAfterHold {
		return "", errRedisGone
	}
	return id, err
}

func (p faultyPublisher) CancelDelayed(context.Context, string, string, time.Time) (bool, error) {
	if p.movedAlready {
		return false, nil
	}
	return false, errRedisGone
}

// TestPostEmail_scheduledWithoutKeyNeverAnswers503ForAnEmailItSends: a
// scheduled email without an Idempotency-Key, whose held-back request
// cannot be withdrawn after a failure, will be sent. The answer must not
// be a plain "retry later", whose retry would send it twice: a failed
// notice gets 202, and a hold whose outcome is unknown a 503 that says the
// email may have been accepted.
func TestPostEmail_scheduledWithoutKeyNeverAnswers503ForAnEmailItSends(t *testing.T) {
	t.Parallel()
	sendAt := time.Now().Add(time.Hour).UTC().Truncate(time.Second)
	req := `{"to":"ann@example.com","subject":"Later","body":"b","send_at":"` + sendAt.Format(time.RFC3339) + `"}`

	t.Run("notice refused", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, withPublisher(func(p api.Publisher) api.Publisher { return faultyPublisher{Publisher: p} }))
		e.refuseAppends(t, events.TypeEmailScheduled)
		r := e.postJSON(t, "/v1/emails", req)
		wantStatus(t, r, http.StatusAccepted)
		if n, err := e.rdb.ZCard(t.Context(), bus.DelayedSet(e.prefix+events.TypeEmailRequested)).Result(); err != nil || n != 1 {
			t.Errorf("%d held-back email.requested (%v), want the 1 accepted", n, err)
		}
	})
	t.Run("notice refused, email moved on already", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, withPublisher(func(p api.Publisher) api.Publisher { return faultyPublisher{Publisher: p, movedAlready: true} }))
		e.refuseAppends(t, events.TypeEmailScheduled)
		wantStatus(t, e.postJSON(t, "/v1/emails", req), http.StatusAccepted)
	})
	t.Run("hold of unknown outcome", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, withPublisher(func(p api.Publisher) api.Publisher { return faultyPublisher{Publisher: p, lostAfterHold: true} }))
		r := e.postJSON(t, "/v1/emails", req)
		wantError(t, r, http.StatusServiceUnavailable, "unavailable")
		if !strings.Contains(string(r.body), "may have been accepted") {
			t.Errorf("body %s, want it to say the email may have been accepted", r.body)
		}
	})
}

// TestIdempotencyKeyMustBeOne: an empty Idempotency-Key, or two, is refused
// with 400 rather than taken as no key: the client meant its request to be
// safe to retry.
func TestIdempotencyKeyMustBeOne(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	const body = `{"to":"ann@example.com","subject":"s","body":"b"}`
	for name, keys := range map[string][]string{"empty": {""}, "blank": {"  "}, "two": {"k1", "k2"}} {
		req := e.request(t, http.MethodPost, "/v1/emails", strings.NewReader(body), "Content-Type", "application/json")
		for _, k := range keys {
			req.Header.Add("Idempotency-Key", k)
		}
		wantError(t, e.do(t, req), http.StatusBadRequest, "bad_idempotency_key")
		if n := len(e.entries(t, events.TypeEmailRequested)); n != 0 {
			t.Fatalf("%s: %d email.requested published, want none", name, n)
		}
	}
}

// TestPostEmail_keyOfARecordWithTheBytesFingerprint: a record written
// before fingerprints were of the JSON as a value holds the fingerprint of
// the body's bytes; a retry of its request still matches it.
func TestPostEmail_keyOfARecordWithTheBytesFingerprint(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	body := `{"to":"ann@example.com","subject":"Once","body":"only once"}`
	id := wantAcceptedEmail(t, e.postJSON(t, "/v1/emails", body, "Idempotency-Key", "legacy-1"))
	// The record as the earlier api wrote it.
	key := e.prefix + "idem:key:email:legacy-1"
	raw, err := e.rdb.Get(t.Context(), key).Bytes()
	if err != nil {
		t.Fatal(err)
	}
	var rec map[string]any
	if err := json.Unmarshal(raw, &rec); err != nil {
		t.Fatalf("record %s: %v", raw, err)
	}
	sum := sha256.Sum256([]byte(body))
	rec["fp"] = hex.EncodeToString(sum[:])
	raw, _ = json.Marshal(rec)
	if err := e.rdb.Set(t.Context(), key, raw, time.Hour).Err(); err != nil {
		t.Fatal(err)
	}
	if got := wantAcceptedEmail(t, e.postJSON(t, "/v1/emails", body, "Idempotency-Key", "legacy-1")); got != id {
		t.Errorf("retry answered %s, want the replay of %s", got, id)
	}
}

// slowPublisher is a real Publisher whose PublishEvent first waits, as
// over a slow link to Redis.
type slowPublisher struct {
	api.Publisher
	wait time.Duration
}

func (p slowPublisher) PublishEvent(ctx context.Context, ev events.Event, opts ...bus.PublishOption) (string, error) {
	time.Sleep(p.wait)
	return p.Publisher.PublishEvent(ctx, ev, opts...)
}

// TestJSONBody_slowOrCut: a JSON route reads its body under a deadline of
// its own (JSONBodyTimeout; the server's read timeout is set for uploads):
// a body that has not arrived by then gets 408 timeout, and one whose
// connection ends before it does 499 client_closed, both as JSON errors. A
// body read in time is served however long its request takes after it.
func TestJSONBody_slowOrCut(t *testing.T) {
	t.Parallel()
	const timeout = 300 * time.Millisecond
	e := newEnv(t, withJSONBodyTimeout(timeout),
		withPublisher(func(p api.Publisher) api.Publisher { return slowPublisher{Publisher: p, wait: 3 * timeout} }))
	tests := []struct {
		name   string
		cut    bool
		status int
		code   string
	}{
		{name: "slow", status: http.StatusRequestTimeout, code: "timeout"},
		{name: "cut", cut: true, status: 499, code: "client_closed"},
	}
	for _, path := range []string{"/v1/emails", "/v1/events", "/v1/events/batch"} {
		for _, tt := range tests {
			t.Run(tt.name+" "+path, func(t *testing.T) {
				t.Parallel()
				conn, err := net.Dial("tcp", e.srv.Listener.Addr().String())
				if err != nil {
					t.Fatal(err)
				}
				defer conn.Close()
				if err := conn.SetDeadline(time.Now().Add(liveness)); err != nil {
					t.Fatal(err)
				}
				start := time.Now()
				// 100 bytes announced, 6 sent.
				if _, err := io.WriteString(conn, "POST "+path+" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"to\":"); err != nil {
					t.Fatal(err)
				}
				if tt.cut {
					if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
						t.Fatal(err)
					}
				}
				res, err := http.ReadResponse(bufio.NewReader(conn), nil)
				if err != nil {
					t.Fatalf("no answer: %v", err)
				}
				body, err := io.ReadAll(res.Body)
				res.Body.Close()
				if err != nil {
					t.Fatal(err)
				}
				wantError(t, response{status: res.StatusCode, header: res.Header, body: body}, tt.status, tt.code)
				if took := time.Since(start); !tt.cut && took < timeout {
					t.Errorf("answered after %v, before the deadline of %v", took, timeout)
				}
			})
		}
	}
	t.Run("served past the deadline", func(t *testing.T) {
		t.Parallel()
		wantAcceptedEmail(t, e.postJSON(t, "/v1/emails", `{"to":"ann@example.com","subject":"s","body":"b"}`))
	})
}
