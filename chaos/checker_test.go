package chaos

import (
	"context"
	"database/sql"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
)

// waitDrained waits, within bound, until every group of the topology has
// nothing pending, nothing undelivered and nothing waiting for a retry on
// every stream, in two snapshots a second apart between which no stream
// grew. One snapshot is not enough: bus.Inspect reads the streams one after
// the other, so a handler could ack its input after its stream was read and
// publish its output to a stream already read. It returns the groups whose
// lag, as Redis reports it, contradicted their ids in the final snapshot.
func waitDrained(ctx context.Context, rdb *redis.Client, bound time.Duration) ([]string, error) {
	deadline := time.Now().Add(bound)
	prev, why := "", ""
	for {
		fp, busy, oddLag, err := drainState(ctx, rdb)
		switch {
		case err != nil:
			prev, why = "", err.Error()
		case busy != "":
			prev, why = "", busy
		case fp == prev:
			return oddLag, nil
		default:
			prev = fp
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("streams not drained within %s: %s", bound, why)
		}
		if !sleepCtx(ctx, time.Second) {
			return nil, ctx.Err()
		}
	}
}

// drainState returns a fingerprint of the streams (their last ids), a
// description of every group that still has work ("" if none has), and
// the groups whose reported lag contradicts their ids.
//
// A group is caught up when it was handed the stream's last entry (its
// last-delivered-id is the stream's last-generated-id) and has nothing
// pending or retrying. Redis's lag counter is not used for the decision:
// it is derived from an entries-read counter that Redis estimates, and can
// be unknown (after deletions) or, as seen here after restarts, wrong.
func drainState(ctx context.Context, rdb *redis.Client) (fingerprint, busy string, oddLag []string, err error) {
	st, err := bus.Inspect(ctx, rdb, topology())
	if err != nil {
		return "", "", nil, err
	}
	var fp strings.Builder
	var work []string
	for _, s := range st.Streams {
		last := ""
		info, err := rdb.XInfoStream(ctx, s.Stream).Result()
		switch {
		case err == nil:
			last = info.LastGeneratedID
		case !strings.Contains(err.Error(), "no such key"):
			return "", "", nil, fmt.Errorf("xinfo stream %s: %w", s.Stream, err)
		}
		fmt.Fprintf(&fp, "%s=%s ", s.Stream, last)
		delivered, entriesRead := map[string]string{}, map[string]int64{}
		if last != "" {
			gs, err := rdb.XInfoGroups(ctx, s.Stream).Result()
			if err != nil {
				return "", "", nil, fmt.Errorf("xinfo groups %s: %w", s.Stream, err)
			}
			for _, g := range gs {
				delivered[g.Name], entriesRead[g.Name] = g.LastDeliveredID, g.EntriesRead
			}
		}
		for _, g := range s.Groups {
			behind := last != "" && delivered[g.Group] != last
			if g.Pending > 0 || g.Retrying > 0 || behind {
				work = append(work, fmt.Sprintf("%s/%s: pending %d, retrying %d, last delivered %s of %s (lag reported %d)",
					s.Stream, g.Group, g.Pending, g.Retrying, delivered[g.Group], last, g.Lag))
			}
			if !behind && g.Lag > 0 {
				oddLag = append(oddLag, fmt.Sprintf("%s/%s: lag %d reported, but last-delivered-id is the stream's last-generated-id %s "+
					"(entries-read %d, entries-added %d, length %d, first entry %s, max-deleted-entry-id %s)",
					s.Stream, g.Group, g.Lag, last, entriesRead[g.Group], info.EntriesAdded, info.Length, info.RecordedFirstEntryID, info.MaxDeletedEntryID))
			}
		}
	}
	return fp.String(), strings.Join(work, "; "), oddLag, nil
}

// deadLetterCheck compares one group's dead letters with the poison
// written to its streams.
type deadLetterCheck struct {
	got, want int
	// duplicates are extra dead letters of one poison entry; missing are
	// poison entries never dead-lettered; unexpected are dead letters of
	// anything but poison (real work given up), described.
	duplicates, missing int
	unexpected          []string
}

