package projector_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/cache"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/internal/testenv"
	"github.com/conveyor/conveyor/projector"
	"github.com/conveyor/conveyor/store"
)

// fixture is a migrated database of its own and the shared test Redis.
// Tests that share a fixture between subtests keep to their own ids, cache
// prefixes and registries.
type fixture struct {
	st  *store.Store
	db  *sql.DB // plain connection, to inspect tables and to hold locks
	rdb *redis.Client
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	url := testenv.DatabaseURL(t)
	st, err := store.Open(store.Config{URL: url})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := st.Close(); err != nil {
			t.Errorf("close store: %v", err)
		}
	})
	if _, err := st.Migrate(t.Context()); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	// The driver is registered by package store.
	db, err := sql.Open("postgres", url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := db.Close(); err != nil {
			t.Errorf("close db: %v", err)
		}
	})
	return &fixture{st: st, db: db, rdb: testenv.Redis(t)}
}

// newCache returns a cache client on rdb under a prefix of the test's own.
func newCache(t *testing.T, rdb redis.UniversalClient) *cache.Client {
	t.Helper()
	c, err := cache.New(cache.Config{Redis: rdb, Prefix: testenv.Prefix(t), Logger: discard})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

var discard = slog.New(slog.DiscardHandler)

// projector starts a Projector on the fixture's store with a registry of its
// own, closed at cleanup.
func (f *fixture) projector(t *testing.T, c *cache.Client, mod func(*projector.Config)) (*projector.Projector, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	cfg := projector.Config{Store: f.st, Cache: c, Logger: discard, Registerer: reg}
	if mod != nil {
		mod(&cfg)
	}
	p, err := projector.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p, reg
}

// apply hands ev to p as the router would, with an envelope of id.
func apply(ctx context.Context, p *projector.Projector, id string, ev events.Event) error {
	return p.Apply(bus.WithEnvelope(ctx, events.Envelope{ID: id, Type: ev.EventType(), Version: ev.EventVersion()}), ev)
}

func mustApply(t *testing.T, p *projector.Projector, id string, ev events.Event) {
	t.Helper()
	if err := apply(t.Context(), p, id, ev); err != nil {
		t.Fatalf("Apply %s %s: %v", ev.EventType(), id, err)
	}
}

// applyConcurrently applies every (id, event) pair at once, each from its
// own goroutine, and returns the errors in the same order.
func applyConcurrently(ctx context.Context, p *projector.Projector, ids []string, evs []events.Event) []error {
	errs := make([]error, len(evs))
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range evs {
		wg.Go(func() {
			<-start
			errs[i] = apply(ctx, p, ids[i], evs[i])
		})
	}
	close(start)
	wg.Wait()
	return errs
}

func (f *fixture) count(t *testing.T, query string, args ...any) int {
	t.Helper()
	var n int
	if err := f.db.QueryRowContext(context.Background(), query, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

func (f *fixture) inboxRows(t *testing.T, id string) int {
	t.Helper()
	return f.count(t, "SELECT count(*) FROM processed_events WHERE event_id = $1", id)
}

// waitFor polls cond until it holds. The bound is for liveness only: a
// healthy run meets the condition far sooner, and no test asserts on time.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting: %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// blockInbox makes every projector transaction wait at its inbox insert,
// by holding a table lock from another connection, until release is
// called. waiting reports how many transactions are blocked on it. Tests
// use it to know, without sleeping, that events are queued behind busy
// workers and will therefore share the next batch.
func (f *fixture) blockInbox(t *testing.T) (waiting func() int, release func()) {
	t.Helper()
	ctx := context.Background()
	conn, err := f.db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.ExecContext(ctx, "LOCK TABLE processed_events IN EXCLUSIVE MODE"); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	release = func() {
		once.Do(func() {
			if err := tx.Rollback(); err != nil {
				t.Errorf("release inbox lock: %v", err)
			}
			_ = conn.Close()
		})
	}
	t.Cleanup(release)
	waiting = func() int {
		return f.count(t, `SELECT count(*) FROM pg_locks
			WHERE NOT granted AND relation = 'processed_events'::regclass
			  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`)
	}
	return waiting, release
}

// Metrics read back from a projector's registry.

func batchSizes(t testing.TB, reg *prometheus.Registry) (count uint64, sum float64) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "conveyor_projector_batch_size" {
			h := mf.GetMetric()[0].GetHistogram()
			return h.GetSampleCount(), h.GetSampleSum()
		}
	}
	return 0, 0
}

func eventsSeen(t *testing.T, reg *prometheus.Registry, result string) int {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "conveyor_projector_events_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "result" && l.GetValue() == result {
					return int(m.GetCounter().GetValue())
				}
			}
		}
	}
	return 0
}

// Events with fixed facts. at has whole microseconds, which PostgreSQL keeps.
var at = time.Date(2026, 3, 4, 5, 6, 7, 123456000, time.UTC)

const (
	sha  = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
	blob = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
)

func uploaded(id string) events.Event {
	return &events.DocumentUploaded{DocID: id, Filename: "report.txt", Size: 1234, SHA256: sha, BlobKey: blob,
		DeclaredContentType: "text/plain", Notify: "ops@example.com", UploadedAt: at}
}

func processed(id string) events.Event {
	return &events.DocumentProcessed{DocID: id, ContentType: "text/plain", Words: 42, Lines: 7,
		Summary: "a summary", ProcessedAt: at.Add(time.Second)}
}

func docFailed(id string) events.Event {
	return &events.DocumentProcessingFailed{DocID: id, ContentType: "application/zip", Reason: "unsupported type",
		FailedAt: at.Add(2 * time.Second)}
}

func requested(id string) events.Event {
	return &events.EmailRequested{EmailID: id, To: "a@example.com", Subject: "Your document", Body: "done",
		RequestedAt: at}
}

