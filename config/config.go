// Package config reads Conveyor's configuration from the environment, once,
// and validates it, reporting every problem together. It is the only reader
// of the environment. Any variable X of [Vars] may instead be given as
// X_FILE, the path of a file holding the value (for secrets mounted as
// files). GOGC and GOMEMLIMIT are read by the Go runtime (and GOGC by
// [TuneGC]) from the environment only: they have no _FILE form.
//
// config must not import other project packages.
package config

import (
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
)

// Config is the whole configuration. Zero values never reach callers: Load
// applies the documented defaults.
type Config struct {
	RedisURL       string
	CacheRedisURL  string
	DatabaseURL    string
	HTTPAddr       string
	BlobDir        string
	SMTPURL        string
	SMTPFrom       string
	SMTPTimeout    time.Duration
	OutboxDir      string
	ConsumerName   string
	MaxUploadBytes int64
	// MaxConcurrentUploads bounds the uploads the api receives at once.
	MaxConcurrentUploads int
	CacheTTL             time.Duration
	LogLevel             slog.Level
	LogFormat            string
	SummarizerURL        string
	SummarizerModel      string
	SummarizerAPIKey     string
	RetryMaxAttempts     int
	RetryMinBackoff      time.Duration
	RetryMaxBackoff      time.Duration
	ClaimMinIdle         time.Duration
	ShutdownTimeout      time.Duration
	// ShutdownDelay is how long the api keeps serving, unready, after
	// SIGTERM before it stops accepting.
	ShutdownDelay time.Duration
	DataDir       string
	SchedulesFile string
	MaxDelay      time.Duration
	// StuckAfter is 0 unless STUCK_AFTER is set: the scheduler then derives
	// it from the retry policy (see cmd/conveyor).
	StuckAfter     time.Duration
	BlobRetention  time.Duration
	InboxRetention time.Duration
}

// MinInboxRetention is the shortest INBOX_RETENTION accepted: an event
// redelivered after its inbox row is gone is applied again.
const MinInboxRetention = 24 * time.Hour

// Var documents one environment variable.
type Var struct {
	Name    string
	Default string
	Help    string
}

