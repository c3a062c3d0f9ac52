package store_test

import (
	"context"
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/store"
)

// applyBatch applies evs in one transaction as the projector applies a
// batch: one call per event type, in its fixed order of types (whatever
// the order of arrival), each call with that type's events in arrival
// order.
func applyBatch(ctx context.Context, tx *store.Tx, evs ...events.Event) error {
	var (
		up   []*events.DocumentUploaded
		proc []*events.DocumentProcessed
		fail []*events.DocumentProcessingFailed
		sch  []*events.EmailScheduled
		req  []*events.EmailRequested
		snt  []*events.EmailSent
		mf   []*events.EmailFailed
	)
	for _, ev := range evs {
		switch e := ev.(type) {
		case *events.DocumentUploaded:
			up = append(up, e)
		case *events.DocumentProcessed:
			proc = append(proc, e)
		case *events.DocumentProcessingFailed:
			fail = append(fail, e)
		case *events.EmailScheduled:
			sch = append(sch, e)
		case *events.EmailRequested:
			req = append(req, e)
		case *events.EmailSent:
			snt = append(snt, e)
		case *events.EmailFailed:
			mf = append(mf, e)
		default:
			return fmt.Errorf("no apply function for %T", ev)
		}
	}
	for _, apply := range []func() error{
		func() error { return tx.ApplyDocumentsUploaded(ctx, up, nil) },
		func() error { return tx.ApplyDocumentsProcessed(ctx, proc) },
		func() error { return tx.ApplyDocumentsFailed(ctx, fail) },
		func() error { return tx.ApplyEmailsScheduled(ctx, sch) },
		func() error { return tx.ApplyEmailsRequested(ctx, req) },
		func() error { return tx.ApplyEmailsSent(ctx, snt) },
		func() error { return tx.ApplyEmailsFailed(ctx, mf) },
	} {
		if err := apply(); err != nil {
			return err
		}
	}
	return nil
}

// permutations returns every order of in.
func permutations[T any](in []T) [][]T {
	if len(in) <= 1 {
		return [][]T{in}
	}
	var out [][]T
	for i := range in {
		rest := append(append([]T{}, in[:i]...), in[i+1:]...)
		for _, p := range permutations(rest) {
			out = append(out, append([]T{in[i]}, p...))
		}
	}
	return out
}

// applyModes are the ways the same events reach the store: one at a time,
// in one transaction in arrival order, and in one projector batch.
var applyModes = []struct {
	name  string
	apply func(t *testing.T, st *store.Store, evs []events.Event)
}{
	{name: "one at a time", apply: func(t *testing.T, st *store.Store, evs []events.Event) { applyEach(t, st, evs...) }},
	{name: "one transaction", apply: func(t *testing.T, st *store.Store, evs []events.Event) {
		if err := st.WithTx(t.Context(), func(tx *store.Tx) error { return applyOne(t.Context(), tx, evs...) }); err != nil {
			t.Fatal(err)
		}
	}},
	{name: "one batch", apply: func(t *testing.T, st *store.Store, evs []events.Event) {
		if err := st.WithTx(t.Context(), func(tx *store.Tx) error { return applyBatch(t.Context(), tx, evs...) }); err != nil {
			t.Fatal(err)
		}
	}},
}

