package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/conveyor/conveyor/config"
	"github.com/conveyor/conveyor/embedded"
)

type upOpts struct {
	dataDir *string
}

func upCommand() *command {
	return &command{
		name:    "up",
		summary: "run api, handlers, projector and scheduler in one process (starts local Redis/PostgreSQL if unconfigured)",
		usage: `Runs the api, every handler, the projector and the scheduler (schedules,
delayed events and emails) in one process, for a laptop.
If REDIS_URL is unset it starts a local redis-server (AOF on) and if
DATABASE_URL is unset a local PostgreSQL, both with their data under
CONVEYOR_DATA_DIR (default ./.conveyor), reused on the next run. It applies
migrations, prints the API URL (127.0.0.1:8080 unless HTTP_ADDR is set),
and on Ctrl-C stops everything it started.
Uploaded bytes and outbox emails also live under CONVEYOR_DATA_DIR unless
BLOB_DIR / OUTBOX_DIR are set. For the servers it started it prints an
export line to paste into another shell, so that conveyor status, dlq and
schedules reach them (the local redis-server listens on a port of its own).`,
		vars: append([]string{"CONVEYOR_DATA_DIR"}, allVars...),
		flags: func(fs *flag.FlagSet) any {
			return &upOpts{dataDir: fs.String("data", "", "data folder (overrides CONVEYOR_DATA_DIR)")}
		},
		run: runUp,
	}
}

func runUp(ctx context.Context, env *environment, o any, _ []string) error {
	opts := o.(*upOpts)
	// set reports whether the user set a variable, as X or as X_FILE.
	set := func(name string) bool { return env.getenv(name) != "" || env.getenv(name+"_FILE") != "" }
	cfg := upDefaults(env.cfg, set)
	if *opts.dataDir != "" {
		cfg.DataDir = *opts.dataDir
	}
	if err := checkSchedulesFile(cfg); err != nil {
		return err
	}
	log := newLogger(cfg, os.Stderr)
	// A local server that dies is restarted (embedded); one that keeps
	// dying stops the whole process, with its cause.
	ctx, serverDown := context.WithCancelCause(ctx)
	defer serverDown(nil)
	dataDir, err := filepath.Abs(cfg.DataDir)
	if err != nil {
		return err
	}
	if !set("BLOB_DIR") {
		cfg.BlobDir = filepath.Join(dataDir, "blobs")
	}
	if !set("OUTBOX_DIR") {
		cfg.OutboxDir = filepath.Join(dataDir, "outbox")
	}
	ln, err := listen(cfg.HTTPAddr)
	if err != nil {
		return err
	}
	defer ln.Close()

	// Servers started here are stopped here, after the pipeline stopped,
	// even if ctx is already cancelled (Ctrl-C).
	var stops []func()
	defer func() {
		for i := len(stops) - 1; i >= 0; i-- {
			stops[i]()
		}
	}()
	serverLog := log.With("component", "embedded")
	// started holds the variables that name what up started itself, for
	// the commands run from another shell. A URL the user set is not
	// printed: it may hold a password, and the user has it already.
	var started [][2]string
	if cfg.RedisURL == "" {
		r, err := embedded.StartRedis(ctx, embedded.RedisConfig{Dir: filepath.Join(dataDir, "redis"), Logger: serverLog})
		if err != nil {
			return friendly(err, "redis-server")
		}
		stops = append(stops, func() { stopServer(log, "redis", r.Stop) })
		go watchServer(ctx, serverDown, "redis-server", r.Failed(), r.Err)
		cfg.RedisURL = r.URL()
		if !set("CACHE_REDIS_URL") {
			cfg.CacheRedisURL = cfg.RedisURL
		}
		log.Info("started local redis-server", "url", cfg.RedisURL, "data", filepath.Join(dataDir, "redis"))
		started = append(started, [2]string{"REDIS_URL", cfg.RedisURL})
	}
	if cfg.DatabaseURL == "" {
		p, err := embedded.StartPostgres(ctx, embedded.PostgresConfig{Dir: filepath.Join(dataDir, "postgres"), Logger: serverLog})
		if err != nil {
			return friendly(err, "postgres")
		}
		stops = append(stops, func() { stopServer(log, "postgres", p.Stop) })
		go watchServer(ctx, serverDown, "postgres", p.Failed(), p.Err)
		cfg.DatabaseURL = p.URL()
		log.Info("started local PostgreSQL", "url", cfg.DatabaseURL, "data", filepath.Join(dataDir, "postgres"))
		started = append(started, [2]string{"DATABASE_URL", cfg.DatabaseURL})
	}
	if len(started) > 0 && !set("BLOB_DIR") {
		// schedules lists the built-in schedules, which need the blobs.
		started = append(started, [2]string{"BLOB_DIR", cfg.BlobDir})
	}

	a, err := newApp(ctx, cfg, log, needs{db: true, blobs: true, consumer: true})
	if err != nil {
		return err
	}
	defer a.close()
	if err := a.migrate(ctx, &environment{cfg: cfg, stdout: env.stdout}); err != nil {
		return err
	}
	base := "http://" + displayAddr(ln.Addr())
	fmt.Fprintf(env.stdout, `
Conveyor is up: %[1]s
  upload:   curl -F file=@README.md -F notify=you@example.com %[1]s/v1/documents
  status:   curl %[1]s/v1/documents/<doc_id>
  email:    curl -H 'Content-Type: application/json' -d '{"to":"you@example.com","subject":"Hi","body":"Hello"}' %[1]s/v1/emails
  ready:    curl %[1]s/readyz
Emails go to %[2]s unless SMTP_URL is set. Press Ctrl-C to stop.
`, base, cfg.OutboxDir)
	if len(started) > 0 {
		fmt.Fprintf(env.stdout, `For conveyor status, dlq and schedules in another shell, paste first:
  %s
`, exportLine(started))
	}
	fmt.Fprintln(env.stdout)
	err = runAll(ctx, a, ln)
	if cause := context.Cause(ctx); errors.Is(cause, embedded.ErrDown) {
		return errors.Join(cause, err)
	}
	return err
}

