package main

import (
	"context"
	"encoding/json"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/hibiken/asynq"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/rivermigrate"
	"golang.org/x/sync/errgroup"

	"github.com/conveyor/conveyor/events"
)

// Peer rows: asynq (Redis) and River (PostgreSQL), each enqueueing and then
// running a no-op job whose payload is the same email the Conveyor rows
// carry.

const (
	asynqEnqueuers   = 64
	asynqConcurrency = 256
	riverInserters   = 4
	riverBatch       = 1000
	riverWorkers     = 1000
)

// asynqLogger discards asynq's logs (errors still reach the error counts).
type asynqLogger struct{}

func (asynqLogger) Debug(...any) {}
func (asynqLogger) Info(...any)  {}
func (asynqLogger) Warn(...any)  {}
func (asynqLogger) Error(...any) {}
func (asynqLogger) Fatal(...any) {}

func runAsynq(ctx context.Context, b *bench) error {
	// The same client settings as Conveyor's (a pool of 128).
	rdb, err := newRedis(b.env.redisURL, 0)
	if err != nil {
		return err
	}
	defer rdb.Close()
	payload, err := json.Marshal(newEmail())
	if err != nil {
		return err
	}
	client := asynq.NewClientFromRedisClient(rdb)

	var enqueued, failed atomic.Int64
	ectx, stop := context.WithCancel(ctx)
	g, gctx := errgroup.WithContext(ectx)
	for range asynqEnqueuers {
		g.Go(func() error {
			for gctx.Err() == nil {
				if _, err := client.EnqueueContext(gctx, asynq.NewTask("email:noop", payload)); err != nil {
					if gctx.Err() != nil {
						return nil
					}
					failed.Add(1)
					continue
				}
				enqueued.Add(1)
			}
			return nil
		})
	}
	w, err := measureCounter(ctx, enqueued.Load, 0, b.opts.warmup, b.opts.duration, b.snap)
	stop()
	_ = g.Wait()
	if err != nil {
		return err
	}
	b.add(line{key: "asynq.enqueue", what: "4a. asynq v0.26 Client.Enqueue", value: w.rate(), unit: "jobs/s", role: rolePeer,
		chart: "throughput", notes: fmt.Sprintf("%d concurrent enqueuers; %d failed; %s; %s", asynqEnqueuers, failed.Load(), w, w.cpuNotes("job"))})

	total := enqueued.Load()
	var done atomic.Int64
	srv := asynq.NewServerFromRedisClient(rdb, asynq.Config{
		Concurrency: asynqConcurrency, LogLevel: asynq.ErrorLevel, Logger: asynqLogger{},
		ShutdownTimeout: 5 * time.Second,
	})
	if err := srv.Start(asynq.HandlerFunc(func(context.Context, *asynq.Task) error {
		done.Add(1)
		return nil
	})); err != nil {
		return fmt.Errorf("asynq server: %w", err)
	}
	w, err = measureCounter(ctx, done.Load, total, b.opts.warmup, b.opts.duration, b.snap)
	srv.Shutdown()
	if err != nil {
		return err
	}
	b.add(line{key: "asynq.process", what: "4b. asynq v0.26 Server, no-op handler", value: w.rate(), unit: "jobs/s", role: rolePeer,
		chart: "throughput", notes: fmt.Sprintf("Concurrency %d; counted at handler return; %s; %s", asynqConcurrency, w, w.cpuNotes("job"))})
	_ = client.Close()
	return nil
}

// riverArgs is the River job: the benchmark email.
type riverArgs struct {
	Email events.EmailRequested `json:"email"`
}

// Kind implements river.JobArgs.
func (riverArgs) Kind() string { return "email_noop" }

// riverWorker does nothing but count.
type riverWorker struct {
	river.WorkerDefaults[riverArgs]
	n *atomic.Int64
}

// Work implements river.Worker.
func (w *riverWorker) Work(context.Context, *river.Job[riverArgs]) error {
	w.n.Add(1)
	return nil
}

func runRiver(ctx context.Context, b *bench) error {
	cfg, err := pgxpool.ParseConfig(b.env.dbURL)
	if err != nil {
		return err
	}
	cfg.MaxConns = 20 // the product's store pool size
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	driver := riverpgxv5.New(pool)
	migrator, err := rivermigrate.New(driver, nil)
	if err != nil {
		return err
	}
	if _, err := migrator.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil {
		return fmt.Errorf("river migrate: %w", err)
	}
	var done atomic.Int64
	workers := river.NewWorkers()
	river.AddWorker(workers, &riverWorker{n: &done})
	client, err := river.NewClient(driver, &river.Config{
		Queues:  map[string]river.QueueConfig{river.QueueDefault: {MaxWorkers: riverWorkers}},
		Workers: workers,
		Logger:  b.log,
	})
	if err != nil {
		return err
	}

	var inserted atomic.Int64
	ictx, stop := context.WithCancel(ctx)
	g, gctx := errgroup.WithContext(ictx)
	for range riverInserters {
		g.Go(func() error {
			params := make([]river.InsertManyParams, riverBatch)
			for gctx.Err() == nil {
				for i := range params {
					params[i] = river.InsertManyParams{Args: riverArgs{Email: *newEmail()}}
				}
				if _, err := client.InsertMany(gctx, params); err != nil {
					if gctx.Err() != nil {
						return nil
					}
					return fmt.Errorf("river insert: %w", err)
				}
				inserted.Add(riverBatch)
			}
			return nil
		})
	}
	w, err := measureCounter(ctx, inserted.Load, 0, b.opts.warmup, b.opts.duration, b.snap)
	stop()
	if gerr := g.Wait(); err == nil {
		err = gerr
	}
	if err != nil {
		return err
	}
	b.add(line{key: "river.insert", what: "4c. River v0.51 InsertMany, batches of 1,000", value: w.rate(), unit: "jobs/s", role: rolePeer,
		chart: "throughput", notes: fmt.Sprintf("%d concurrent inserters; %s; %s", riverInserters, w, w.cpuNotes("job"))})

	total := inserted.Load()
	if err := client.Start(ctx); err != nil {
		return fmt.Errorf("river start: %w", err)
	}
	w, err = measureCounter(ctx, done.Load, total, b.opts.warmup, b.opts.duration, b.snap)
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
	defer cancel()
	if serr := client.StopAndCancel(sctx); err == nil && serr != nil {
		b.log.Warn("river stop", "error", serr)
	}
	if err != nil {
		return err
	}
	b.add(line{key: "river.work", what: "4d. River v0.51, no-op worker, MaxWorkers 1,000", value: w.rate(), unit: "jobs/s", role: rolePeer,
		chart: "throughput", notes: fmt.Sprintf("stock fetch settings; counted at Work return; %s; %s", w, w.cpuNotes("job"))})
	return nil
}
