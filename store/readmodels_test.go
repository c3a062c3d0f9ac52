package store_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/internal/testenv"
	"github.com/conveyor/conveyor/store"
)

// at is a fixed time with whole microseconds, which PostgreSQL keeps
// exactly.
var at = time.Date(2026, 3, 4, 5, 6, 7, 123456000, time.UTC)

const (
	sha  = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
	blob = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
)

func uploaded(id string) *events.DocumentUploaded {
	return &events.DocumentUploaded{DocID: id, Filename: "report.txt", Size: 1234, SHA256: sha, BlobKey: blob,
		DeclaredContentType: "text/plain", Notify: "ops@example.com", UploadedAt: at}
}

func processed(id string) *events.DocumentProcessed {
	return &events.DocumentProcessed{DocID: id, ContentType: "text/plain; charset=utf-8", Words: 42, Lines: 7,
		Summary: "a summary", ProcessedAt: at.Add(time.Second)}
}

func docFailed(id string) *events.DocumentProcessingFailed {
	return &events.DocumentProcessingFailed{DocID: id, ContentType: "application/zip", Reason: "unsupported type",
		FailedAt: at.Add(2 * time.Second)}
}

func requested(id string) *events.EmailRequested {
	return &events.EmailRequested{EmailID: id, To: "a@example.com", Subject: "Your document", Body: "done",
		DocID: "0190a0c0-0000-7000-8000-000000000001", RequestedAt: at}
}

func sent(id string) *events.EmailSent {
	return &events.EmailSent{EmailID: id, To: "a@example.com", MessageID: "<m1@example.com>", Attempts: 2,
		SentAt: at.Add(time.Second)}
}

func mailFailed(id string) *events.EmailFailed {
	return &events.EmailFailed{EmailID: id, Reason: "550 no such user", Attempts: 5, FailedAt: at.Add(2 * time.Second)}
}

