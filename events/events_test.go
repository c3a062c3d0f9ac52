package events_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	fastjson "github.com/goccy/go-json"

	"github.com/conveyor/conveyor/events"
)

func TestDecode(t *testing.T) {
	t.Parallel()
	id := events.NewID()
	tests := []struct {
		name      string
		typ       string
		payload   string
		wantErr   error
		wantField string
	}{
		{name: "valid email", typ: events.TypeEmailRequested,
			payload: `{"email_id":"` + id + `","to":"a@example.com","subject":"hi","body":"x","requested_at":"2026-01-01T00:00:00Z"}`},
		{name: "unknown type", typ: "nope.happened", payload: `{}`, wantErr: events.ErrUnknownType},
		{name: "bad json", typ: events.TypeEmailRequested, payload: `{`, wantField: "data"},
		{name: "wrong json type", typ: events.TypeEmailRequested, payload: `{"to":5}`, wantField: "to"},
		{name: "missing to", typ: events.TypeEmailRequested,
			payload: `{"email_id":"` + id + `","subject":"hi","body":"x","requested_at":"2026-01-01T00:00:00Z"}`, wantField: "to"},
		{name: "bad address", typ: events.TypeEmailRequested,
			payload: `{"email_id":"` + id + `","to":"nope","subject":"hi","body":"x","requested_at":"2026-01-01T00:00:00Z"}`, wantField: "to"},
		{name: "header injection", typ: events.TypeEmailRequested,
			payload: `{"email_id":"` + id + `","to":"a@example.com","subject":"hi\r\nBcc: x@y.z","body":"x","requested_at":"2026-01-01T00:00:00Z"}`, wantField: "subject"},
		{name: "bad uuid", typ: events.TypeDocumentProcessed,
			payload: `{"doc_id":"1","content_type":"text/plain","processed_at":"2026-01-01T00:00:00Z"}`, wantField: "doc_id"},
		{name: "negative words", typ: events.TypeDocumentProcessed,
			payload: `{"doc_id":"` + id + `","content_type":"text/plain","words":-1,"processed_at":"2026-01-01T00:00:00Z"}`, wantField: "words"},
		// Times: the UTC form must have a year of 1 to 9999, which RFC
		// 3339 can write and PostgreSQL can store.
		{name: "time in year 0", typ: events.TypeEmailRequested,
			payload: emailPayload(id, "a@example.com", "0000-06-01T00:00:00Z"), wantField: "requested_at"},
		{name: "time in year 1 but year 0 in UTC", typ: events.TypeEmailRequested,
			payload: emailPayload(id, "a@example.com", "0001-01-01T00:00:00+01:00"), wantField: "requested_at"},
		{name: "time in year 9999 but 10000 in UTC", typ: events.TypeEmailRequested,
			payload: emailPayload(id, "a@example.com", "9999-12-31T23:30:00-01:00"), wantField: "requested_at"},
		{name: "first representable time", typ: events.TypeEmailRequested,
			payload: emailPayload(id, "a@example.com", "0001-01-01T00:00:01Z")},
		{name: "last representable time", typ: events.TypeEmailRequested,
			payload: emailPayload(id, "a@example.com", "9999-12-31T23:59:59.999999999Z")},
		{name: "time out of range, other type", typ: events.TypeDocumentProcessed,
			payload: `{"doc_id":"` + id + `","content_type":"text/plain","processed_at":"0000-12-31T23:00:00Z"}`, wantField: "processed_at"},
		{name: "both times of email.scheduled", typ: events.TypeEmailScheduled,
			payload: `{"email_id":"` + id + `","to":"a@example.com","send_at":"0000-01-01T00:00:00Z","scheduled_at":"2026-01-01T00:00:00Z"}`, wantField: "send_at"},
		// Addresses: RFC 5321 limits.
		{name: "local part of 64 bytes", typ: events.TypeEmailRequested,
			payload: emailPayload(id, strings.Repeat("a", 64)+"@example.com", "2026-01-01T00:00:00Z")},
		// Consumers take addresses beyond RFC 5321's lengths, which only
		// ingest refuses (DecodeStrict): events accepted before the limit
		// are handled, not dead-lettered.
		{name: "local part of 65 bytes", typ: events.TypeEmailRequested,
			payload: emailPayload(id, strings.Repeat("a", 65)+"@example.com", "2026-01-01T00:00:00Z")},
		{name: "address of 20 KB", typ: events.TypeEmailRequested,
			payload: emailPayload(id, "a@"+strings.Repeat("b", 20<<10)+".com", "2026-01-01T00:00:00Z")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ev, err := events.Decode(tt.typ, 0, []byte(tt.payload))
			switch {
			case tt.wantErr != nil:
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
			case tt.wantField != "":
				var ve *events.ValidationError
				if !errors.As(err, &ve) {
					t.Fatalf("err = %v, want a ValidationError", err)
				}
				found := false
				for _, f := range ve.Fields {
					found = found || f.Field == tt.wantField
				}
				if !found {
					t.Fatalf("fields %v do not name %q", ve.Fields, tt.wantField)
				}
			default:
				if err != nil {
					t.Fatalf("unexpected error: %v", err)
				}
				if ev.EventType() != tt.typ {
					t.Fatalf("type = %s", ev.EventType())
				}
			}
		})
	}
}