// report is what a run found.
type report struct {
	mode     string
	seed     uint64
	requests int
	elapsed  time.Duration

	accepted, processed, lost, wrong, abandoned [numKinds]int
	lostDetails, wrongDetails                   []string
	// lostItems are the request numbers of the lost entries.
	lostItems []int
	// unledgered counts rows that no accepted request explains: a request
	// whose acceptance never reached the client (its 202 was lost, or
	// its 503 hid a write that Redis had made durable).
	unledgered int
	problems   []string

	retried, rotated, repeated, repeatsUnsettled int64

	// inboxDuplicates is the projector's count of redelivered events its
	// inbox absorbed; markAbsorbed counts redelivered email requests the
	// sender found already marked as sent.
	inboxDuplicates float64
	markAbsorbed    int

	dupEffects       int
	dupEffectDetails []string

	mailChecked                                 bool
	mails, dupEmails, dupEmailBudget, strayMail int
	dupEmailDetails                             []string

	poison      int
	deadLetters map[string]deadLetterCheck

	faultsPlanned, faults [numFaults]int
	recoveries            []recovery
	handlerConcurrency    int
	handlerStops          int

	docLatency, emailLatency []time.Duration
	findings                 []string
	// exits lists replicas that ended without the injector ending them.
	exits []string
	// oddLag lists groups whose lag, as Redis reports it, contradicted
	// their ids once drained (what `conveyor status`, the metrics and a
	// lag-based autoscaler would show).
	oddLag []string
}

type docRow struct {
	id, status                    string
	filename, notify, uploadEvent sql.NullString
	uploadedAt                    sql.NullTime
	updatedAt                     time.Time
}

type emailRow struct {
	id, status     string
	docID, subject sql.NullString
	requestedAt    sql.NullTime
	updatedAt      time.Time
}

