package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/redis/go-redis/v9"
	"golang.org/x/sync/errgroup"

	"github.com/conveyor/conveyor/api"
	"github.com/conveyor/conveyor/blob"
	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/cache"
	"github.com/conveyor/conveyor/config"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/handlers"
	"github.com/conveyor/conveyor/idem"
	"github.com/conveyor/conveyor/projector"
	"github.com/conveyor/conveyor/store"
)

// topology is every consumer group and the streams it reads. Groups are
// created ahead of time (by migrate and at every start) so that no group
// misses events published before its handler first ran.
func topology() map[string][]string {
	return map[string][]string{
		handlers.DocumentGroup: {events.TypeDocumentUploaded},
		handlers.EmailGroup:    {events.TypeEmailRequested},
		projector.Group:        events.Types(),
	}
}

// app holds the connections and shared parts of a running process.
type app struct {
	cfg      config.Config
	log      *slog.Logger
	rdb      *redis.Client
	cacheRdb *redis.Client
	store    *store.Store
	pub      *bus.Publisher
	cache    *cache.Client
	idem     *idem.Store
	blobs    *blob.Dir
	reg      *prometheus.Registry
	metrics  *bus.Metrics
	lease    *bus.ConsumerLease
	// stopping is set once a stop began (SHUTDOWN_DELAY: readiness fails).
	stopping atomic.Bool
}

type needs struct {
	db, blobs, consumer bool
}

// newLogger returns the process's logger, in LOG_FORMAT at LOG_LEVEL, and
// makes it slog's default: code that logs through slog.Default() (the
// readiness checks' warnings) writes in the same format, at the same level.
// go-redis's own logger writes through it too (see redisLogger): it would
// otherwise write plain-text lines to stderr, many a second while Redis is
// down.
func newLogger(cfg config.Config, w *os.File) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	var l *slog.Logger
	if cfg.LogFormat == "text" {
		l = slog.New(slog.NewTextHandler(w, opts))
	} else {
		l = slog.New(slog.NewJSONHandler(w, opts))
	}
	slog.SetDefault(l)
	redis.SetLogger(newRedisLogger(l))
	return l
}

func redisClient(url string) (*redis.Client, error) {
	opt, err := redisOptions(url)
	if err != nil {
		return nil, err
	}
	opt.PoolSize = max(opt.PoolSize, 128)
	opt.MinIdleConns = 4
	return redis.NewClient(opt), nil
}

// cliRedisClient is redisClient for a command that runs a few commands and
// exits (status, dlq): no idle connections kept ready, whose dials against
// a Redis that is down would each log a line before the command's error.
func cliRedisClient(url string) (*redis.Client, error) {
	opt, err := redisOptions(url)
	if err != nil {
		return nil, err
	}
	// One try per command: against a Redis that is down, each retry's
	// failed dial logs a line of its own; the command's error says it.
	opt.PoolSize, opt.MaxRetries = 4, -1
	return redis.NewClient(opt), nil
}

// redisOptions parses url with the settings every client here shares.
func redisOptions(url string) (*redis.Options, error) {
	opt, err := redis.ParseURL(url)
	if err != nil {
		return nil, fmt.Errorf("parse redis url: %w", err)
	}
	opt.DialTimeout = 3 * time.Second
	// A context's deadline bounds the command (go-redis otherwise waits
	// for its own read timeout): a readiness check of a Redis that hangs
	// answers within its 2 s, not after 3 s or more.
	opt.ContextTimeoutEnabled = true
	return opt, nil
}

// errStoppedWhileStarting is the error of a command stopped while it
// waited for Redis or PostgreSQL: exit status 0.
var errStoppedWhileStarting = errors.New("stopped while starting")

// startTimeout is the cause of the deadline of a command that gives up
// waiting for its dependencies after a while (migrate): waitFor then says
// it gave up, not that the command was stopped.
type startTimeout time.Duration

func (d startTimeout) Error() string {
	return "gave up after " + time.Duration(d).String()
}

// withStartTimeout returns ctx ending after d, with a startTimeout cause.
func withStartTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeoutCause(ctx, d, startTimeout(d))
}