func sent(id string) events.Event {
	return &events.EmailSent{EmailID: id, To: "a@example.com", MessageID: "<m1@example.com>", Attempts: 2,
		SentAt: at.Add(time.Second)}
}

func mailFailed(id string) events.Event {
	return &events.EmailFailed{EmailID: id, Reason: "550 no such user", Attempts: 5, FailedAt: at.Add(2 * time.Second)}
}

// kinds lists the six event types the projector applies, with the cache key
// of the row each one changes.
var kinds = []struct {
	name  string
	mk    func(id string) events.Event
	isDoc bool
	// first marks the event that usually creates its row; the projector
	// leaves the cache key of a row such an event created alone.
	first bool
}{
	{name: events.TypeDocumentUploaded, mk: uploaded, isDoc: true, first: true},
	{name: events.TypeDocumentProcessed, mk: processed, isDoc: true},
	{name: events.TypeDocumentProcessingFailed, mk: docFailed, isDoc: true},
	{name: events.TypeEmailRequested, mk: requested, first: true},
	{name: events.TypeEmailSent, mk: sent},
	{name: events.TypeEmailFailed, mk: mailFailed},
}

func cacheKey(isDoc bool, id string) string {
	if isDoc {
		return store.DocumentKey(id)
	}
	return store.EmailKey(id)
}

// row returns the read model row of a document or an email, whole.
func (f *fixture) row(t *testing.T, isDoc bool, id string) any {
	t.Helper()
	var (
		r   any
		err error
	)
	if isDoc {
		r, err = f.st.Document(t.Context(), id)
	} else {
		r, err = f.st.Email(t.Context(), id)
	}
	if err != nil {
		t.Fatalf("read row %s: %v", id, err)
	}
	return r
}

// facts is a row without what legitimately differs between rows with the
// same facts: the key and the write time.
func facts(r any) any {
	switch r := r.(type) {
	case store.Document:
		// The upload's event id is bookkeeping, not a fact of the
		// document; TestUploadEventIDIsKept checks it.
		r.DocID, r.UpdatedAt, r.UploadEventID = "", time.Time{}, sql.NullString{}
		r.UploadedAt, r.ProcessedAt = utc(r.UploadedAt), utc(r.ProcessedAt)
		return r
	case store.Email:
		r.EmailID, r.UpdatedAt = "", time.Time{}
		r.RequestedAt, r.SendAt, r.SentAt, r.FailedAt = utc(r.RequestedAt), utc(r.SendAt), utc(r.SentAt), utc(r.FailedAt)
		return r
	}
	panic(fmt.Sprintf("facts of %T", r))
}

func utc(t sql.NullTime) sql.NullTime {
	if t.Valid {
		t.Time = t.Time.UTC()
	}
	return t
}

func TestConfigValidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		cfg  projector.Config
	}{
		{name: "no store, no cache", cfg: projector.Config{}},
		{name: "negative batch", cfg: projector.Config{MaxBatch: -1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if p, err := projector.New(tt.cfg); err == nil {
				p.Close()
				t.Fatal("New: no error")
			}
		})
	}
}

func TestApplyWithoutEnvelopeIsPermanent(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	p, _ := f.projector(t, newCache(t, f.rdb), nil)
	tests := []struct {
		name string
		ctx  context.Context
	}{
		{name: "no envelope", ctx: t.Context()},
		{name: "envelope without id", ctx: bus.WithEnvelope(t.Context(), events.Envelope{Type: events.TypeDocumentUploaded})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := p.Apply(tt.ctx, uploaded(events.NewID()))
			if !bus.IsPermanent(err) {
				t.Fatalf("Apply = %v, want a permanent error", err)
			}
		})
	}
	if n := f.count(t, "SELECT count(*) FROM documents"); n != 0 {
		t.Errorf("%d documents written without an envelope id", n)
	}
}

// TestRedelivery applies each event type twice with the same envelope id,
// one after the other and from 20 goroutines at once: the inbox must let it
// change the read model once. The row is compared whole, write time
// included, and the projector's counters say how often it was applied.
func TestRedelivery(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	for _, k := range kinds {
		for _, concurrent := range []bool{false, true} {
			name := k.name + "/sequential"
			if concurrent {
				name = k.name + "/20 goroutines"
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				p, reg := f.projector(t, newCache(t, f.rdb), nil)
				key, eventID := events.NewID(), events.NewID()
				copies := 2
				if concurrent {
					copies = 20
					ids, evs := make([]string, copies), make([]events.Event, copies)
					for i := range evs {
						// Each delivery decodes its own copy of the payload.
						ids[i], evs[i] = eventID, k.mk(key)
					}
					for i, err := range applyConcurrently(t.Context(), p, ids, evs) {
						if err != nil {
							t.Fatalf("Apply copy %d: %v", i, err)
						}
					}
				} else {
					mustApply(t, p, eventID, k.mk(key))
					first := f.row(t, k.isDoc, key)
					mustApply(t, p, eventID, k.mk(key))
					if again := f.row(t, k.isDoc, key); !reflect.DeepEqual(again, first) {
						t.Errorf("redelivery changed the row:\n%+v\nwas\n%+v", again, first)
					}
				}
				after := f.row(t, k.isDoc, key)
				// A later redelivery still changes nothing.
				mustApply(t, p, eventID, k.mk(key))
				if again := f.row(t, k.isDoc, key); !reflect.DeepEqual(again, after) {
					t.Errorf("redelivery changed the row:\n%+v\nwas\n%+v", again, after)
				}

				if n := f.inboxRows(t, eventID); n != 1 {
					t.Errorf("%d inbox rows for one event, want 1", n)
				}
				if got := eventsSeen(t, reg, "applied"); got != 1 {
					t.Errorf("applied %d times, want 1", got)
				}
				if got := eventsSeen(t, reg, "duplicate"); got != copies {
					t.Errorf("%d duplicates counted, want %d", got, copies)
				}
				// The row is the one a single application gives.
				ref := events.NewID()
				mustApply(t, p, events.NewID(), k.mk(ref))
				if got, want := facts(after), facts(f.row(t, k.isDoc, ref)); !reflect.DeepEqual(got, want) {
					t.Errorf("row after redeliveries:\n%+v\nafter one delivery:\n%+v", got, want)
				}
			})
		}
	}
}