// check compares the ledger with the read models, Mailpit and the
// dead-letter streams, once the streams have drained.
func check(ctx context.Context, t *testing.T, c *cluster, l *ledger, poison *poisonBook) *report {
	t.Helper()
	r := &report{deadLetters: map[string]deadLetterCheck{}}
	entries, abandoned, problems := l.snapshot()
	r.abandoned, r.problems = abandoned, problems

	docs, emails, inbox, outcomes, err := readModels(ctx, c.db)
	if err != nil {
		t.Fatalf("read the read models: %v", err)
	}
	emailsByDoc := map[string][]*emailRow{}
	for _, e := range emails {
		if e.docID.Valid {
			emailsByDoc[e.docID.String] = append(emailsByDoc[e.docID.String], e)
		}
	}

	// Copies of each email the SMTP server received, by Message-ID.
	mailCopies := map[string]int{}
	if c.mail != nil {
		r.mailChecked = true
		for _, m := range c.mail.Messages(t) {
			mailCopies[m.MessageID]++
			r.mails++
		}
	}
	messageID := func(emailID string) string { return emailID + "@conveyor" }

	// checkEmail says what is wrong with an email the run must have sent.
	checkEmail := func(e *emailRow, what string) (lost, wrong string) {
		switch {
		case e == nil:
			return what + ": no row", ""
		case e.status == "failed":
			return "", fmt.Sprintf("%s %s: failed, want sent", what, e.id)
		case e.status != "sent":
			return fmt.Sprintf("%s %s: still %s", what, e.id, e.status), ""
		case r.mailChecked && mailCopies[messageID(e.id)] == 0:
			return fmt.Sprintf("%s %s: sent, but the SMTP server never received it", what, e.id), ""
		}
		return "", ""
	}

	ledgerEmails := map[string]bool{}
	for _, e := range entries {
		r.accepted[e.kind]++
		var lost, wrong []string
		final := false
		switch e.kind {
		case kindDocument:
			d := docs[e.id]
			switch {
			case d == nil:
				lost = append(lost, fmt.Sprintf("document %s (%s): no row", e.id, e.filename))
			case d.status == "processing":
				lost = append(lost, fmt.Sprintf("document %s (%s): still processing", e.id, e.filename))
			default:
				final = true
				if d.status != e.want {
					wrong = append(wrong, fmt.Sprintf("document %s (%s): %s, want %s", e.id, e.filename, d.status, e.want))
				}
				if d.uploadedAt.Valid {
					r.docLatency = append(r.docLatency, d.updatedAt.Sub(d.uploadedAt.Time))
				}
			}
			if e.notify != "" {
				es := emailsByDoc[e.id]
				var n *emailRow
				if len(es) > 0 {
					n = es[0]
				}
				if len(es) > 1 {
					r.dupEffects += len(es) - 1
					r.dupEffectDetails = append(r.dupEffectDetails, fmt.Sprintf("document %s has %d notification emails", e.id, len(es)))
				}
				lw, ww := checkEmail(n, fmt.Sprintf("notification of document %s", e.id))
				lost, wrong = appendNonEmpty(lost, lw), appendNonEmpty(wrong, ww)
			}
		case kindEmail, kindEvent:
			ledgerEmails[e.emailID] = true
			em := emails[e.emailID]
			what := fmt.Sprintf("email %s", e.emailID)
			if e.kind == kindEvent {
				what = fmt.Sprintf("email of event %s", e.id)
			}
			lw, ww := checkEmail(em, what)
			lost, wrong = appendNonEmpty(lost, lw), appendNonEmpty(wrong, ww)
			final = em != nil && (em.status == "sent" || em.status == "failed")
			if final && e.kind == kindEmail && em.requestedAt.Valid {
				r.emailLatency = append(r.emailLatency, em.updatedAt.Sub(em.requestedAt.Time))
			}
		}
		if final {
			r.processed[e.kind]++
		}
		if len(lost) > 0 {
			r.lost[e.kind]++
			r.lostItems = append(r.lostItems, e.item)
			r.lostDetails = append(r.lostDetails, lost...)
		}
		if len(wrong) > 0 {
			r.wrong[e.kind]++
			r.wrongDetails = append(r.wrongDetails, wrong...)
		}
	}

	// Rows no accepted request explains.
	for id := range docs {
		if !l.has(id) {
			r.unledgered++
		}
	}
	for id, e := range emails {
		if !e.docID.Valid && !ledgerEmails[id] {
			r.unledgered++
		}
	}

	r.checkEffects(docs, emails, inbox, outcomes)

	if r.mailChecked {
		sent := map[string]bool{}
		for _, e := range emails {
			if e.status == "sent" {
				sent[messageID(e.id)] = true
			}
		}
		for _, id := range sortedKeys(mailCopies) {
			if n := mailCopies[id]; n > 1 {
				r.dupEmails += n - 1
				r.dupEmailDetails = append(r.dupEmailDetails, fmt.Sprintf("%s received %d times", id, n))
			}
			if !sent[id] {
				r.strayMail++
			}
		}
	}

	r.checkDeadLetters(ctx, t, c.rdb, poison)
	sort.Slice(r.docLatency, func(i, j int) bool { return r.docLatency[i] < r.docLatency[j] })
	sort.Slice(r.emailLatency, func(i, j int) bool { return r.emailLatency[i] < r.emailLatency[j] })
	r.findings = c.logFindings()
	return r
}

func appendNonEmpty(s []string, v string) []string {
	if v == "" {
		return s
	}
	return append(s, v)
}

