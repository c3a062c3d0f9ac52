package bus

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/events"
)

// PublisherConfig configures a Publisher.
type PublisherConfig struct {
	// Client is the Redis holding the streams. Required. Close never closes
	// it: its owner does, after closing the Publisher. A single-node
	// *redis.Client (without an OnConnect hook, streaming credentials or a
	// Limiter) is used for its options: each pipeline appends over a
	// connection of its own, outside the client's pool and unseen by its
	// hooks, and through the client only when that connection cannot be
	// used. Such a connection is dialled only while the client is open, and
	// kept until Close.
	Client redis.UniversalClient
	// Source names the publishing program in the envelope. Defaults to
	// "conveyor".
	Source string
	// StreamPrefix is put before every event type to name its stream.
	// Defaults to "" (the stream is the wire name). Tests use it to isolate
	// themselves.
	StreamPrefix string
	// MaxBatch bounds how many concurrent publishes go into one pipelined
	// round trip. Defaults to 512.
	MaxBatch int
	// Pipelines is how many pipelined round trips may be in flight at once
	// (each over a connection of its own, see Client). Defaults to 4.
	Pipelines int
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Metrics, if set, counts publishes.
	Metrics *Metrics
}

func (c *PublisherConfig) setDefaults() {
	if c.Source == "" {
		c.Source = "conveyor"
	}
	if c.MaxBatch == 0 {
		c.MaxBatch = 512
	}
	if c.Pipelines == 0 {
		c.Pipelines = 4
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Validate reports every configuration problem at once.
func (c *PublisherConfig) Validate() error {
	var errs []error
	if c.Client == nil {
		errs = append(errs, errors.New("publisher: Client is required"))
	}
	if c.MaxBatch < 1 {
		errs = append(errs, errors.New("publisher: MaxBatch must be at least 1"))
	}
	if c.Pipelines < 1 {
		errs = append(errs, errors.New("publisher: Pipelines must be at least 1"))
	}
	return errors.Join(errs...)
}

// Publisher appends events to their streams. Concurrent publishes are
// coalesced into pipelined XADDs: while one round trip is in flight, the
// next requests queue and leave together, so batching adds no timer delay
// and a lone publish goes out at once.
//
// A publish returns only after Redis acknowledged the XADD: accepted means
// written (with the durability of the Redis AOF setting).
type Publisher struct {
	cfg     PublisherConfig
	reqs    chan *pubReq
	closed  chan struct{}
	once    sync.Once
	workers sync.WaitGroup
	// mu orders submits before Close: a request is either queued while the
	// workers still run, or refused.
	mu       sync.RWMutex
	isClosed bool
	// noncePrefix and nonces make the nonces of onceNonce.
	noncePrefix string
	nonces      atomic.Uint64
}

type pubReq struct {
	ctx    context.Context
	stream string
	fields []any
	// onceKey, if set, makes the append conditional: it happens only if
	// this marker key is absent, and sets it, in one atomic step.
	onceKey string
	onceTTL time.Duration
	// onceNonce names this publish in its marker (see onceNonce): every
	// send of this request, over the own connection or through go-redis,
	// carries the same one.
	onceNonce string
	id        string // resulting entry id
	err       error
	done      chan struct{}
}

var pubReqPool = sync.Pool{New: func() any { return &pubReq{done: make(chan struct{}, 1)} }}

// NewPublisher starts a Publisher.
func NewPublisher(cfg PublisherConfig) (*Publisher, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	p := &Publisher{cfg: cfg, reqs: make(chan *pubReq, cfg.MaxBatch*cfg.Pipelines), closed: make(chan struct{})}
	var prefix [12]byte
	_, _ = rand.Read(prefix[:]) // never fails (crypto/rand)
	p.noncePrefix = base64.RawURLEncoding.EncodeToString(prefix[:]) + ":"
	for i := 0; i < cfg.Pipelines; i++ {
		p.workers.Add(1)
		go p.work()
	}
	return p, nil
}

// onceNonce returns a new nonce for one publish made with WithOnce. Its
// marker holds it, so that the once-scripts can tell the same call run
// again (the Redis client sends a command again when a connection broke
// after Redis ran it, and flushOwn hands go-redis the appends whose replies
// it did not read) from another call with the same id: the first succeeds
// as the first run did, adding nothing; only the second is refused with
// ErrAlreadyPublished. A random prefix per Publisher and a counter make it
// unique across processes without a random read per publish.
func (p *Publisher) onceNonce() string {
	return p.noncePrefix + strconv.FormatUint(p.nonces.Add(1), 36)
}

// ErrPublisherClosed is returned by publishes after Close.
var ErrPublisherClosed = errors.New("publisher closed")

// Stream returns the stream name for an event type.
func (p *Publisher) Stream(eventType string) string { return p.cfg.StreamPrefix + eventType }

// Publish implements message.Publisher: it appends msgs to the stream topic
// and returns when all are written.
func (p *Publisher) Publish(topic string, msgs ...*message.Message) error {
	reqs := make([]*pubReq, 0, len(msgs))
	var firstErr error
	for _, msg := range msgs {
		fields, err := marshalFields(msg)
		if err != nil {
			firstErr = fmt.Errorf("publish %s to %s: %w", msg.UUID, topic, err)
			break
		}
		r, err := p.submit(msg.Context(), topic, fields)
		if err != nil {
			firstErr = fmt.Errorf("publish %s to %s: %w", msg.UUID, topic, err)
			break
		}
		reqs = append(reqs, r)
	}
	for i, r := range reqs {
		<-r.done
		if r.err != nil && firstErr == nil {
			firstErr = fmt.Errorf("publish %s to %s: %w", msgs[i].UUID, topic, r.err)
		}
		pubReqPool.Put(r)
	}
	return firstErr
}

func (p *Publisher) submit(ctx context.Context, stream string, fields []any) (*pubReq, error) {
	return p.submitOnce(ctx, stream, fields, "", 0)
}

// submitOnce submits an append that is conditional on OnceKey(stream, id)
// when ttl > 0.
func (p *Publisher) submitOnce(ctx context.Context, stream string, fields []any, id string, ttl time.Duration) (*pubReq, error) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.isClosed {
		return nil, ErrPublisherClosed
	}
	r := pubReqPool.Get().(*pubReq)
	r.ctx, r.stream, r.fields, r.id, r.err = ctx, stream, fields, "", nil
	r.onceKey, r.onceTTL, r.onceNonce = "", 0, ""
	if ttl > 0 {
		r.onceKey, r.onceTTL, r.onceNonce = OnceKey(stream, id), ttl, p.onceNonce()
	}
	select {
	case p.reqs <- r:
		return r, nil
	case <-ctx.Done():
		pubReqPool.Put(r)
		return nil, ctx.Err()
	}
}

func (p *Publisher) work() {
	defer p.workers.Done()
	batch := make([]*pubReq, 0, p.cfg.MaxBatch)
	cmds := make([]redis.Cmder, 0, p.cfg.MaxBatch)
	// Each worker writes over a connection of its own where it can (see
	// flushOwn), and through go-redis otherwise.
	conn := newReadConn(p.cfg.Client)
	if conn != nil {
		defer conn.close()
	}
	for {
		batch = batch[:0]
		select {
		case r := <-p.reqs:
			batch = append(batch, r)
		case <-p.closed:
			// Close waits for senders to stop, so draining now finishes
			// every accepted request.
			for {
				select {
				case r := <-p.reqs:
					p.flush(append(batch[:0], r), cmds, conn)
				default:
					return
				}
			}
		}
	fill:
		for len(batch) < p.cfg.MaxBatch {
			select {
			case r := <-p.reqs:
				batch = append(batch, r)
			default:
				break fill
			}
		}
		p.flush(batch, cmds, conn)
	}
}

func (p *Publisher) flush(batch []*pubReq, cmds []redis.Cmder, conn *readConn) {
	live := batch[:0:0]
	for _, r := range batch {
		if err := r.ctx.Err(); err != nil {
			r.err = err
			r.done <- struct{}{}
			continue
		}
		live = append(live, r)
	}
	// One deadline for the whole batch, whichever way it is sent.
	deadline := time.Now().Add(replyTimeout)
	if conn != nil {
		live = p.flushOwn(live, conn, deadline)
	}
	if len(live) == 0 {
		return
	}
	cmds = cmds[:0]
	pipe := p.cfg.Client.Pipeline()
	bg := context.Background()
	for _, r := range live {
		if r.onceKey != "" {
			args := append([]any{r.onceTTL.Milliseconds(), r.onceNonce}, r.fields...)
			cmds = append(cmds, publishOnceScript.Eval(bg, pipe, []string{r.onceKey, r.stream}, args...))
		} else {
			cmds = append(cmds, pipe.XAdd(bg, &redis.XAddArgs{Stream: r.stream, Values: r.fields}))
		}
	}
	// The pipeline is not bound to any one request's context: once sent,
	// an XADD may have happened, and the caller must learn its outcome.
	ctx, cancel := context.WithDeadline(bg, deadline)
	_, _ = pipe.Exec(ctx)
	cancel()
	for i, r := range live {
		switch c := cmds[i].(type) {
		case *redis.StringCmd:
			r.id, r.err = c.Result()
		case *redis.Cmd:
			var n int64
			if n, r.err = c.Int64(); r.err == nil && n == 0 {
				r.err = ErrAlreadyPublished
			}
		}
		p.finish(r)
	}
}

// flushOwn writes the appends of live over the worker's own connection, in
// one write, and finishes each request whose reply it reads. That saves
// go-redis's per-command work (a command value and an argument list per
// append, its reply reader, its pool). It returns the requests it did not
// finish, for go-redis to send:
//   - all of them if the connection cannot be set up (or the client is
//     closed: go-redis then fails them), or a field is of a type it does not
//     write;
//   - those whose reply says Redis did not run them and go-redis would send
//     them again (READONLY after a failover, LOADING, the client limit, ...;
//     see notRun): the connection is then closed, and publishes go through
//     go-redis for a while, which finds the new master;
//   - after an I/O error (which closes the connection), those whose replies
//     it did not read. Those may have been appended already: go-redis sends
//     them again, as it does itself when a connection breaks under a
//     pipeline (see MaybeWritten), and so at most one attempt more than the
//     client's MaxRetries allows. A client whose retries are off gets the
//     error instead.
func (p *Publisher) flushOwn(live []*pubReq, conn *readConn, deadline time.Time) []*pubReq {
	if len(live) == 0 {
		return nil
	}
	bg := context.Background()
	if conn.dialDue() && clientClosed(p.cfg.Client) {
		return live
	}
	if !conn.readyLogged(bg, p.cfg.Logger, "own publish connection to Redis could not be set up; publishing through the client's pool for now") {
		return live
	}
	conn.wbuf = conn.wbuf[:0]
	for _, r := range live {
		if !conn.appendPublish(r) {
			return live
		}
	}
	now := time.Now()
	writeBy, readBy := deadline, deadline
	if wt := conn.opt.WriteTimeout; wt > 0 && now.Add(wt).Before(writeBy) {
		writeBy = now.Add(wt)
	}
	if rt := conn.opt.ReadTimeout; rt > 0 && now.Add(rt).Before(readBy) {
		readBy = now.Add(rt)
	}
	if err := conn.send(writeBy, readBy); err != nil {
		conn.close()
		return live
	}
	var rest []*pubReq
	for i, r := range live {
		if err := conn.readReply(); err != nil {
			conn.close()
			if conn.opt.MaxRetries > 0 {
				return append(rest, live[i:]...)
			}
			for _, r := range live[i:] {
				r.err = err
				p.finish(r)
			}
			return rest
		}
		id, err := conn.publishReply(r.onceKey != "")
		if notRun(err) && conn.opt.MaxRetries > 0 {
			rest = append(rest, r)
			continue
		}
		r.id, r.err = id, err
		p.finish(r)
	}
	if len(rest) > 0 {
		conn.backOff()
	}
	conn.trim()
	return rest
}

// notRun reports whether an error reply says that Redis did not run the
// command, for a reason go-redis retries on: a replica (after a failover
// that a name or a proxy hides), a dataset still loading, a master down or
// without enough replicas, a cluster down, a busy slot, or the client limit.
func notRun(err error) bool {
	re, ok := err.(replyError) // as publishReply returns it, unwrapped
	if !ok {
		return false
	}
	msg := string(re)
	for _, prefix := range [...]string{"READONLY ", "LOADING ", "MASTERDOWN ", "NOREPLICAS ", "CLUSTERDOWN ", "TRYAGAIN ", "ERR max number of clients"} {
		if strings.HasPrefix(msg, prefix) {
			return true
		}
	}
	return false
}

// cancelled is a context that is done, for clientClosed.
var cancelled = func() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	return ctx
}()