// TestRedeliveryWithChangedPayload shows that the inbox, not only the
// forward-only statuses, absorbs a redelivery: a copy under the same event
// id whose payload would change the row is not applied.
func TestRedeliveryWithChangedPayload(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	tests := []struct {
		name   string
		isDoc  bool
		first  func(id string) events.Event
		second func(id string) events.Event
	}{
		{name: "upload", isDoc: true, first: uploaded, second: func(id string) events.Event {
			e := uploaded(id).(*events.DocumentUploaded)
			e.Filename = "renamed.txt"
			return e
		}},
		{name: "email request", first: requested, second: func(id string) events.Event {
			e := requested(id).(*events.EmailRequested)
			e.Subject = "changed"
			return e
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			p, _ := f.projector(t, newCache(t, f.rdb), nil)
			key, eventID := events.NewID(), events.NewID()
			mustApply(t, p, eventID, tt.first(key))
			before := f.row(t, tt.isDoc, key)
			mustApply(t, p, eventID, tt.second(key))
			if after := f.row(t, tt.isDoc, key); !reflect.DeepEqual(after, before) {
				t.Errorf("a duplicate event id changed the row:\n%+v\nwas\n%+v", after, before)
			}
		})
	}
}

// TestRepublish applies the same facts under two event ids, as a publisher
// that retries after a lost acknowledgement does: both are recorded, and
// the row holds the same facts as after one.
func TestRepublish(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	for _, k := range kinds {
		t.Run(k.name, func(t *testing.T) {
			t.Parallel()
			p, _ := f.projector(t, newCache(t, f.rdb), nil)
			key := events.NewID()
			id1, id2 := events.NewID(), events.NewID()
			mustApply(t, p, id1, k.mk(key))
			once := f.row(t, k.isDoc, key)
			mustApply(t, p, id2, k.mk(key))
			if got, want := facts(f.row(t, k.isDoc, key)), facts(once); !reflect.DeepEqual(got, want) {
				t.Errorf("row after a republish:\n%+v\nafter the first:\n%+v", got, want)
			}
			if n := f.inboxRows(t, id1) + f.inboxRows(t, id2); n != 2 {
				t.Errorf("%d inbox rows, want 2", n)
			}
		})
	}
}

// TestOutOfOrder applies an event and its follow-up in both orders, one at
// a time and both at once (then they may share a batch), and compares the
// rows with the in-order one.
func TestOutOfOrder(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	tests := []struct {
		name        string
		isDoc       bool
		first, then func(id string) events.Event
	}{
		{name: "document processed", isDoc: true, first: uploaded, then: processed},
		{name: "document failed", isDoc: true, first: uploaded, then: docFailed},
		{name: "email sent", first: requested, then: sent},
		{name: "email failed", first: requested, then: mailFailed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			p, _ := f.projector(t, newCache(t, f.rdb), nil)
			inOrder := events.NewID()
			mustApply(t, p, events.NewID(), tt.first(inOrder))
			mustApply(t, p, events.NewID(), tt.then(inOrder))
			want := facts(f.row(t, tt.isDoc, inOrder))

			reversed := events.NewID()
			mustApply(t, p, events.NewID(), tt.then(reversed))
			mustApply(t, p, events.NewID(), tt.first(reversed))
			if got := facts(f.row(t, tt.isDoc, reversed)); !reflect.DeepEqual(got, want) {
				t.Errorf("reversed order:\n%+v\nin order:\n%+v", got, want)
			}

			together := events.NewID()
			errs := applyConcurrently(t.Context(), p,
				[]string{events.NewID(), events.NewID()},
				[]events.Event{tt.then(together), tt.first(together)})
			if err := errors.Join(errs...); err != nil {
				t.Fatal(err)
			}
			if got := facts(f.row(t, tt.isDoc, together)); !reflect.DeepEqual(got, want) {
				t.Errorf("applied together:\n%+v\nin order:\n%+v", got, want)
			}
		})
	}
}

// TestGroupCommit applies 200 events at once. While the first transactions
// wait on a lock, the others queue; once it is released they are applied in
// shared transactions, so there are fewer transactions than events.
func TestGroupCommit(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	p, reg := f.projector(t, newCache(t, f.rdb), nil)

	const pairs = 50 // 50 documents and 50 emails, two events each
	var (
		ids  []string
		evs  []events.Event
		docs = make([]string, pairs)
		mail = make([]string, pairs)
	)
	for i := range pairs {
		docs[i], mail[i] = events.NewID(), events.NewID()
		// Keys alternate, so the first two events (one document, one
		// email) lock different rows and both reach the inbox.
		for _, ev := range []events.Event{uploaded(docs[i]), requested(mail[i]), processed(docs[i]), sent(mail[i])} {
			ids, evs = append(ids, events.NewID()), append(evs, ev)
		}
	}

	// The first two events occupy both workers; the other 198 then queue
	// behind them, all at once.
	waiting, release := f.blockInbox(t)
	errs := make([]error, len(evs))
	var wg sync.WaitGroup
	for i := range 2 {
		wg.Go(func() { errs[i] = apply(context.Background(), p, ids[i], evs[i]) })
		waitFor(t, "worker blocked", func() bool { return waiting() == i+1 })
	}
	wg.Go(func() { copy(errs[2:], applyConcurrently(context.Background(), p, ids[2:], evs[2:])) })
	waitFor(t, "events queued", func() bool { return p.Queued() == len(evs)-2 })
	release()
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}

	count, sum := batchSizes(t, reg)
	if count >= uint64(len(evs)) || sum != float64(len(evs)) {
		t.Errorf("batch sizes: %d transactions for %v events; want fewer transactions than %d events", count, sum, len(evs))
	}
	t.Logf("%d events in %d transactions", len(evs), count)
	if n := f.count(t, "SELECT count(*) FROM processed_events"); n != len(evs) {
		t.Errorf("%d inbox rows, want %d", n, len(evs))
	}
	for i := range pairs {
		d, err := f.st.Document(t.Context(), docs[i])
		if err != nil || d.Status != store.DocumentProcessed || d.Filename.String != "report.txt" || d.Words.Int64 != 42 {
			t.Errorf("document %d = %+v, %v; want processed with its upload's facts", i, d, err)
		}
		e, err := f.st.Email(t.Context(), mail[i])
		if err != nil || e.Status != store.EmailSent || e.Subject.String != "Your document" || e.Attempts != 2 {
			t.Errorf("email %d = %+v, %v; want sent with its request's facts", i, e, err)
		}
	}
}