// checkEffects counts duplicate effects in PostgreSQL. Every row is the
// effect of events, so a fact applied twice shows up as one of:
//   - more inbox rows (processed_events) of a type than the rows that type
//     makes: one per document for document.uploaded, one per processed or
//     failed document for its outcome, one per email for email.requested,
//     one per sent or failed email for its outcome. An excess is a fact
//     applied under two event ids, which the inbox cannot absorb (two
//     outcomes, or work redone under a new id);
//   - a document with both outcome events in the inbox (the outcome ids
//     derive from the upload event's id, so both can be named exactly);
//   - an outcome event derived from no recorded upload;
//   - one request that made two rows: every document's file name and every
//     email's subject carries the number of the request that sent it.
func (r *report) checkEffects(docs map[string]*docRow, emails map[string]*emailRow, inbox map[string]int, outcomes map[string]bool) {
	implied := map[string]int{}
	for _, t := range events.Types() {
		implied[t] = 0
	}
	implied[events.TypeDocumentUploaded] = len(docs)
	implied[events.TypeEmailRequested] = len(emails)
	derived := map[string]bool{}
	byFilename := map[string]int{}
	for _, d := range docs {
		switch d.status {
		case "processed":
			implied[events.TypeDocumentProcessed]++
		case "failed":
			implied[events.TypeDocumentProcessingFailed]++
		}
		if d.filename.Valid {
			byFilename[d.filename.String]++
		}
		if !d.uploadEvent.Valid {
			continue
		}
		p, f := events.DerivedID(d.uploadEvent.String, "processed"), events.DerivedID(d.uploadEvent.String, "failed")
		derived[p], derived[f] = true, true
		if outcomes[p] && outcomes[f] {
			r.dupEffects++
			r.dupEffectDetails = append(r.dupEffectDetails, fmt.Sprintf("document %s was both processed and failed", d.id))
		}
	}
	bySubject := map[string]int{}
	for _, e := range emails {
		switch e.status {
		case "sent":
			implied[events.TypeEmailSent]++
		case "failed":
			implied[events.TypeEmailFailed]++
		}
		if !e.docID.Valid && e.subject.Valid {
			bySubject[e.subject.String]++
		}
	}
	for _, t := range sortedKeys(implied) {
		if got, want := inbox[t], implied[t]; got != want {
			r.dupEffects += max(got-want, want-got)
			r.dupEffectDetails = append(r.dupEffectDetails, fmt.Sprintf("%d inbox rows of %s for %d rows that need one each", got, t, want))
		}
	}
	for id := range outcomes {
		if !derived[id] {
			r.dupEffects++
			r.dupEffectDetails = append(r.dupEffectDetails, fmt.Sprintf("outcome event %s derives from no recorded upload", id))
		}
	}
	for _, m := range []map[string]int{byFilename, bySubject} {
		for _, k := range sortedKeys(m) {
			if m[k] > 1 {
				r.dupEffects += m[k] - 1
				r.dupEffectDetails = append(r.dupEffectDetails, fmt.Sprintf("one request made %d rows: %q", m[k], k))
			}
		}
	}
}

// checkDeadLetters compares every group's dead-letter stream with the
// poison written: each poison entry once per group reading its stream,
// nothing else.
func (r *report) checkDeadLetters(ctx context.Context, t *testing.T, rdb *redis.Client, poison *poisonBook) {
	t.Helper()
	want, markers := map[string]int{}, map[string]map[string]bool{}
	if poison != nil {
		r.poison = poison.count()
		want, markers = poison.want()
	}
	dl := bus.NewDeadLetters(rdb)
	for _, g := range sortedKeys(topology()) {
		check := deadLetterCheck{want: want[g]}
		seen := map[string]int{}
		after := ""
		for {
			page, err := dl.List(ctx, g, after, 500)
			if err != nil {
				t.Fatalf("list dead letters of %s: %v", g, err)
			}
			if len(page) == 0 {
				break
			}
			for _, d := range page {
				check.got++
				m := poisonMarker(d)
				if m == "" || !markers[g][m] {
					check.unexpected = append(check.unexpected, fmt.Sprintf("%s entry %s (event %s %s, %d attempts): %s",
						d.Stream, d.EntryID, d.EventType, d.EventID, d.Attempts, d.Error))
					continue
				}
				seen[m]++
			}
			after = page[len(page)-1].ID
		}
		for m := range markers[g] {
			switch n := seen[m]; {
			case n == 0:
				check.missing++
			case n > 1:
				check.duplicates += n - 1
			}
		}
		r.deadLetters[g] = check
	}
}

