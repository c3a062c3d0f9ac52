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