// applyOne calls the Apply function of each event's type, one call per
// event, in order, in one transaction.
func applyOne(ctx context.Context, tx *store.Tx, evs ...events.Event) error {
	for _, ev := range evs {
		var err error
		switch e := ev.(type) {
		case *events.DocumentUploaded:
			err = tx.ApplyDocumentsUploaded(ctx, []*events.DocumentUploaded{e}, nil)
		case *events.DocumentProcessed:
			err = tx.ApplyDocumentsProcessed(ctx, []*events.DocumentProcessed{e})
		case *events.DocumentProcessingFailed:
			err = tx.ApplyDocumentsFailed(ctx, []*events.DocumentProcessingFailed{e})
		case *events.EmailRequested:
			err = tx.ApplyEmailsRequested(ctx, []*events.EmailRequested{e})
		case *events.EmailScheduled:
			err = tx.ApplyEmailsScheduled(ctx, []*events.EmailScheduled{e})
		case *events.EmailSent:
			err = tx.ApplyEmailsSent(ctx, []*events.EmailSent{e})
		case *events.EmailFailed:
			err = tx.ApplyEmailsFailed(ctx, []*events.EmailFailed{e})
		default:
			err = fmt.Errorf("no apply function for %T", ev)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// applyEach applies every event in a transaction of its own, in order, as
// events arriving one at a time are.
func applyEach(t *testing.T, st *store.Store, evs ...events.Event) {
	t.Helper()
	for _, ev := range evs {
		if err := st.WithTx(t.Context(), func(tx *store.Tx) error { return applyOne(t.Context(), tx, ev) }); err != nil {
			t.Fatalf("apply %s: %v", ev.EventType(), err)
		}
	}
}

func document(t *testing.T, st *store.Store, id string) store.Document {
	t.Helper()
	d, err := st.Document(t.Context(), id)
	if err != nil {
		t.Fatalf("Document(%s): %v", id, err)
	}
	return d
}

func email(t *testing.T, st *store.Store, id string) store.Email {
	t.Helper()
	e, err := st.Email(t.Context(), id)
	if err != nil {
		t.Fatalf("Email(%s): %v", id, err)
	}
	return e
}

// Helpers for expected rows.
func str(s string) sql.NullString { return sql.NullString{String: s, Valid: true} }
func num(n int64) sql.NullInt64   { return sql.NullInt64{Int64: n, Valid: true} }
func tm(t time.Time) sql.NullTime { return sql.NullTime{Time: t, Valid: true} }
func utc(t sql.NullTime) sql.NullTime {
	if t.Valid {
		t.Time = t.Time.UTC()
	}
	return t
}

// comparableDoc drops what legitimately differs between two rows with the
// same facts (the key and the write time) and normalises time zones.
func comparableDoc(d store.Document) store.Document {
	d.DocID, d.UpdatedAt = "", time.Time{}
	d.UploadedAt, d.ProcessedAt = utc(d.UploadedAt), utc(d.ProcessedAt)
	return d
}

func comparableEmail(e store.Email) store.Email {
	e.EmailID, e.UpdatedAt = "", time.Time{}
	e.RequestedAt, e.SendAt, e.SentAt, e.FailedAt = utc(e.RequestedAt), utc(e.SendAt), utc(e.SentAt), utc(e.FailedAt)
	return e
}

// The rows each event alone leaves behind, and their combinations.
var (
	rowUploaded = store.Document{Status: store.DocumentProcessing, Filename: str("report.txt"), Size: num(1234),
		DeclaredContentType: str("text/plain"), SHA256: str(sha), BlobKey: str(blob), Notify: str("ops@example.com"),
		UploadedAt: tm(at)}
	rowProcessed = store.Document{Status: store.DocumentProcessed, ContentType: str("text/plain; charset=utf-8"),
		Words: num(42), Lines: num(7), Summary: str("a summary"), ProcessedAt: tm(at.Add(time.Second))}
	rowDocFailed = store.Document{Status: store.DocumentFailed, ContentType: str("application/zip"),
		Error: str("unsupported type"), ProcessedAt: tm(at.Add(2 * time.Second))}

	rowRequested = store.Email{Status: store.EmailQueued, Recipient: str("a@example.com"), Subject: str("Your document"),
		DocID: str("0190a0c0-0000-7000-8000-000000000001"), RequestedAt: tm(at)}
	rowSent = store.Email{Status: store.EmailSent, Recipient: str("a@example.com"), Attempts: 2,
		MessageID: str("<m1@example.com>"), SentAt: tm(at.Add(time.Second))}
	rowMailFailed = store.Email{Status: store.EmailFailed, Attempts: 5, Error: str("550 no such user"),
		FailedAt: tm(at.Add(2 * time.Second))}
)

func mergeDoc(upload, outcome store.Document) store.Document {
	outcome.Filename, outcome.Size, outcome.DeclaredContentType = upload.Filename, upload.Size, upload.DeclaredContentType
	outcome.SHA256, outcome.BlobKey, outcome.Notify, outcome.UploadedAt = upload.SHA256, upload.BlobKey, upload.Notify, upload.UploadedAt
	return outcome
}

func mergeEmail(req, outcome store.Email) store.Email {
	outcome.Recipient, outcome.Subject, outcome.DocID, outcome.RequestedAt = req.Recipient, req.Subject, req.DocID, req.RequestedAt
	return outcome
}

// TestApplyDocuments applies sequences of document events, each in its own
// transaction, and checks the row they leave. Statuses only move forward, so
// the arrival order of an upload and its outcome does not matter, and of
// two outcomes the earliest (by event time) wins, in either order (see
// TestEarliestOutcomeWins).
func TestApplyDocuments(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		seq  func(id string) []events.Event
		want store.Document
	}{
		{name: "uploaded", want: rowUploaded,
			seq: func(id string) []events.Event { return []events.Event{uploaded(id)} }},
		{name: "processed alone", want: rowProcessed,
			seq: func(id string) []events.Event { return []events.Event{processed(id)} }},
		{name: "failed alone", want: rowDocFailed,
			seq: func(id string) []events.Event { return []events.Event{docFailed(id)} }},
		{name: "uploaded then processed", want: mergeDoc(rowUploaded, rowProcessed),
			seq: func(id string) []events.Event { return []events.Event{uploaded(id), processed(id)} }},
		{name: "processed before uploaded", want: mergeDoc(rowUploaded, rowProcessed),
			seq: func(id string) []events.Event { return []events.Event{processed(id), uploaded(id)} }},
		{name: "uploaded then failed", want: mergeDoc(rowUploaded, rowDocFailed),
			seq: func(id string) []events.Event { return []events.Event{uploaded(id), docFailed(id)} }},
		{name: "failed before uploaded", want: mergeDoc(rowUploaded, rowDocFailed),
			seq: func(id string) []events.Event { return []events.Event{docFailed(id), uploaded(id)} }},
		{name: "a failure after the success changes nothing", want: mergeDoc(rowUploaded, rowProcessed),
			seq: func(id string) []events.Event { return []events.Event{uploaded(id), processed(id), docFailed(id)} }},
		{name: "a success before the failure replaces it", want: mergeDoc(rowUploaded, rowProcessed),
			seq: func(id string) []events.Event { return []events.Event{uploaded(id), docFailed(id), processed(id)} }},
		{name: "a success before the failure replaces it without an upload", want: rowProcessed,
			seq: func(id string) []events.Event { return []events.Event{docFailed(id), processed(id)} }},
		{name: "an upload repeated after the outcome keeps it", want: mergeDoc(rowUploaded, rowProcessed),
			seq: func(id string) []events.Event { return []events.Event{uploaded(id), processed(id), uploaded(id)} }},
		{name: "an outcome repeated changes nothing", want: mergeDoc(rowUploaded, rowProcessed),
			seq: func(id string) []events.Event {
				again := processed(id)
				again.Words, again.Summary = 1, "different"
				return []events.Event{uploaded(id), processed(id), again}
			}},
		{name: "empty notify and declared type are NULL",
			want: func() store.Document {
				d := rowUploaded
				d.Notify, d.DeclaredContentType = sql.NullString{}, sql.NullString{}
				return d
			}(),
			seq: func(id string) []events.Event {
				e := uploaded(id)
				e.Notify, e.DeclaredContentType = "", ""
				return []events.Event{e}
			}},
		{name: "a later upload without notify clears it",
			want: func() store.Document {
				d := rowUploaded
				d.Notify = sql.NullString{}
				return d
			}(),
			seq: func(id string) []events.Event {
				e := uploaded(id)
				e.Notify = ""
				return []events.Event{uploaded(id), e}
			}},
		{name: "empty content type of a failure is NULL",
			want: func() store.Document {
				d := rowDocFailed
				d.ContentType = sql.NullString{}
				return d
			}(),
			seq: func(id string) []events.Event {
				e := docFailed(id)
				e.ContentType = ""
				return []events.Event{e}
			}},
		{name: "text survives the array encoding",
			want: func() store.Document {
				d := mergeDoc(rowUploaded, rowProcessed)
				d.Filename, d.Summary = str(awkward), str(awkward+" summary")
				return d
			}(),
			seq: func(id string) []events.Event {
				u, p := uploaded(id), processed(id)
				u.Filename, p.Summary = awkward, awkward+" summary"
				return []events.Event{u, p}
			}},
	}
	st, _ := newStore(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			id := events.NewID()
			applyEach(t, st, tt.seq(id)...)
			got := document(t, st, id)
			if got.DocID != id {
				t.Errorf("DocID = %q, want %q", got.DocID, id)
			}
			if got.UpdatedAt.IsZero() {
				t.Error("UpdatedAt not set")
			}
			if c := comparableDoc(got); !reflect.DeepEqual(c, tt.want) {
				t.Errorf("row =\n%+v\nwant\n%+v", c, tt.want)
			}
		})
	}
}

// awkward is text that an array literal must quote and escape.
const awkward = `NULL "quoted" back\slash, {braces} 'single' ünïcødé 😀 tab	end`

