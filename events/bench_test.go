package events_test

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/conveyor/conveyor/events"
)

// benchEvents are realistic payloads of the hottest event types: every
// delivery decodes one, every publish marshals one.
func benchEvents() []events.Event {
	now := time.Date(2026, 11, 28, 12, 0, 0, 123456789, time.UTC)
	sum := "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
	return []events.Event{
		&events.DocumentUploaded{DocID: events.NewID(), Filename: "quarterly-report.md", Size: 48213,
			SHA256: sum, BlobKey: sum, DeclaredContentType: "text/markdown", Notify: "ops@example.com", UploadedAt: now},
		&events.DocumentProcessed{DocID: events.NewID(), ContentType: "text/plain; charset=utf-8", Words: 7042, Lines: 388,
			Summary: "Revenue grew in every region. Costs fell for the third quarter in a row.", ProcessedAt: now},
		&events.EmailRequested{EmailID: events.NewID(), To: "ada@example.com", Subject: "Your document is ready",
			Body: "Hello,\n\nquarterly-report.md was processed: 7042 words.\n", RequestedAt: now},
		// The completion event the projector applies for every email.
		&events.EmailSent{EmailID: events.NewID(), To: "ada@example.com", MessageID: "<20261128120000.3f9a61c2@conveyor>",
			Attempts: 1, SentAt: now},
	}
}

// BenchmarkDecode measures events.Decode (JSON parse plus validation), which
// every handler and the projector run once per delivery.
func BenchmarkDecode(b *testing.B) {
	for _, ev := range benchEvents() {
		payload, err := json.Marshal(ev)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(ev.EventType(), func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(payload)))
			for b.Loop() {
				got, err := events.Decode(ev.EventType(), ev.EventVersion(), payload)
				if err != nil {
					b.Fatal(err)
				}
				if got.EventType() != ev.EventType() {
					b.Fatalf("decoded %s, want %s", got.EventType(), ev.EventType())
				}
			}
		})
	}
}

// BenchmarkDecodeStrict measures events.DecodeStrict, which the API runs
// once per event it accepts: Decode plus the check for unknown members.
func BenchmarkDecodeStrict(b *testing.B) {
	ev := benchEvents()[2] // email.requested, the one the API accepts
	payload, err := json.Marshal(ev)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.SetBytes(int64(len(payload)))
	for b.Loop() {
		if _, err := events.DecodeStrict(ev.EventType(), ev.EventVersion(), payload); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkMarshal measures the JSON encoding of a payload, as the publisher
// does it for every event.
func BenchmarkMarshal(b *testing.B) {
	for _, ev := range benchEvents() {
		b.Run(ev.EventType(), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				p, err := json.Marshal(ev)
				if err != nil {
					b.Fatal(err)
				}
				if len(p) == 0 {
					b.Fatal("empty payload")
				}
			}
		})
	}
}

// BenchmarkDerivedID measures the id derivation that keys every effect's
// idempotency (one per handler output).
func BenchmarkDerivedID(b *testing.B) {
	parent := events.NewID()
	b.ReportAllocs()
	for b.Loop() {
		if !events.IsUUID(events.DerivedID(parent, "document.processed")) {
			b.Fatal("derived id is not a UUID")
		}
	}
}
