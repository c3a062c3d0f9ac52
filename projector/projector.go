// Package projector keeps the Postgres read models (documents, emails) in
// step with the event streams. It is their only writer.
//
// Every event is applied in one transaction together with its inbox row, so
// a redelivered or duplicated event changes nothing twice (while the row is
// kept: the scheduler's inbox-retention deletes it after INBOX_RETENTION);
// statuses only move forward, so events may arrive in any order. Events
// handed to the projector at the same time are applied in one transaction
// (group commit) with multi-row upserts. Cache keys of the changed rows are
// deleted only after the commit. A row created by its first event
// (document.uploaded, email.requested, email.scheduled) has nothing cached,
// so its key is left alone.
//
// projector must not import api, handlers or Redis/Watermill packages: it
// gets events from bus and writes through store.
package projector

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/store"
)

// Group is the projector's consumer group.
const Group = "projector"

// Invalidator deletes cache entries made stale by a commit.
type Invalidator interface {
	Invalidate(ctx context.Context, keys ...string) error
}

// Config configures a Projector.
type Config struct {
	// Store is the database. Required.
	Store *store.Store
	// Cache gets the keys each commit made stale. Required.
	Cache Invalidator
	// MaxBatch bounds the events applied in one transaction. Defaults to 500.
	MaxBatch int
	// Workers is how many transactions may run at once. Defaults to 2.
	Workers int
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Registerer, if set, receives the projector's metrics.
	Registerer prometheus.Registerer
}

func (c *Config) setDefaults() {
	if c.MaxBatch == 0 {
		c.MaxBatch = 500
	}
	if c.Workers == 0 {
		c.Workers = 2
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Validate reports every configuration problem at once.
func (c *Config) Validate() error {
	var errs []error
	if c.Store == nil {
		errs = append(errs, errors.New("projector: Store is required"))
	}
	if c.Cache == nil {
		errs = append(errs, errors.New("projector: Cache is required"))
	}
	if c.MaxBatch < 1 || c.Workers < 1 {
		errs = append(errs, errors.New("projector: MaxBatch and Workers must be at least 1"))
	}
	return errors.Join(errs...)
}

// Projector applies events to the read models.
type Projector struct {
	cfg   Config
	log   *slog.Logger
	items chan *item
	stop  chan struct{}
	wg    sync.WaitGroup
	once  sync.Once
	// mu guards closed. Apply holds it shared while it queues an event, so
	// once Close has set closed, no event joins the queue and Close can
	// answer every event left in it.
	mu     sync.RWMutex
	closed bool

	batchSize prometheus.Histogram
	applied   *prometheus.CounterVec
}

type item struct {
	ctx  context.Context
	id   string
	ev   events.Event
	key  string      // cacheKey(ev)
	done func(error) // called once, by the worker that takes it or by Close
}

// New starts a Projector's workers. Close stops them.
func New(cfg Config) (*Projector, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	p := &Projector{
		cfg:   cfg,
		log:   cfg.Logger.With("consumer_group", Group),
		items: make(chan *item, cfg.MaxBatch),
		stop:  make(chan struct{}),
		batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "conveyor_projector_batch_size",
			Help:    "Events applied per projector transaction.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 10),
		}),
		applied: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "conveyor_projector_events_total",
			Help: "Events seen by the projector, by result (applied or duplicate).",
		}, []string{"result"}),
	}
	if cfg.Registerer != nil {
		cfg.Registerer.MustRegister(p.batchSize, p.applied)
	}
	for i := 0; i < cfg.Workers; i++ {
		p.wg.Add(1)
		go p.work()
	}
	return p, nil
}

// Close stops the workers after the current transactions. Apply calls
// whose events no worker took by then return an error rather than wait:
// the events are not applied, and their redelivery is.
func (p *Projector) Close() {
	p.once.Do(func() {
		p.mu.Lock()
		p.closed = true
		p.mu.Unlock()
		close(p.stop)
		p.wg.Wait()
		// No worker and no new sender is left: answer what is queued.
		for len(p.items) > 0 {
			(<-p.items).done(errClosed)
		}
	})
}

// errClosed is returned by Apply once the projector is closed. It is not
// permanent: the event is redelivered to the next projector.
var errClosed = errors.New("projector closed")