// readModels reads every document and email row, the inbox counts by
// event type, and the ids of the documents' outcome events in the inbox.
func readModels(ctx context.Context, db *sql.DB) (map[string]*docRow, map[string]*emailRow, map[string]int, map[string]bool, error) {
	docs, emails, inbox, outcomes := map[string]*docRow{}, map[string]*emailRow{}, map[string]int{}, map[string]bool{}
	rows, err := db.QueryContext(ctx, `SELECT doc_id::text, status, filename, notify, upload_event_id, uploaded_at, updated_at FROM documents`)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	for rows.Next() {
		d := &docRow{}
		if err := rows.Scan(&d.id, &d.status, &d.filename, &d.notify, &d.uploadEvent, &d.uploadedAt, &d.updatedAt); err != nil {
			rows.Close()
			return nil, nil, nil, nil, err
		}
		docs[d.id] = d
	}
	if err := rows.Close(); err != nil {
		return nil, nil, nil, nil, err
	}
	if rows, err = db.QueryContext(ctx, `SELECT email_id::text, status, doc_id::text, subject, requested_at, updated_at FROM emails`); err != nil {
		return nil, nil, nil, nil, err
	}
	for rows.Next() {
		e := &emailRow{}
		if err := rows.Scan(&e.id, &e.status, &e.docID, &e.subject, &e.requestedAt, &e.updatedAt); err != nil {
			rows.Close()
			return nil, nil, nil, nil, err
		}
		emails[e.id] = e
	}
	if err := rows.Close(); err != nil {
		return nil, nil, nil, nil, err
	}
	if rows, err = db.QueryContext(ctx, `SELECT event_type, count(*) FROM processed_events GROUP BY event_type`); err != nil {
		return nil, nil, nil, nil, err
	}
	for rows.Next() {
		var typ string
		var n int
		if err := rows.Scan(&typ, &n); err != nil {
			rows.Close()
			return nil, nil, nil, nil, err
		}
		inbox[typ] = n
	}
	if err := rows.Close(); err != nil {
		return nil, nil, nil, nil, err
	}
	if rows, err = db.QueryContext(ctx, `SELECT event_id FROM processed_events WHERE event_type IN ($1, $2)`,
		events.TypeDocumentProcessed, events.TypeDocumentProcessingFailed); err != nil {
		return nil, nil, nil, nil, err
	}
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			rows.Close()
			return nil, nil, nil, nil, err
		}
		outcomes[id] = true
	}
	return docs, emails, inbox, outcomes, rows.Close()
}

// failures returns every rule of the run that the report breaks.
func (r *report) failures() []string {
	var out []string
	if n := sum(r.lost); n > 0 {
		out = append(out, fmt.Sprintf("%d accepted requests lost; first: %s", n, first(r.lostDetails, 20)))
	}
	if n := sum(r.wrong); n > 0 {
		out = append(out, fmt.Sprintf("%d accepted requests reached the wrong outcome; first: %s", n, first(r.wrongDetails, 20)))
	}
	if r.dupEffects > 0 {
		out = append(out, fmt.Sprintf("%d duplicate effects in PostgreSQL: %s", r.dupEffects, first(r.dupEffectDetails, 20)))
	}
	if r.dupEmails > r.dupEmailBudget {
		out = append(out, fmt.Sprintf("%d duplicate emails, more than the %d that the %d handler stops could explain: %s",
			r.dupEmails, r.dupEmailBudget, r.handlerStops, first(r.dupEmailDetails, 20)))
	}
	if r.strayMail > 0 {
		out = append(out, fmt.Sprintf("%d emails received that no sent email row explains", r.strayMail))
	}
	for _, g := range sortedKeys(r.deadLetters) {
		d := r.deadLetters[g]
		if d.got != d.want || d.duplicates > 0 || d.missing > 0 || len(d.unexpected) > 0 {
			out = append(out, fmt.Sprintf("group %s: %d dead letters, want %d (%d duplicated, %d poison entries missing, %d not poison: %s)",
				g, d.got, d.want, d.duplicates, d.missing, len(d.unexpected), first(d.unexpected, 10)))
		}
	}
	for k := range numFaults {
		if r.faults[k] < r.faultsPlanned[k] {
			out = append(out, fmt.Sprintf("fault %q happened %d times, planned %d", k, r.faults[k], r.faultsPlanned[k]))
		}
	}
	for _, rec := range r.recoveries {
		if !rec.recovered {
			out = append(out, fmt.Sprintf("%s still held entries %s after its kill -9", rec.victim, rec.took.Round(time.Second)))
		}
	}
	if len(r.problems) > 0 {
		out = append(out, fmt.Sprintf("%d answers of the API contradict the ledger: %s", len(r.problems), first(r.problems, 20)))
	}
	out = append(out, r.findings...)
	return out
}

func sum(n [numKinds]int) int {
	s := 0
	for _, v := range n {
		s += v
	}
	return s
}

// first joins the first n of s, saying how many more there are.
func first(s []string, n int) string {
	if len(s) <= n {
		return strings.Join(s, "; ")
	}
	return strings.Join(s[:n], "; ") + fmt.Sprintf("; and %d more", len(s)-n)
}

// percentile returns the p-th percentile (0..1) of sorted durations.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[int(p*float64(len(sorted)-1)+0.5)]
}