// clientClosed reports whether client was closed, without any I/O: a
// command with a done context fails with redis.ErrClosed on a closed client
// (the pool checks that first) and with the context's error otherwise. It
// runs before each dial of an own connection only: the client's hooks see
// that PING, which is why it is not run for every batch.
func clientClosed(client redis.UniversalClient) bool {
	return errors.Is(client.Ping(cancelled).Err(), redis.ErrClosed)
}

// finish counts a publish and hands its outcome to its caller.
func (p *Publisher) finish(r *pubReq) {
	if p.cfg.Metrics != nil && !errors.Is(r.err, ErrAlreadyPublished) {
		p.cfg.Metrics.published(r.stream, r.err)
	}
	r.done <- struct{}{}
}

// MaybeWritten reports whether a publish that failed with err may still
// have appended its entry. Only failures before anything was sent are sure
// (the request's context ended while it waited, the publisher or its
// client was closed, no pooled connection was free): the Redis client
// retries a command whose connection broke, so even an error that Redis
// itself answered may follow an attempt that was written and lost its
// reply. For a publish made with WithOnce, [Publisher.Published] then
// tells what happened.
func MaybeWritten(err error) bool {
	return err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, ErrPublisherClosed) &&
		!errors.Is(err, redis.ErrClosed) && !errors.Is(err, redis.ErrPoolTimeout) && !errors.Is(err, redis.ErrPoolExhausted)
}

