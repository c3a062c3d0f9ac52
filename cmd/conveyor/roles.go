package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/conveyor/conveyor/api"
	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/projector"
)

func apiCommand() *command {
	return &command{
		name:    "api",
		summary: "serve the HTTP API (uploads, emails, events, reads)",
		usage: `Serves HTTP API v1 on HTTP_ADDR: POST /v1/documents, GET /v1/documents/{id},
POST /v1/emails, GET /v1/emails/{id}, POST /v1/events, POST /v1/events/batch,
plus /healthz, /readyz and /metrics. On SIGTERM it stops accepting and lets
running requests finish within SHUTDOWN_TIMEOUT.`,
		vars:     []string{"REDIS_URL", "CACHE_REDIS_URL", "DATABASE_URL", "HTTP_ADDR", "BLOB_DIR", "MAX_UPLOAD_BYTES", "MAX_CONCURRENT_UPLOADS", "MAX_DELAY", "CACHE_TTL", "LOG_LEVEL", "LOG_FORMAT", "SHUTDOWN_TIMEOUT", "SHUTDOWN_DELAY"},
		requires: []string{"REDIS_URL", "DATABASE_URL"},
		run: func(ctx context.Context, env *environment, _ any, _ []string) error {
			log := newLogger(env.cfg, os.Stderr)
			ln, err := listen(env.cfg.HTTPAddr)
			if err != nil {
				return err
			}
			defer ln.Close()
			a, err := newApp(ctx, env.cfg, log, needs{db: true, blobs: true})
			if err != nil {
				return err
			}
			defer a.close()
			h, err := a.apiHandler(a.checks("api", nil))
			if err != nil {
				return err
			}
			log.Info("api listening", "addr", ln.Addr().String())
			return serve(a.stopAfterDelay(ctx), newServer(env.cfg.HTTPAddr, h, log), ln, env.cfg.ShutdownTimeout, log)
		},
	}
}

// stopAfterDelay returns a context that ends SHUTDOWN_DELAY after ctx:
// meanwhile the api's readiness fails (check "accepting"), so that load
// balancers stop sending before it stops accepting.
func (a *app) stopAfterDelay(ctx context.Context) context.Context {
	if a.cfg.ShutdownDelay <= 0 {
		return ctx
	}
	delayed, cancel := context.WithCancel(context.WithoutCancel(ctx))
	go func() {
		<-ctx.Done()
		a.stopping.Store(true)
		a.log.Info("stopping: readiness fails now; the api stops accepting after SHUTDOWN_DELAY", "delay", a.cfg.ShutdownDelay)
		time.Sleep(a.cfg.ShutdownDelay)
		cancel()
	}()
	return delayed
}

// apiHandler returns the api's handler, with checks as its readiness checks.
func (a *app) apiHandler(checks map[string]api.Check) (http.Handler, error) {
	a.reg.MustRegister(bus.NewStatusCollector(a.rdb, topology()))
	srv, err := api.New(api.Config{
		Publisher:            a.pub,
		Blobs:                a.blobs,
		Reader:               a.store,
		Cache:                a.cache,
		Idem:                 a.idem,
		CacheTTL:             a.cfg.CacheTTL,
		MaxUploadBytes:       a.cfg.MaxUploadBytes,
		MaxConcurrentUploads: a.cfg.MaxConcurrentUploads,
		MaxDelay:             a.cfg.MaxDelay,
		Checks:               checks,
		Registry:             a.reg,
		Logger:               a.log,
	})
	if err != nil {
		return nil, err
	}
	return srv.Handler(), nil
}

type handlerOpts struct {
	handlers    *string
	concurrency *int
}

var knownHandlers = map[string]string{
	"document": "document-processor: extracts text, counts, summarizes; publishes document.processed/failed",
	"email":    "email-sender: sends email.requested over SMTP (or to the outbox); publishes email.sent/failed",
}

func parseHandlers(s string) (map[string]bool, error) {
	out := map[string]bool{}
	if s == "" || s == "all" {
		for k := range knownHandlers {
			out[k] = true
		}
		return out, nil
	}
	for _, h := range strings.Split(s, ",") {
		h = strings.TrimSpace(h)
		if _, ok := knownHandlers[h]; !ok {
			names := make([]string, 0, len(knownHandlers))
			for k := range knownHandlers {
				names = append(names, k)
			}
			sort.Strings(names)
			return nil, fmt.Errorf("%w: unknown handler %q (known: %s)", errUsage, h, strings.Join(names, ", "))
		}
		out[h] = true
	}
	return out, nil
}