// Vars lists every variable Conveyor reads, for --help and the README.
var Vars = []Var{
	{"REDIS_URL", "(conveyor up: a local redis-server)", "Redis for streams and idempotency records: redis://[:password@]host:port/db, rediss:// for TLS, or unix:///path/redis.sock?db=0. Run it with AOF and maxmemory-policy noeviction."},
	{"CACHE_REDIS_URL", "REDIS_URL", "Redis for the read cache; may be a separate instance with an LRU policy."},
	{"DATABASE_URL", "(conveyor up: a local PostgreSQL)", "PostgreSQL for the read models: postgres://user:pass@host:5432/db?sslmode=disable, or postgres:///db?host=/var/run/postgresql for a Unix socket."},
	{"HTTP_ADDR", ":8080", "Listen address of the role's HTTP server (the API for `api`; /healthz, /readyz and /metrics for every role). Unset, conveyor up listens on 127.0.0.1:8080 only: its API has no authentication."},
	{"BLOB_DIR", "./data/blobs (conveyor up: CONVEYOR_DATA_DIR/blobs)", "Directory of uploaded bytes, shared by api, handler and scheduler replicas (the scheduler's blob retention removes expired bytes from it)."},
	{"SMTP_URL", "(none: emails go to OUTBOX_DIR)", "smtp://[user:pass@]host:port (STARTTLS if offered; ?tls=required|none) or smtps://host:port. A user and password are sent only over TLS; add ?auth=plain-insecure to send them unencrypted (needed with tls=none)."},
	{"SMTP_FROM", "Conveyor <conveyor@localhost>", "Sender address of emails."},
	{"SMTP_TIMEOUT", "30s", "Timeout of each part of one SMTP send: connecting (with TLS and authentication), then the message."},
	{"OUTBOX_DIR", "./data/outbox (conveyor up: CONVEYOR_DATA_DIR/outbox)", "Where emails are written as .eml files when SMTP_URL is unset."},
	{"CONSUMER_NAME", "hostname-N", "Consumer name of this replica in its consumer groups: unique per replica, stable across its restarts. By default the host name plus the lowest free index, leased in Redis."},
	{"MAX_UPLOAD_BYTES", "33554432", "Largest accepted upload (32 MiB); larger uploads get 413 and nothing is kept."},
	{"MAX_CONCURRENT_UPLOADS", "64", "Uploads the api receives at once (each holds up to about 3.3 MiB of buffers while its body streams in); one more waits up to 5s for a slot, then gets 503 too_many_uploads with Retry-After."},
	{"CACHE_TTL", "60s", "Time to live of cached reads (plus up to 10% jitter)."},
	{"LOG_LEVEL", "info", "debug, info, warn or error."},
	{"LOG_FORMAT", "json", "json or text."},
	{"SUMMARIZER_URL", "(none: built-in extractive summarizer)", "Base URL of an OpenAI-compatible API (…/v1) used to summarize documents."},
	{"SUMMARIZER_MODEL", "gpt-4o-mini", "Model name sent to SUMMARIZER_URL."},
	{"SUMMARIZER_API_KEY", "", "Bearer token for SUMMARIZER_URL (use SUMMARIZER_API_KEY_FILE for a mounted secret)."},
	{"RETRY_MAX_ATTEMPTS", "20", "Attempts per message, the first included (about 1¾ hours of retries at the default backoff), before it is dead-lettered or its email or document marked failed (the projector makes at least 50: its failures are outages, not bad data)."},
	{"RETRY_BACKOFF_MIN", "1s", "Delay before the first retry; doubles per attempt, ±20% jitter."},
	{"RETRY_BACKOFF_MAX", "10m", "Longest delay between retries."},
	{"CLAIM_MIN_IDLE", "10s", "Idle time after which a dead consumer's messages are claimed by a live replica."},
	{"SHUTDOWN_TIMEOUT", "20s", "How long a stopping process lets running requests and handlers finish. Keep the container stop grace period longer."},
	{"SHUTDOWN_DELAY", "0s", "api only: how long it keeps serving after SIGTERM, with /readyz failing, before it stops accepting, so that a load balancer (Kubernetes endpoints) stops sending it requests first. Keep the grace period longer than this plus SHUTDOWN_TIMEOUT."},
	{"CONVEYOR_DATA_DIR", "./.conveyor", "conveyor up only: where the local Redis and PostgreSQL keep their data (redis/, postgres/), and uploads (blobs/) and outbox emails (outbox/) unless BLOB_DIR / OUTBOX_DIR are set. Run as root, it must be a folder the postgres user can enter."},
	{"SCHEDULES_FILE", "(none: built-in schedules only)", "YAML file of periodic events (cron) and built-in schedule overrides, read by the scheduler."},
	{"MAX_DELAY", "720h", "Longest accepted delay of a delayed event or email (30 days); further → 422."},
	{"STUCK_AFTER", "the retry window + 15m (2h43m with the default retry settings)", "The stuck-document re-drive re-publishes documents still processing this long after upload; shorter than the retry window (computed from RETRY_* as set on the scheduler: set them as on the handlers), it re-publishes documents that are only waiting for their retries."},
	{"INBOX_RETENTION", "168h", "The projector remembers an applied event (its inbox row) this long, so that a redelivery changes nothing twice; an event redelivered later is applied again (7 days). At least 24h."},
	{"BLOB_RETENTION", "168h", "Stored bytes of failed documents are removed this long after the failure, and bytes no document refers to this long after they were stored, but never before 8 days, while a retry under an Idempotency-Key may still need them (7 days)."},
}

