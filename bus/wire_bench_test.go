package bus

import (
	"context"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"github.com/conveyor/conveyor/events"
)

// benchEntry is a stream entry as the publisher writes it for a typical
// event, and as a read hands it to the subscriber: every value a string.
func benchEntry(b *testing.B) (*message.Message, []string) {
	b.Helper()
	p := &Publisher{cfg: PublisherConfig{Source: "bench"}}
	ev := &events.DocumentProcessed{DocID: events.NewID(), ContentType: "text/plain; charset=utf-8",
		Words: 7042, Lines: 388, Summary: "Revenue grew in every region.", ProcessedAt: time.Now().UTC()}
	msg, err := p.NewMessage(context.Background(), ev)
	if err != nil {
		b.Fatal(err)
	}
	fields, err := marshalFields(msg)
	if err != nil {
		b.Fatal(err)
	}
	values := make([]string, len(fields))
	for i, f := range fields {
		switch v := f.(type) {
		case string:
			values[i] = v
		case []byte:
			values[i] = string(v)
		}
	}
	return msg, values
}

// BenchmarkMarshalFields measures turning a message into XADD arguments
// (metadata encoded as msgpack), once per publish.
func BenchmarkMarshalFields(b *testing.B) {
	msg, _ := benchEntry(b)
	b.ReportAllocs()
	for b.Loop() {
		fields, err := marshalFields(msg)
		if err != nil {
			b.Fatal(err)
		}
		if len(fields) != 6 {
			b.Fatalf("%d fields, want 6", len(fields))
		}
	}
}

// BenchmarkUnmarshalFields measures turning a read entry into a message,
// once per delivery.
func BenchmarkUnmarshalFields(b *testing.B) {
	want, values := benchEntry(b)
	b.ReportAllocs()
	for b.Loop() {
		msg, err := unmarshalFields(values, true)
		if err != nil {
			b.Fatal(err)
		}
		if msg.UUID != want.UUID || len(msg.Metadata) != len(want.Metadata) {
			b.Fatalf("decoded %s with %d metadata keys, want %s with %d", msg.UUID, len(msg.Metadata), want.UUID, len(want.Metadata))
		}
	}
}

// BenchmarkEventFields measures building an event's whole stream entry
// (id, envelope, JSON payload, metadata), the publisher's work per event
// before the XADD.
func BenchmarkEventFields(b *testing.B) {
	p := &Publisher{cfg: PublisherConfig{Source: "bench"}}
	ev := &events.EmailRequested{EmailID: events.NewID(), To: "ada@example.com", Subject: "Your document is ready",
		Body: "quarterly-report.md was processed.", RequestedAt: time.Now().UTC()}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		id, fields, err := p.eventFields(ctx, ev, nil)
		if err != nil {
			b.Fatal(err)
		}
		if id == "" || len(fields) != 6 {
			b.Fatalf("id %q, %d fields", id, len(fields))
		}
	}
}