// TestBadEventFailsOnlyItself puts an event that passes validation but that
// PostgreSQL rejects (a summary that is not valid UTF-8; no JSON payload can
// carry it, since decoding replaces such bytes, so only a direct call can
// build it) into a batch with good
// events. The batch transaction fails; the projector then applies it in
// halves, and halves of the failing half, so only the bad one fails,
// permanently, and the others commit, in a few transactions rather than
// one each.
func TestBadEventFailsOnlyItself(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	logs := &recorder{}
	p, reg := f.projector(t, newCache(t, f.rdb), func(c *projector.Config) { c.Logger = slog.New(logs) })

	badDoc := events.NewID()
	bad := &events.DocumentProcessed{DocID: badDoc, ContentType: "text/plain", Words: 1, Summary: "caf\xe9", ProcessedAt: time.Now()}
	if err := bad.Validate(); err != nil {
		t.Fatalf("the bad event must pass validation to reach the database: %v", err)
	}

	// Occupy both workers, so that the events below queue up together.
	waiting, release := f.blockInbox(t)
	warm := make(chan error, 2)
	for i := range 2 {
		go func() { warm <- apply(context.Background(), p, events.NewID(), uploaded(events.NewID())) }()
		waitFor(t, "worker blocked", func() bool { return waiting() == i+1 })
	}

	const good = 30
	ids, evs := []string{events.NewID()}, []events.Event{bad}
	goodDocs := make([]string, good)
	for i := range goodDocs {
		goodDocs[i] = events.NewID()
		ids, evs = append(ids, events.NewID()), append(evs, uploaded(goodDocs[i]))
	}
	// The bad event's document also gets a good event in the same batch.
	ids, evs = append(ids, events.NewID()), append(evs, uploaded(badDoc))
	result := make(chan []error, 1)
	go func() { result <- applyConcurrently(context.Background(), p, ids, evs) }()
	waitFor(t, "events queued", func() bool { return p.Queued() == len(evs) })
	release()
	for range 2 {
		if err := <-warm; err != nil {
			t.Fatalf("warm-up event: %v", err)
		}
	}
	errs := <-result

	if errs[0] == nil {
		t.Error("the bad event was applied without an error")
	} else if !bus.IsPermanent(errs[0]) {
		t.Errorf("the bad event's error %v is not permanent: retrying cannot help", errs[0])
	}
	for i, err := range errs[1:] {
		if err != nil {
			t.Errorf("good event %d failed with the bad one: %v", i, err)
		}
	}
	if got := logs.find("batch transaction failed; applying it in halves"); got == nil || got["events"] != int64(len(evs)) {
		t.Errorf("fallback log = %v; want one for a batch of %d events (the bad event must have shared it)", got, len(evs))
	}
	for i, id := range goodDocs {
		if d, err := f.st.Document(t.Context(), id); err != nil || d.Status != store.DocumentProcessing {
			t.Errorf("good document %d = %+v, %v; want it applied", i, d, err)
		}
	}
	d, err := f.st.Document(t.Context(), badDoc)
	if err != nil || d.Status != store.DocumentProcessing || d.Words.Valid {
		t.Errorf("document of the bad event = %+v, %v; want its upload only", d, err)
	}
	if n := f.inboxRows(t, ids[0]); n != 0 {
		t.Errorf("the failed event has %d inbox rows; want 0, so that its retry is applied", n)
	}
	// Two warm-ups, then every good event committed once, by halving: at
	// each of the log2(32) = 5 levels one half commits, and the last
	// level's other single event too.
	if count, sum := batchSizes(t, reg); count > 2+6 || sum != float64(2+len(evs)-1) {
		t.Errorf("batch sizes: %d transactions, %v events; want at most %d transactions committing %d events", count, sum, 2+6, 2+len(evs)-1)
	}
}

// recorder is a slog.Handler that keeps records, for tests that check what
// was logged.
type recorder struct {
	mu      sync.Mutex
	records []slog.Record
}

func (h *recorder) Enabled(context.Context, slog.Level) bool { return true }
func (h *recorder) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *recorder) WithGroup(string) slog.Handler            { return h }

func (h *recorder) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.records = append(h.records, r.Clone())
	return nil
}

// find returns the attributes of the first record with message msg, or nil.
func (h *recorder) find(msg string) map[string]any {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, r := range h.records {
		if r.Message != msg {
			continue
		}
		attrs := map[string]any{}
		r.Attrs(func(a slog.Attr) bool {
			attrs[a.Key] = a.Value.Any()
			return true
		})
		return attrs
	}
	return nil
}

