package events

import (
	"crypto/sha256"
	"time"

	"github.com/google/uuid"
)

// Envelope is what travels with every event besides its payload. On the wire
// it is kept in Watermill message metadata (see package bus); ID is the
// Watermill message UUID.
type Envelope struct {
	// ID identifies the event: a UUIDv7, so ids sort by time. Consumers
	// deduplicate on it.
	ID      string
	Type    string
	Version int
	// OccurredAt is when the fact happened, not when it was delivered.
	OccurredAt time.Time
	// CorrelationID ties together every event caused by one outside request.
	CorrelationID string
	// CausationID is the ID of the event that caused this one; empty for
	// events that come from outside.
	CausationID string
	// Source names the program or role that published the event.
	Source string
	// Traceparent is a W3C trace context header value.
	Traceparent string
	// Attempt is the delivery attempt of the consumer that received the
	// event (1 for the first); zero when publishing.
	Attempt int
}

// NewID returns a new UUIDv7.
func NewID() string {
	return uuid.Must(uuid.NewV7()).String()
}

// IsUUID reports whether s is a UUID in canonical textual form.
func IsUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	_, err := uuid.Parse(s)
	return err == nil
}

// DerivedID returns a deterministic UUIDv7 for an event caused by parent, so
// that a consumer which runs twice on the same event (at-least-once
// delivery) publishes follow-up events with the same ids and downstream
// deduplication absorbs the repeat. name distinguishes several follow-ups of
// one parent. The timestamp of a UUIDv7 parent is kept, so derived ids still
// sort near their cause.
func DerivedID(parent, name string) string {
	h := sha256.Sum256([]byte(parent + "\x00" + name))
	var id uuid.UUID
	copy(id[:], h[:16])
	if p, err := uuid.Parse(parent); err == nil && p.Version() == 7 {
		copy(id[:6], p[:6])
	}
	id[6] = id[6]&0x0f | 0x70 // version 7
	id[8] = id[8]&0x3f | 0x80 // RFC 4122 variant
	return id.String()
}

// DerivedIDAt returns a deterministic UUIDv7 with the timestamp t for the
// name: the same (t, name) gives the same id in every process. The
// scheduler names each tick's event this way.
func DerivedIDAt(t time.Time, name string) string {
	h := sha256.Sum256([]byte(name))
	var id uuid.UUID
	copy(id[:], h[:16])
	ms := uint64(t.UnixMilli())
	for i := 0; i < 6; i++ {
		id[i] = byte(ms >> (8 * (5 - i)))
	}
	id[6] = id[6]&0x0f | 0x70
	id[8] = id[8]&0x3f | 0x80
	return id.String()
}
