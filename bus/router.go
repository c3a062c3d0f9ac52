package bus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/events"
)

// RouterConfig configures a Router.
type RouterConfig struct {
	// Client is the Redis holding the streams. Required; never closed here.
	Client redis.UniversalClient
	// Consumer is this replica's consumer name in every group. Required.
	Consumer string
	// StreamPrefix is put before event types to name streams (tests).
	StreamPrefix string
	// Concurrency is how many messages each handler (consumer group) works
	// on at once. Defaults to 64.
	Concurrency int
	// BatchSize is the COUNT of each read. Defaults to 100.
	BatchSize int
	// ReadAhead: see SubscriberConfig. Defaults to 5ms.
	ReadAhead time.Duration
	// ClaimMinIdle: see SubscriberConfig. Defaults to 10s.
	ClaimMinIdle time.Duration
	// Retry is the default retry policy of handlers.
	Retry RetryPolicy
	// HandlerTimeout bounds one handler call. Defaults to 5m.
	HandlerTimeout time.Duration
	// DrainTimeout is how long Run lets running handlers finish after its
	// ctx ends. Defaults to 20s; keep the container stop grace period
	// longer.
	DrainTimeout time.Duration
	// Middlewares wrap every handler call, first outermost, as in
	// Watermill's router. A middleware sees the Watermill message (with
	// its metadata and context); messages it returns are ignored.
	Middlewares []message.HandlerMiddleware
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// Metrics, if set, records handler and subscriber metrics.
	Metrics *Metrics
}