// TestCacheInvalidation checks which keys the projector invalidates after
// the commit. The key of a row that existed before the event is: on its
// first delivery, on a duplicate (which repairs an invalidation that
// failed), and when the event names the row in capitals. The key of a row
// that a first event (document.uploaded, email.requested) created is not
// (nothing can be cached for a row that did not exist, since a read that
// finds no row caches nothing): a value planted under it stays, which shows
// that no invalidation was sent. An unrelated key is never touched.
func TestCacheInvalidation(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	for _, k := range kinds {
		t.Run(k.name, func(t *testing.T) {
			t.Parallel()
			c := newCache(t, f.rdb)
			p, _ := f.projector(t, c, nil)
			ctx := t.Context()
			id := events.NewID()
			key := cacheKey(k.isDoc, id)
			other := cacheKey(k.isDoc, events.NewID())
			if err := c.Set(ctx, other, "unrelated", time.Hour); err != nil {
				t.Fatal(err)
			}

			if err := c.Set(ctx, key, "planted", time.Hour); err != nil {
				t.Fatal(err)
			}
			mustApply(t, p, events.NewID(), k.mk(id))
			var v string
			err := c.Get(ctx, key, &v)
			switch {
			case k.first && (err != nil || v != "planted"):
				t.Errorf("the event that created the row: cache holds %q, %v; want the planted value, not invalidated", v, err)
			case !k.first && !errors.Is(err, cache.ErrMiss):
				// Only first events' statements report the rows they create.
				t.Errorf("an outcome that created the row: cache holds %q, %v; want a miss", v, err)
			}

			eventID := events.NewID()
			for _, attempt := range []struct{ name, id, eventID string }{
				{"first delivery", id, eventID},
				{"duplicate", id, eventID},
				{"id in capitals", strings.ToUpper(id), events.NewID()},
			} {
				if err := c.Set(ctx, key, "stale", time.Hour); err != nil {
					t.Fatal(err)
				}
				mustApply(t, p, attempt.eventID, k.mk(attempt.id))
				var v string
				if err := c.Get(ctx, key, &v); !errors.Is(err, cache.ErrMiss) {
					t.Errorf("%s on a row that existed: cache holds %q, %v after Apply; want a miss", attempt.name, v, err)
				}
			}
			if err := c.Get(ctx, other, &v); err != nil || v != "unrelated" {
				t.Errorf("an unrelated key was touched: %q, %v", v, err)
			}
		})
	}
}

// TestCacheUnreachable runs the projector with a cache Redis that refuses
// connections. Uploads that create their rows need no invalidation and
// are applied, also when they share a transaction with changes. For events that change a row, Apply must report the failed
// invalidation, so the event is retried, but the database change is
// committed once: retries are duplicates, and a retry after the cache is
// back repairs it.
func TestCacheUnreachable(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	// Nothing listens on port 1 (tcpmux, privileged and unused): its
	// connections are refused. A port taken from a listener and closed
	// again may meanwhile be another test's.
	down := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1, DialerRetries: 1})
	// After a failed dial the client's pool sleeps a second in the
	// background before it sees that it was closed: wait for that, or the
	// leak check at the end of a short run finds it.
	t.Cleanup(func() {
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			buf := make([]byte, 1<<20)
			if !strings.Contains(string(buf[:runtime.Stack(buf, true)]), "ConnPool).tryDial") {
				return
			}
		}
	})
	t.Cleanup(func() { _ = down.Close() })
	// One worker, so that the events applied at once share transactions.
	broken, reg := f.projector(t, newCache(t, down), func(c *projector.Config) { c.Workers = 1 })

	tests := []struct {
		name   string
		events int
	}{
		{name: "one event", events: 1},
		{name: "events sharing transactions", events: 10},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ids, evs, docs := make([]string, tt.events), make([]events.Event, tt.events), make([]string, tt.events)
			creates, createIDs := make([]events.Event, tt.events), make([]string, tt.events)
			for i := range evs {
				ids[i], docs[i], createIDs[i] = events.NewID(), events.NewID(), events.NewID()
				creates[i], evs[i] = uploaded(docs[i]), processed(docs[i])
			}
			// Uploads that create their rows need no invalidation, so the
			// cache being down does not hold them up.
			for i, err := range applyConcurrently(t.Context(), broken, createIDs, creates) {
				if err != nil {
					t.Errorf("Apply %d creating its row with the cache down: %v, want nil", i, err)
				}
			}
			// Changes to those rows, in transactions shared with uploads
			// of new documents: the changes fail, the uploads are done.
			// The batch is committed once, not applied again one by one
			// (that would count duplicates).
			mixedIDs, mixed := slices.Clone(ids), slices.Clone(evs)
			for range tt.events {
				mixedIDs, mixed = append(mixedIDs, events.NewID()), append(mixed, uploaded(events.NewID()))
			}
			dups := eventsSeen(t, reg, "duplicate")
			for i, err := range applyConcurrently(t.Context(), broken, mixedIDs, mixed) {
				switch {
				case i < tt.events && err == nil:
					t.Errorf("Apply %d changing a row with the cache down = nil, want an error so that it is retried", i)
				case i >= tt.events && err != nil:
					t.Errorf("Apply %d creating its row with the cache down, alongside changes: %v, want nil", i, err)
				}
			}
			if got := eventsSeen(t, reg, "duplicate") - dups; got != 0 {
				t.Errorf("%d events applied again as duplicates after the failed invalidation, want 0", got)
			}
			rows := make([]store.Document, len(docs))
			for i := range docs {
				d, err := f.st.Document(t.Context(), docs[i])
				if err != nil {
					t.Fatalf("document %d not committed: %v", i, err)
				}
				rows[i] = d
			}
			// The retries, still without a cache, then with it back.
			for i, err := range applyConcurrently(t.Context(), broken, ids, evs) {
				if err == nil {
					t.Errorf("retry %d with the cache down = nil, want an error", i)
				}
			}
			c := newCache(t, f.rdb)
			healthy, _ := f.projector(t, c, nil)
			for i := range evs {
				if err := c.Set(t.Context(), store.DocumentKey(docs[i]), "stale", time.Hour); err != nil {
					t.Fatal(err)
				}
			}
			for i, err := range applyConcurrently(t.Context(), healthy, ids, evs) {
				if err != nil {
					t.Errorf("retry %d with the cache back: %v", i, err)
				}
			}
			for i := range docs {
				if n := f.inboxRows(t, ids[i]); n != 1 {
					t.Errorf("event %d: %d inbox rows, want 1", i, n)
				}
				if d := f.row(t, true, docs[i]); !reflect.DeepEqual(d, rows[i]) {
					t.Errorf("document %d changed by retries:\n%+v\nwas\n%+v", i, d, rows[i])
				}
				var v string
				if err := c.Get(t.Context(), store.DocumentKey(docs[i]), &v); !errors.Is(err, cache.ErrMiss) {
					t.Errorf("document %d: cache holds %q, %v after the repairing retry; want a miss", i, v, err)
				}
			}
		})
	}
	if got := eventsSeen(t, reg, "applied"); got != 33 {
		t.Errorf("the projector without a cache applied %d events, want 33 (22 creating rows, 11 changing them)", got)
	}
}