// Load reads the configuration through getenv (os.Getenv in production).
// Each variable named in required must be set (see [Config.Require]): one
// that is not is reported with every other problem, not after they are
// fixed.
func Load(getenv func(string) string, required ...string) (Config, error) {
	r := reader{getenv: getenv, bad: map[string]bool{}}
	c := Config{
		RedisURL:             r.str("REDIS_URL", ""),
		DatabaseURL:          r.str("DATABASE_URL", ""),
		HTTPAddr:             r.str("HTTP_ADDR", ":8080"),
		BlobDir:              r.str("BLOB_DIR", "./data/blobs"),
		SMTPURL:              r.str("SMTP_URL", ""),
		SMTPFrom:             r.str("SMTP_FROM", "Conveyor <conveyor@localhost>"),
		SMTPTimeout:          r.duration("SMTP_TIMEOUT", 30*time.Second),
		OutboxDir:            r.str("OUTBOX_DIR", "./data/outbox"),
		ConsumerName:         r.str("CONSUMER_NAME", ""),
		MaxUploadBytes:       r.int64("MAX_UPLOAD_BYTES", 32<<20),
		MaxConcurrentUploads: int(r.int64("MAX_CONCURRENT_UPLOADS", 64)),
		CacheTTL:             r.duration("CACHE_TTL", 60*time.Second),
		LogFormat:            r.str("LOG_FORMAT", "json"),
		SummarizerURL:        r.str("SUMMARIZER_URL", ""),
		SummarizerModel:      r.str("SUMMARIZER_MODEL", "gpt-4o-mini"),
		SummarizerAPIKey:     r.str("SUMMARIZER_API_KEY", ""),
		RetryMaxAttempts:     int(r.int64("RETRY_MAX_ATTEMPTS", 20)),
		RetryMinBackoff:      r.duration("RETRY_BACKOFF_MIN", time.Second),
		RetryMaxBackoff:      r.duration("RETRY_BACKOFF_MAX", 10*time.Minute),
		ClaimMinIdle:         r.duration("CLAIM_MIN_IDLE", 10*time.Second),
		ShutdownTimeout:      r.duration("SHUTDOWN_TIMEOUT", 20*time.Second),
		ShutdownDelay:        r.duration("SHUTDOWN_DELAY", 0),
		DataDir:              r.str("CONVEYOR_DATA_DIR", "./.conveyor"),
		SchedulesFile:        r.str("SCHEDULES_FILE", ""),
		MaxDelay:             r.duration("MAX_DELAY", 30*24*time.Hour),
		StuckAfter:           r.duration("STUCK_AFTER", -1), // -1: not set, made 0 below
		BlobRetention:        r.duration("BLOB_RETENTION", 7*24*time.Hour),
		InboxRetention:       r.duration("INBOX_RETENTION", 7*24*time.Hour),
	}
	c.CacheRedisURL = r.str("CACHE_REDIS_URL", c.RedisURL)
	switch lvl := strings.ToLower(r.str("LOG_LEVEL", "info")); lvl {
	case "debug":
		c.LogLevel = slog.LevelDebug
	case "info":
		c.LogLevel = slog.LevelInfo
	case "warn", "warning":
		c.LogLevel = slog.LevelWarn
	case "error":
		c.LogLevel = slog.LevelError
	default:
		r.fail("LOG_LEVEL", "must be debug, info, warn or error, not %q", lvl)
	}
	if c.LogFormat != "json" && c.LogFormat != "text" {
		r.fail("LOG_FORMAT", "must be json or text, not %q", c.LogFormat)
	}
	r.url("REDIS_URL", c.RedisURL, "redis", "rediss", "unix")
	r.url("CACHE_REDIS_URL", c.CacheRedisURL, "redis", "rediss", "unix")
	r.url("DATABASE_URL", c.DatabaseURL, "postgres", "postgresql")
	r.url("SMTP_URL", c.SMTPURL, "smtp", "smtps")
	r.url("SUMMARIZER_URL", c.SummarizerURL, "http", "https")
	if c.MaxUploadBytes < 1 {
		r.fail("MAX_UPLOAD_BYTES", "must be positive")
	}
	if c.MaxConcurrentUploads < 1 || c.MaxConcurrentUploads > 1<<20 {
		r.fail("MAX_CONCURRENT_UPLOADS", "must be between 1 and 1048576")
	}
	if c.CacheTTL <= 0 {
		r.fail("CACHE_TTL", "must be positive")
	}
	if c.RetryMaxAttempts < 1 {
		r.fail("RETRY_MAX_ATTEMPTS", "must be at least 1")
	}
	if c.RetryMinBackoff < 0 || c.RetryMaxBackoff < c.RetryMinBackoff {
		r.fail("RETRY_BACKOFF_MIN", "must be between 0 and RETRY_BACKOFF_MAX")
	}
	if c.ClaimMinIdle < time.Second {
		r.fail("CLAIM_MIN_IDLE", "must be at least 1s")
	}
	if c.ShutdownDelay < 0 {
		r.fail("SHUTDOWN_DELAY", "must not be negative")
	}
	if c.ShutdownTimeout <= 0 {
		r.fail("SHUTDOWN_TIMEOUT", "must be positive")
	}
	for name, d := range map[string]time.Duration{"MAX_DELAY": c.MaxDelay, "STUCK_AFTER": c.StuckAfter, "BLOB_RETENTION": c.BlobRetention} {
		if d <= 0 && !(name == "STUCK_AFTER" && d == -1) {
			r.fail(name, "must be positive")
		}
	}
	if c.StuckAfter == -1 {
		c.StuckAfter = 0 // the default: the scheduler derives it from the retry policy
	}
	if c.InboxRetention < MinInboxRetention {
		r.fail("INBOX_RETENTION", "must be at least %s: an event redelivered after its inbox row is gone is applied again", MinInboxRetention)
	}
	if c.SMTPTimeout <= 0 {
		r.fail("SMTP_TIMEOUT", "must be positive")
	}
	if strings.ContainsAny(c.ConsumerName, " \t\r\n") {
		r.fail("CONSUMER_NAME", "must not contain white space")
	}
	for _, n := range required {
		// A variable whose value or file was refused is reported once.
		if r.bad[n] || r.bad[n+"_FILE"] {
			continue
		}
		if err := c.Require(n); err != nil {
			r.errs = append(r.errs, err)
		}
	}
	return c, errors.Join(r.errs...)
}