func TestApplyEmails(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		seq  func(id string) []events.Event
		want store.Email
	}{
		{name: "requested", want: rowRequested,
			seq: func(id string) []events.Event { return []events.Event{requested(id)} }},
		{name: "sent alone", want: rowSent,
			seq: func(id string) []events.Event { return []events.Event{sent(id)} }},
		{name: "failed alone", want: rowMailFailed,
			seq: func(id string) []events.Event { return []events.Event{mailFailed(id)} }},
		{name: "requested then sent", want: mergeEmail(rowRequested, rowSent),
			seq: func(id string) []events.Event { return []events.Event{requested(id), sent(id)} }},
		{name: "sent before requested", want: mergeEmail(rowRequested, rowSent),
			seq: func(id string) []events.Event { return []events.Event{sent(id), requested(id)} }},
		{name: "requested then failed", want: mergeEmail(rowRequested, rowMailFailed),
			seq: func(id string) []events.Event { return []events.Event{requested(id), mailFailed(id)} }},
		{name: "failed before requested", want: mergeEmail(rowRequested, rowMailFailed),
			seq: func(id string) []events.Event { return []events.Event{mailFailed(id), requested(id)} }},
		{name: "a later request does not move sent back", want: mergeEmail(rowRequested, rowSent),
			seq: func(id string) []events.Event { return []events.Event{requested(id), sent(id), requested(id)} }},
		{name: "a later request does not move failed back", want: mergeEmail(rowRequested, rowMailFailed),
			seq: func(id string) []events.Event { return []events.Event{requested(id), mailFailed(id), requested(id)} }},
		{name: "a failure after the send changes nothing", want: mergeEmail(rowRequested, rowSent),
			seq: func(id string) []events.Event { return []events.Event{requested(id), sent(id), mailFailed(id)} }},
		{name: "a send before the failure replaces it", want: mergeEmail(rowRequested, rowSent),
			seq: func(id string) []events.Event { return []events.Event{requested(id), mailFailed(id), sent(id)} }},
		{name: "a repeated sent does not change attempts", want: mergeEmail(rowRequested, rowSent),
			seq: func(id string) []events.Event {
				again := sent(id)
				again.Attempts, again.MessageID = 9, "<other@example.com>"
				return []events.Event{requested(id), sent(id), again}
			}},
		{name: "a second request under a used email id rewrites nothing",
			want: mergeEmail(rowRequested, rowSent),
			seq: func(id string) []events.Event {
				other := requested(id)
				other.To, other.Subject, other.DocID = "mallory@example.com", "Replaced", events.NewID()
				other.RequestedAt = other.RequestedAt.Add(time.Hour)
				return []events.Event{requested(id), sent(id), other}
			}},
		{name: "sent keeps the requested recipient",
			want: mergeEmail(rowRequested, rowSent),
			seq: func(id string) []events.Event {
				s := sent(id)
				s.To = "other@example.com"
				return []events.Event{requested(id), s}
			}},
		{name: "empty doc id is NULL",
			want: func() store.Email {
				e := rowRequested
				e.DocID = sql.NullString{}
				return e
			}(),
			seq: func(id string) []events.Event {
				e := requested(id)
				e.DocID = ""
				return []events.Event{e}
			}},
		{name: "empty recipient and message id of a send are NULL",
			want: func() store.Email {
				e := rowSent
				e.Recipient, e.MessageID = sql.NullString{}, sql.NullString{}
				return e
			}(),
			seq: func(id string) []events.Event {
				e := sent(id)
				e.To, e.MessageID = "", ""
				return []events.Event{e}
			}},
		{name: "text survives the array encoding",
			want: func() store.Email {
				e := rowRequested
				e.Subject = str(awkward)
				return e
			}(),
			seq: func(id string) []events.Event {
				e := requested(id)
				e.Subject = awkward
				return []events.Event{e}
			}},
	}
	st, _ := newStore(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			id := events.NewID()
			applyEach(t, st, tt.seq(id)...)
			got := email(t, st, id)
			if got.EmailID != id {
				t.Errorf("EmailID = %q, want %q", got.EmailID, id)
			}
			if c := comparableEmail(got); !reflect.DeepEqual(c, tt.want) {
				t.Errorf("row =\n%+v\nwant\n%+v", c, tt.want)
			}
		})
	}
}

// TestApplyBatches calls each Apply function once with many rows, with
// duplicate keys among them: one multi-row upsert may not touch a row twice
// ("ON CONFLICT DO UPDATE command cannot affect row a second time"), so the
// function must reduce them first. Each case runs against both new and
// existing rows, since only an existing row takes the ON CONFLICT path.
func TestApplyBatches(t *testing.T) {
	t.Parallel()
	const n = 300
	type batch struct {
		apply func(ctx context.Context, tx *store.Tx, ids []string) error
		check func(t *testing.T, st *store.Store, id string)
	}
	docStatus := func(want string) func(*testing.T, *store.Store, string) {
		return func(t *testing.T, st *store.Store, id string) {
			if got := document(t, st, id).Status; got != want {
				t.Errorf("document %s status %q, want %q", id, got, want)
			}
		}
	}
	mailStatus := func(want string) func(*testing.T, *store.Store, string) {
		return func(t *testing.T, st *store.Store, id string) {
			if got := email(t, st, id).Status; got != want {
				t.Errorf("email %s status %q, want %q", id, got, want)
			}
		}
	}
	tests := []struct {
		name  string
		setup func(id string) []events.Event // applied before the batch
		batch batch
	}{
		{name: "documents uploaded", batch: batch{
			apply: func(ctx context.Context, tx *store.Tx, ids []string) error {
				return tx.ApplyDocumentsUploaded(ctx, dup(ids, uploaded), nil)
			}, check: docStatus(store.DocumentProcessing)}},
		{name: "documents processed", batch: batch{
			apply: func(ctx context.Context, tx *store.Tx, ids []string) error {
				return tx.ApplyDocumentsProcessed(ctx, dup(ids, processed))
			}, check: docStatus(store.DocumentProcessed)}},
		{name: "documents failed", batch: batch{
			apply: func(ctx context.Context, tx *store.Tx, ids []string) error {
				return tx.ApplyDocumentsFailed(ctx, dup(ids, docFailed))
			}, check: docStatus(store.DocumentFailed)}},
		{name: "emails requested", batch: batch{
			apply: func(ctx context.Context, tx *store.Tx, ids []string) error {
				return tx.ApplyEmailsRequested(ctx, dup(ids, requested))
			}, check: mailStatus(store.EmailQueued)}},
		{name: "emails sent", batch: batch{
			apply: func(ctx context.Context, tx *store.Tx, ids []string) error {
				return tx.ApplyEmailsSent(ctx, dup(ids, sent))
			}, check: mailStatus(store.EmailSent)}},
		{name: "emails failed", batch: batch{
			apply: func(ctx context.Context, tx *store.Tx, ids []string) error {
				return tx.ApplyEmailsFailed(ctx, dup(ids, mailFailed))
			}, check: mailStatus(store.EmailFailed)}},
	}
	st, _ := newStore(t)
	for _, tt := range tests {
		for _, existing := range []bool{false, true} {
			name := tt.name + "/new rows"
			if existing {
				name = tt.name + "/existing rows"
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				ctx := t.Context()
				ids := make([]string, n)
				for i := range ids {
					ids[i] = events.NewID()
				}
				if existing {
					// Rows in their first status, so the batch updates them.
					var pre []events.Event
					for _, id := range ids {
						if strings.HasPrefix(tt.name, "documents") {
							pre = append(pre, uploaded(id))
						} else {
							pre = append(pre, requested(id))
						}
					}
					if err := st.WithTx(ctx, func(tx *store.Tx) error { return applyOne(ctx, tx, pre...) }); err != nil {
						t.Fatal(err)
					}
				}
				// Twice in one transaction: the second call finds every row.
				if err := st.WithTx(ctx, func(tx *store.Tx) error {
					if err := tt.batch.apply(ctx, tx, ids); err != nil {
						return err
					}
					return tt.batch.apply(ctx, tx, ids)
				}); err != nil {
					t.Fatalf("apply %d rows with duplicate keys: %v", n, err)
				}
				for _, id := range ids {
					tt.batch.check(t, st, id)
				}
			})
		}
	}
}