// emailPayload returns an email.requested payload, valid but for to and
// requestedAt.
func emailPayload(id, to, requestedAt string) string {
	return fmt.Sprintf(`{"email_id":%q,"to":%q,"subject":"hi","body":"x","requested_at":%q}`, id, to, requestedAt)
}

// DecodeStrict refuses members the event does not have; Decode, which the
// consumers use, keeps ignoring them.
func TestDecodeStrict(t *testing.T) {
	t.Parallel()
	id := events.NewID()
	valid := strings.TrimSuffix(emailPayload(id, "a@example.com", "2026-01-01T00:00:00Z"), "}")
	long := strings.Repeat("x", 1000)
	tests := []struct {
		name    string
		payload string
		// unknown is the member named first as not known, if any.
		unknown string
		// wantFields are the fields named after it, in order; none and
		// no unknown means valid.
		wantFields []string
		// lenientErr: Decode refuses the payload too.
		lenientErr bool
	}{
		{name: "valid", payload: valid + `}`},
		{name: "member in another case", payload: `{"email_id":"` + id + `","TO":"a@example.com","subject":"hi","body":"x","requested_at":"2026-01-01T00:00:00Z"}`},
		{name: "send_at", payload: valid + `,"send_at":"2027-01-01T00:00:00Z"}`, unknown: "send_at"},
		{name: "cc", payload: valid + `,"cc":"b@example.com"}`, unknown: "cc"},
		{name: "html", payload: valid + `,"html":"<p>x</p>"}`, unknown: "html"},
		{name: "docId", payload: valid + `,"docId":"` + id + `"}`, unknown: "docId"},
		{name: "unknown member first", payload: `{"cc":null,` + valid[1:] + `}`, unknown: "cc"},
		{name: "unknown member and invalid fields", payload: `{"cc":"b@example.com","to":"nobody"}`, unknown: "cc",
			wantFields: []string{"email_id", "to", "subject", "body", "requested_at"}, lenientErr: true},
		{name: "long unknown member clipped", payload: valid + `,"` + long + `":1}`, unknown: events.Clip(long)},
		{name: "escaped unknown member", payload: valid + `,"c\u0063":1}`, unknown: "cc"},
		{name: "invalid only", payload: `{"to":"nobody"}`, wantFields: []string{"email_id", "to", "subject", "body", "requested_at"}, lenientErr: true},
		{name: "not an object", payload: `"hello"`, wantFields: []string{"data"}, lenientErr: true},
		{name: "malformed", payload: valid + `,"cc":`, wantFields: []string{"data"}, lenientErr: true},
		{name: "local part of 65 bytes", payload: emailPayload(id, strings.Repeat("a", 65)+"@example.com", "2026-01-01T00:00:00Z"), wantFields: []string{"to"}},
		{name: "address of 20 KB", payload: emailPayload(id, "a@"+strings.Repeat("b", 20<<10)+".com", "2026-01-01T00:00:00Z"), wantFields: []string{"to"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ev, err := events.DecodeStrict(events.TypeEmailRequested, 0, []byte(tt.payload))
			want := tt.wantFields
			if tt.unknown != "" {
				want = append([]string{tt.unknown}, want...)
			}
			if len(want) == 0 {
				if err != nil || ev.EventType() != events.TypeEmailRequested {
					t.Fatalf("DecodeStrict = %v, %v; want an email.requested", ev, err)
				}
			} else {
				var ve *events.ValidationError
				if !errors.As(err, &ve) || ev != nil {
					t.Fatalf("DecodeStrict = %v, %v; want a ValidationError", ev, err)
				}
				var got []string
				for _, f := range ve.Fields {
					got = append(got, f.Field)
				}
				if strings.Join(got, ",") != strings.Join(want, ",") {
					t.Fatalf("fields %q, want %q", got, want)
				}
				if tt.unknown != "" && ve.Fields[0].Message != "is not a known field" {
					t.Errorf("message %q for the unknown member", ve.Fields[0].Message)
				}
			}
			// A consumer reads what a newer producer added.
			if _, err := events.Decode(events.TypeEmailRequested, 0, []byte(tt.payload)); (err != nil) != tt.lenientErr {
				t.Errorf("Decode err = %v, want an error: %v", err, tt.lenientErr)
			}
		})
	}
	if _, err := events.DecodeStrict("nope.happened", 0, []byte(`{}`)); !errors.Is(err, events.ErrUnknownType) {
		t.Errorf("DecodeStrict of an unknown type: %v, want ErrUnknownType", err)
	}
}