// Published reports whether the event with id was appended to the stream
// of eventType by a publish made with WithOnce (whose marker is still
// within its TTL). It settles the outcome of such a publish that failed
// with an error after which [MaybeWritten] is true.
func (p *Publisher) Published(ctx context.Context, eventType, id string) (bool, error) {
	n, err := p.cfg.Client.Exists(ctx, OnceKey(p.Stream(eventType), id)).Result()
	if err != nil {
		return false, fmt.Errorf("check whether %s was published: %w", id, err)
	}
	return n == 1, nil
}

// ErrAlreadyPublished is returned by a publish with WithOnce whose key was
// used before by another call: nothing was appended. The same call sent
// again (a retry of a command whose reply was lost) is not refused: it
// reports the success of its first run.
var ErrAlreadyPublished = errors.New("already published")

// Close stops the publisher after in-flight publishes finished. It does not
// close the Redis client.
func (p *Publisher) Close() error {
	p.once.Do(func() {
		p.mu.Lock()
		p.isClosed = true
		p.mu.Unlock()
		close(p.closed)
		p.workers.Wait()
	})
	return nil
}

// PublishOption adjusts one publish.
type PublishOption func(*publishOptions)

type publishOptions struct {
	id            string
	correlationID string
	occurredAt    time.Time
	once          time.Duration
}