// dup builds one event per id, with every id three times, interleaved
// (a, b, c, ..., a, b, c, ..., a, b, c, ...), as a redelivery and a
// republish in one batch would give.
func dup[E any](ids []string, mk func(string) E) []E {
	out := make([]E, 0, 3*len(ids))
	for range 3 {
		for _, id := range ids {
			out = append(out, mk(id))
		}
	}
	return out
}

// TestApplyUploadAndOutcomeInOneTransaction applies an upload and its
// outcome in one transaction, in both orders, as one batch of the
// projector may.
// Several events of one row in one call apply one after another, in the
// order given, as they would one at a time: the first request's subject
// stays (a request fills in an email, never rewrites it), of two outcomes
// with the same time the first stays, and a refused repeat fails the call
// instead of being dropped unchecked.
func TestApplyRepeatsOfARow(t *testing.T) {
	t.Parallel()
	st, _ := newStore(t)
	ctx := t.Context()
	id := events.NewID()
	others := make([]*events.EmailRequested, 0, 40)
	for range 40 { // enough rows that the order must be kept, not found
		others = append(others, requested(events.NewID()))
	}
	first, second, third := requested(id), requested(id), requested(strings.ToUpper(id))
	first.Subject, second.Subject, third.Subject = "first", "second", "third"
	batch := append(append([]*events.EmailRequested{first}, others[:20]...), second)
	batch = append(append(batch, others[20:]...), third)
	if err := st.WithTx(ctx, func(tx *store.Tx) error { return tx.ApplyEmailsRequested(ctx, batch) }); err != nil {
		t.Fatal(err)
	}
	if got := email(t, st, id); got.Subject.String != "first" {
		t.Fatalf("subject %q, want the first request's", got.Subject.String)
	}

	a, b := sent(id), sent(id)
	a.Attempts, b.Attempts = 2, 7
	if err := st.WithTx(ctx, func(tx *store.Tx) error { return tx.ApplyEmailsSent(ctx, []*events.EmailSent{a, b}) }); err != nil {
		t.Fatal(err)
	}
	if got := email(t, st, id); got.Status != store.EmailSent || got.Attempts != 2 {
		t.Fatalf("status %s after %d attempts, want sent after the first send's 2", got.Status, got.Attempts)
	}

	poison := requested(id)
	poison.DocID = "not-a-uuid"
	err := st.WithTx(ctx, func(tx *store.Tx) error {
		return tx.ApplyEmailsRequested(ctx, []*events.EmailRequested{requested(id), poison})
	})
	if !store.IsDataError(err) {
		t.Fatalf("a refused repeat: %v, want PostgreSQL's data error", err)
	}
}

func TestApplyUploadAndOutcomeInOneTransaction(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		seq  func(id string) []events.Event
		want store.Document
	}{
		{name: "uploaded, processed", want: mergeDoc(rowUploaded, rowProcessed),
			seq: func(id string) []events.Event { return []events.Event{uploaded(id), processed(id)} }},
		{name: "processed, uploaded", want: mergeDoc(rowUploaded, rowProcessed),
			seq: func(id string) []events.Event { return []events.Event{processed(id), uploaded(id)} }},
		{name: "failed, uploaded", want: mergeDoc(rowUploaded, rowDocFailed),
			seq: func(id string) []events.Event { return []events.Event{docFailed(id), uploaded(id)} }},
	}
	st, _ := newStore(t)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			id := events.NewID()
			if err := st.WithTx(t.Context(), func(tx *store.Tx) error { return applyOne(t.Context(), tx, tt.seq(id)...) }); err != nil {
				t.Fatal(err)
			}
			if c := comparableDoc(document(t, st, id)); !reflect.DeepEqual(c, tt.want) {
				t.Errorf("row =\n%+v\nwant\n%+v", c, tt.want)
			}
		})
	}
}