// TestStaleSetRace runs the race the cache's version guard exists for, end
// to end: a reader misses and loads the old row; the projector commits the
// new row and invalidates; then the reader tries to store the old row. The
// cache must not keep it. Channels order the steps; nothing sleeps.
func TestStaleSetRace(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	tests := []struct {
		name       string
		commit     bool // the projector commits while the reader loads
		wantCached bool // the reader's old row stays in the cache
	}{
		{name: "commit during the load", commit: true},
		{name: "no commit during the load caches the row", wantCached: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			c := newCache(t, f.rdb)
			p, _ := f.projector(t, c, nil)
			id := events.NewID()
			key := store.DocumentKey(id)
			mustApply(t, p, events.NewID(), uploaded(id))

			loaded, proceed := make(chan struct{}), make(chan struct{})
			var releaseOnce sync.Once
			releaseLoad := func() { releaseOnce.Do(func() { close(proceed) }) }
			t.Cleanup(releaseLoad)
			type result struct {
				d   store.Document
				err error
			}
			done := make(chan result, 1)
			go func() {
				d, err := cache.Fetch(ctx, c, key, time.Hour, func(ctx context.Context) (store.Document, error) {
					d, err := f.st.Document(ctx, id)
					close(loaded)
					<-proceed
					return d, err
				})
				done <- result{d, err}
			}()

			<-loaded
			if tt.commit {
				mustApply(t, p, events.NewID(), processed(id))
			}
			releaseLoad()
			res := <-done
			if res.err != nil || res.d.Status != store.DocumentProcessing {
				t.Fatalf("racing Fetch = %q, %v; want the old row it loaded", res.d.Status, res.err)
			}

			var cached store.Document
			err := c.Get(ctx, key, &cached)
			switch {
			case tt.wantCached && (err != nil || cached.Status != store.DocumentProcessing):
				t.Errorf("cache holds %q, %v; want the loaded row", cached.Status, err)
			case !tt.wantCached && !errors.Is(err, cache.ErrMiss):
				t.Errorf("cache holds %q, %v after the race; want a miss", cached.Status, err)
			}

			want := store.DocumentProcessing
			if tt.commit {
				want = store.DocumentProcessed
			}
			got, err := cache.Fetch(ctx, c, key, time.Hour, func(ctx context.Context) (store.Document, error) {
				return f.st.Document(ctx, id)
			})
			if err != nil || got.Status != want {
				t.Errorf("later Fetch = %q, %v; want %q", got.Status, err, want)
			}
		})
	}
}