// upAddr is up's HTTP_ADDR unless one is set: this machine only, as the API
// has no authentication (the roles' default, :8080, is for containers).
const upAddr = "127.0.0.1:8080"

// upDefaults applies up's own defaults, for a laptop, to what the user did
// not set (set reports whether a variable was).
func upDefaults(cfg config.Config, set func(name string) bool) config.Config {
	if !set("LOG_FORMAT") {
		cfg.LogFormat = "text" // readable logs unless asked otherwise
	}
	if !set("HTTP_ADDR") {
		cfg.HTTPAddr = upAddr
	}
	return cfg
}

// watchServer stops up, through cancel, with the error of a local server
// that failed for good (it kept dying however often it was restarted).
func watchServer(ctx context.Context, cancel context.CancelCauseFunc, name string, failed <-chan struct{}, errOf func() error) {
	select {
	case <-failed:
		cancel(fmt.Errorf("local %s: %w", name, errOf()))
	case <-ctx.Done():
	}
}

// exportLine is a shell line that sets vars (name, value pairs), each
// value quoted.
func exportLine(vars [][2]string) string {
	var b strings.Builder
	b.WriteString("export")
	for _, v := range vars {
		b.WriteString(" " + v[0] + "=" + shellQuote(v[1]))
	}
	return b.String()
}

// shellQuote quotes s for POSIX shells, unless it needs no quotes.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/:._-@") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func displayAddr(addr net.Addr) string {
	host, port, err := net.SplitHostPort(addr.String())
	if err != nil {
		return addr.String()
	}
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = "localhost"
	}
	return net.JoinHostPort(host, port)
}

func stopServer(log *slog.Logger, name string, stop func(context.Context) error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := stop(ctx); err != nil {
		log.Error("stop local "+name, "error", err)
		return
	}
	log.Info("stopped local " + name)
}

// friendly turns a missing server binary into install instructions; the
// error already says how, without a stack trace.
func friendly(err error, what string) error {
	if errors.Is(err, embedded.ErrNotInstalled) {
		return fmt.Errorf("%s is needed when %s is unset.\n%v\nOr point REDIS_URL and DATABASE_URL at running servers, or use `docker compose up` (see README.md)",
			what, map[string]string{"redis-server": "REDIS_URL", "postgres": "DATABASE_URL"}[what], err)
	}
	if errors.Is(err, embedded.ErrInUse) {
		return fmt.Errorf("start local %s: %w\n(or give this one a data folder of its own: --data or CONVEYOR_DATA_DIR)", what, err)
	}
	return fmt.Errorf("start local %s: %w", what, err)
}
