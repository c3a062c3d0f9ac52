package bus

import (
	"context"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/conveyor/conveyor/events"
)

// TestHandlerContext: a handler's context carries its values through
// derived contexts, and derived contexts end with the message's context
// without a goroutine each (they attach to the parent's cancellation, as
// they would to a context.WithValue).
func TestHandlerContext(t *testing.T) {
	parent, cancel := context.WithCancel(context.Background())
	hc := &handlerCtx{Context: parent, hv: handlerValues{env: events.Envelope{ID: "e1", Attempt: 3}, attempts: attempts{attempt: 3, max: 3}}}
	before := runtime.NumGoroutine()
	var children []context.Context
	for range 200 {
		c, stop := context.WithTimeout(hc, time.Hour)
		defer stop()
		children = append(children, c)
	}
	if grew := runtime.NumGoroutine() - before; grew > 20 {
		t.Fatalf("200 derived contexts started %d goroutines; want none", grew)
	}
	env, ok := EnvelopeFrom(children[0])
	if !ok || env.ID != "e1" || Attempt(children[0]) != 3 || !IsLastAttempt(children[0]) {
		t.Fatalf("derived context: envelope %+v %v, attempt %d, last %v", env, ok, Attempt(children[0]), IsLastAttempt(children[0]))
	}
	if _, ok := EnvelopeFrom(context.Background()); ok || Attempt(context.Background()) != 0 {
		t.Fatal("a plain context claims to be a handler's")
	}
	cancel()
	for _, c := range children {
		select {
		case <-c.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("a derived context outlived the message's context")
		}
	}
}

// entryEnvelope and messageEnvelope read the same envelope from an entry's metadata pairs and
// from a message's metadata map: every field, a key given twice as its
// last value (as Get does), and defaults for what is missing or malformed,
// except an event_version that is present and not a version, which is a
// permanent error.
func TestEnvelopeOfPairsAndMap(t *testing.T) {
	at := time.Date(2026, 12, 6, 15, 4, 5, 123456789, time.UTC)
	full := []string{
		MetaEventType, "email.requested", MetaEventVersion, "1", MetaOccurredAt, at.Format(time.RFC3339Nano),
		MetaCorrelationID, "corr", MetaCausationID, "cause", MetaSource, "api",
		MetaTraceparent, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", MetaAttempt, "1",
		"unrelated", "x", MetaAttempt, "3", // the last of a key given twice
	}
	tests := []struct {
		name       string
		meta       []string
		want       events.Envelope
		badVersion bool
	}{
		{"every field", full, events.Envelope{ID: "id-1", Type: "email.requested", Version: 1, OccurredAt: at,
			CorrelationID: "corr", CausationID: "cause", Source: "api",
			Traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", Attempt: 3}, false},
		{"nothing set", nil, events.Envelope{ID: "id-1", Type: "fallback.type", Attempt: 1}, false},
		{"malformed", []string{MetaEventType, "", MetaEventVersion, "one", MetaOccurredAt, "yesterday", MetaAttempt, "-2"},
			events.Envelope{ID: "id-1", Type: "fallback.type", Attempt: 1}, true},
		{"version of two digits", []string{MetaEventVersion, "12"}, events.Envelope{ID: "id-1", Type: "fallback.type", Version: 12, Attempt: 1}, false},
	}
	for _, v := range []string{"2.0", "v2", " 2", "2 ", "+2", "-2", "0", "99999999999999999999"} {
		tests = append(tests, struct {
			name       string
			meta       []string
			want       events.Envelope
			badVersion bool
		}{"version " + v, []string{MetaEventVersion, v}, events.Envelope{ID: "id-1", Type: "fallback.type", Attempt: 1}, true})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			em := &entryMessage{uuid: "id-1", meta: tt.meta}
			fromPairs, pairsErr := entryEnvelope(em, "fallback.type")
			fromMap, mapErr := messageEnvelope(em.message(true), "fallback.type")
			for _, err := range []error{pairsErr, mapErr} {
				if tt.badVersion != (err != nil) || err != nil && (!IsPermanent(err) || !strings.Contains(err.Error(), MetaEventVersion)) {
					t.Fatalf("error = %v, want a permanent error naming %s: %v", err, MetaEventVersion, tt.badVersion)
				}
			}
			for _, got := range []events.Envelope{fromPairs, fromMap} {
				want := tt.want
				if !got.OccurredAt.Equal(want.OccurredAt) {
					t.Fatalf("OccurredAt = %v, want %v", got.OccurredAt, want.OccurredAt)
				}
				got.OccurredAt, want.OccurredAt = time.Time{}, time.Time{}
				if got != want {
					t.Fatalf("envelope = %+v, want %+v", got, want)
				}
			}
		})
	}
}