// WithOnce publishes the event only if no publish with the same event id
// (give one with WithID) was made on its stream within ttl; otherwise the
// publish returns ErrAlreadyPublished. The check and the append are one
// atomic step in Redis, so a crash or outage in between cannot leave a
// mark without its event, or the reverse.
func WithOnce(ttl time.Duration) PublishOption { return func(o *publishOptions) { o.once = ttl } }

func onceOf(opts []PublishOption) time.Duration {
	var o publishOptions
	for _, opt := range opts {
		opt(&o)
	}
	return o.once
}

// WithID sets the event id instead of a new UUIDv7; use events.DerivedID for
// follow-up events so a redelivered cause republishes the same id.
func WithID(id string) PublishOption { return func(o *publishOptions) { o.id = id } }

// WithCorrelationID sets the correlation id (default: the one of the event
// being handled, else the new event's own id).
func WithCorrelationID(id string) PublishOption {
	return func(o *publishOptions) { o.correlationID = id }
}

// WithOccurredAt sets when the fact happened (default: now).
func WithOccurredAt(t time.Time) PublishOption { return func(o *publishOptions) { o.occurredAt = t } }

// NewMessage builds the Watermill message for ev with the full envelope. If
// ctx carries the envelope of an event being handled, the new event records
// it as its cause and shares its correlation id.
func (p *Publisher) NewMessage(ctx context.Context, ev events.Event, opts ...PublishOption) (*message.Message, error) {
	id, md, payload, err := p.envelope(ctx, ev, opts)
	if err != nil {
		return nil, err
	}
	msg := message.NewMessage(id, payload)
	msg.Metadata = md.toMap()
	return msg, nil
}

// metaPairs is an event's metadata as key/value pairs, each key once:
// publishing encodes it as it is, without building a map. envelope sets at
// most 8 keys; kv has room for 10, and add panics (index out of range)
// beyond that, which every publish test would show.
type metaPairs struct {
	kv [20]string
	n  int
}

func (m *metaPairs) add(k, v string) {
	m.kv[m.n], m.kv[m.n+1] = k, v
	m.n += 2
}