func handlerCommand() *command {
	return &command{
		name:    "handler",
		summary: "run handler consumers (document processor, email sender)",
		usage: `Runs the chosen handlers, each as one consumer group; replicas share the
groups. Serves /healthz, /readyz and /metrics on HTTP_ADDR. On SIGTERM it stops
reading, lets running messages finish within SHUTDOWN_TIMEOUT (the rest stay
pending and are picked up again), flushes acks and exits.

Handlers:
  document  ` + knownHandlers["document"] + `
  email     ` + knownHandlers["email"],
		vars: []string{"REDIS_URL", "CACHE_REDIS_URL", "HTTP_ADDR", "BLOB_DIR", "SMTP_URL", "SMTP_FROM", "SMTP_TIMEOUT", "OUTBOX_DIR",
			"CONSUMER_NAME", "MAX_UPLOAD_BYTES", "SUMMARIZER_URL", "SUMMARIZER_MODEL", "SUMMARIZER_API_KEY",
			"RETRY_MAX_ATTEMPTS", "RETRY_BACKOFF_MIN", "RETRY_BACKOFF_MAX", "CLAIM_MIN_IDLE", "SHUTDOWN_TIMEOUT", "LOG_LEVEL", "LOG_FORMAT"},
		requires: []string{"REDIS_URL"},
		flags: func(fs *flag.FlagSet) any {
			return &handlerOpts{
				handlers:    fs.String("handlers", "all", "comma-separated handlers to run: document, email, or all"),
				concurrency: fs.Int("concurrency", 64, "messages each handler works on at once"),
			}
		},
		run: func(ctx context.Context, env *environment, o any, _ []string) error {
			opts := o.(*handlerOpts)
			which, err := parseHandlers(*opts.handlers)
			if err != nil {
				return err
			}
			if *opts.concurrency < 1 {
				return fmt.Errorf("%w: --concurrency must be at least 1", errUsage)
			}
			log := newLogger(env.cfg, os.Stderr)
			ln, err := listen(env.cfg.HTTPAddr)
			if err != nil {
				return err
			}
			defer ln.Close()
			a, err := newApp(ctx, env.cfg, log, needs{blobs: which["document"], consumer: true})
			if err != nil {
				return err
			}
			defer a.close()
			router, err := a.router(*opts.concurrency)
			if err != nil {
				return err
			}
			if err := a.registerHandlers(router, which); err != nil {
				return err
			}
			log.Info("handler running", "handlers", *opts.handlers, "concurrency", *opts.concurrency, "consumer", a.lease.Name())
			return runRouterAndServer(ctx, a, router, newServer(env.cfg.HTTPAddr, opsHandler(a.checks("handler", router), a.reg), log), ln)
		},
	}
}

type projectorOpts struct {
	concurrency *int
}

func projectorCommand() *command {
	return &command{
		name:    "projector",
		summary: "apply events to the Postgres read models and invalidate the cache",
		usage: `Consumes every event stream as group "projector" and keeps the documents and
emails read models in Postgres, applying concurrent events in one transaction
with the inbox, then deleting the cache keys of changed rows. Serves /healthz,
/readyz and /metrics on HTTP_ADDR.`,
		vars: []string{"REDIS_URL", "CACHE_REDIS_URL", "DATABASE_URL", "HTTP_ADDR", "CONSUMER_NAME", "RETRY_MAX_ATTEMPTS",
			"RETRY_BACKOFF_MIN", "RETRY_BACKOFF_MAX", "CLAIM_MIN_IDLE", "SHUTDOWN_TIMEOUT", "LOG_LEVEL", "LOG_FORMAT"},
		requires: []string{"REDIS_URL", "DATABASE_URL"},
		flags: func(fs *flag.FlagSet) any {
			return &projectorOpts{concurrency: fs.Int("concurrency", 1024, "events in flight at once (they share transactions, up to 500 each)")}
		},
		run: func(ctx context.Context, env *environment, o any, _ []string) error {
			opts := o.(*projectorOpts)
			log := newLogger(env.cfg, os.Stderr)
			ln, err := listen(env.cfg.HTTPAddr)
			if err != nil {
				return err
			}
			defer ln.Close()
			a, err := newApp(ctx, env.cfg, log, needs{db: true, consumer: true})
			if err != nil {
				return err
			}
			defer a.close()
			router, err := a.router(*opts.concurrency)
			if err != nil {
				return err
			}
			p, err := a.projector()
			if err != nil {
				return err
			}
			defer p.Close()
			if err := p.Register(router, bus.WithRetry(a.projectorRetry())); err != nil {
				return err
			}
			log.Info("projector running", "consumer", a.lease.Name())
			return runRouterAndServer(ctx, a, router, newServer(env.cfg.HTTPAddr, opsHandler(a.checks("projector", router), a.reg), log), ln)
		},
	}
}