// TestEarliestOutcomeWins: of two final outcomes of one row (processed or
// failed for a document, sent or failed for an email), a success beats a
// failure and, of two of one kind, the one with the earliest event time
// wins, whatever the order they arrive in and whether
// they are applied one at a time, in one transaction, or in one batch of
// the projector (which applies processed before failed, sent before
// failed); the row holds the winner's facts alone.
func TestEarliestOutcomeWins(t *testing.T) {
	t.Parallel()
	early, late := at.Add(time.Second), at.Add(2*time.Second)
	proc := func(when time.Time, summary string) func(string) events.Event {
		return func(id string) events.Event {
			e := processed(id)
			e.ProcessedAt, e.Summary = when, summary
			return e
		}
	}
	fail := func(when time.Time, reason string) func(string) events.Event {
		return func(id string) events.Event {
			e := docFailed(id)
			e.FailedAt, e.Reason = when, reason
			return e
		}
	}
	snt := func(when time.Time, mid string) func(string) events.Event {
		return func(id string) events.Event {
			e := sent(id)
			e.SentAt, e.MessageID = when, mid
			return e
		}
	}
	mfail := func(when time.Time, reason string) func(string) events.Event {
		return func(id string) events.Event {
			e := mailFailed(id)
			e.FailedAt, e.Reason = when, reason
			return e
		}
	}
	docProcessed := func(when time.Time, summary string) store.Document {
		d := mergeDoc(rowUploaded, rowProcessed)
		d.ProcessedAt, d.Summary = tm(when), str(summary)
		return d
	}
	docFailedRow := func(when time.Time, reason string) store.Document {
		d := mergeDoc(rowUploaded, rowDocFailed)
		d.ProcessedAt, d.Error = tm(when), str(reason)
		return d
	}
	mailSent := func(when time.Time, mid string) store.Email {
		e := mergeEmail(rowRequested, rowSent)
		e.SentAt, e.MessageID = tm(when), str(mid)
		return e
	}
	mailFailedRow := func(when time.Time, reason string) store.Email {
		e := mergeEmail(rowRequested, rowMailFailed)
		e.FailedAt, e.Error = tm(when), str(reason)
		return e
	}

	tests := []struct {
		name   string
		isDoc  bool
		events []func(id string) events.Event // the row's first event and two outcomes; applied in every order
		doc    store.Document
		mail   store.Email
	}{
		{name: "document processed before it failed", isDoc: true,
			events: []func(string) events.Event{upload, proc(early, "s"), fail(late, "r")}, doc: docProcessed(early, "s")},
		{name: "document failed before it was processed", isDoc: true,
			events: []func(string) events.Event{upload, proc(late, "s"), fail(early, "r")}, doc: docProcessed(late, "s")},
		{name: "document processed twice", isDoc: true,
			events: []func(string) events.Event{upload, proc(late, "second"), proc(early, "first")}, doc: docProcessed(early, "first")},
		{name: "document failed twice", isDoc: true,
			events: []func(string) events.Event{upload, fail(late, "second"), fail(early, "first")}, doc: docFailedRow(early, "first")},
		{name: "email sent before it failed",
			events: []func(string) events.Event{request, snt(early, "<m>"), mfail(late, "r")}, mail: mailSent(early, "<m>")},
		{name: "email failed before it was sent",
			events: []func(string) events.Event{request, snt(late, "<m>"), mfail(early, "r")}, mail: mailSent(late, "<m>")},
		{name: "email sent twice",
			events: []func(string) events.Event{request, snt(late, "<second>"), snt(early, "<first>")}, mail: mailSent(early, "<first>")},
		{name: "email failed twice",
			events: []func(string) events.Event{request, mfail(late, "second"), mfail(early, "first")}, mail: mailFailedRow(early, "first")},
	}
	st, _ := newStore(t)
	for _, tt := range tests {
		for _, mode := range applyModes {
			for _, order := range permutations([]int{0, 1, 2}) {
				name := fmt.Sprintf("%s/%s/%v", tt.name, mode.name, order)
				t.Run(name, func(t *testing.T) {
					t.Parallel()
					id := events.NewID()
					var evs []events.Event
					for _, i := range order {
						evs = append(evs, tt.events[i](id))
					}
					mode.apply(t, st, evs)
					if tt.isDoc {
						if got := comparableDoc(document(t, st, id)); !reflect.DeepEqual(got, tt.doc) {
							t.Errorf("row =\n%+v\nwant\n%+v", got, tt.doc)
						}
						return
					}
					if got := comparableEmail(email(t, st, id)); !reflect.DeepEqual(got, tt.mail) {
						t.Errorf("row =\n%+v\nwant\n%+v", got, tt.mail)
					}
				})
			}
		}
	}
}

func upload(id string) events.Event  { return uploaded(id) }
func request(id string) events.Event { return requested(id) }