func TestClip(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		in   string
		want string
	}{
		{name: "empty", in: "", want: ""},
		{name: "short", in: "abc", want: "abc"},
		{name: "MaxEcho bytes", in: strings.Repeat("a", events.MaxEcho), want: strings.Repeat("a", events.MaxEcho)},
		{name: "one byte more", in: strings.Repeat("a", events.MaxEcho+1), want: strings.Repeat("a", events.MaxEcho) + "…"},
		{name: "500 KB", in: strings.Repeat("a", 500<<10), want: strings.Repeat("a", events.MaxEcho) + "…"},
		{name: "cut before a rune", in: strings.Repeat("a", events.MaxEcho-1) + "é" + "b", want: strings.Repeat("a", events.MaxEcho-1) + "…"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := events.Clip(tt.in); got != tt.want {
				t.Errorf("Clip = %q (%d bytes), want %q", got, len(got), tt.want)
			}
		})
	}
}

// An unknown type is not echoed whole.
func TestDecodeUnknownTypeClipped(t *testing.T) {
	t.Parallel()
	_, err := events.Decode(strings.Repeat("t", 500<<10), 0, []byte(`{}`))
	if !errors.Is(err, events.ErrUnknownType) || len(err.Error()) > 200 {
		t.Fatalf("err (%d bytes) = %.200v…, want ErrUnknownType in at most 200 bytes", len(err.Error()), err)
	}
}

// valueEvent implements Event on its value, which DecodeInto cannot fill.
type valueEvent struct{}

func (valueEvent) EventType() string { return "value.event" }
func (valueEvent) EventVersion() int { return 1 }
func (valueEvent) Validate() error   { return nil }

func TestDecodeIntoNeedsAPointer(t *testing.T) {
	t.Parallel()
	err := events.DecodeInto(valueEvent{}, []byte(`{}`))
	if err == nil || !strings.Contains(err.Error(), "not a pointer") {
		t.Fatalf("err = %v, want one saying it is not a pointer", err)
	}
}

func TestEveryTypeIsRegisteredAndValidates(t *testing.T) {
	t.Parallel()
	want := []string{
		events.TypeDocumentProcessed, events.TypeDocumentProcessingFailed, events.TypeDocumentUploaded,
		events.TypeEmailFailed, events.TypeEmailRequested, events.TypeEmailScheduled, events.TypeEmailSent,
	}
	got := events.Types()
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("Types() = %v, want %v", got, want)
	}
	for _, typ := range got {
		spec, ok := events.Lookup(typ, 1)
		if !ok {
			t.Fatalf("%s v1 not registered", typ)
		}
		ev := spec.New()
		if ev.EventType() != typ || ev.EventVersion() != 1 {
			t.Fatalf("%s: New() returned %s v%d", typ, ev.EventType(), ev.EventVersion())
		}
		if err := ev.Validate(); err == nil {
			t.Fatalf("%s: zero value must not validate", typ)
		}
	}
}

func TestDerivedID(t *testing.T) {
	t.Parallel()
	parent := events.NewID()
	a := events.DerivedID(parent, "processed")
	if a != events.DerivedID(parent, "processed") {
		t.Fatal("DerivedID is not deterministic")
	}
	if a == events.DerivedID(parent, "email") || a == events.DerivedID(events.NewID(), "processed") {
		t.Fatal("DerivedID collides")
	}
	if !events.IsUUID(a) || a[14] != '7' {
		t.Fatalf("%s is not a UUIDv7", a)
	}
	if a[:8] != parent[:8] {
		t.Fatalf("derived id %s lost the parent's time prefix %s", a, parent)
	}
	if got := events.DerivedID("not-a-uuid", "x"); !events.IsUUID(got) {
		t.Fatalf("DerivedID of a non-UUID parent = %q", got)
	}
}

