// Package api is Conveyor's HTTP transport: routes, request decoding and
// validation, errors mapped to statuses, and cache-aside reads. It never
// writes read models: it stores upload bytes, publishes one event through
// the Publisher interface, and answers 202.
//
// api must not import handlers or projector, nor Redis Streams or
// Watermill (that is bus's job).
package api

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sync/semaphore"

	"github.com/conveyor/conveyor/blob"
	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/cache"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/idem"
	"github.com/conveyor/conveyor/store"
)

// Publisher publishes events. *bus.Publisher implements it.
type Publisher interface {
	PublishEvent(ctx context.Context, ev events.Event, opts ...bus.PublishOption) (string, error)
	PublishBatch(ctx context.Context, evs []events.Event, opts [][]bus.PublishOption) []bus.PublishResult
	// PublishAt holds ev back until at (durably, in Redis).
	PublishAt(ctx context.Context, at time.Time, ev events.Event, opts ...bus.PublishOption) (string, error)
	// CancelDelayed withdraws a held-back event that was not published yet,
	// held until at.
	CancelDelayed(ctx context.Context, eventType, id string, at time.Time) (bool, error)
	// Published reports whether a publish made with WithOnce appended the
	// event with id.
	Published(ctx context.Context, eventType, id string) (bool, error)
}

// Reader reads the read models. *store.Store implements it.
type Reader interface {
	Document(ctx context.Context, id string) (store.Document, error)
	Email(ctx context.Context, id string) (store.Email, error)
}

// Check is one readiness check: nil means ready.
type Check func(ctx context.Context) error