// Register adds the projector's handlers, one per event type, all in the
// consumer group "projector". They hand events over with ApplyAsync, so the
// router's workers never wait for a commit: the in-flight window bounds the
// events being applied, and a batch's events are acked as it commits.
func (p *Projector) Register(r *bus.Router, opts ...bus.HandlerOption) error {
	return errors.Join(
		handle[events.DocumentUploaded](r, p, opts),
		handle[events.DocumentProcessed](r, p, opts),
		handle[events.DocumentProcessingFailed](r, p, opts),
		handle[events.EmailRequested](r, p, opts),
		handle[events.EmailScheduled](r, p, opts),
		handle[events.EmailSent](r, p, opts),
		handle[events.EmailFailed](r, p, opts),
	)
}

// handle registers p's handler of event type P.
func handle[E any, P interface {
	*E
	events.Event
}](r *bus.Router, p *Projector, opts []bus.HandlerOption) error {
	return bus.HandleAsync(r, Group, func(ctx context.Context, ev P, done func(error)) { p.ApplyAsync(ctx, ev, done) }, opts...)
}

// Apply applies one event, identified by the envelope in ctx, and returns
// once it is committed (or was applied before) and the cache key of its row
// is invalidated, unless the event created the row. Concurrent calls share
// transactions. If ctx ends first, it returns ctx's error; the transaction
// may still commit, and a redelivery is then a harmless duplicate.
func (p *Projector) Apply(ctx context.Context, ev events.Event) error {
	res := make(chan error, 1)
	p.ApplyAsync(ctx, ev, func(err error) { res <- err })
	select {
	case err := <-res:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ApplyAsync is Apply without the wait: it queues ev and calls done once
// with what Apply would return, from the worker that applies the batch (or
// at once, if ev cannot be queued). done should return quickly: a worker
// answers a whole batch in turn. A call may block while the queue is full,
// unless ctx ends. An event whose ctx has ended when a worker takes it is
// answered with ctx's error and not applied.
func (p *Projector) ApplyAsync(ctx context.Context, ev events.Event, done func(error)) {
	env, ok := bus.EnvelopeFrom(ctx)
	if !ok || env.ID == "" {
		done(bus.Permanent(errors.New("projector: event without an envelope id cannot be deduplicated")))
		return
	}
	// Every queued event is answered: by the worker that takes it, or by
	// Close.
	it := &item{ctx: ctx, id: env.ID, ev: ev, key: cacheKey(ev), done: done}
	p.mu.RLock()
	if p.closed {
		p.mu.RUnlock()
		done(errClosed)
		return
	}
	select {
	case p.items <- it: // the common case, without a full select
	default:
		select {
		case p.items <- it:
		case <-ctx.Done():
			p.mu.RUnlock()
			done(ctx.Err())
			return
		}
	}
	p.mu.RUnlock()
}

func (p *Projector) work() {
	defer p.wg.Done()
	batch := make([]*item, 0, p.cfg.MaxBatch)
	for {
		batch = batch[:0]
		select {
		case it := <-p.items:
			batch = append(batch, it)
		case <-p.stop:
			return
		}
	fill:
		for len(batch) < p.cfg.MaxBatch {
			select {
			case it := <-p.items:
				batch = append(batch, it)
			default:
				break fill
			}
		}
		p.run(batch)
	}
}

// run applies a batch. If the batch transaction fails, the batch is
// applied again in halves, each as run applies a batch: a half that fails
// is halved again, down to single events. So one bad event cannot fail the
// events it happened to share a batch with, and it costs about 2·log2(n)
// transactions of a batch of n, not n.
func (p *Projector) run(batch []*item) {
	live := batch[:0:0]
	for _, it := range batch {
		if err := it.ctx.Err(); err != nil {
			it.done(err)
			continue
		}
		live = append(live, it)
	}
	if len(live) == 0 {
		return
	}
	err := p.applyBatch(live)
	var inv *invalidationError
	if errors.As(err, &inv) {
		// Committed, but the cache still holds some of the rows as they
		// were: the events that changed them fail, and their redelivery
		// (a duplicate) invalidates again. The others are done.
		for _, it := range live {
			if inv.stale[it.key] {
				it.done(err)
			} else {
				it.done(nil)
			}
		}
		return
	}
	if err == nil || len(live) == 1 {
		for _, it := range live {
			it.done(permanentIfData(err))
		}
		return
	}
	p.log.Warn("batch transaction failed; applying it in halves", "events", len(live), "error", err)
	// An event whose handler timed out meanwhile is not applied again: run
	// ends its delivery now, not after another try. Halves keep the
	// order, so events of one row still apply in the order they came.
	mid := len(live) / 2
	p.run(live[:mid])
	p.run(live[mid:])
}

// permanentIfData marks a single event's failure permanent when Postgres
// refused its data: a retry would be refused too, so it goes to the
// dead-letter stream at once.
func permanentIfData(err error) error {
	if store.IsDataError(err) {
		return bus.Permanent(err)
	}
	return err
}

func (p *Projector) applyBatch(items []*item) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	entries := make([]store.InboxEntry, len(items))
	for i, it := range items {
		entries[i] = store.InboxEntry{EventID: it.id, EventType: it.ev.EventType()}
	}
	// One total order of event ids (no folding, no stability needed).
	slices.SortFunc(entries, func(a, b store.InboxEntry) int { return strings.Compare(a.EventID, b.EventID) })
	// Keys of every row the batch may write, locked first in one global
	// order, so concurrent batches (other workers, other replicas) never
	// deadlock on rows they both touch.
	keys := make([]string, 0, len(items))
	for _, it := range items {
		keys = append(keys, it.key)
	}
	var fresh map[string]bool
	var stale []string // keys to invalidate after the commit
	err := p.cfg.Store.WithTx(ctx, func(tx *store.Tx) error {
		var err error
		if fresh, err = tx.LockAndInbox(ctx, keys, entries); err != nil {
			return err
		}
		var b byType
		seen := map[string]bool{}
		for _, it := range items {
			// Two copies of one event in a batch: apply it once.
			if fresh[it.id] && !seen[it.id] {
				seen[it.id] = true
				b.add(it.ev, it.id)
			}
		}
		if err := b.apply(ctx, tx); err != nil {
			return err
		}
		// The key of a row this transaction inserted is not invalidated:
		// nothing can be cached for a row that did not exist (the api
		// caches only rows it read). In a steady flow that is half of the
		// invalidations, since each email's or document's first event
		// inserts its row.
		stale = keys[:0:0]
		for _, k := range keys {
			if !tx.Created(k) {
				stale = append(stale, k)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("apply %d events: %w", len(items), err)
	}
	p.batchSize.Observe(float64(len(items)))
	p.applied.WithLabelValues("applied").Add(float64(len(fresh)))
	p.applied.WithLabelValues("duplicate").Add(float64(len(items) - len(fresh)))

	// Keys of duplicates are invalidated too: if an invalidation failed
	// after an earlier commit, the redelivery repairs the cache.
	if err := p.cfg.Cache.Invalidate(ctx, stale...); err != nil {
		inv := &invalidationError{stale: make(map[string]bool, len(stale)), err: err}
		for _, k := range stale {
			inv.stale[k] = true
		}
		return inv
	}
	return nil
}

// invalidationError is applyBatch's error when the batch was committed but
// the invalidation of its stale keys failed: the batch must not be applied
// again one event at a time, and the events whose keys were not stale are
// done.
type invalidationError struct {
	stale map[string]bool
	err   error
}

func (e *invalidationError) Error() string {
	return "invalidate cache after commit: " + e.err.Error()
}

func (e *invalidationError) Unwrap() error { return e.err }

// cacheKey is the key of the row ev writes. A UUID may arrive in capitals;
// the api reads and caches under the lowercase form, as PostgreSQL returns
// it, so the key uses that form too.
func cacheKey(ev events.Event) string {
	switch e := ev.(type) {
	case *events.DocumentUploaded:
		return store.DocumentKey(strings.ToLower(e.DocID))
	case *events.DocumentProcessed:
		return store.DocumentKey(strings.ToLower(e.DocID))
	case *events.DocumentProcessingFailed:
		return store.DocumentKey(strings.ToLower(e.DocID))
	case *events.EmailRequested:
		return store.EmailKey(strings.ToLower(e.EmailID))
	case *events.EmailScheduled:
		return store.EmailKey(strings.ToLower(e.EmailID))
	case *events.EmailSent:
		return store.EmailKey(strings.ToLower(e.EmailID))
	case *events.EmailFailed:
		return store.EmailKey(strings.ToLower(e.EmailID))
	}
	return ""
}

// byType groups a batch's new events by type, to apply each type with one
// statement.
type byType struct {
	uploaded []*events.DocumentUploaded
	// uploadedIDs[i] is the event id of uploaded[i].
	uploadedIDs []string
	processed   []*events.DocumentProcessed
	failed      []*events.DocumentProcessingFailed
	requested   []*events.EmailRequested
	scheduled   []*events.EmailScheduled
	sent        []*events.EmailSent
	mailFail    []*events.EmailFailed
}

func (b *byType) add(ev events.Event, id string) {
	switch e := ev.(type) {
	case *events.DocumentUploaded:
		b.uploaded = append(b.uploaded, e)
		b.uploadedIDs = append(b.uploadedIDs, id)
	case *events.DocumentProcessed:
		b.processed = append(b.processed, e)
	case *events.DocumentProcessingFailed:
		b.failed = append(b.failed, e)
	case *events.EmailRequested:
		b.requested = append(b.requested, e)
	case *events.EmailScheduled:
		b.scheduled = append(b.scheduled, e)
	case *events.EmailSent:
		b.sent = append(b.sent, e)
	case *events.EmailFailed:
		b.mailFail = append(b.mailFail, e)
	}
}

// apply runs the statements in a fixed order, each over rows sorted by key.
// The rows' keys are already locked (Tx.LockAndInbox), which is what prevents
// deadlocks between concurrent batches.
func (b *byType) apply(ctx context.Context, tx *store.Tx) error {
	sort.Stable(uploadsByDoc{b})
	sortBy(b.processed, func(e *events.DocumentProcessed) string { return e.DocID })
	sortBy(b.failed, func(e *events.DocumentProcessingFailed) string { return e.DocID })
	sortBy(b.requested, func(e *events.EmailRequested) string { return e.EmailID })
	sortBy(b.scheduled, func(e *events.EmailScheduled) string { return e.EmailID })
	sortBy(b.sent, func(e *events.EmailSent) string { return e.EmailID })
	sortBy(b.mailFail, func(e *events.EmailFailed) string { return e.EmailID })
	if len(b.uploaded) > 0 {
		if err := tx.ApplyDocumentsUploaded(ctx, b.uploaded, b.uploadedIDs); err != nil {
			return err
		}
	}
	if len(b.processed) > 0 {
		if err := tx.ApplyDocumentsProcessed(ctx, b.processed); err != nil {
			return err
		}
	}
	if len(b.failed) > 0 {
		if err := tx.ApplyDocumentsFailed(ctx, b.failed); err != nil {
			return err
		}
	}
	if len(b.scheduled) > 0 {
		if err := tx.ApplyEmailsScheduled(ctx, b.scheduled); err != nil {
			return err
		}
	}
	if len(b.requested) > 0 {
		if err := tx.ApplyEmailsRequested(ctx, b.requested); err != nil {
			return err
		}
	}
	if len(b.sent) > 0 {
		if err := tx.ApplyEmailsSent(ctx, b.sent); err != nil {
			return err
		}
	}
	if len(b.mailFail) > 0 {
		if err := tx.ApplyEmailsFailed(ctx, b.mailFail); err != nil {
			return err
		}
	}
	return nil
}

// sortBy sorts s by key, ignoring case as the store does when it groups a
// row's events, and stably: events of one row stay in the order they came
// in, the order the store applies them in.
func sortBy[T any](s []T, key func(T) string) {
	slices.SortStableFunc(s, func(a, b T) int { return compareFold(key(a), key(b)) })
}

// compareFold compares a and b as strings.Compare does their ASCII
// lowercase forms, without making them: a sort calls it thousands of
// times per batch (strings.ToLower there cost 2.8 µs per event).
func compareFold(a, b string) int {
	for i := 0; i < len(a) && i < len(b); i++ {
		x, y := a[i], b[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			if x < y {
				return -1
			}
			return 1
		}
	}
	return len(a) - len(b)
}

// uploadsByDoc sorts uploads and their event ids together by document.
type uploadsByDoc struct{ b *byType }

func (u uploadsByDoc) Len() int { return len(u.b.uploaded) }
func (u uploadsByDoc) Less(i, j int) bool {
	return compareFold(u.b.uploaded[i].DocID, u.b.uploaded[j].DocID) < 0
}
func (u uploadsByDoc) Swap(i, j int) {
	u.b.uploaded[i], u.b.uploaded[j] = u.b.uploaded[j], u.b.uploaded[i]
	u.b.uploadedIDs[i], u.b.uploadedIDs[j] = u.b.uploadedIDs[j], u.b.uploadedIDs[i]
}