// waitFor retries check with backoff until it succeeds or ctx ends: at
// start a dependency may still be coming up, and a process that exits on
// that only crash-loops.
func waitFor(ctx context.Context, log *slog.Logger, what string, check func(context.Context) error) error {
	wait := 200 * time.Millisecond
	for {
		cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
		err := check(cctx)
		cancel()
		if err == nil {
			return nil
		}
		log.Warn("waiting for "+what, "error", err, "retry_in", wait)
		select {
		case <-ctx.Done():
			var d startTimeout
			if errors.As(context.Cause(ctx), &d) {
				return fmt.Errorf("gave up waiting for %s after %s: %w", what, time.Duration(d), err)
			}
			return fmt.Errorf("%w: %s not reachable: %w", errStoppedWhileStarting, what, err)
		case <-time.After(wait):
		}
		wait = min(wait*2, 5*time.Second)
	}
}

func newApp(ctx context.Context, cfg config.Config, log *slog.Logger, n needs) (a *app, err error) {
	required := []string{"REDIS_URL"}
	if n.db {
		required = append(required, "DATABASE_URL")
	}
	// run checked the command's requirements already; up fills them in.
	if err := cfg.Require(required...); err != nil {
		return nil, fmt.Errorf("%w: %w", errConfig, err)
	}
	a = &app{cfg: cfg, log: log, reg: prometheus.NewRegistry()}
	defer func() {
		if err != nil {
			a.close()
		}
	}()
	a.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	a.metrics = bus.NewMetrics(a.reg)

	if a.rdb, err = redisClient(cfg.RedisURL); err != nil {
		return a, err
	}
	a.cacheRdb = a.rdb
	if cfg.CacheRedisURL != cfg.RedisURL {
		if a.cacheRdb, err = redisClient(cfg.CacheRedisURL); err != nil {
			return a, err
		}
	}
	if err := waitFor(ctx, log, "redis", func(ctx context.Context) error { return a.rdb.Ping(ctx).Err() }); err != nil {
		return a, err
	}
	if err := bus.EnsureGroups(ctx, a.rdb, topology()); err != nil {
		return a, err
	}
	if a.pub, err = bus.NewPublisher(bus.PublisherConfig{Client: a.rdb, Source: "conveyor", Logger: log, Metrics: a.metrics}); err != nil {
		return a, err
	}
	if a.cache, err = cache.New(cache.Config{Redis: a.cacheRdb, TTL: cfg.CacheTTL, Logger: log}); err != nil {
		return a, err
	}
	if a.idem, err = idem.New(idem.Config{Redis: a.rdb}); err != nil {
		return a, err
	}
	if n.db {
		if a.store, err = store.Open(store.Config{URL: cfg.DatabaseURL}); err != nil {
			return a, err
		}
		if err := waitFor(ctx, log, "postgres", a.store.Ping); err != nil {
			return a, err
		}
	}
	if n.blobs {
		if a.blobs, err = blob.NewDir(blob.DirConfig{Dir: cfg.BlobDir}); err != nil {
			return a, err
		}
	}
	if n.consumer {
		if a.lease, err = bus.LeaseConsumerName(ctx, a.rdb, cfg.ConsumerName, log); err != nil {
			return a, err
		}
		log.Info("consumer name leased", "consumer", a.lease.Name())
	}
	return a, nil
}

// close releases everything, connections last.
func (a *app) close() {
	if a.pub != nil {
		_ = a.pub.Close()
	}
	if a.lease != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		a.lease.Release(ctx)
		cancel()
	}
	if a.store != nil {
		_ = a.store.Close()
	}
	if a.cacheRdb != nil && a.cacheRdb != a.rdb {
		_ = a.cacheRdb.Close()
	}
	if a.rdb != nil {
		_ = a.rdb.Close()
	}
}

// softChecks names, per role, the readiness checks of dependencies the role
// works without for a while (api.Soft): their failure leaves it ready, 200
// "degraded". A role whose readiness failed for them would leave its load
// balancer without replicas, an outage of everything for that of a part.
// Every other check is hard (503), as are the api's "accepting" while it
// stops and "starting" while it waits for its dependencies.
//   - api: reads go to PostgreSQL while the cache Redis is down, and
//     accepting work needs the streams Redis only.
//   - handler: the summarizer's cache falls back to calling the summarizer.
//   - scheduler: without PostgreSQL only its built-in maintenance jobs fail
//     (it runs without DATABASE_URL too); it reads no cache.
//   - projector: none: it writes PostgreSQL, and an event whose cache
//     invalidation failed is retried. up: none, as it runs the projector.
var softChecks = map[string][]string{
	"api":       {"cache_redis", "postgres"},
	"handler":   {"cache_redis"},
	"scheduler": {"cache_redis", "postgres"},
}