func (c *RouterConfig) setDefaults() {
	if c.Concurrency == 0 {
		c.Concurrency = 64
	}
	if c.HandlerTimeout == 0 {
		c.HandlerTimeout = 5 * time.Minute
	}
	if c.DrainTimeout == 0 {
		c.DrainTimeout = 20 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Validate reports every configuration problem at once.
func (c *RouterConfig) Validate() error {
	var errs []error
	if c.Client == nil {
		errs = append(errs, errors.New("router: Client is required"))
	}
	if c.Consumer == "" {
		errs = append(errs, errors.New("router: Consumer is required"))
	}
	if c.Concurrency < 1 {
		errs = append(errs, errors.New("router: Concurrency must be at least 1"))
	}
	return errors.Join(errs...)
}

// Router runs typed handlers, one consumer group per handler.
//
// It drives its Subscribers directly rather than through Watermill's
// router: a fixed pool of Concurrency workers per group takes deliveries
// and reports each outcome straight to the subscriber. That saves, per
// message, the goroutine Watermill's router starts, the goroutine that
// waits for Ack or Nack, and their stack growth — the costs that dominated
// a handler hop. The Subscriber remains a full Watermill message.Subscriber
// for Watermill's own router, and Watermill middleware applies here too
// (RouterConfig.Middlewares). The lifecycle is Watermill's: Run until ctx
// ends, then stop reading, drain within DrainTimeout, flush acks.
type Router struct {
	cfg     RouterConfig
	mu      sync.Mutex
	groups  map[string]*groupState
	order   []string
	running chan struct{}
}

type groupState struct {
	name   string
	sub    *Subscriber
	retry  RetryPolicy
	routes []*route
}

// workers is how many workers g runs: concurrency, or one per CPU when
// every route reports its outcome itself (HandleAsync), since then no
// worker waits for a handler and the window alone bounds the work.
func (g *groupState) workers(concurrency int) int {
	for _, rt := range g.routes {
		if rt.start == nil {
			return concurrency
		}
	}
	return min(concurrency, runtime.GOMAXPROCS(0))
}

// route is one event type handled by a group: call handles a delivery and
// returns its outcome; start, set instead for a HandleAsync handler
// without middleware, starts handling it and reports the outcome itself.
type route struct {
	topic string
	typ   string
	call  func(*delivery) error
	start func(*delivery)
}

// NewRouter returns a Router with no handlers.
func NewRouter(cfg RouterConfig) (*Router, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Router{cfg: cfg, groups: map[string]*groupState{}, running: make(chan struct{})}, nil
}

// HandlerOption adjusts one consumer group.
type HandlerOption func(*handlerOptions)

type handlerOptions struct {
	retry *RetryPolicy
}

// WithRetry sets the group's retry policy (per handler max attempts and
// backoff). All handlers of one group share one policy: the policy of its
// first handler, which is RouterConfig.Retry without WithRetry. Handle
// refuses a WithRetry that differs from the policy its group already has.
func WithRetry(p RetryPolicy) HandlerOption {
	return func(o *handlerOptions) { o.retry = &p }
}

func (r *Router) group(name string, o handlerOptions) (*groupState, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	retry := r.cfg.Retry
	if o.retry != nil {
		retry = *o.retry
	}
	if g, ok := r.groups[name]; ok {
		if o.retry != nil {
			retry.setDefaults()
			if retry != g.retry {
				return nil, fmt.Errorf("bus: group %s: retry policy %+v differs from the one its handlers registered before have (%+v); a group has one", name, retry, g.retry)
			}
		}
		return g, nil
	}
	sub, err := NewSubscriber(SubscriberConfig{
		Client:         r.cfg.Client,
		ConsumerGroup:  name,
		Consumer:       r.cfg.Consumer,
		BatchSize:      r.cfg.BatchSize,
		MaxInFlight:    r.cfg.Concurrency,
		ReadAhead:      r.cfg.ReadAhead,
		ClaimMinIdle:   r.cfg.ClaimMinIdle,
		Retry:          retry,
		DrainTimeout:   r.cfg.DrainTimeout,
		HandlerTimeout: r.cfg.HandlerTimeout,
		Logger:         r.cfg.Logger,
		Metrics:        r.cfg.Metrics,
	})
	if err != nil {
		return nil, err
	}
	g := &groupState{name: name, sub: sub, retry: sub.cfg.Retry}
	r.groups[name] = g
	r.order = append(r.order, name)
	return g, nil
}

// eventPtr constrains P to be a pointer to an event struct E.
type eventPtr[E any] interface {
	*E
	events.Event
}

// Handle registers h as the handler of event type P in consumer group
// group. Several event types may share one group (the projector does); each
// group has one subscriber and one in-flight window.
//
// h receives a decoded, validated event and a context carrying its envelope
// (EnvelopeFrom). It returns nil (ack), an error (retry with backoff), or
// Permanent(err) (dead-letter now). It never sees Redis or Watermill.
//
// P's type and version must be registered in package events. An entry of
// another version of the type is dead-lettered, and so is one whose
// event_version is not a version ("2.0", "v2"); an entry without a version
// (from a plain Watermill publisher) is read as P's.
func Handle[E any, P eventPtr[E]](r *Router, group string, h func(ctx context.Context, ev P) error, opts ...HandlerOption) error {
	return register[E, P](r, group, h, nil, opts)
}

// HandleAsync registers h as Handle does, for a handler that reports its
// outcome later instead of returning it: h starts the work and calls done
// once, from any goroutine, with what Handle's handler would return (nil
// acks, an error retries, Permanent dead-letters). Calls of done after the
// first are ignored; a panic of h before it calls done nacks the event.
//
// It is for handlers that gather events and finish them together (the
// projector commits a batch in one transaction): a worker hands the event
// over and takes the next delivery, instead of waiting with it. The group's
// in-flight window (Concurrency) still bounds the events started and not
// done. A group whose handlers are all asynchronous runs one worker per CPU
// rather than Concurrency, since no worker waits.
//
// h must only hand the event over and return: the group's few workers
// run it in turn, so h blocking stalls the group (a bounded wait for room
// in a queue, as Projector.ApplyAsync has, is backpressure). The context
// given to h is cancelled when the handler times out (HandlerTimeout) or
// at a hard stop, as Handle's is, but only done ends the delivery: the
// work h handed over should then call done with the context's error soon.
// With middlewares (RouterConfig.Middlewares), which wrap a call that
// returns the outcome, the worker waits for done as Handle's would.
func HandleAsync[E any, P eventPtr[E]](r *Router, group string, h func(ctx context.Context, ev P, done func(error)), opts ...HandlerOption) error {
	return register[E, P](r, group, nil, h, opts)
}

// register adds a route for Handle (h) or HandleAsync (async).
func register[E any, P eventPtr[E]](r *Router, group string, h func(ctx context.Context, ev P) error, async func(ctx context.Context, ev P, done func(error)), opts []HandlerOption) error {
	var o handlerOptions
	for _, opt := range opts {
		opt(&o)
	}
	proto := P(new(E))
	typ, version := proto.EventType(), proto.EventVersion()
	if _, ok := events.Lookup(typ, version); !ok {
		return fmt.Errorf("bus: handler of %q version %d: %w", typ, version, events.ErrUnknownType)
	}
	g, err := r.group(group, o)
	if err != nil {
		return err
	}
	log := r.cfg.Logger.With("consumer_group", group, "event_type", typ)
	var observe prometheus.Observer
	var observeErr prometheus.Observer
	if m := r.cfg.Metrics; m != nil {
		observe = m.handling.WithLabelValues(group, typ, "ok")
		observeErr = m.handling.WithLabelValues(group, typ, "error")
	}
	// report logs and observes the outcome of a delivery handled since
	// start (zero when there is no histogram).
	report := func(env events.Envelope, start time.Time, err error) {
		if err != nil {
			logFailure(log, env, g.retry, err)
			if observeErr != nil {
				observeErr.Observe(time.Since(start).Seconds())
			}
		} else if observe != nil {
			observe.Observe(time.Since(start).Seconds())
		}
	}
	now := func() (t time.Time) {
		if observe != nil { // the clock only for the histogram
			t = time.Now()
		}
		return t
	}
	// decode checks a delivery's type and version (see Handle) and
	// decodes its payload into a P. envErr is what reading the envelope
	// found wrong (a malformed event_version), which decides before the
	// payload is looked at.
	decode := func(env events.Envelope, envErr error, payload []byte) (P, error) {
		if envErr != nil {
			return nil, envErr
		}
		if env.Type != typ {
			return nil, Permanent(fmt.Errorf("event type %q arrived on the stream of %q", env.Type, typ))
		}
		if env.Version != 0 && env.Version != version {
			if _, known := events.Lookup(typ, env.Version); !known {
				return nil, Permanent(fmt.Errorf("decode %s: %w: %q version %d", typ, events.ErrUnknownType, typ, env.Version))
			}
			return nil, Permanent(fmt.Errorf("decode %s: version %d arrived at a handler of version %d", typ, env.Version, version))
		}
		ev := P(new(E))
		if err := events.DecodeInto(ev, payload); err != nil {
			return nil, Permanent(fmt.Errorf("decode %s: %w", typ, err))
		}
		return ev, nil
	}
	// The delivery's context is cancelled when the handler times out
	// (HandlerTimeout, enforced with the heartbeats) or at hard stop.
	handlerContext := func(mctx context.Context, env events.Envelope) context.Context {
		return &handlerCtx{Context: mctx, hv: handlerValues{env: env, attempts: attempts{attempt: env.Attempt, max: g.retry.MaxAttempts}}}
	}
	if h == nil {
		// With middleware the outcome is returned to the middleware:
		// wait for done.
		h = func(ctx context.Context, ev P) error {
			res := make(chan error, 1)
			async(ctx, ev, func(err error) {
				select {
				case res <- err:
				default: // not the first call
				}
			})
			select {
			case err := <-res:
				return err
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	// run handles one delivery: its context, envelope and payload.
	run := func(mctx context.Context, env events.Envelope, envErr error, payload []byte) (err error) {
		start := now()
		defer func() {
			if p := recover(); p != nil {
				err = fmt.Errorf("handler panicked: %v", p)
				log.Error("handler panicked", "event_id", env.ID, "panic", p, "stack", string(debug.Stack()))
			}
			report(env, start, err)
		}()
		ev, err := decode(env, envErr, payload)
		if err != nil {
			return err
		}
		return h(handlerContext(mctx, env), ev)
	}
	rt := &route{topic: r.cfg.StreamPrefix + typ, typ: typ}
	switch {
	case len(r.cfg.Middlewares) > 0:
		// A middleware sees the Watermill message.
		hf := func(msg *message.Message) ([]*message.Message, error) {
			env, envErr := messageEnvelope(msg, typ)
			return nil, run(msg.Context(), env, envErr, msg.Payload)
		}
		for i := len(r.cfg.Middlewares) - 1; i >= 0; i-- {
			hf = r.cfg.Middlewares[i](hf)
		}
		rt.call = func(d *delivery) error {
			_, err := hf(d.message())
			return err
		}
	case async != nil:
		// Without middleware, no Watermill message is made: the envelope
		// is read from the entry's metadata pairs.
		rt.start = func(d *delivery) {
			env, envErr := entryEnvelope(&d.em, typ)
			f := &asyncDone{d: d, env: env, start: now(), report: report}
			defer func() {
				if p := recover(); p != nil {
					log.Error("handler panicked", "event_id", f.env.ID, "panic", p, "stack", string(debug.Stack()))
					f.done(fmt.Errorf("handler panicked: %v", p))
				}
			}()
			ev, err := decode(f.env, envErr, readOnlyBytes(d.em.payload))
			if err != nil {
				f.done(err)
				return
			}
			async(handlerContext(d.ctx, f.env), ev, f.done)
		}
	default:
		rt.call = func(d *delivery) error {
			env, envErr := entryEnvelope(&d.em, typ)
			return run(d.ctx, env, envErr, readOnlyBytes(d.em.payload))
		}
	}
	r.mu.Lock()
	g.routes = append(g.routes, rt)
	r.mu.Unlock()
	return nil
}

// asyncDone reports the outcome of a delivery started by a HandleAsync
// handler, once.
type asyncDone struct {
	d      *delivery
	env    events.Envelope
	start  time.Time
	report func(events.Envelope, time.Time, error)
	called atomic.Bool
}

func (f *asyncDone) done(err error) {
	if !f.called.CompareAndSwap(false, true) {
		return
	}
	// Completed even if the report panics: a delivery left open would
	// hold its window slot until the subscriber closes.
	defer f.d.sub.s.complete(f.d, err)
	f.report(f.env, f.start, err)
}

func logFailure(log *slog.Logger, env events.Envelope, retry RetryPolicy, err error) {
	attrs := []any{"event_id", env.ID, "correlation_id", env.CorrelationID, "attempt", env.Attempt, "error", err}
	switch {
	case IsPermanent(err):
		log.Error("handler failed permanently; dead-lettering", attrs...)
	case env.Attempt >= retry.MaxAttempts:
		log.Error("handler failed on its last attempt; dead-lettering", attrs...)
	default:
		log.Warn("handler failed; will retry", attrs...)
	}
}

// Run runs the handlers until ctx ends, then closes gracefully: the
// subscribers stop reading, running handlers get DrainTimeout to finish,
// the rest are handed back, and every ack is flushed. Run returns an error
// only if it cannot start.
func (r *Router) Run(ctx context.Context) error {
	r.mu.Lock()
	groups := make([]*groupState, 0, len(r.order))
	for _, name := range r.order {
		groups = append(groups, r.groups[name])
	}
	r.mu.Unlock()

	var workers sync.WaitGroup
	for _, g := range groups {
		// One channel per group, fed by every stream of the group and
		// drained by its workers: a delivery changes hands once. The
		// buffer lets a reader hand out a batch without waking a worker
		// per message.
		in := make(chan *delivery, r.cfg.Concurrency)
		var feeding sync.WaitGroup
		feeding.Add(len(g.routes))
		for _, rt := range g.routes {
			if err := g.sub.consume(ctx, rt.topic, in, rt, feeding.Done); err != nil {
				return fmt.Errorf("consume %s as %s: %w", rt.topic, g.name, err)
			}
		}
		go func() {
			feeding.Wait()
			close(in)
		}()
		for i := 0; i < g.workers(r.cfg.Concurrency); i++ {
			workers.Add(1)
			go func() {
				defer workers.Done()
				for d := range in {
					if rt := d.tag.(*route); rt.start != nil {
						rt.start(d)
					} else {
						d.sub.s.complete(d, rt.call(d))
					}
				}
			}()
		}
	}
	close(r.running)
	<-ctx.Done()

	// Subscribers stop reading (their channels close, so the workers end
	// once idle), wait DrainTimeout for running handlers, hand back the
	// rest and flush acks.
	var errs []error
	var closing sync.WaitGroup
	var mu sync.Mutex
	for _, g := range groups {
		closing.Add(1)
		go func() {
			defer closing.Done()
			if err := g.sub.Close(); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		}()
	}
	closing.Wait()
	// A handler that ignores its cancelled context would keep its worker;
	// its entry is already handed back, so don't wait for it long.
	done := make(chan struct{})
	go func() {
		workers.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		r.cfg.Logger.Warn("handlers still running after the drain; their entries were handed back")
	}
	return errors.Join(errs...)
}

// Running is closed once the router's handlers run.
func (r *Router) Running() chan struct{} { return r.running }

// Err returns the last Redis error any group's subscriber saw, or nil.
func (r *Router) Err() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, g := range r.groups {
		if err := g.sub.Err(); err != nil {
			return err
		}
	}
	return nil
}

// readOnlyBytes returns the bytes of s without copying them. They must
// only be read: events.DecodeInto, which takes a delivery's payload this
// way, only reads its input (goccy/go-json copies it into a buffer of its
// own before decoding, and the fallback is encoding/json), and it keeps no
// reference to it. A copy took about 3% of the CPU of the router hop.
func readOnlyBytes(s string) []byte { return unsafe.Slice(unsafe.StringData(s), len(s)) }