// Config configures the API.
type Config struct {
	// Publisher publishes accepted work. Required.
	Publisher Publisher
	// Blobs stores uploads. Required.
	Blobs blob.Store
	// Reader reads the read models. Required.
	Reader Reader
	// Cache serves reads cache-aside. Required.
	Cache *cache.Client
	// Idem keeps Idempotency-Key records and accepted markers. Required.
	Idem *idem.Store
	// IdempotencyLease bounds how long a request holds its Idempotency-Key
	// before it has recorded its work, unless it keeps the claim: a running
	// request extends it every third of the lease, so a slow upload keeps
	// its key, while a request that dies blocks its key with 409 for at most
	// this long. Defaults to 1 minute.
	IdempotencyLease time.Duration
	// CacheTTL defaults to 60s.
	CacheTTL time.Duration
	// MaxUploadBytes bounds an upload's file. Defaults to 32 MiB.
	MaxUploadBytes int64
	// MaxJSONBytes bounds JSON bodies. Defaults to 1 MiB.
	MaxJSONBytes int64
	// JSONBodyTimeout bounds how long a JSON route waits for its body,
	// from the moment it starts reading it: the server's read timeout is
	// set for uploads (minutes), far longer than a body of at most
	// MaxJSONBytes needs, and a client that trickles one in must not hold
	// its connection and handler that long. Defaults to
	// DefaultJSONBodyTimeout.
	JSONBodyTimeout time.Duration
	// MaxConcurrentUploads bounds the uploads received at once: each holds
	// up to about 3.3 MiB of buffers while its body streams in, so this
	// bounds the memory of a burst (or of many slow clients). One more
	// waits up to UploadWait for a slot, then gets 503 too_many_uploads
	// with Retry-After. Defaults to 64.
	MaxConcurrentUploads int
	// UploadWait is how long an upload waits for a slot. Defaults to 5s.
	UploadWait time.Duration
	// MaxBatch bounds events per batch request. Defaults to 1000.
	MaxBatch int
	// MaxDelay bounds how far ahead an event or email may be scheduled.
	// Defaults to 30 days.
	MaxDelay time.Duration
	// Checks are run by /readyz, by name.
	Checks map[string]Check
	// Registry collects metrics for /metrics; nil means a new one.
	Registry *prometheus.Registry
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

func (c *Config) setDefaults() {
	if c.IdempotencyLease == 0 {
		c.IdempotencyLease = time.Minute
	}
	if c.CacheTTL == 0 {
		c.CacheTTL = 60 * time.Second
	}
	if c.MaxUploadBytes == 0 {
		c.MaxUploadBytes = 32 << 20
	}
	if c.MaxJSONBytes == 0 {
		c.MaxJSONBytes = 1 << 20
	}
	if c.JSONBodyTimeout == 0 {
		c.JSONBodyTimeout = DefaultJSONBodyTimeout
	}
	if c.MaxConcurrentUploads == 0 {
		c.MaxConcurrentUploads = 64
	}
	if c.UploadWait == 0 {
		c.UploadWait = 5 * time.Second
	}
	if c.MaxBatch == 0 {
		c.MaxBatch = 1000
	}
	if c.MaxDelay == 0 {
		c.MaxDelay = 30 * 24 * time.Hour
	}
	if c.Registry == nil {
		c.Registry = prometheus.NewRegistry()
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Validate reports every configuration problem at once.
func (c *Config) Validate() error {
	var errs []error
	if c.Publisher == nil {
		errs = append(errs, errors.New("api: Publisher is required"))
	}
	if c.Blobs == nil {
		errs = append(errs, errors.New("api: Blobs is required"))
	}
	if c.Reader == nil {
		errs = append(errs, errors.New("api: Reader is required"))
	}
	if c.Cache == nil {
		errs = append(errs, errors.New("api: Cache is required"))
	}
	if c.Idem == nil {
		errs = append(errs, errors.New("api: Idem is required"))
	}
	if c.IdempotencyLease < 0 {
		errs = append(errs, errors.New("api: IdempotencyLease must be positive"))
	}
	if c.MaxConcurrentUploads < 0 {
		errs = append(errs, errors.New("api: MaxConcurrentUploads must be positive"))
	}
	if c.UploadWait < 0 {
		errs = append(errs, errors.New("api: UploadWait must not be negative"))
	}
	if c.JSONBodyTimeout < 0 {
		errs = append(errs, errors.New("api: JSONBodyTimeout must be positive"))
	}
	return errors.Join(errs...)
}

// DefaultJSONBodyTimeout is the default of Config.JSONBodyTimeout: a
// JSON body of 1 MiB arrives well within it even on a slow mobile link.
const DefaultJSONBodyTimeout = 30 * time.Second

// API serves Conveyor's HTTP API v1.
type API struct {
	cfg     Config
	log     *slog.Logger
	metrics *httpMetrics
	uploads *semaphore.Weighted // of MaxConcurrentUploads
}

// New returns an API.
func New(cfg Config) (*API, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &API{
		cfg: cfg, log: cfg.Logger, metrics: newHTTPMetrics(cfg.Registry),
		uploads: semaphore.NewWeighted(int64(cfg.MaxConcurrentUploads)),
	}, nil
}

// Handler returns the routes of the API.
func (a *API) Handler() http.Handler {
	mux := http.NewServeMux()
	a.route(mux, "POST /v1/documents", a.postDocument)
	a.route(mux, "GET /v1/documents/{doc_id}", a.getDocument)
	a.route(mux, "POST /v1/emails", a.postEmail)
	a.route(mux, "GET /v1/emails/{email_id}", a.getEmail)
	a.route(mux, "POST /v1/events", a.postEvent)
	a.route(mux, "POST /v1/events/batch", a.postEventBatch)
	Ops(mux, a.cfg.Checks, a.cfg.Registry)
	mux.Handle("/", a.metrics.wrap(unmatchedRoute, unrouted(mux)))
	return a.recoverer(cleanPathsOnly(mux, a.metrics.wrap(unmatchedRoute, http.HandlerFunc(notFound))))
}

// cleanPathsOnly serves a request whose path is clean with next, and any
// other (a doubled or trailing slash, a "." or ".." segment) with
// unclean. http.ServeMux would answer such a path with a redirect to its
// clean form, without a body and unseen by the metrics, and a client that
// followed it would send its request to a route it did not name
// (/v1/emails/../events is /v1/events). No route ends in a slash, so a
// trailing one is not clean either; "/" itself is. The path is looked at
// as it was sent (escaped), as the mux matches it: an escaped slash is
// part of a segment, not a separator (/v1/documents/..%2fx asks for the
// document "../x", a malformed id).
func cleanPathsOnly(next, unclean http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p := r.URL.EscapedPath(); p != "/" && path.Clean(p) != p {
			unclean.ServeHTTP(w, r)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// notFound answers a path the API does not have.
func notFound(w http.ResponseWriter, r *http.Request) {
	writeError(w, http.StatusNotFound, "not_found", "no such endpoint: "+r.Method+" "+r.URL.Path)
}

// unrouted answers, in JSON, what no other pattern of mux matches: 405
// (with Allow) for a path that other methods take, 404 otherwise. It asks
// mux which methods the path takes only then, so routed requests are
// matched once.
func unrouted(mux *http.ServeMux) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var allow []string
		for _, m := range []string{http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete} {
			probe := *r
			probe.Method = m
			if _, pattern := mux.Handler(&probe); pattern != "/" {
				allow = append(allow, m)
			}
		}
		if len(allow) > 0 {
			w.Header().Set("Allow", strings.Join(allow, ", "))
			writeError(w, http.StatusMethodNotAllowed, "method_not_allowed",
				r.Method+" is not allowed on "+r.URL.Path+"; allowed: "+strings.Join(allow, ", "))
			return
		}
		notFound(w, r)
	}
}

// Ops adds the operational endpoints every role serves: /healthz
// (liveness, no dependencies), /readyz (dependencies; status words only) and
// /metrics.
func Ops(mux *http.ServeMux, checks map[string]Check, reg *prometheus.Registry) {
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		status, body := Readiness(r.Context(), checks)
		writeJSON(w, status, body)
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
}

// ReadinessBody is the /readyz response. Status is "ready", "degraded"
// (a soft check failed: see [Soft]) or "unavailable" (a check that is not
// soft failed).
type ReadinessBody struct {
	Status string            `json:"status"`
	Checks map[string]string `json:"checks,omitempty"`
}

// Soft marks a readiness check of a dependency the process works without for
// a while: the api serves reads from PostgreSQL while the cache Redis is
// down, and accepts work while PostgreSQL is down. Its failure leaves the
// process ready, 200 with status "degraded": failing readiness would take
// every replica out of its load balancer at once, an outage of everything,
// for the outage of a part.
func Soft(check Check) Check {
	return func(ctx context.Context) error {
		if err := check(ctx); err != nil {
			return softError{err}
		}
		return nil
	}
}

// softError is the error of a failed [Soft] check.
type softError struct{ err error }

func (e softError) Error() string { return e.err.Error() }
func (e softError) Unwrap() error { return e.err }

// Readiness runs the checks concurrently, each with a short timeout: 200
// "ready" if all pass, 200 "degraded" if only [Soft] ones fail, 503
// "unavailable" otherwise. The body says "ok" or "down" per check and never
// carries error text: it may be public, and the logs have the details.
func Readiness(ctx context.Context, checks map[string]Check) (int, ReadinessBody) {
	type result struct {
		name string
		err  error
	}
	results := make(chan result, len(checks))
	for name, check := range checks {
		go func() {
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			results <- result{name, check(cctx)}
		}()
	}
	body := ReadinessBody{Status: "ready", Checks: map[string]string{}}
	status := http.StatusOK
	for range checks {
		r := <-results
		body.Checks[r.name] = "ok"
		if r.err == nil {
			continue
		}
		body.Checks[r.name] = "down"
		var se softError
		soft := errors.As(r.err, &se)
		switch {
		case !soft:
			body.Status = "unavailable"
			status = http.StatusServiceUnavailable
		case status == http.StatusOK:
			body.Status = "degraded"
		}
		slog.Default().Warn("readiness check failed", "check", r.name, "soft", soft, "error", r.err)
	}
	return status, body
}

func (a *API) route(mux *http.ServeMux, pattern string, h http.HandlerFunc) {
	mux.Handle(pattern, a.metrics.wrap(pattern, h))
}

func (a *API) recoverer(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if p := recover(); p != nil {
				if p == http.ErrAbortHandler {
					panic(p)
				}
				a.log.Error("panic serving request", "method", r.Method, "path", r.URL.Path, "panic", p)
				writeError(w, http.StatusInternalServerError, "internal", "internal error")
			}
		}()
		if tp := r.Header.Get("traceparent"); tp != "" {
			r = r.WithContext(bus.WithTraceparent(r.Context(), tp))
		}
		next.ServeHTTP(w, r)
	})
}

// errorBody is the shape of every error response.
type errorBody struct {
	Error errorDetail `json:"error"`
}

type errorDetail struct {
	Code    string              `json:"code"`
	Message string              `json:"message"`
	Fields  []events.FieldError `json:"fields,omitempty"`
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, errorBody{Error: errorDetail{Code: code, Message: msg}})
}

func writeValidation(w http.ResponseWriter, ve *events.ValidationError) {
	writeJSON(w, http.StatusUnprocessableEntity, errorBody{Error: errorDetail{
		Code: "validation_failed", Message: ve.Error(), Fields: ve.Fields,
	}})
}

// humanDuration writes whole days as days, the rest as Go durations.
func humanDuration(d time.Duration) string {
	if d >= 24*time.Hour && d%(24*time.Hour) == 0 {
		n := int(d / (24 * time.Hour))
		if n == 1 {
			return "1 day"
		}
		return strconv.Itoa(n) + " days"
	}
	return d.String()
}