// checks returns the readiness checks of role (a command's name). router,
// if not nil, is the role's consumer router.
func (a *app) checks(role string, router *bus.Router) map[string]api.Check {
	c := map[string]api.Check{
		"redis": func(ctx context.Context) error { return a.rdb.Ping(ctx).Err() },
	}
	if a.cacheRdb != a.rdb {
		c["cache_redis"] = func(ctx context.Context) error { return a.cacheRdb.Ping(ctx).Err() }
	}
	if a.store != nil {
		c["postgres"] = a.store.Ping
	}
	if router != nil {
		c["consumers"] = func(context.Context) error { return router.Err() }
	}
	if a.cfg.ShutdownDelay > 0 {
		c["accepting"] = func(context.Context) error {
			if a.stopping.Load() {
				return errors.New("stopping")
			}
			return nil
		}
	}
	for _, name := range softChecks[role] {
		if check, ok := c[name]; ok {
			c[name] = api.Soft(check)
		}
	}
	return c
}

func (a *app) router(concurrency int) (*bus.Router, error) {
	return bus.NewRouter(bus.RouterConfig{
		Client:       a.rdb,
		Consumer:     a.lease.Name(),
		Concurrency:  concurrency,
		ClaimMinIdle: a.cfg.ClaimMinIdle,
		Retry:        retryPolicy(a.cfg),
		DrainTimeout: a.cfg.ShutdownTimeout,
		Logger:       a.log,
		Metrics:      a.metrics,
	})
}

