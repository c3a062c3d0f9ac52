package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/lib/pq"

	"github.com/conveyor/conveyor/events"
)

// Document is the documents read model.
type Document struct {
	DocID               string         `db:"doc_id"`
	Status              string         `db:"status"`
	Filename            sql.NullString `db:"filename"`
	Size                sql.NullInt64  `db:"size"`
	DeclaredContentType sql.NullString `db:"declared_content_type"`
	ContentType         sql.NullString `db:"content_type"`
	SHA256              sql.NullString `db:"sha256"`
	BlobKey             sql.NullString `db:"blob_key"`
	Notify              sql.NullString `db:"notify"`
	Words               sql.NullInt64  `db:"words"`
	Lines               sql.NullInt64  `db:"lines"`
	Summary             sql.NullString `db:"summary"`
	Error               sql.NullString `db:"error"`
	UploadedAt          sql.NullTime   `db:"uploaded_at"`
	ProcessedAt         sql.NullTime   `db:"processed_at"`
	UpdatedAt           time.Time      `db:"updated_at"`
	UploadEventID       sql.NullString `db:"upload_event_id"`
}

// Email is the emails read model.
type Email struct {
	EmailID     string         `db:"email_id"`
	Status      string         `db:"status"`
	Recipient   sql.NullString `db:"recipient"`
	Subject     sql.NullString `db:"subject"`
	DocID       sql.NullString `db:"doc_id"`
	Attempts    int            `db:"attempts"`
	MessageID   sql.NullString `db:"message_id"`
	Error       sql.NullString `db:"error"`
	RequestedAt sql.NullTime   `db:"requested_at"`
	SendAt      sql.NullTime   `db:"send_at"`
	SentAt      sql.NullTime   `db:"sent_at"`
	FailedAt    sql.NullTime   `db:"failed_at"`
	UpdatedAt   time.Time      `db:"updated_at"`
}

// documentColumns and emailColumns are the columns of Document and Email,
// named rather than SELECT *: sqlx refuses a row with a column its struct
// lacks, so with SELECT * a migration adding a column would break the
// readers of binaries built before it while a deploy rolls out (and a
// binary rolled back after it). TestColumnLists keeps them in step with the
// structs' db tags.
const (
	documentColumns = `doc_id, status, filename, size, declared_content_type, content_type, sha256, blob_key, notify,
		words, lines, summary, error, uploaded_at, processed_at, updated_at, upload_event_id`
	emailColumns = `email_id, status, recipient, subject, doc_id, attempts, message_id, error,
		requested_at, send_at, sent_at, failed_at, updated_at`
)

// Document statuses. A status only moves forward: processing → processed
// or failed. A failure gives way to a success, and an outcome to an
// earlier one of its kind (see ApplyDocumentsProcessed).
const (
	DocumentProcessing = "processing"
	DocumentProcessed  = "processed"
	DocumentFailed     = "failed"
)

// Email statuses: scheduled → queued → sent or failed. A failure gives way
// to a send, and an outcome to an earlier one of its kind (see
// ApplyEmailsSent).
const (
	EmailScheduled = "scheduled"
	EmailQueued    = "queued"
	EmailSent      = "sent"
	EmailFailed    = "failed"
)

// DocumentKey is the cache key of a document's read model (id in
// lowercase). The api caches under it only rows it read, never a "not
// found"; the projector invalidates it when it changes a row, not when it
// creates one (see [Tx.Created]).
func DocumentKey(id string) string { return "document:" + id }

// EmailKey is the cache key of an email's read model, as [DocumentKey] is
// a document's.
func EmailKey(id string) string { return "email:" + id }