// TestCreated checks that a transaction reports the rows it inserted
// through the statements of first events (document.uploaded,
// email.requested, email.scheduled), and never a row that existed before
// it: a row it inserted is reported even after a later statement of it
// updated the row, and an id sent in capitals is reported under its
// lowercase key. A call some of whose rows existed reports none of them,
// and the other statements report nothing, not even a row they insert.
func TestCreated(t *testing.T) {
	t.Parallel()
	st, _ := newStore(t)
	scheduled := func(id string) *events.EmailScheduled {
		return &events.EmailScheduled{EmailID: id, To: "a@example.com", Subject: "later", SendAt: at.Add(time.Hour), ScheduledAt: at}
	}
	type step struct {
		ev    events.Event
		key   string
		first bool // a first event's statement reports the rows it inserts
	}
	docs := []func(string) events.Event{
		func(id string) events.Event { return uploaded(id) },
		func(id string) events.Event { return processed(id) },
		func(id string) events.Event { return docFailed(id) },
	}
	emails := []func(string) events.Event{
		func(id string) events.Event { return requested(id) },
		func(id string) events.Event { return scheduled(id) },
		func(id string) events.Event { return sent(id) },
		func(id string) events.Event { return mailFailed(id) },
	}
	var steps []step
	for i, mk := range docs {
		id := events.NewID()
		steps = append(steps, step{mk(id), store.DocumentKey(id), i == 0})
	}
	for i, mk := range emails {
		id := events.NewID()
		steps = append(steps, step{mk(id), store.EmailKey(id), i < 2})
	}
	for _, s := range steps {
		t.Run(s.ev.EventType(), func(t *testing.T) {
			created := func(evs ...events.Event) bool {
				t.Helper()
				var got bool
				err := st.WithTx(t.Context(), func(tx *store.Tx) error {
					if err := applyOne(t.Context(), tx, evs...); err != nil {
						return err
					}
					got = tx.Created(s.key)
					return nil
				})
				if err != nil {
					t.Fatal(err)
				}
				return got
			}
			if got := created(s.ev); got != s.first {
				t.Errorf("the first %s of a row: Created(%s) = %v, want %v", s.ev.EventType(), s.key, got, s.first)
			}
			if created(s.ev) {
				t.Errorf("%s again, on the row it inserted before: Created(%s) = true, want false", s.ev.EventType(), s.key)
			}
		})
	}

	t.Run("a call with a row an earlier statement wrote", func(t *testing.T) {
		// email.scheduled creates one row; email.requested then offers that
		// row and a new one: the insert adds the new one only, and the row
		// the earlier statement wrote must still get the request's update
		// (queued), keeping what it had (the subject).
		early, fresh := events.NewID(), events.NewID()
		err := st.WithTx(t.Context(), func(tx *store.Tx) error {
			if err := applyOne(t.Context(), tx, scheduled(early)); err != nil {
				return err
			}
			if err := tx.ApplyEmailsRequested(t.Context(), []*events.EmailRequested{requested(early), requested(fresh)}); err != nil {
				return err
			}
			if !tx.Created(store.EmailKey(early)) {
				t.Errorf("Created(early) = false; the scheduled email's statement created it")
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		for id, subject := range map[string]string{early: "later", fresh: "Your document"} {
			if e := email(t, st, id); e.Status != store.EmailQueued || e.Subject != str(subject) {
				t.Errorf("email %s: %+v, want queued with subject %q", id, e, subject)
			}
		}
	})

	t.Run("inserted then updated in one transaction", func(t *testing.T) {
		id := events.NewID()
		err := st.WithTx(t.Context(), func(tx *store.Tx) error {
			if err := applyOne(t.Context(), tx, requested(id), sent(id)); err != nil {
				return err
			}
			if !tx.Created(store.EmailKey(id)) {
				t.Errorf("email.requested then email.sent of a new row: Created = false, want true")
			}
			if tx.Created(store.EmailKey(events.NewID())) {
				t.Errorf("Created of a row the transaction never touched = true")
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})

	t.Run("id in capitals", func(t *testing.T) {
		id := events.NewID()
		err := st.WithTx(t.Context(), func(tx *store.Tx) error {
			// One row named both ways in one statement, which may touch a
			// row only once.
			if err := tx.ApplyEmailsRequested(t.Context(), []*events.EmailRequested{requested(strings.ToUpper(id)), requested(id)}); err != nil {
				return err
			}
			if !tx.Created(store.EmailKey(id)) {
				t.Errorf("Created(%s) = false after inserting the row by its id in capitals, want true", store.EmailKey(id))
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})

	t.Run("a call with new and old rows", func(t *testing.T) {
		old, fresh := events.NewID(), events.NewID()
		applyEach(t, st, sent(old))
		err := st.WithTx(t.Context(), func(tx *store.Tx) error {
			before, err := tx.UpdatedRows(t.Context(), "emails")
			if err != nil {
				return err
			}
			if err := tx.ApplyEmailsRequested(t.Context(), []*events.EmailRequested{requested(old), requested(fresh)}); err != nil {
				return err
			}
			// Which of the rows were new is not known: none is reported.
			if tx.Created(store.EmailKey(old)) || tx.Created(store.EmailKey(fresh)) {
				t.Errorf("Created(old) = %v, Created(new) = %v; want false, false", tx.Created(store.EmailKey(old)), tx.Created(store.EmailKey(fresh)))
			}
			// The row that existed is updated; the new one, just inserted,
			// is not written a second time.
			after, err := tx.UpdatedRows(t.Context(), "emails")
			if err != nil {
				return err
			}
			if updated := after - before; updated != 1 {
				t.Errorf("%d rows updated in the transaction, want 1 (the row that existed)", updated)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		// Both rows are applied all the same.
		if e := email(t, st, old); e.Status != store.EmailSent || e.Subject != str("Your document") {
			t.Errorf("the row that existed: %+v, want sent with the request's subject", e)
		}
		if e := email(t, st, fresh); e.Status != store.EmailQueued || e.Subject != str("Your document") {
			t.Errorf("the new row: %+v, want queued with the request's subject", e)
		}
	})
}

func TestInbox(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		before    []string // recorded in an earlier transaction
		offer     []string
		wantFresh []string
		wantRows  int
	}{
		{name: "new ids are fresh", offer: []string{"a", "b"}, wantFresh: []string{"a", "b"}, wantRows: 2},
		{name: "repeated ids are not", before: []string{"a"}, offer: []string{"a", "b"}, wantFresh: []string{"b"}, wantRows: 2},
		{name: "all repeated", before: []string{"a", "b"}, offer: []string{"b", "a"}, wantRows: 2},
		{name: "duplicates within one call count once", offer: []string{"a", "a", "b", "a"}, wantFresh: []string{"a", "b"}, wantRows: 2},
		{name: "repeated and duplicated ids in one call", before: []string{"a"}, offer: []string{"b", "a", "c", "b"}, wantFresh: []string{"b", "c"}, wantRows: 3},
		{name: "ids that are not UUIDs",
			offer:     []string{"01J8Z3K5", "msg-7", "0190a0c0-0000-7000-8000-000000000001", "with space", awkward},
			wantFresh: []string{"01J8Z3K5", "msg-7", "0190a0c0-0000-7000-8000-000000000001", "with space", awkward},
			wantRows:  5},
		{name: "nothing offered", offer: nil, wantRows: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			st, db := newStore(t)
			ctx := t.Context()
			offer := func(ids []string) map[string]bool {
				t.Helper()
				entries := make([]store.InboxEntry, len(ids))
				for i, id := range ids {
					entries[i] = store.InboxEntry{EventID: id, EventType: events.TypeEmailSent}
				}
				var fresh map[string]bool
				if err := st.WithTx(ctx, func(tx *store.Tx) (err error) {
					fresh, err = tx.Inbox(ctx, entries)
					return err
				}); err != nil {
					t.Fatalf("Inbox(%q): %v", ids, err)
				}
				return fresh
			}
			if tt.before != nil {
				offer(tt.before)
			}
			fresh := offer(tt.offer)
			want := map[string]bool{}
			for _, id := range tt.wantFresh {
				want[id] = true
			}
			if len(fresh) != len(want) {
				t.Errorf("fresh = %v, want %v", fresh, want)
			}
			for id := range want {
				if !fresh[id] {
					t.Errorf("fresh = %v, want %v", fresh, want)
				}
			}
			if n := count(t, db, "SELECT count(*) FROM processed_events"); n != tt.wantRows {
				t.Errorf("%d inbox rows, want %d", n, tt.wantRows)
			}
			if n := count(t, db, "SELECT count(*) FROM processed_events WHERE event_type <> $1", events.TypeEmailSent); n != 0 {
				t.Errorf("%d inbox rows with the wrong type", n)
			}
		})
	}
}

// TestInboxTwiceInOneTransaction: a second call in one transaction reports
// as new only what it recorded itself, not the events the first call
// recorded (their rows are this transaction's too).
func TestInboxTwiceInOneTransaction(t *testing.T) {
	t.Parallel()
	st, _ := newStore(t)
	ctx := t.Context()
	entries := func(ids ...string) []store.InboxEntry {
		out := make([]store.InboxEntry, len(ids))
		for i, id := range ids {
			out[i] = store.InboxEntry{EventID: id, EventType: events.TypeEmailSent}
		}
		return out
	}
	if err := st.WithTx(ctx, func(tx *store.Tx) error {
		_, err := tx.Inbox(ctx, entries("old"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	err := st.WithTx(ctx, func(tx *store.Tx) error {
		first, err := tx.Inbox(ctx, entries("x"))
		if err != nil {
			return err
		}
		second, err := tx.Inbox(ctx, entries("x", "y", "old"))
		if err != nil {
			return err
		}
		if !reflect.DeepEqual(first, map[string]bool{"x": true}) || !reflect.DeepEqual(second, map[string]bool{"y": true}) {
			t.Errorf("first call %v, second call %v; want {x}, then {y}", first, second)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestInboxConcurrentTransactions offers one id from two transactions at
// once: exactly one of them may apply the event.
func TestInboxConcurrentTransactions(t *testing.T) {
	t.Parallel()
	st, _ := newStore(t)
	ctx := t.Context()
	const callers = 8
	fresh := make(chan bool, callers)
	errs := make(chan error, callers)
	start := make(chan struct{})
	for range callers {
		go func() {
			<-start
			errs <- st.WithTx(ctx, func(tx *store.Tx) error {
				f, err := tx.Inbox(ctx, []store.InboxEntry{{EventID: "same", EventType: "t"}})
				fresh <- f["same"]
				return err
			})
		}()
	}
	close(start)
	n := 0
	for range callers {
		if err := <-errs; err != nil {
			t.Errorf("WithTx: %v", err)
		}
		if <-fresh {
			n++
		}
	}
	if n != 1 {
		t.Errorf("%d transactions saw the id as fresh, want 1", n)
	}
}

// TestLockAndInboxLocksBeforeWriting checks the order inside the one
// statement: a transaction waiting for a key's lock has not written its
// inbox rows yet, so another transaction can record the same event
// meanwhile (it would wait on the first one's row otherwise), and the
// waiting one then finds the event already applied.
func TestLockAndInboxLocksBeforeWriting(t *testing.T) {
	t.Parallel()
	st, db := newStore(t)
	ctx := t.Context()
	entry := []store.InboxEntry{{EventID: "ev-1", EventType: "t"}}

	holding, release, held := make(chan struct{}), make(chan struct{}), make(chan error, 1)
	go func() {
		held <- st.WithTx(ctx, func(tx *store.Tx) error {
			if _, err := tx.LockAndInbox(ctx, []string{"email:1"}, []store.InboxEntry{{EventID: "holder", EventType: "t"}}); err != nil {
				close(holding)
				return err
			}
			close(holding)
			<-release
			return nil
		})
	}()
	<-holding
	releaseOnce := sync.OnceFunc(func() { close(release) })
	t.Cleanup(releaseOnce)

	type result struct {
		fresh map[string]bool
		err   error
	}
	waiter := make(chan result, 1)
	go func() {
		var r result
		r.err = st.WithTx(ctx, func(tx *store.Tx) (err error) {
			r.fresh, err = tx.LockAndInbox(ctx, []string{"email:2", "email:1"}, entry)
			return err
		})
		waiter <- r
	}()
	// Wait until the statement is blocked on the held lock.
	deadline := time.Now().Add(30 * time.Second)
	for count(t, db, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
		AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("LockAndInbox never waited for the held lock")
		}
		time.Sleep(10 * time.Millisecond)
	}

	other := make(chan result, 1)
	go func() {
		var r result
		r.err = st.WithTx(ctx, func(tx *store.Tx) (err error) {
			r.fresh, err = tx.Inbox(ctx, entry)
			return err
		})
		other <- r
	}()
	select {
	case r := <-other:
		if r.err != nil || !r.fresh["ev-1"] {
			t.Fatalf("other transaction: fresh %v, err %v; want ev-1 fresh", r.fresh, r.err)
		}
	case r := <-waiter:
		t.Fatalf("LockAndInbox returned (%v, %v) while its lock was held", r.fresh, r.err)
	case <-time.After(30 * time.Second):
		t.Fatal("the other transaction waited: the blocked statement had written its inbox row before taking its locks")
	}

	releaseOnce()
	if err := <-held; err != nil {
		t.Fatalf("holding transaction: %v", err)
	}
	r := <-waiter
	if r.err != nil {
		t.Fatalf("LockAndInbox: %v", r.err)
	}
	if r.fresh["ev-1"] {
		t.Error("LockAndInbox saw ev-1 as fresh after another transaction recorded it")
	}
	if n := count(t, db, "SELECT count(*) FROM processed_events WHERE event_id = 'ev-1'"); n != 1 {
		t.Errorf("%d inbox rows of ev-1, want 1", n)
	}
}

func TestGettersNotFound(t *testing.T) {
	t.Parallel()
	st, _ := newStore(t)
	ctx := t.Context()
	known := events.NewID()
	applyEach(t, st, uploaded(known), requested(known))
	tests := []struct {
		name string
		get  func(id string) error
		id   string
	}{
		{name: "document unknown", id: events.NewID(), get: func(id string) error { _, err := st.Document(ctx, id); return err }},
		{name: "email unknown", id: events.NewID(), get: func(id string) error { _, err := st.Email(ctx, id); return err }},
		{name: "document id that is not a UUID", id: "not-a-uuid", get: func(id string) error { _, err := st.Document(ctx, id); return err }},
		{name: "email id that is not a UUID", id: "42", get: func(id string) error { _, err := st.Email(ctx, id); return err }},
		{name: "document empty id", id: "", get: func(id string) error { _, err := st.Document(ctx, id); return err }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := tt.get(tt.id)
			if !errors.Is(err, store.ErrNotFound) {
				t.Errorf("get(%q) = %v, want ErrNotFound", tt.id, err)
			}
		})
	}
	// The same getters find rows that exist, so the cases above do not pass
	// by failing every lookup.
	if _, err := st.Document(ctx, known); err != nil {
		t.Errorf("Document(known) = %v", err)
	}
	if _, err := st.Email(ctx, strings.ToUpper(known)); err != nil {
		t.Errorf("Email(known, upper case) = %v", err)
	}
}

// TestWritesArePreparedOncePerConnection: the read-model writes run as
// statements each connection prepares once, not once per transaction (a
// leak would exhaust the server's memory over a day of traffic), with a
// pool of one connection (preparing must not wait for the connection the
// transaction holds), and they write what they wrote unprepared.
func TestWritesArePreparedOncePerConnection(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	st, err := store.Open(store.Config{URL: testenv.DatabaseURL(t), MaxOpenConns: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	if _, err := st.Migrate(ctx); err != nil {
		t.Fatal(err)
	}
	before, err := st.PreparedStatements(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for i := range 20 {
		e := &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: fmt.Sprint("s", i), Body: "b", RequestedAt: at}
		ids = append(ids, e.EmailID)
		err := st.WithTx(ctx, func(tx *store.Tx) error {
			fresh, err := tx.LockAndInbox(ctx, []string{store.EmailKey(e.EmailID)}, []store.InboxEntry{{EventID: events.NewID(), EventType: e.EventType()}})
			if err != nil || len(fresh) != 1 {
				return fmt.Errorf("inbox: %v %v", fresh, err)
			}
			return tx.ApplyEmailsRequested(ctx, []*events.EmailRequested{e})
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	after, err := st.PreparedStatements(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if after-before != store.ReadModelWrites {
		t.Fatalf("%d statements prepared by 20 transactions; want the %d read-model writes, each once", after-before, store.ReadModelWrites)
	}
	for i, id := range ids {
		e, err := st.Email(ctx, id)
		if err != nil || e.Subject.String != fmt.Sprint("s", i) {
			t.Fatalf("email %d: %+v, %v", i, e, err)
		}
	}
}

// TestPruneInbox: rows of events applied before the cutoff go, oldest first,
// a batch per statement and at most limit per call; a row applied exactly at
// the cutoff and rows applied since stay.
func TestPruneInbox(t *testing.T) {
	t.Parallel()
	st, db := newStore(t)
	ctx := t.Context()
	cutoff := time.Now().Add(-7 * 24 * time.Hour).Truncate(time.Millisecond)
	insert := func(id string, at time.Time) {
		t.Helper()
		if _, err := db.ExecContext(ctx, "INSERT INTO processed_events (event_id, event_type, processed_at) VALUES ($1, 'email.sent', $2)", id, at); err != nil {
			t.Fatal(err)
		}
	}
	// old-0 is the newest of the old rows, old-9 the oldest.
	for i := range 10 {
		insert(fmt.Sprintf("old-%d", i), cutoff.Add(-time.Duration(i+1)*time.Minute))
	}
	insert("at-cutoff", cutoff)
	insert("recent", time.Now().Add(-time.Hour))

	// A limit of 4 in batches of 3: the 4 oldest go, in two statements.
	n, err := st.PruneInbox(ctx, cutoff, 3, 4)
	if err != nil || n != 4 {
		t.Fatalf("PruneInbox with limit 4 = %d, %v; want 4", n, err)
	}
	if left := count(t, db, "SELECT count(*) FROM processed_events WHERE event_id IN ('old-6', 'old-7', 'old-8', 'old-9')"); left != 0 {
		t.Errorf("%d of the 4 oldest rows left, want them deleted first", left)
	}
	n, err = st.PruneInbox(ctx, cutoff, 3, 100)
	if err != nil || n != 6 {
		t.Fatalf("PruneInbox = %d, %v; want the 6 old rows left", n, err)
	}
	var left []string
	rows, err := db.QueryContext(ctx, "SELECT event_id FROM processed_events ORDER BY event_id")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		left = append(left, id)
	}
	if want := []string{"at-cutoff", "recent"}; !slices.Equal(left, want) {
		t.Errorf("rows left %q, want %q", left, want)
	}
	if n, err := st.PruneInbox(ctx, cutoff, 3, 100); err != nil || n != 0 {
		t.Errorf("third PruneInbox = %d, %v; want nothing left to delete", n, err)
	}
	for _, bad := range [][2]int{{0, 10}, {10, 0}} {
		if _, err := st.PruneInbox(ctx, cutoff, bad[0], int64(bad[1])); err == nil {
			t.Errorf("PruneInbox with batch %d, limit %d: no error", bad[0], bad[1])
		}
	}
}

// TestUpdatesStayOnTheirPage checks that the read models leave room in
// their pages: every row is updated after its insert (an email when it is
// sent, a document when it is processed), and with room on its page the new
// version stays there as a heap-only tuple, which adds no index entries.
// With full pages (the default fillfactor) almost every new version moves
// to another page.
func TestUpdatesStayOnTheirPage(t *testing.T) {
	t.Parallel()
	st, db := newStore(t)
	ctx := t.Context()
	const n = 400
	ids := make([]string, n)
	for i := range ids {
		ids[i] = events.NewID()
	}
	tests := []struct {
		table, key string
		insert     func(tx *store.Tx) error
		update     func(tx *store.Tx) error
	}{
		{table: "emails", key: "email_id",
			insert: func(tx *store.Tx) error { return tx.ApplyEmailsRequested(ctx, dup(ids, requested)) },
			update: func(tx *store.Tx) error { return tx.ApplyEmailsSent(ctx, dup(ids, sent)) }},
		{table: "documents", key: "doc_id",
			insert: func(tx *store.Tx) error { return tx.ApplyDocumentsUploaded(ctx, dup(ids, uploaded), nil) },
			update: func(tx *store.Tx) error { return tx.ApplyDocumentsProcessed(ctx, dup(ids, processed)) }},
	}
	for _, tt := range tests {
		pages := func() map[string]string {
			rows, err := db.QueryContext(ctx, fmt.Sprintf("SELECT %s::text, (ctid::text::point)[0]::text FROM %s", tt.key, tt.table))
			if err != nil {
				t.Fatalf("pages of %s: %v", tt.table, err)
			}
			defer rows.Close()
			out := map[string]string{}
			for rows.Next() {
				var id, page string
				if err := rows.Scan(&id, &page); err != nil {
					t.Fatal(err)
				}
				out[id] = page
			}
			if err := rows.Err(); err != nil {
				t.Fatal(err)
			}
			return out
		}
		if err := st.WithTx(ctx, tt.insert); err != nil {
			t.Fatalf("insert %s: %v", tt.table, err)
		}
		before := pages()
		if err := st.WithTx(ctx, tt.update); err != nil {
			t.Fatalf("update %s: %v", tt.table, err)
		}
		after := pages()
		if len(before) != n || len(after) != n {
			t.Fatalf("%s: %d rows before the update and %d after, want %d", tt.table, len(before), len(after), n)
		}
		stayed := 0
		for id, page := range before {
			if after[id] == page {
				stayed++
			}
		}
		// All rows of a page are updated in one transaction here, so only
		// the room left by the fillfactor takes new versions; between
		// transactions PostgreSQL also reuses the room of dead versions.
		t.Logf("%s: %d of %d stayed", tt.table, stayed, n)
		if stayed < n/4 {
			t.Errorf("%s: %d of %d updated rows stayed on their page, want at least %d", tt.table, stayed, n, n/4)
		}
	}
}

// TestInboxOfNewEventsIsAPlainInsert: a large batch of events that are all
// new is recorded with a plain insert in a savepoint (its rows carry the
// savepoint's transaction id), the cheaper statement; a batch that meets an
// event recorded before falls back to the insert with ON CONFLICT, at the
// transaction's own level, and still reports only its new events; a small
// batch goes straight to ON CONFLICT.
func TestInboxOfNewEventsIsAPlainInsert(t *testing.T) {
	t.Parallel()
	st, _ := newStore(t)
	ctx := t.Context()
	batch := func(prefix string, n int) ([]store.InboxEntry, []string) {
		var es []store.InboxEntry
		var ids []string
		for i := range n {
			id := fmt.Sprintf("%s-%d", prefix, i)
			es, ids = append(es, store.InboxEntry{EventID: id, EventType: "t"}), append(ids, id)
		}
		return es, ids
	}
	n := store.PlainInboxMin
	err := st.WithTx(ctx, func(tx *store.Tx) error {
		first, firstIDs := batch("a", n)
		fresh, err := tx.Inbox(ctx, first)
		if err != nil {
			return err
		}
		if len(fresh) != n {
			t.Errorf("first call: %d fresh, want %d", len(fresh), n)
		}
		if got, err := tx.InsertedAtTopLevel(ctx, firstIDs); err != nil || got != 0 {
			t.Errorf("%d rows of new events inserted at the transaction's level (%v); want the plain insert in its savepoint", got, err)
		}
		// One event of the first call again, and n-1 new ones.
		second, secondIDs := batch("b", n-1)
		second = append(second, first[0])
		fresh, err = tx.Inbox(ctx, second)
		if err != nil {
			return err
		}
		if len(fresh) != n-1 || fresh[first[0].EventID] {
			t.Errorf("second call: %d fresh (the repeated one %v), want the %d new", len(fresh), fresh[first[0].EventID], n-1)
		}
		if got, err := tx.InsertedAtTopLevel(ctx, append(secondIDs, firstIDs[0])); err != nil || got != n-1 {
			t.Errorf("%d rows inserted at the transaction's level by the fallback (%v), want %d", got, err, n-1)
		}
		small, smallIDs := batch("c", n-1)
		if _, err := tx.Inbox(ctx, small); err != nil {
			return err
		}
		if got, err := tx.InsertedAtTopLevel(ctx, smallIDs); err != nil || got != n-1 {
			t.Errorf("a small batch: %d rows at the transaction's level (%v), want all %d (ON CONFLICT)", got, err, n-1)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