func (m *metaPairs) toMap() message.Metadata {
	md := make(message.Metadata, m.n/2)
	for i := 0; i < m.n; i += 2 {
		md[m.kv[i]] = m.kv[i+1]
	}
	return md
}

// envelope builds an event's id, metadata and payload.
func (p *Publisher) envelope(ctx context.Context, ev events.Event, opts []PublishOption) (string, metaPairs, []byte, error) {
	var o publishOptions
	for _, opt := range opts {
		opt(&o)
	}
	if o.id == "" {
		o.id = events.NewID()
	}
	if o.occurredAt.IsZero() {
		o.occurredAt = time.Now()
	}
	var md metaPairs
	payload, err := marshalJSON(ev)
	if err != nil {
		return "", md, nil, fmt.Errorf("marshal %s: %w", ev.EventType(), err)
	}
	md.add(MetaEventID, o.id) // also the message UUID; the envelope names it too
	md.add(MetaEventType, ev.EventType())
	md.add(MetaEventVersion, strconv.Itoa(ev.EventVersion()))
	md.add(MetaOccurredAt, o.occurredAt.UTC().Format(time.RFC3339Nano))
	md.add(MetaSource, p.cfg.Source)
	cause, hasCause := EnvelopeFrom(ctx)
	switch {
	case o.correlationID != "":
		md.add(MetaCorrelationID, o.correlationID)
	case hasCause && cause.CorrelationID != "":
		md.add(MetaCorrelationID, cause.CorrelationID)
	default:
		md.add(MetaCorrelationID, o.id)
	}
	if hasCause {
		md.add(MetaCausationID, cause.ID)
	}
	// The traceparent of ctx (an incoming request) wins over the cause's.
	tp := traceparentFrom(ctx)
	if tp == "" && hasCause {
		tp = cause.Traceparent
	}
	if tp != "" {
		md.add(MetaTraceparent, tp)
	}
	return o.id, md, payload, nil
}

// eventFields builds the stream entry of ev without a Watermill message,
// which publishing does not need.
func (p *Publisher) eventFields(ctx context.Context, ev events.Event, opts []PublishOption) (string, []any, error) {
	id, md, payload, err := p.envelope(ctx, ev, opts)
	if err != nil {
		return "", nil, err
	}
	return id, []any{fieldUUID, id, fieldMetadata, encodePairs(md.kv[:md.n]), fieldPayload, payload}, nil
}

// PublishEvent validates ev and appends it to its stream. It returns the
// event id once Redis has acknowledged the write.
func (p *Publisher) PublishEvent(ctx context.Context, ev events.Event, opts ...PublishOption) (string, error) {
	if err := ev.Validate(); err != nil {
		return "", fmt.Errorf("publish %s: %w", ev.EventType(), err)
	}
	id, fields, err := p.eventFields(ctx, ev, opts)
	if err != nil {
		return "", err
	}
	stream := p.Stream(ev.EventType())
	r, err := p.submitOnce(ctx, stream, fields, id, onceOf(opts))
	if err != nil {
		return "", fmt.Errorf("publish %s to %s: %w", id, stream, err)
	}
	<-r.done
	err = r.err
	pubReqPool.Put(r)
	if errors.Is(err, ErrAlreadyPublished) {
		return id, err
	}
	if err != nil {
		return "", fmt.Errorf("publish %s to %s: %w", id, stream, err)
	}
	return id, nil
}

// PublishResult is the outcome of one event of PublishBatch.
type PublishResult struct {
	ID  string
	Err error
}

// PublishBatch appends many events at once, each independently: every
// result with a nil Err is durable, the others were not written.
func (p *Publisher) PublishBatch(ctx context.Context, evs []events.Event, opts [][]PublishOption) []PublishResult {
	res := make([]PublishResult, len(evs))
	reqs := make([]*pubReq, len(evs))
	for i, ev := range evs {
		var o []PublishOption
		if i < len(opts) {
			o = opts[i]
		}
		id, fields, err := p.eventFields(ctx, ev, o)
		if err != nil {
			res[i].Err = err
			continue
		}
		res[i].ID = id
		if reqs[i], err = p.submitOnce(ctx, p.Stream(ev.EventType()), fields, id, onceOf(o)); err != nil {
			res[i].Err = err
		}
	}
	for i, r := range reqs {
		if r == nil {
			continue
		}
		<-r.done
		res[i].Err = r.err
		pubReqPool.Put(r)
	}
	return res
}
