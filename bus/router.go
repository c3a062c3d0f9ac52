package bus

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
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
	// ClaimMinIdle: see SubscriberConfig. Defaults to 10s.
	ClaimMinIdle time.Duration
	// Retry is the default retry policy of handlers.
	Retry RetryPolicy
	// HandlerTimeout bounds one handler call. Defaults to 5m.
	HandlerTimeout time.Duration
	// DrainTimeout is how long Close lets running handlers finish. Defaults
	// to 20s; keep the container stop grace period longer.
	DrainTimeout time.Duration
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

// Router runs typed handlers, one consumer group per handler, on a
// Watermill router fed by Subscribers.
type Router struct {
	cfg    RouterConfig
	wr     *message.Router
	groups map[string]*groupState
	mu     sync.Mutex
}

type groupState struct {
	sub   *Subscriber
	retry RetryPolicy
}

// NewRouter returns a Router with no handlers.
func NewRouter(cfg RouterConfig) (*Router, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	wr, err := message.NewRouter(message.RouterConfig{
		// The subscribers drain in-flight messages themselves within
		// DrainTimeout; the router waits a little longer for them.
		CloseTimeout: cfg.DrainTimeout + 5*time.Second,
	}, quietLogger{watermill.NewSlogLogger(cfg.Logger)})
	if err != nil {
		return nil, fmt.Errorf("new router: %w", err)
	}
	return &Router{cfg: cfg, wr: wr, groups: map[string]*groupState{}}, nil
}

// HandlerOption adjusts one consumer group.
type HandlerOption func(*handlerOptions)

type handlerOptions struct {
	retry *RetryPolicy
}

// WithRetry sets the group's retry policy (per handler max attempts and
// backoff). All handlers of one group share it; the first one set wins.
func WithRetry(p RetryPolicy) HandlerOption {
	return func(o *handlerOptions) { o.retry = &p }
}

func (r *Router) group(name string, o handlerOptions) (*groupState, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if g, ok := r.groups[name]; ok {
		return g, nil
	}
	retry := r.cfg.Retry
	if o.retry != nil {
		retry = *o.retry
	}
	sub, err := NewSubscriber(SubscriberConfig{
		Client:        r.cfg.Client,
		ConsumerGroup: name,
		Consumer:      r.cfg.Consumer,
		BatchSize:     r.cfg.BatchSize,
		MaxInFlight:   r.cfg.Concurrency,
		ClaimMinIdle:  r.cfg.ClaimMinIdle,
		Retry:         retry,
		DrainTimeout:  r.cfg.DrainTimeout,
		Logger:        r.cfg.Logger,
		Metrics:       r.cfg.Metrics,
	})
	if err != nil {
		return nil, err
	}
	g := &groupState{sub: sub, retry: sub.cfg.Retry}
	r.groups[name] = g
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
func Handle[E any, P eventPtr[E]](r *Router, group string, h func(ctx context.Context, ev P) error, opts ...HandlerOption) error {
	var o handlerOptions
	for _, opt := range opts {
		opt(&o)
	}
	g, err := r.group(group, o)
	if err != nil {
		return err
	}
	typ := P(new(E)).EventType()
	topic := r.cfg.StreamPrefix + typ
	log := r.cfg.Logger.With("consumer_group", group, "event_type", typ)
	r.wr.AddConsumerHandler(group+"/"+typ, topic, g.sub, func(msg *message.Message) (err error) {
		start := time.Now()
		env := envelopeOf(msg, typ)
		defer func() {
			if p := recover(); p != nil {
				err = fmt.Errorf("handler panicked: %v", p)
				log.Error("handler panicked", "event_id", env.ID, "panic", p, "stack", string(debug.Stack()))
			}
			if err != nil {
				RecordFailure(msg, err)
				logFailure(log, env, g.retry, err)
			}
			if r.cfg.Metrics != nil {
				r.cfg.Metrics.handled(group, typ, err, time.Since(start))
			}
		}()
		if env.Type != typ {
			return Permanent(fmt.Errorf("event type %q arrived on the stream of %q", env.Type, typ))
		}
		ev, err := events.Decode(env.Type, env.Version, msg.Payload)
		if err != nil {
			return Permanent(fmt.Errorf("decode %s: %w", typ, err))
		}
		ctx, cancel := context.WithTimeout(msg.Context(), r.cfg.HandlerTimeout)
		defer cancel()
		ctx = WithEnvelope(ctx, env)
		ctx = context.WithValue(ctx, attemptsKey, attempts{attempt: env.Attempt, max: g.retry.MaxAttempts})
		return h(ctx, ev.(P))
	})
	return nil
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

// Run runs the handlers until ctx is cancelled, then closes gracefully:
// subscribers stop reading, running handlers get DrainTimeout to finish, and
// every ack is flushed. It returns an error if the router stopped by itself.
func (r *Router) Run(ctx context.Context) error {
	runErr := make(chan error, 1)
	go func() { runErr <- r.wr.Run(ctx) }()
	select {
	case err := <-runErr:
		if err != nil {
			return fmt.Errorf("router: %w", err)
		}
		if ctx.Err() == nil {
			return errors.New("router stopped by itself")
		}
		return r.closeSubscribers()
	case <-ctx.Done():
	}
	// Close only once the router runs: Watermill's Close holds the handlers
	// lock while it waits for handlers, so a Close that lands before
	// RunHandlers keeps the handlers from ever starting, and waits for them
	// until CloseTimeout. Starting is quick: Subscribe does not block.
	select {
	case <-r.wr.Running():
	case err := <-runErr:
		return errors.Join(err, r.closeSubscribers())
	}
	closeErr := r.wr.Close()
	<-runErr
	return errors.Join(closeErr, r.closeSubscribers())
}

// Running is closed once the router's handlers run.
func (r *Router) Running() chan struct{} { return r.wr.Running() }

func (r *Router) closeSubscribers() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	for _, g := range r.groups {
		errs = append(errs, g.sub.Close())
	}
	return errors.Join(errs...)
}

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

// quietLogger passes Watermill's logs on, except its per-message error log
// for handler errors: the router logs those itself, once, with the retry
// decision.
type quietLogger struct{ watermill.LoggerAdapter }

func (q quietLogger) Error(msg string, err error, fields watermill.LogFields) {
	if strings.HasPrefix(msg, "Handler returned error") {
		return
	}
	q.LoggerAdapter.Error(msg, err, fields)
}

func (q quietLogger) Info(msg string, fields watermill.LogFields) {
	q.LoggerAdapter.Debug(msg, fields)
}

func (q quietLogger) With(fields watermill.LogFields) watermill.LoggerAdapter {
	return quietLogger{q.LoggerAdapter.With(fields)}
}