func (a *app) projector() (*projector.Projector, error) {
	return projector.New(projector.Config{Store: a.store, Cache: a.cache, Logger: a.log, Registerer: a.reg})
}

// migrateTimeout bounds a migrate run, waiting for Redis and PostgreSQL
// included: a one-shot job that waits forever blocks what depends on it
// without a word.
var migrateTimeout = 2 * time.Minute

func migrateCommand() *command {
	return &command{
		name:    "migrate",
		oneShot: true,
		summary: "apply database migrations and create consumer groups, then exit",
		usage: `Applies the SQL migrations embedded in the binary (under an advisory lock, so
concurrent runs are safe) and creates every consumer group on its streams.`,
		vars:     []string{"REDIS_URL", "DATABASE_URL", "LOG_LEVEL", "LOG_FORMAT"},
		requires: []string{"REDIS_URL", "DATABASE_URL"},
		run: func(ctx context.Context, env *environment, _ any, _ []string) error {
			log := newLogger(env.cfg, os.Stderr)
			ctx, cancel := withStartTimeout(ctx, migrateTimeout)
			defer cancel()
			a, err := newApp(ctx, env.cfg, log, needs{db: true})
			if err != nil {
				return err
			}
			defer a.close()
			return a.migrate(ctx, env)
		},
	}
}

func (a *app) migrate(ctx context.Context, env *environment) error {
	ran, err := a.store.Migrate(ctx)
	if err != nil {
		return err
	}
	if len(ran) == 0 {
		fmt.Fprintln(env.stdout, "database schema is up to date")
	}
	for _, m := range ran {
		fmt.Fprintf(env.stdout, "applied migration %s\n", m)
	}
	return nil
}

type healthOpts struct {
	url     *string
	timeout *time.Duration
}

func healthcheckCommand() *command {
	return &command{
		name:    "healthcheck",
		oneShot: true,
		summary: "exit 0 if the role on HTTP_ADDR is ready (or degraded), 1 if not (for container HEALTHCHECK)",
		usage: `Calls GET /readyz of the role listening on HTTP_ADDR (or --url) and exits 0 on 200
(status ready, or degraded: a dependency the role works without is down), 1
otherwise.`,
		vars: []string{"HTTP_ADDR"},
		flags: func(fs *flag.FlagSet) any {
			return &healthOpts{
				url:     fs.String("url", "", "readiness URL to call (default http://127.0.0.1:<port of HTTP_ADDR>/readyz)"),
				timeout: fs.Duration("timeout", 3*time.Second, "give up after this long"),
			}
		},
		run: func(ctx context.Context, env *environment, o any, _ []string) error {
			opts := o.(*healthOpts)
			u := *opts.url
			if u == "" {
				host, port, err := net.SplitHostPort(env.cfg.HTTPAddr)
				if err != nil {
					return fmt.Errorf("%w: HTTP_ADDR %q: %v", errUsage, env.cfg.HTTPAddr, err)
				}
				if host == "" || host == "0.0.0.0" || host == "::" {
					host = "127.0.0.1"
				}
				u = "http://" + net.JoinHostPort(host, port) + "/readyz"
			}
			ctx, cancel := context.WithTimeout(ctx, *opts.timeout)
			defer cancel()
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
			if err != nil {
				return err
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				return fmt.Errorf("not healthy: %w", err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("not ready: %s", resp.Status)
			}
			fmt.Fprintln(env.stdout, "ready")
			return nil
		},
	}
}

// runAll runs the api, every handler, the projector and the scheduler in
// one process.
func runAll(ctx context.Context, a *app, ln net.Listener) error {
	router, err := a.router(64)
	if err != nil {
		return err
	}
	if err := a.registerHandlers(router, map[string]bool{"document": true, "email": true}); err != nil {
		return err
	}
	p, err := a.projector()
	if err != nil {
		return err
	}
	defer p.Close()
	if err := p.Register(router, bus.WithRetry(a.projectorRetry())); err != nil {
		return err
	}
	// The checks of up, whose router runs the projector too.
	h, err := a.apiHandler(a.checks("up", router))
	if err != nil {
		return err
	}
	sc, err := a.newScheduler()
	if err != nil {
		return err
	}
	return runRouterAndServer(ctx, a, router, newServer(a.cfg.HTTPAddr, h, a.log), ln, sc.Run)
}