// Document returns one document, or ErrNotFound. An id that is not a UUID
// names no document: it is ErrNotFound too, not a query error.
func (s *Store) Document(ctx context.Context, id string) (Document, error) {
	var d Document
	if !events.IsUUID(id) {
		return d, fmt.Errorf("document %q: %w", id, ErrNotFound)
	}
	err := s.db.GetContext(ctx, &d, "SELECT "+documentColumns+" FROM documents WHERE doc_id = $1", id)
	if errors.Is(err, sql.ErrNoRows) {
		return d, fmt.Errorf("document %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return d, fmt.Errorf("get document %s: %w", id, err)
	}
	return d, nil
}

// Email returns one email, or ErrNotFound. An id that is not a UUID names
// no email: it is ErrNotFound too, not a query error.
func (s *Store) Email(ctx context.Context, id string) (Email, error) {
	var e Email
	if !events.IsUUID(id) {
		return e, fmt.Errorf("email %q: %w", id, ErrNotFound)
	}
	err := s.db.GetContext(ctx, &e, "SELECT "+emailColumns+" FROM emails WHERE email_id = $1", id)
	if errors.Is(err, sql.ErrNoRows) {
		return e, fmt.Errorf("email %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return e, fmt.Errorf("get email %s: %w", id, err)
	}
	return e, nil
}

// InboxEntry is one event offered to the inbox.
type InboxEntry struct {
	EventID   string
	EventType string
}

// Inbox records events as applied and reports which of them are new. Only
// new events may be applied in this transaction; the others were applied
// before (a redelivery or a duplicate publish).
func (tx *Tx) Inbox(ctx context.Context, entries []InboxEntry) (map[string]bool, error) {
	return tx.LockAndInbox(ctx, nil, entries)
}

// qLockAndInboxNew is qLockAndInbox for events that are all new: a plain
// insert, which fails on the first id already recorded.
var qLockAndInboxNew = readModelWrite(`
		INSERT INTO processed_events (event_id, event_type)
		SELECT * FROM unnest($1::text[], $2::text[])
		WHERE (SELECT count(*) FROM (
			SELECT pg_advisory_xact_lock(t.k)
			FROM unnest($3::bigint[]) WITH ORDINALITY AS t(k, i)
			ORDER BY t.i) AS locks) >= 0`)

var qLockAndInbox = readModelWrite(qLockAndInboxNew + `
		ON CONFLICT (event_id) DO NOTHING`)

// qInsertedHere picks, of the event ids $1, those whose inbox rows this
// transaction inserted (their xmin, the inserting transaction, is this
// one). It only reads; it is prepared with the writes it serves.
var qInsertedHere = readModelWrite(`
		SELECT event_id FROM processed_events
		WHERE event_id = ANY($1::text[]) AND xmin = pg_current_xact_id()::xid`)

// LockAndInbox takes transaction-scoped advisory locks on keys, in one
// global order, then does what Inbox does, in one statement (see
// inboxAllNew for the savepoint around it when the batch is large).
// Transactions that lock the keys of every row they will write
// before writing them cannot deadlock with each other, however their
// statements interleave. The locks are an uncorrelated subquery of the
// insert's filter, which PostgreSQL runs once before the insert writes its
// first row (unnest keeps the array's order, WITH ORDINALITY ... ORDER BY
// makes it explicit, and a volatile function in the select list runs after
// the sort), so every lock is held before any inbox row is written. The
// transaction's later statements take their snapshots after the locks.
// With no entries, no lock is taken.
//
// Usually every event is new, and the insert's count says so: the ids are
// then all fresh, and no row comes back (a statement returning the ids
// cost a microsecond or two per event, in PostgreSQL and here). When some
// were applied before, a second statement picks the rows this transaction
// inserted.
func (tx *Tx) LockAndInbox(ctx context.Context, keys []string, entries []InboxEntry) (map[string]bool, error) {
	ids := make([]string, len(entries))
	types := make([]string, len(entries))
	out := make(map[string]bool, len(entries))
	for i, e := range entries {
		ids[i], types[i] = e.EventID, e.EventType
		out[e.EventID] = true
	}
	args := []any{array(ids), array(types), array(lockIDs(keys))}
	var n int64
	var err error
	allNew := false
	if len(entries) >= plainInboxMin {
		n, allNew, err = tx.inboxAllNew(ctx, args)
	}
	if err == nil && !allNew {
		n, err = tx.execCount(ctx, qLockAndInbox, args...)
	}
	if err != nil {
		return nil, fmt.Errorf("lock %d keys and record %d events in inbox: %w", len(keys), len(entries), err)
	}
	switch {
	case n == int64(len(out)): // every distinct id is new
	case n == 0:
		clear(out)
	default:
		var mine []string
		if err := tx.selectAll(ctx, &mine, qInsertedHere, array(ids)); err != nil {
			return nil, fmt.Errorf("find the %d new of %d events in inbox: %w", n, len(entries), err)
		}
		// Rows an earlier call of this transaction inserted are this
		// transaction's too, but not new to this call.
		clear(out)
	mine:
		for _, id := range mine {
			for _, earlier := range tx.inboxed {
				if earlier[id] {
					continue mine
				}
			}
			out[id] = true
		}
		if len(out) != int(n) {
			return nil, fmt.Errorf("inbox: %d events recorded, but %d found as this call's", n, len(out))
		}
	}
	tx.inboxed = append(tx.inboxed, out)
	return out, nil
}

// plainInboxMin is the smallest batch recorded with inboxAllNew: the two
// round trips of its savepoint cost more than it saves on fewer rows.
const plainInboxMin = 32

// inboxAllNew records events that are all new, with a plain insert in a
// savepoint: usually every event is, and a plain insert costs PostgreSQL
// about a fifth less per row than ON CONFLICT DO NOTHING, which looks each
// id up in the index before it inserts it speculatively. If an id was
// recorded before (a redelivery), the insert fails with a unique violation
// (which PostgreSQL logs as an error): the savepoint is rolled back, with
// the locks the insert took, and allNew is false; the insert with ON
// CONFLICT then takes the locks again, in the same order, holding no other.
// The cost: two more round trips per batch, while the locks are held, and a
// second transaction id (the savepoint's) per batch. The rows inserted here
// carry the savepoint's transaction id, not this transaction's, so
// qInsertedHere (this transaction's own rows) does not see them; it is only
// used after a fallback, for rows inserted at this transaction's level.
func (tx *Tx) inboxAllNew(ctx context.Context, args []any) (n int64, allNew bool, err error) {
	if _, err := tx.tx.ExecContext(ctx, "SAVEPOINT inbox"); err != nil {
		return 0, false, err
	}
	n, err = tx.execCount(ctx, qLockAndInboxNew, args...)
	var pe *pq.Error
	if errors.As(err, &pe) && pe.Code == "23505" { // processed_events is all it writes
		// Rolled back to, a savepoint stays open: released too, the
		// statements that follow are this transaction's own again.
		_, err := tx.tx.ExecContext(ctx, "ROLLBACK TO SAVEPOINT inbox; RELEASE SAVEPOINT inbox")
		return 0, false, err
	}
	if err != nil {
		return 0, false, err
	}
	if _, err := tx.tx.ExecContext(ctx, "RELEASE SAVEPOINT inbox"); err != nil {
		return 0, false, err
	}
	return n, true, nil
}

func ts(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

// creating is the upsert of a row's first event, in three forms: insert
// adds the rows that do not exist and leaves the others alone; upsert adds
// or updates every row; guarded is upsert that leaves alone the rows this
// transaction wrote, unless their ids are in its one more parameter.
type creating struct{ insert, upsert, guarded string }

// placeholder matches a statement's parameters.
var placeholder = regexp.MustCompile(`\$(\d+)`)

// firstEvent registers the three forms of upsert, a statement on table
// (key column id) ending in ON CONFLICT (...) DO UPDATE SET with no WHERE,
// as read-model writes (see readModelWrite).
func firstEvent(table, id, upsert string) creating {
	before, after, ok := strings.Cut(upsert, "DO UPDATE SET")
	if !ok || strings.Contains(after, "WHERE") {
		panic("store: not an upsert ending in DO UPDATE SET without WHERE: " + upsert)
	}
	params := 0
	for _, m := range placeholder.FindAllStringSubmatch(upsert, -1) {
		n, _ := strconv.Atoi(m[1])
		params = max(params, n)
	}
	guarded := fmt.Sprintf("%s\n\t\tWHERE %s.xmin <> pg_current_xact_id()::xid OR %s.%s = ANY($%d::uuid[])",
		upsert, table, table, id, params+1)
	return creating{
		insert:  readModelWrite(before + "DO NOTHING"),
		upsert:  readModelWrite(upsert),
		guarded: readModelWrite(guarded),
	}
}

// applyFirst applies the rows of a first event (document.uploaded,
// email.requested, email.scheduled), whose ids are ids, and records which
// rows it created (see [Tx.Created]).
//
// Usually none of the rows exists yet: the insert does it all, and its
// count says so. A statement returning the keys of the rows it inserted
// cost PostgreSQL about a microsecond per row.
//
// If none was inserted, the upsert applies every row. If some were, the
// others still need their update, but which is which is not known: the
// guarded upsert runs over every row and skips those this transaction
// wrote (their xmin is this transaction), which are the rows the insert
// just added, except the rows an earlier statement of this transaction
// wrote, which it names. Then no row is recorded as created. (A row left
// untouched for 2^32 transactions could carry this transaction's xid as
// its frozen xmin and miss its update; that needs an exact match and is
// left alone.)
func (tx *Tx) applyFirst(ctx context.Context, q creating, key func(id string) string, ids []string, args ...any) error {
	defer tx.wrote(key, ids)
	n, err := tx.execCount(ctx, q.insert, args...)
	if err != nil {
		return fmt.Errorf("insert: %w", err)
	}
	switch {
	case n == int64(len(ids)):
		if tx.created == nil {
			tx.created = make(map[string]bool, len(ids))
		}
		for _, id := range ids {
			tx.created[key(strings.ToLower(id))] = true
		}
		return nil
	case n == 0:
		if err := tx.exec(ctx, q.upsert, args...); err != nil {
			return fmt.Errorf("upsert: %w", err)
		}
		return nil
	}
	written := map[string]bool{}
	for _, w := range tx.written {
		for _, id := range w.ids {
			written[w.key(strings.ToLower(id))] = true
		}
	}
	var earlier []string
	for _, id := range ids {
		if written[key(strings.ToLower(id))] {
			earlier = append(earlier, id)
		}
	}
	if err := tx.exec(ctx, q.guarded, append(args[:len(args):len(args)], array(earlier))...); err != nil {
		return fmt.Errorf("upsert the rows that existed: %w", err)
	}
	return nil
}

// wrote records that this transaction wrote the rows of ids.
func (tx *Tx) wrote(key func(id string) string, ids []string) {
	tx.written = append(tx.written, writes{key: key, ids: ids})
}

// Created reports whether this transaction inserted the row whose cache
// key is key (see [DocumentKey] and [EmailKey]), through ApplyDocumentsUploaded,
// ApplyEmailsRequested or ApplyEmailsScheduled: whether the row did not exist
// before the transaction, whatever its later statements did to it. It may
// report false for a row the transaction inserted (an outcome that
// overtook its row's first event, or a call whose rows did not all
// exist), never true for a row that existed. Keys hold ids in lowercase.
//
// The projector uses it to skip invalidating the keys of new rows: nothing
// can be cached for a row that did not exist, since the api caches only
// rows it read, never a "not found".
func (tx *Tx) Created(key string) bool { return tx.created[key] }

// Each apply function upserts many rows with one statement. A statement
// may not touch one row twice, so rows are first reduced to one per key (a
// UUID in capitals and in lowercase are one key); which duplicate wins does
// not matter because duplicates of one key carry the same facts
// (at-least-once redelivery, or republishing).

var qApplyDocumentsUploaded = firstEvent("documents", "doc_id", `
		INSERT INTO documents (doc_id, status, filename, size, declared_content_type, sha256, blob_key, notify, uploaded_at, upload_event_id)
		SELECT t.id, 'processing', t.fn, t.size, NULLIF(t.dct, ''), t.sha, t.key, NULLIF(t.notify, ''), t.up, NULLIF(t.ev, '')
		FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::timestamptz[], $9::text[])
		  AS t(id, fn, size, dct, sha, key, notify, up, ev)
		ON CONFLICT (doc_id) DO UPDATE SET
		  filename = EXCLUDED.filename,
		  size = EXCLUDED.size,
		  declared_content_type = EXCLUDED.declared_content_type,
		  sha256 = EXCLUDED.sha256,
		  blob_key = EXCLUDED.blob_key,
		  notify = EXCLUDED.notify,
		  uploaded_at = EXCLUDED.uploaded_at,
		  upload_event_id = COALESCE(documents.upload_event_id, EXCLUDED.upload_event_id),
		  updated_at = now()`)

// ApplyDocumentsUploaded records uploads. It fills in the upload's facts and
// never moves a status back: a document already processed stays so.
// eventIDs, if not nil, holds the id of each upload event (kept so the
// stuck-document re-drive can re-publish it under the same id).
func (tx *Tx) ApplyDocumentsUploaded(ctx context.Context, evs []*events.DocumentUploaded, eventIDs []string) error {
	type row struct {
		ev *events.DocumentUploaded
		id string
	}
	rows := make([]row, len(evs))
	for i, e := range evs {
		rows[i].ev = e
		if i < len(eventIDs) {
			rows[i].id = eventIDs[i]
		}
	}
	rows, later := splitRepeats(rows, func(r row) string { return strings.ToLower(r.ev.DocID) })
	var id, fn, dct, sha, key, notify, up, evID []string
	var size []int64
	for _, r := range rows {
		e := r.ev
		id, fn, dct, sha = append(id, e.DocID), append(fn, e.Filename), append(dct, e.DeclaredContentType), append(sha, e.SHA256)
		key, notify, up = append(key, e.BlobKey), append(notify, e.Notify), append(up, ts(e.UploadedAt))
		size, evID = append(size, e.Size), append(evID, r.id)
	}
	err := tx.applyFirst(ctx, qApplyDocumentsUploaded, DocumentKey, id,
		array(id), array(fn), array(size), array(dct), array(sha), array(key), array(notify), array(up), array(evID))
	if err != nil {
		return fmt.Errorf("apply %d document uploads: %w", len(rows), err)
	}
	if len(later) > 0 {
		evs, eventIDs = evs[:0:0], eventIDs[:0:0]
		for _, r := range later {
			evs, eventIDs = append(evs, r.ev), append(eventIDs, r.id)
		}
		return tx.ApplyDocumentsUploaded(ctx, evs, eventIDs)
	}
	return nil
}

var qApplyDocumentsProcessed = readModelWrite(`
		INSERT INTO documents (doc_id, status, content_type, words, lines, summary, processed_at)
		SELECT t.id, 'processed', t.ct, t.words, t.lines, t.sum, t.at
		FROM unnest($1::uuid[], $2::text[], $3::int[], $4::int[], $5::text[], $6::timestamptz[]) AS t(id, ct, words, lines, sum, at)
		ON CONFLICT (doc_id) DO UPDATE SET
		  status = 'processed',
		  content_type = EXCLUDED.content_type,
		  words = EXCLUDED.words,
		  lines = EXCLUDED.lines,
		  summary = EXCLUDED.summary,
		  error = NULL,
		  processed_at = EXCLUDED.processed_at,
		  updated_at = now()
		WHERE documents.status IN ('processing', 'failed')
		   OR documents.processed_at > EXCLUDED.processed_at`)

// ApplyDocumentsProcessed moves documents to processed, unless they are
// processed already at a time earlier than this one's or the same. It may
// arrive before the upload's event: the row is created and the upload
// fills in the rest later.
//
// Of a document's outcomes, a success beats a failure, and of two of one
// kind the earlier by event time wins (processed_at holds either
// outcome's), whatever order they come in: the projector applies processed
// before failed within a batch, so "the first applied wins" would give a
// different row for the same two events depending on whether they shared a
// batch. Both outcomes exist when a replica gives up on its last attempt
// (a missing blob, say) while another, which claimed the entry, processes
// it: the document was processed. A tie keeps the row as it is. The winner
// writes every outcome column (processed clears error, failed clears words,
// lines and summary), so the row holds the winner's facts alone.
func (tx *Tx) ApplyDocumentsProcessed(ctx context.Context, evs []*events.DocumentProcessed) error {
	evs, later := splitRepeats(evs, func(e *events.DocumentProcessed) string { return strings.ToLower(e.DocID) })
	var id, ct, sum, at []string
	var words, lines []int64
	for _, e := range evs {
		id, ct, sum, at = append(id, e.DocID), append(ct, e.ContentType), append(sum, e.Summary), append(at, ts(e.ProcessedAt))
		words, lines = append(words, int64(e.Words)), append(lines, int64(e.Lines))
	}
	defer tx.wrote(DocumentKey, id)
	err := tx.exec(ctx, qApplyDocumentsProcessed,
		array(id), array(ct), array(words), array(lines), array(sum), array(at))
	if err != nil {
		return fmt.Errorf("apply %d processed documents: %w", len(evs), err)
	}
	if len(later) > 0 {
		return tx.ApplyDocumentsProcessed(ctx, later)
	}
	return nil
}

var qApplyDocumentsFailed = readModelWrite(`
		INSERT INTO documents (doc_id, status, content_type, error, processed_at)
		SELECT t.id, 'failed', NULLIF(t.ct, ''), t.reason, t.at
		FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[]) AS t(id, ct, reason, at)
		ON CONFLICT (doc_id) DO UPDATE SET
		  status = 'failed',
		  content_type = EXCLUDED.content_type,
		  words = NULL,
		  lines = NULL,
		  summary = NULL,
		  error = EXCLUDED.error,
		  processed_at = EXCLUDED.processed_at,
		  updated_at = now()
		WHERE documents.status = 'processing'
		   OR (documents.status = 'failed' AND documents.processed_at > EXCLUDED.processed_at)`)

// ApplyDocumentsFailed moves documents to failed, unless they are processed,
// or failed at a time earlier than this failure's or the same (see
// ApplyDocumentsProcessed).
func (tx *Tx) ApplyDocumentsFailed(ctx context.Context, evs []*events.DocumentProcessingFailed) error {
	evs, later := splitRepeats(evs, func(e *events.DocumentProcessingFailed) string { return strings.ToLower(e.DocID) })
	var id, ct, reason, at []string
	for _, e := range evs {
		id, ct, reason, at = append(id, e.DocID), append(ct, e.ContentType), append(reason, e.Reason), append(at, ts(e.FailedAt))
	}
	defer tx.wrote(DocumentKey, id)
	err := tx.exec(ctx, qApplyDocumentsFailed,
		array(id), array(ct), array(reason), array(at))
	if err != nil {
		return fmt.Errorf("apply %d failed documents: %w", len(evs), err)
	}
	if len(later) > 0 {
		return tx.ApplyDocumentsFailed(ctx, later)
	}
	return nil
}

var qApplyEmailsRequested = firstEvent("emails", "email_id", `
		INSERT INTO emails (email_id, status, recipient, subject, doc_id, requested_at)
		SELECT t.id, 'queued', t.rcpt, t.subj, NULLIF(t.doc, '')::uuid, t.at
		FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[]) AS t(id, rcpt, subj, doc, at)
		ON CONFLICT (email_id) DO UPDATE SET
		  recipient = COALESCE(emails.recipient, EXCLUDED.recipient),
		  subject = COALESCE(emails.subject, EXCLUDED.subject),
		  doc_id = COALESCE(emails.doc_id, EXCLUDED.doc_id),
		  requested_at = COALESCE(emails.requested_at, EXCLUDED.requested_at),
		  status = CASE WHEN emails.status = 'scheduled' THEN 'queued' ELSE emails.status END,
		  updated_at = now()`)

// ApplyEmailsRequested records requested emails as queued, without moving
// a status back. It fills in what the row lacks (email.sent may have been
// projected first) but never rewrites what it has: a second request under
// an email id already used (an upstream that reuses ids) is not the email
// the sender sent, which went out once, to the first request's recipient.
func (tx *Tx) ApplyEmailsRequested(ctx context.Context, evs []*events.EmailRequested) error {
	evs, later := splitRepeats(evs, func(e *events.EmailRequested) string { return strings.ToLower(e.EmailID) })
	var id, to, subj, doc, at []string
	for _, e := range evs {
		id, to, subj, doc, at = append(id, e.EmailID), append(to, e.To), append(subj, e.Subject), append(doc, e.DocID), append(at, ts(e.RequestedAt))
	}
	err := tx.applyFirst(ctx, qApplyEmailsRequested, EmailKey, id,
		array(id), array(to), array(subj), array(doc), array(at))
	if err != nil {
		return fmt.Errorf("apply %d requested emails: %w", len(evs), err)
	}
	if len(later) > 0 {
		return tx.ApplyEmailsRequested(ctx, later)
	}
	return nil
}

var qApplyEmailsScheduled = firstEvent("emails", "email_id", `
		INSERT INTO emails (email_id, status, recipient, subject, doc_id, send_at, requested_at)
		SELECT t.id, 'scheduled', t.rcpt, t.subj, NULLIF(t.doc, '')::uuid, t.send_at, t.at
		FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[]) AS t(id, rcpt, subj, doc, send_at, at)
		ON CONFLICT (email_id) DO UPDATE SET
		  send_at = EXCLUDED.send_at,
		  recipient = COALESCE(emails.recipient, EXCLUDED.recipient),
		  subject = COALESCE(emails.subject, EXCLUDED.subject),
		  updated_at = now()`)

// ApplyEmailsScheduled records emails held back until their send time. A
// row that is already queued or final keeps its status (the email was due
// before this event arrived).
func (tx *Tx) ApplyEmailsScheduled(ctx context.Context, evs []*events.EmailScheduled) error {
	evs, later := splitRepeats(evs, func(e *events.EmailScheduled) string { return strings.ToLower(e.EmailID) })
	var id, to, subj, doc, sendAt, at []string
	for _, e := range evs {
		id, to, subj, doc = append(id, e.EmailID), append(to, e.To), append(subj, e.Subject), append(doc, e.DocID)
		sendAt, at = append(sendAt, ts(e.SendAt)), append(at, ts(e.ScheduledAt))
	}
	err := tx.applyFirst(ctx, qApplyEmailsScheduled, EmailKey, id,
		array(id), array(to), array(subj), array(doc), array(sendAt), array(at))
	if err != nil {
		return fmt.Errorf("apply %d scheduled emails: %w", len(evs), err)
	}
	if len(later) > 0 {
		return tx.ApplyEmailsScheduled(ctx, later)
	}
	return nil
}

var qApplyEmailsSent = readModelWrite(`
		INSERT INTO emails (email_id, status, recipient, message_id, attempts, sent_at)
		SELECT t.id, 'sent', NULLIF(t.rcpt, ''), NULLIF(t.mid, ''), t.attempts, t.at
		FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::timestamptz[]) AS t(id, rcpt, mid, attempts, at)
		ON CONFLICT (email_id) DO UPDATE SET
		  status = 'sent',
		  recipient = COALESCE(emails.recipient, EXCLUDED.recipient),
		  message_id = EXCLUDED.message_id,
		  attempts = EXCLUDED.attempts,
		  sent_at = EXCLUDED.sent_at,
		  error = NULL,
		  failed_at = NULL,
		  updated_at = now()
		WHERE emails.status IN ('scheduled', 'queued', 'failed')
		   OR (emails.status = 'sent' AND emails.sent_at > EXCLUDED.sent_at)`)

// ApplyEmailsSent moves emails to sent unless they are sent already at a
// time earlier than this send's or the same: as with documents (see
// ApplyDocumentsProcessed), a send beats a failure (a replica gave up on
// its last attempt while another, which claimed the entry, sent it: the
// email went out), and of two sends the earlier wins, whatever the order
// or batching of the events; a tie keeps the row. A send that replaces a
// failure clears its error and failed_at. A losing send changes nothing,
// not even a missing recipient: the request fills that in.
func (tx *Tx) ApplyEmailsSent(ctx context.Context, evs []*events.EmailSent) error {
	evs, later := splitRepeats(evs, func(e *events.EmailSent) string { return strings.ToLower(e.EmailID) })
	var id, to, mid, at []string
	var attempts []int64
	for _, e := range evs {
		id, to, mid, at = append(id, e.EmailID), append(to, e.To), append(mid, e.MessageID), append(at, ts(e.SentAt))
		attempts = append(attempts, int64(e.Attempts))
	}
	defer tx.wrote(EmailKey, id)
	err := tx.exec(ctx, qApplyEmailsSent,
		array(id), array(to), array(mid), array(attempts), array(at))
	if err != nil {
		return fmt.Errorf("apply %d sent emails: %w", len(evs), err)
	}
	if len(later) > 0 {
		return tx.ApplyEmailsSent(ctx, later)
	}
	return nil
}

var qApplyEmailsFailed = readModelWrite(`
		INSERT INTO emails (email_id, status, error, attempts, failed_at)
		SELECT t.id, 'failed', t.reason, t.attempts, t.at
		FROM unnest($1::uuid[], $2::text[], $3::int[], $4::timestamptz[]) AS t(id, reason, attempts, at)
		ON CONFLICT (email_id) DO UPDATE SET
		  status = 'failed',
		  error = EXCLUDED.error,
		  attempts = EXCLUDED.attempts,
		  failed_at = EXCLUDED.failed_at,
		  message_id = NULL,
		  sent_at = NULL,
		  updated_at = now()
		WHERE emails.status IN ('scheduled', 'queued')
		   OR (emails.status = 'failed' AND emails.failed_at > EXCLUDED.failed_at)`)

// ApplyEmailsFailed moves emails to failed unless they are sent, or failed
// at a time earlier than this failure's or the same (see ApplyEmailsSent).
func (tx *Tx) ApplyEmailsFailed(ctx context.Context, evs []*events.EmailFailed) error {
	evs, later := splitRepeats(evs, func(e *events.EmailFailed) string { return strings.ToLower(e.EmailID) })
	var id, reason, at []string
	var attempts []int64
	for _, e := range evs {
		id, reason, at = append(id, e.EmailID), append(reason, e.Reason), append(at, ts(e.FailedAt))
		attempts = append(attempts, int64(e.Attempts))
	}
	defer tx.wrote(EmailKey, id)
	err := tx.exec(ctx, qApplyEmailsFailed,
		array(id), array(reason), array(attempts), array(at))
	if err != nil {
		return fmt.Errorf("apply %d failed emails: %w", len(evs), err)
	}
	if len(later) > 0 {
		return tx.ApplyEmailsFailed(ctx, later)
	}
	return nil
}

// splitRepeats splits in, keeping its order, into the first event of each
// row (by key) and the others. A multi-row statement may touch a row only
// once, so the others are applied by a statement after it (and their
// repeats by one after that), each event of a row after the one before, as
// when they arrive one at a time: an update of a later event wins, a
// repeated outcome replaces the one before only if its event time is
// earlier (so the earliest of a kind wins, as across batches), and PostgreSQL still
// checks every event's data.
func splitRepeats[T any](in []T, key func(T) string) (first, later []T) {
	if len(in) < 2 {
		return in, nil
	}
	seen := make(map[string]bool, len(in))
	first = in[:0:0]
	for _, v := range in {
		k := key(v)
		if seen[k] {
			later = append(later, v)
			continue
		}
		seen[k] = true
		first = append(first, v)
	}
	return first, later
}

// StuckDocuments returns up to limit documents still processing that were
// uploaded before cutoff, oldest first, with what is needed to re-publish
// their upload. It returns those after the document (afterAt, afterID) in
// that order: pass the last one returned to read the next page, and the
// zero time and "" for the first.
func (s *Store) StuckDocuments(ctx context.Context, cutoff, afterAt time.Time, afterID string, limit int) ([]Document, error) {
	if afterID == "" {
		afterID = "00000000-0000-0000-0000-000000000000"
	}
	var docs []Document
	err := s.db.SelectContext(ctx, &docs, `
		SELECT `+documentColumns+` FROM documents
		WHERE status = 'processing' AND uploaded_at < $1
		  AND upload_event_id IS NOT NULL AND blob_key IS NOT NULL
		  AND (uploaded_at, doc_id) > ($2, $3::uuid)
		ORDER BY uploaded_at, doc_id
		LIMIT $4`, cutoff, afterAt, afterID, limit)
	if err != nil {
		return nil, fmt.Errorf("stuck documents: %w", err)
	}
	return docs, nil
}

// PruneInbox deletes the inbox rows of events applied before cutoff, oldest
// first and at most limit of them, and returns how many it deleted. It
// deletes batch rows per statement, so that no statement runs long or holds
// many row locks while the projector writes; it stops when a statement finds
// fewer, at limit, or when ctx is done. An event redelivered after its row is
// gone is applied again, so cutoff must lie further back than any
// redelivery.
func (s *Store) PruneInbox(ctx context.Context, cutoff time.Time, batch int, limit int64) (int64, error) {
	if batch < 1 || limit < 1 {
		return 0, fmt.Errorf("prune inbox: batch %d and limit %d must be at least 1", batch, limit)
	}
	var total int64
	for total < limit {
		want := min(int64(batch), limit-total)
		res, err := s.db.ExecContext(ctx, `
			DELETE FROM processed_events WHERE ctid = ANY(ARRAY(
				SELECT ctid FROM processed_events
				WHERE processed_at < $1
				ORDER BY processed_at
				LIMIT $2))`, cutoff, want)
		if err != nil {
			return total, fmt.Errorf("prune inbox before %s: %w", cutoff.UTC().Format(time.RFC3339), err)
		}
		n, err := res.RowsAffected()
		if err != nil {
			return total, fmt.Errorf("prune inbox: %w", err)
		}
		total += n
		if n < want {
			break
		}
	}
	return total, nil
}

// UnreferencedBlobKeys returns those of keys that no document refers to.
func (s *Store) UnreferencedBlobKeys(ctx context.Context, keys []string) ([]string, error) {
	if len(keys) == 0 {
		return nil, nil
	}
	var out []string
	err := s.db.SelectContext(ctx, &out, `
		SELECT k FROM unnest($1::text[]) AS k
		WHERE NOT EXISTS (SELECT 1 FROM documents d WHERE d.blob_key = k)`, array(keys))
	if err != nil {
		return nil, fmt.Errorf("unreferenced blob keys: %w", err)
	}
	return out, nil
}

// ExpiredBlobKeys returns up to limit blob keys whose every document failed
// before cutoff: their bytes may be removed. Failures older than cutoff by
// more than lookback are not looked at again (their bytes went on an
// earlier pass). Keys come in order, those after after only: pass the last
// one returned to read the next page, and "" for the first. (Removed bytes
// leave their rows as they are, so the same keys come back on every pass
// within lookback; without pages, a fixed set of them would hide the rest.)
func (s *Store) ExpiredBlobKeys(ctx context.Context, cutoff time.Time, lookback time.Duration, after string, limit int) ([]string, error) {
	var keys []string
	err := s.db.SelectContext(ctx, &keys, `
		SELECT DISTINCT d.blob_key FROM documents d
		WHERE d.status = 'failed' AND d.processed_at < $1 AND d.processed_at >= $2
		  AND d.blob_key IS NOT NULL AND d.blob_key > $3
		  AND NOT EXISTS (
		    SELECT 1 FROM documents o
		    WHERE o.blob_key = d.blob_key AND NOT (o.status = 'failed' AND o.processed_at < $1))
		ORDER BY d.blob_key
		LIMIT $4`, cutoff, cutoff.Add(-lookback), after, limit)
	if err != nil {
		return nil, fmt.Errorf("expired blob keys: %w", err)
	}
	return keys, nil
}