// TestInvalidationAfterCommit holds the projector's commit (a deferred
// trigger waits on an advisory lock the test holds) and reads through the
// cache meanwhile. The reader sees the old row, as it must before the
// commit, and caches it; the invalidation must come after the commit and
// remove it. An invalidation before the commit would let this reader put
// the old row back for a whole TTL, and the version guard could not tell.
func TestInvalidationAfterCommit(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	ctx := t.Context()
	c := newCache(t, f.rdb)
	p, _ := f.projector(t, c, nil)
	id := events.NewID()
	key := store.DocumentKey(id)
	mustApply(t, p, events.NewID(), uploaded(id))

	const lockID = 4242
	for _, q := range []string{
		fmt.Sprintf(`CREATE FUNCTION hold_commit() RETURNS trigger LANGUAGE plpgsql AS $$
			BEGIN PERFORM pg_advisory_xact_lock(%d); RETURN NULL; END $$`, lockID),
		`CREATE CONSTRAINT TRIGGER hold_commit AFTER INSERT OR UPDATE ON documents
			DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION hold_commit()`,
	} {
		if _, err := f.db.ExecContext(ctx, q); err != nil {
			t.Fatalf("install commit hold: %v", err)
		}
	}
	conn, err := f.db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, "SELECT pg_advisory_lock($1)", lockID); err != nil {
		t.Fatal(err)
	}
	var unlockOnce sync.Once
	unlock := func() {
		unlockOnce.Do(func() {
			if _, err := conn.ExecContext(context.Background(), "SELECT pg_advisory_unlock($1)", lockID); err != nil {
				t.Errorf("unlock: %v", err)
			}
		})
	}
	defer unlock()

	applied := make(chan error, 1)
	go func() { applied <- apply(context.Background(), p, events.NewID(), processed(id)) }()
	waitFor(t, "commit held", func() bool {
		return f.count(t, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
			AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`) == 1
	})

	// Before the commit a reader loads, and caches, the old row.
	d, err := cache.Fetch(ctx, c, key, time.Hour, func(ctx context.Context) (store.Document, error) {
		return f.st.Document(ctx, id)
	})
	if err != nil || d.Status != store.DocumentProcessing {
		t.Fatalf("Fetch before the commit = %q, %v; want the old row", d.Status, err)
	}
	unlock()
	if err := <-applied; err != nil {
		t.Fatalf("Apply: %v", err)
	}

	var cached store.Document
	if err := c.Get(ctx, key, &cached); !errors.Is(err, cache.ErrMiss) {
		t.Errorf("cache holds %q, %v after the commit; want a miss", cached.Status, err)
	}
	d, err = cache.Fetch(ctx, c, key, time.Hour, func(ctx context.Context) (store.Document, error) {
		return f.st.Document(ctx, id)
	})
	if err != nil || d.Status != store.DocumentProcessed {
		t.Errorf("Fetch after the commit = %q, %v; want %q", d.Status, err, store.DocumentProcessed)
	}
}

// TestClose checks that Apply never hangs on a closed projector: a call
// made after Close, or one still queued when Close stopped the workers,
// returns an error instead of waiting for a worker that is gone. A call
// that returned nil was committed.
func TestClose(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	tests := []struct {
		name string
		// blocked: Close while events are queued behind busy workers.
		blocked bool
	}{
		{name: "apply after close"},
		{name: "close with queued events", blocked: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Not parallel: blockInbox holds a table lock on the shared
			// database.
			p, _ := f.projector(t, newCache(t, f.rdb), nil)
			// A liveness bound: a hung Apply fails the test instead of the
			// whole run.
			ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
			defer cancel()
			const n = 50
			ids, evs := make([]string, n), make([]events.Event, n)
			for i := range evs {
				ids[i], evs[i] = events.NewID(), uploaded(events.NewID())
			}
			var errs []error
			if tt.blocked {
				waiting, release := f.blockInbox(t)
				errs = make([]error, n)
				var wg sync.WaitGroup
				for i := range 2 {
					wg.Go(func() { errs[i] = apply(ctx, p, ids[i], evs[i]) })
					waitFor(t, "worker blocked", func() bool { return waiting() == i+1 })
				}
				wg.Go(func() { copy(errs[2:], applyConcurrently(ctx, p, ids[2:], evs[2:])) })
				waitFor(t, "events queued behind busy workers", func() bool { return p.Queued() == n-2 })
				closed := make(chan struct{})
				go func() { p.Close(); close(closed) }()
				release()
				<-closed
				wg.Wait()
			} else {
				p.Close()
				errs = applyConcurrently(ctx, p, ids, evs)
			}
			failed := 0
			for i, err := range errs {
				if errors.Is(err, context.DeadlineExceeded) {
					t.Fatalf("Apply %d hung on a closed projector", i)
				}
				if err != nil {
					failed++
					continue
				}
				if n := f.inboxRows(t, ids[i]); n != 1 {
					t.Errorf("Apply %d returned nil but the event is not committed", i)
				}
			}
			t.Logf("%d of %d calls failed", failed, n)
			// After Close no worker takes events. (With Close during work,
			// which queued events the workers still take is up to them.)
			if !tt.blocked && failed != n {
				t.Errorf("%d of %d calls after Close failed, want all", failed, n)
			}
		})
	}
}

// TestThroughRouter runs the projector behind a real router on Redis
// streams, with one event published twice under the same id. Every event
// is applied once, the duplicate is absorbed, and after a graceful stop
// nothing is left pending in the projector's group.
func TestThroughRouter(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	prefix := testenv.Prefix(t)
	p, reg := f.projector(t, newCache(t, f.rdb), nil)
	router, err := bus.NewRouter(bus.RouterConfig{
		Client:       f.rdb,
		Consumer:     "t1",
		StreamPrefix: prefix,
		DrainTimeout: 10 * time.Second,
		Logger:       discard,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Register(router); err != nil {
		t.Fatal(err)
	}
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: f.rdb, StreamPrefix: prefix, Logger: discard})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pub.Close() })

	docA, docB, mailC, mailD := events.NewID(), events.NewID(), events.NewID(), events.NewID()
	type publish struct {
		id string
		ev events.Event
	}
	upA, sentC := events.NewID(), events.NewID()
	before := []publish{
		{upA, uploaded(docA)},
		{events.NewID(), processed(docA)},
		{events.NewID(), docFailed(docB)}, // before its upload
		{events.NewID(), requested(mailC)},
		{sentC, sent(mailC)},
	}
	after := []publish{
		{upA, uploaded(docA)}, // the same event again
		{events.NewID(), uploaded(docB)},
		{sentC, sent(mailC)}, // the same event again
		{events.NewID(), mailFailed(mailD)},
		{events.NewID(), requested(mailD)},
	}
	ctx := t.Context()
	publishAll := func(ps []publish) {
		t.Helper()
		for _, pb := range ps {
			if _, err := pub.PublishEvent(ctx, pb.ev, bus.WithID(pb.id)); err != nil {
				t.Fatalf("publish %s: %v", pb.ev.EventType(), err)
			}
		}
	}
	// Published before the router starts, and while it runs: the groups
	// start at the beginning of each stream, so both are read.
	publishAll(before)
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	runErr := make(chan error, 1)
	go func() { runErr <- router.Run(runCtx) }()
	<-router.Running()
	publishAll(after)

	total := len(before) + len(after)
	waitFor(t, "every published entry handled", func() bool {
		return eventsSeen(t, reg, "applied")+eventsSeen(t, reg, "duplicate") >= total
	})
	stop()
	if err := <-runErr; err != nil {
		t.Errorf("router.Run after cancel = %v, want nil", err)
	}

	if got := eventsSeen(t, reg, "applied"); got != total-2 {
		t.Errorf("applied %d events, want %d", got, total-2)
	}
	if got := eventsSeen(t, reg, "duplicate"); got < 2 {
		t.Errorf("%d duplicates absorbed, want at least the 2 republished", got)
	}
	if n := f.count(t, "SELECT count(*) FROM processed_events"); n != total-2 {
		t.Errorf("%d inbox rows, want %d", n, total-2)
	}
	checks := []struct {
		name  string
		isDoc bool
		id    string
		want  string
	}{
		{"document processed", true, docA, store.DocumentProcessed},
		{"document failed before its upload", true, docB, store.DocumentFailed},
		{"email sent", false, mailC, store.EmailSent},
		{"email failed before its request", false, mailD, store.EmailFailed},
	}
	for _, c := range checks {
		switch r := f.row(t, c.isDoc, c.id).(type) {
		case store.Document:
			if r.Status != c.want || r.Filename.String != "report.txt" {
				t.Errorf("%s: %+v, want status %q with the upload's facts", c.name, r, c.want)
			}
		case store.Email:
			if r.Status != c.want || r.Subject.String != "Your document" {
				t.Errorf("%s: %+v, want status %q with the request's facts", c.name, r, c.want)
			}
			if c.id == mailC && r.Attempts != 2 {
				t.Errorf("%s: attempts %d, want 2", c.name, r.Attempts)
			}
		}
	}

	for _, typ := range events.Types() {
		stream := prefix + typ
		for _, s := range []string{stream, bus.RetryStream(stream, projector.Group)} {
			pending, err := f.rdb.XPending(context.Background(), s, projector.Group).Result()
			if err != nil {
				t.Errorf("XPENDING %s: %v", s, err)
				continue
			}
			if pending.Count != 0 {
				t.Errorf("%d entries left pending on %s", pending.Count, s)
			}
		}
	}
}

// TestCrossingBatchesDoNotDeadlock runs two projectors (two replicas) on one
// database with batches that write the same rows in crossing order: one
// batch uploads X and processes Y while another uploads Y and processes X.
// Rows are locked in one global order first, so no transaction deadlocks
// and no batch has to fall back to one-by-one.
func TestCrossingBatchesDoNotDeadlock(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	logs := &recorder{}
	c := newCache(t, f.rdb)
	p1, _ := f.projector(t, c, func(c *projector.Config) { c.Logger = slog.New(logs); c.MaxBatch = 8 })
	p2, _ := f.projector(t, c, func(c *projector.Config) { c.Logger = slog.New(logs); c.MaxBatch = 8 })
	const n = 100
	docs := make([]string, n)
	for i := range docs {
		docs[i] = events.NewID()
	}
	var ids1, ids2 []string
	var evs1, evs2 []events.Event
	for i := 0; i < n; i++ {
		x, y := docs[i], docs[(i+1)%n]
		ids1, evs1 = append(ids1, events.NewID(), events.NewID()), append(evs1, uploaded(x), processed(y))
		ids2, evs2 = append(ids2, events.NewID(), events.NewID()), append(evs2, uploaded(y), processed(x))
	}
	var wg sync.WaitGroup
	var errs1, errs2 []error
	wg.Go(func() { errs1 = applyConcurrently(context.Background(), p1, ids1, evs1) })
	wg.Go(func() { errs2 = applyConcurrently(context.Background(), p2, ids2, evs2) })
	wg.Wait()
	if err := errors.Join(append(errs1, errs2...)...); err != nil {
		t.Fatal(err)
	}
	if got := logs.find("batch transaction failed; applying it in halves"); got != nil {
		t.Fatalf("a batch failed (deadlock?): %v", got)
	}
	for _, id := range docs {
		d, err := f.st.Document(t.Context(), id)
		if err != nil || d.Status != store.DocumentProcessed || d.Filename.String == "" {
			t.Fatalf("document %s = %+v, %v", id, d, err)
		}
	}
}

// The projector keeps the id of a document's first upload event, which the
// stuck-document re-drive re-publishes under.
func TestUploadEventIDIsKept(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	p, _ := f.projector(t, newCache(t, f.rdb), nil)
	doc, first := events.NewID(), events.NewID()
	mustApply(t, p, first, uploaded(doc))
	mustApply(t, p, events.NewID(), uploaded(doc)) // republished under another id
	d, err := f.st.Document(t.Context(), doc)
	if err != nil {
		t.Fatal(err)
	}
	if d.UploadEventID.String != first {
		t.Fatalf("upload_event_id = %q, want the first upload event %s", d.UploadEventID.String, first)
	}
}

// A scheduled email shows "scheduled" with its send time until its request
// comes due; in whichever order the two events arrive, the request wins.
func TestScheduledEmails(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	p, _ := f.projector(t, newCache(t, f.rdb), nil)
	sendAt := at.Add(time.Hour)
	scheduled := func(id string) events.Event {
		return &events.EmailScheduled{EmailID: id, To: "a@example.com", Subject: "Later", SendAt: sendAt, ScheduledAt: at}
	}
	status := func(id string) (string, time.Time) {
		e, err := f.st.Email(t.Context(), id)
		if err != nil {
			t.Fatal(err)
		}
		return e.Status, e.SendAt.Time
	}
	inOrder := events.NewID()
	mustApply(t, p, events.NewID(), scheduled(inOrder))
	if s, when := status(inOrder); s != store.EmailScheduled || !when.Equal(sendAt) {
		t.Fatalf("after email.scheduled: %s, send_at %v", s, when)
	}
	mustApply(t, p, events.NewID(), requested(inOrder))
	if s, _ := status(inOrder); s != store.EmailQueued {
		t.Fatalf("after email.requested: %s, want queued", s)
	}
	mustApply(t, p, events.NewID(), sent(inOrder))
	if s, _ := status(inOrder); s != store.EmailSent {
		t.Fatalf("after email.sent: %s", s)
	}

	late := events.NewID() // the schedule's event arrives after the request
	mustApply(t, p, events.NewID(), requested(late))
	mustApply(t, p, events.NewID(), scheduled(late))
	if s, when := status(late); s != store.EmailQueued || !when.Equal(sendAt) {
		t.Fatalf("scheduled after requested: %s, send_at %v; want queued, with the send time kept", s, when)
	}
}
