package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/conveyor/conveyor/config"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/handlers"
	"github.com/conveyor/conveyor/projector"
	"github.com/conveyor/conveyor/scheduler"
)

// checkSchedulesFile refuses a bad SCHEDULES_FILE at once (exit status 2),
// before the command waits for Redis (or up starts its servers), which
// would report it only once they answer.
func checkSchedulesFile(cfg config.Config) error {
	if cfg.SchedulesFile == "" {
		return nil
	}
	f, err := scheduler.LoadFile(cfg.SchedulesFile)
	if err == nil {
		err = f.Validate()
	}
	if err != nil {
		return fmt.Errorf("%w: SCHEDULES_FILE: %w", errConfig, err)
	}
	return nil
}

// newScheduler builds the scheduler with the user's schedules and the
// built-in ones.
func (a *app) newScheduler() (*scheduler.Scheduler, error) {
	var file scheduler.File
	if a.cfg.SchedulesFile != "" {
		var err error
		if file, err = scheduler.LoadFile(a.cfg.SchedulesFile); err != nil {
			return nil, err
		}
	}
	streams := make([]string, 0, len(events.Types()))
	for _, t := range events.Types() {
		streams = append(streams, a.pub.Stream(t))
	}
	identity := a.cfg.ConsumerName
	if a.lease != nil {
		identity = a.lease.Name()
	}
	return scheduler.New(scheduler.Config{
		Redis:      a.rdb,
		Publisher:  a.pub,
		File:       file,
		Builtins:   a.builtinSchedules(),
		Streams:    streams,
		Identity:   identity,
		Logger:     a.log,
		Registerer: a.reg,
	})
}

func schedulerCommand() *command {
	return &command{
		name:    "scheduler",
		summary: "fire periodic events and move delayed events when due (run 2+ replicas for availability)",
		usage: `Fires every schedule of SCHEDULES_FILE and the built-in ones, and moves
delayed events (POST /v1/events with deliver_at or delay, POST /v1/emails with
send_at) into their streams when due. Replicas need no coordination: each tick
is published exactly once, whichever replicas are alive. Serves /healthz,
/readyz and /metrics on HTTP_ADDR.`,
		vars:     []string{"REDIS_URL", "DATABASE_URL", "HTTP_ADDR", "SCHEDULES_FILE", "BLOB_DIR", "STUCK_AFTER", "RETRY_MAX_ATTEMPTS", "RETRY_BACKOFF_MIN", "RETRY_BACKOFF_MAX", "BLOB_RETENTION", "INBOX_RETENTION", "SHUTDOWN_TIMEOUT", "LOG_LEVEL", "LOG_FORMAT"},
		requires: []string{"REDIS_URL"},
		run: func(ctx context.Context, env *environment, _ any, _ []string) error {
			if err := checkSchedulesFile(env.cfg); err != nil {
				return err
			}
			log := newLogger(env.cfg, os.Stderr)
			ln, err := listen(env.cfg.HTTPAddr)
			if err != nil {
				return err
			}
			defer ln.Close()
			a, err := newApp(ctx, env.cfg, log, needs{db: env.cfg.DatabaseURL != "", blobs: env.cfg.DatabaseURL != ""})
			if err != nil {
				return err
			}
			defer a.close()
			sc, err := a.newScheduler()
			if err != nil {
				return err
			}
			if w := handlerWindow(env.cfg); a.store != nil && stuckAfter(env.cfg) <= w {
				log.Warn("STUCK_AFTER is within the retry window: the stuck-document re-drive re-publishes documents that only wait for a retry, and they are processed again",
					"stuck_after", stuckAfter(env.cfg), "retry_window", w)
			}
			if a.store == nil {
				log.Warn("no DATABASE_URL: the built-in maintenance schedules do not run, so the projector's inbox and stored upload bytes are never pruned and stuck documents are not re-driven; set DATABASE_URL (and BLOB_DIR) on the scheduler",
					"builtins", []string{scheduler.BuiltinStuckDocuments, scheduler.BuiltinBlobRetention, scheduler.BuiltinInboxRetention})
			}
			log.Info("scheduler running")
			g, gctx := errgroup.WithContext(ctx)
			g.Go(func() error { return sc.Run(gctx) })
			g.Go(func() error {
				return serve(gctx, newServer(env.cfg.HTTPAddr, opsHandler(a.checks("scheduler", nil), a.reg), log), ln, env.cfg.ShutdownTimeout, log)
			})
			return g.Wait()
		},
	}
}