// Require reports every listed variable that is empty in c.
func (c Config) Require(names ...string) error {
	values := map[string]string{
		"REDIS_URL":    c.RedisURL,
		"DATABASE_URL": c.DatabaseURL,
		"BLOB_DIR":     c.BlobDir,
	}
	var errs []error
	for _, n := range names {
		if values[n] == "" {
			errs = append(errs, fmt.Errorf("%s is required", n))
		}
	}
	return errors.Join(errs...)
}

type reader struct {
	getenv func(string) string
	errs   []error
	bad    map[string]bool // names that errs reports
}

func (r *reader) fail(name, format string, args ...any) {
	r.bad[name] = true
	r.errs = append(r.errs, fmt.Errorf("%s: "+format, append([]any{name}, args...)...))
}

// raw returns the value of name or, failing that, the contents of the file
// named by name_FILE.
func (r *reader) raw(name string) string {
	v := r.getenv(name)
	file := r.getenv(name + "_FILE")
	if file == "" {
		return v
	}
	if v != "" {
		r.fail(name, "set both %s and %s_FILE; set one", name, name)
		return v
	}
	b, err := os.ReadFile(file)
	if err != nil {
		r.fail(name+"_FILE", "%v", err)
		return ""
	}
	return strings.TrimRight(string(b), "\r\n")
}

func (r *reader) str(name, def string) string {
	if v := r.raw(name); v != "" {
		return v
	}
	return def
}

func (r *reader) duration(name string, def time.Duration) time.Duration {
	v := r.raw(name)
	if v == "" {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		r.fail(name, "must be a duration like 30s or 5m, not %q", v)
		return def
	}
	return d
}

func (r *reader) int64(name string, def int64) int64 {
	v := r.raw(name)
	if v == "" {
		return def
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		r.fail(name, "must be an integer, not %q", v)
		return def
	}
	return n
}

func (r *reader) url(name, v string, schemes ...string) {
	if v == "" {
		return
	}
	// No message here quotes the value or the parser's error, which
	// quotes the value: a URL may hold a password.
	u, err := url.Parse(v)
	if err != nil {
		r.fail(name, "is not a valid URL (the value is not shown, as it may hold a password; percent-encode special characters such as / ? # %% @ in the user name or password)")
		return
	}
	for _, s := range schemes {
		if u.Scheme != s {
			continue
		}
		switch {
		case s == "unix":
			// unix:///path/to/redis.sock
			if u.Path == "" {
				r.fail(name, "names no socket path")
			}
		case u.Host == "" && (s == "postgres" || s == "postgresql") && u.Query().Get("host") != "":
			// postgres:///db?host=/var/run/postgresql: a Unix socket.
		case u.Host == "":
			r.fail(name, "names no host")
		}
		return
	}
	want := make([]string, len(schemes))
	for i, s := range schemes {
		want[i] = s + "://"
	}
	if u.Scheme == "" || u.Opaque != "" {
		// Without "//" after it, what url.Parse took for a scheme may be a
		// user name or a piece of a password ("app:pass@host").
		r.fail(name, "must start with one of %s", strings.Join(want, ", "))
		return
	}
	r.fail(name, "must start with one of %s, not %s://", strings.Join(want, ", "), u.Scheme)
}