func FuzzDecode(f *testing.F) {
	for _, typ := range events.Types() {
		f.Add(typ, []byte(`{}`))
	}
	f.Add(events.TypeEmailRequested, []byte(`{"email_id":"0190a0b0-0000-7000-8000-000000000000","to":"a@b.co","subject":"s","body":"b","requested_at":"2026-01-01T00:00:00Z"}`))
	for _, ev := range benchEvents() {
		payload, err := json.Marshal(ev)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(ev.EventType(), payload)
	}
	f.Fuzz(func(t *testing.T, typ string, payload []byte) {
		// The router hands Decode a delivery's payload without copying it
		// out of the string it was read into: Decode must only read it and
		// keep no reference to it.
		before := bytes.Clone(payload)
		ev, err := events.Decode(typ, 0, payload)
		if !bytes.Equal(payload, before) {
			t.Fatalf("Decode changed its input from %q to %q", before, payload)
		}
		if err == nil {
			// Whatever decodes must validate, and must survive a round trip.
			if verr := ev.Validate(); verr != nil {
				t.Fatalf("decoded event does not validate: %v", verr)
			}
			want, err := json.Marshal(ev)
			if err != nil {
				t.Fatal(err)
			}
			for i := range payload {
				payload[i] = '#'
			}
			if got, _ := json.Marshal(ev); !bytes.Equal(got, want) {
				t.Fatalf("the decoded event changed with its input: %s, was %s", got, want)
			}
		}
	})
}

func ExampleDecode() {
	payload := []byte(`{"email_id":"0190a0b0-0000-7000-8000-000000000001","to":"ops@example.com",` +
		`"subject":"Report ready","body":"See attachment.","requested_at":"2026-11-28T10:00:00Z"}`)
	ev, err := events.Decode(events.TypeEmailRequested, 1, payload)
	if err != nil {
		fmt.Println(err)
		return
	}
	req := ev.(*events.EmailRequested)
	fmt.Println(req.EventType(), req.To, req.RequestedAt.Format(time.DateOnly))

	_, err = events.Decode(events.TypeEmailRequested, 1, []byte(`{"to":"not an address"}`))
	fmt.Println(err)
	// Output:
	// email.requested ops@example.com 2026-11-28
	// invalid event: email_id: is required; to: must be a valid email address; subject: is required; body: is required; requested_at: is required (RFC 3339 time)
}

func ExampleDecodeStrict() {
	// "send_at" is a member of POST /v1/emails, not of email.requested.
	payload := []byte(`{"email_id":"0190a0b0-0000-7000-8000-000000000001","to":"ops@example.com",` +
		`"subject":"Report ready","body":"See attachment.","requested_at":"2026-11-28T10:00:00Z",` +
		`"send_at":"2027-01-01T00:00:00Z"}`)
	_, err := events.DecodeStrict(events.TypeEmailRequested, 1, payload)
	fmt.Println(err)

	// A consumer's Decode reads what it knows of an event from a newer producer.
	ev, err := events.Decode(events.TypeEmailRequested, 1, payload)
	fmt.Println(ev.EventType(), err)
	// Output:
	// invalid event: send_at: is not a known field
	// email.requested <nil>
}

// FuzzFastDecodeAgreesWithEncodingJSON: the fast decoder used by Decode
// must accept exactly what encoding/json accepts, with the same result.
func FuzzFastDecodeAgreesWithEncodingJSON(f *testing.F) {
	f.Add([]byte(`{"email_id":"0190a0b0-0000-7000-8000-000000000000","to":"a@b.co","subject":"s","body":"b","requested_at":"2026-01-01T00:00:00Z"}`))
	f.Add([]byte(`{"To":"x","TO":"y","subject":"\u00e9\ud800","body":null,"requested_at":"2026-01-01T00:00:00.123+02:00"}`))
	f.Add([]byte(`{"email_id":1}`))
	f.Add([]byte(`[]`))
	f.Add([]byte(`{"body":"a\u0000b"} `))
	f.Fuzz(func(t *testing.T, payload []byte) {
		var std, fast events.EmailRequested
		stdErr := json.Unmarshal(payload, &std)
		fastErr := fastjson.Unmarshal(payload, &fast)
		if (stdErr == nil) != (fastErr == nil) {
			t.Fatalf("encoding/json err=%v, fast err=%v for %q", stdErr, fastErr, payload)
		}
		if stdErr == nil && !reflect.DeepEqual(std, fast) {
			t.Fatalf("decoded differently:\n std  %+v\n fast %+v\n from %q", std, fast, payload)
		}
	})
}