type schedulesOpts struct {
	json *bool
}

// schedulesTimeout bounds conveyor schedules, waiting for its servers
// included.
var schedulesTimeout = 15 * time.Second

func schedulesCommand() *command {
	return &command{
		name:    "schedules",
		oneShot: true,
		summary: "list schedules with their next and last fire times and outcomes",
		usage: `Validates SCHEDULES_FILE and lists every schedule with its next fire time, last tick,
when and by which replica it fired, and the outcome. The built-in schedules
are listed only with DATABASE_URL (and BLOB_DIR), as on the scheduler.`,
		vars:     []string{"REDIS_URL", "DATABASE_URL", "BLOB_DIR", "SCHEDULES_FILE"},
		requires: []string{"REDIS_URL"},
		flags: func(fs *flag.FlagSet) any {
			return &schedulesOpts{json: fs.Bool("json", false, "print JSON")}
		},
		run: func(ctx context.Context, env *environment, o any, _ []string) error {
			opts := o.(*schedulesOpts)
			log := newLogger(env.cfg, os.Stderr)
			// A listing: it gives up on a Redis or PostgreSQL that does
			// not answer, as status and dlq do, instead of waiting for it
			// as a server does.
			ctx, cancel := withStartTimeout(ctx, schedulesTimeout)
			defer cancel()
			withDB := env.cfg.DatabaseURL != ""
			a, err := newApp(ctx, env.cfg, log, needs{db: withDB, blobs: withDB})
			if err != nil {
				return err
			}
			defer a.close()
			sc, err := a.newScheduler()
			if err != nil {
				return err
			}
			list, err := sc.List(ctx)
			if err != nil {
				return err
			}
			if *opts.json {
				return json.NewEncoder(env.stdout).Encode(list)
			}
			tw := tabwriter.NewWriter(env.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "NAME\tCRON\tTZ\tWHAT\tNEXT\tLAST TICK\tOUTCOME\tBY")
			for _, s := range list {
				next := "disabled"
				if s.Enabled {
					next = s.Next.Format(time.RFC3339)
				}
				last := "never"
				if !s.LastTick.IsZero() {
					last = s.LastTick.Format(time.RFC3339)
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.Name, s.Cron, s.Timezone, s.What, next, last, s.Outcome, s.FiredBy)
			}
			return tw.Flush()
		},
	}
}

// documentQueues are the groups, and the event types they read, that a
// document's events pass through to its read model: the stuck-document
// re-drive leaves alone what may be waiting in them.
func documentQueues() map[string][]string {
	return map[string][]string{
		handlers.DocumentGroup: {events.TypeDocumentUploaded},
		projector.Group:        {events.TypeDocumentUploaded, events.TypeDocumentProcessed, events.TypeDocumentProcessingFailed},
	}
}

// builtinSchedules are the maintenance schedules; they need the database
// and the blob folder, so a scheduler without DATABASE_URL runs none.
func (a *app) builtinSchedules() []scheduler.Builtin {
	if a.store == nil || a.blobs == nil {
		return nil
	}
	return []scheduler.Builtin{
		{Name: scheduler.BuiltinStuckDocuments, Cron: "*/5 * * * *",
			Job: scheduler.Redrive(a.store, a.pub, a.rdb, stuckAfter(a.cfg), documentQueues(), a.log)},
		{Name: scheduler.BuiltinBlobRetention, Cron: "@hourly",
			Job: scheduler.BlobRetention(a.store, a.blobs, a.cfg.BlobRetention, a.log)},
		{Name: scheduler.BuiltinInboxRetention, Cron: "* * * * *",
			Job: scheduler.InboxRetention(a.store, a.cfg.InboxRetention, a.log)},
	}
}