// newServer returns an http.Server with every timeout set: a slow or stuck
// client must not hold a connection forever.
func newServer(addr string, h http.Handler, log *slog.Logger) *http.Server {
	return &http.Server{
		Addr:              addr,
		Handler:           h,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       5 * time.Minute, // a 32 MiB upload on a slow link
		WriteTimeout:      5 * time.Minute,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
}

// serve runs srv until ctx ends, then shuts it down gracefully: it stops
// accepting and lets running requests finish within timeout.
//
// Requests still running at the timeout are cut (their connections
// closed), and that is logged as an error, which an operator must see:
// their clients get no answer and retry. It is not a failure of the
// process, though: the stop was asked for and went as configured, as for
// consumers whose handlers outlast the same timeout, so serve returns nil
// and the process exits 0 (a failure status would make a supervisor take a
// routine stop during a long upload for a crash).
func serve(ctx context.Context, srv *http.Server, ln net.Listener, timeout time.Duration, log *slog.Logger) error {
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("http server stopped: %w", err)
	case <-ctx.Done():
	}
	log.Info("shutting down http server", "addr", ln.Addr().String())
	sctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	err := srv.Shutdown(sctx)
	if errors.Is(err, context.DeadlineExceeded) {
		log.Error("http server did not drain within SHUTDOWN_TIMEOUT; cutting the requests still running", "addr", ln.Addr().String(), "timeout", timeout)
		if err := srv.Close(); err != nil {
			log.Warn("close http server", "error", err)
		}
	} else if err != nil {
		return fmt.Errorf("http shutdown: %w", err)
	}
	if err := <-errc; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// opsHandler serves /healthz, /readyz and /metrics for roles without the API.
func opsHandler(checks map[string]api.Check, reg *prometheus.Registry) http.Handler {
	mux := http.NewServeMux()
	api.Ops(mux, checks, reg)
	return mux
}

// summarizer builds the configured summarizer, cached by the LLM cache.
func (a *app) summarizer() (handlers.Summarizer, error) {
	var s handlers.Summarizer = handlers.Extractive{}
	if a.cfg.SummarizerURL != "" {
		s = handlers.OpenAI{URL: a.cfg.SummarizerURL, ModelName: a.cfg.SummarizerModel, APIKey: a.cfg.SummarizerAPIKey}
	}
	llm, err := cache.NewLLM(cache.LLMConfig{Cache: a.cache})
	if err != nil {
		return nil, err
	}
	return handlers.Cached{Summarizer: s, LLM: llm}, nil
}

func (a *app) mailer() (handlers.Mailer, error) {
	if a.cfg.SMTPURL == "" {
		return handlers.Outbox{Dir: a.cfg.OutboxDir, Logger: a.log}, nil
	}
	return handlers.NewSMTP(handlers.SMTPConfig{URL: a.cfg.SMTPURL, Timeout: a.cfg.SMTPTimeout})
}

// registerHandlers adds the chosen handlers to router.
func (a *app) registerHandlers(router *bus.Router, which map[string]bool) error {
	if which["document"] {
		sum, err := a.summarizer()
		if err != nil {
			return err
		}
		dp, err := handlers.NewDocumentProcessor(handlers.DocumentProcessorConfig{
			Blobs: a.blobs, Publisher: a.pub, Summarizer: sum, MaxBytes: a.cfg.MaxUploadBytes, Logger: a.log,
		})
		if err != nil {
			return err
		}
		if err := dp.Register(router); err != nil {
			return err
		}
	}
	if which["email"] {
		m, err := a.mailer()
		if err != nil {
			return err
		}
		es, err := handlers.NewEmailSender(handlers.EmailSenderConfig{
			Mailer: m, Marks: a.idem, Publisher: a.pub, From: a.cfg.SMTPFrom, Timeout: a.cfg.SMTPTimeout, Logger: a.log,
		})
		if err != nil {
			return err
		}
		if err := es.Register(router); err != nil {
			return err
		}
	}
	return nil
}

// runRouterAndServer runs a consumer router, stream retention and an HTTP
// server together; any of them stopping by itself stops all.
func runRouterAndServer(ctx context.Context, a *app, router *bus.Router, srv *http.Server, ln net.Listener, more ...func(context.Context) error) error {
	ret, err := bus.NewRetention(bus.RetentionConfig{Client: a.rdb, Topology: topology(), Logger: a.log})
	if err != nil {
		return err
	}
	g, gctx := errgroup.WithContext(ctx)
	for _, run := range more {
		g.Go(func() error { return run(gctx) })
	}
	g.Go(func() error { return router.Run(gctx) })
	g.Go(func() error { return ret.Run(gctx) })
	g.Go(func() error { return serve(gctx, srv, ln, a.cfg.ShutdownTimeout, a.log) })
	return g.Wait()
}

// projectorRetry gives the projector a much longer retry budget than
// RETRY_MAX_ATTEMPTS: its failures are outages of Postgres or the cache
// (data errors are permanent and dead-lettered at once), and an outage
// should delay the read models, not fill the dead-letter stream. With the
// default backoff, 50 attempts span about seven hours.
func (a *app) projectorRetry() bus.RetryPolicy {
	p := retryPolicy(a.cfg)
	p.MaxAttempts = max(p.MaxAttempts, 50)
	return p
}

// retryPolicy is the retry policy of handlers, from RETRY_*.
func retryPolicy(cfg config.Config) bus.RetryPolicy {
	return bus.RetryPolicy{MaxAttempts: cfg.RetryMaxAttempts, MinBackoff: cfg.RetryMinBackoff, MaxBackoff: cfg.RetryMaxBackoff}
}

// handlerWindow is the longest a handler's message can take from its first
// attempt to the end of its last: the retry policy's window plus a minute
// per attempt for the attempt itself (a summarizer's timeout is 60 s).
func handlerWindow(cfg config.Config) time.Duration {
	const most = time.Duration(math.MaxInt64)
	w, n := retryPolicy(cfg).Window(), time.Duration(max(cfg.RetryMaxAttempts, 1))
	if n > (most-w)/time.Minute {
		return most
	}
	return w + n*time.Minute
}

// stuckAfter is STUCK_AFTER, by default the handlers' window plus 15
// minutes, so that the re-drive re-publishes no document that only waits
// for a retry.
func stuckAfter(cfg config.Config) time.Duration {
	if cfg.StuckAfter > 0 {
		return cfg.StuckAfter
	}
	return min(handlerWindow(cfg), math.MaxInt64-15*time.Minute) + 15*time.Minute
}
