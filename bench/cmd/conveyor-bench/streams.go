package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill-redisstream/pkg/redisstream"
	"github.com/redis/go-redis/v9"
	"golang.org/x/sync/errgroup"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
)

// Stream rows: the raw go-redis ceiling, the stock watermill-redisstream
// subscriber and Conveyor's own handler hop, all reading the same wire
// format from a pre-filled stream.

const (
	pipelineSize = 100 // XADDs per pipeline, and COUNT of each read
	poolSize     = 20_000
	xaddWorkers  = 4
	ceilReaders  = 4
)

// entryPool returns n stream entries (field/value pairs) in Conveyor's wire
// format: email.requested events built by (*bus.Publisher).NewMessage and
// marshalled by watermill-redisstream's default marshaller, which bus
// keeps compatible with. Entries are reused round-robin when filling.
func entryPool(ctx context.Context, rdb redis.UniversalClient, n int) ([][]any, error) {
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, Source: "bench"})
	if err != nil {
		return nil, err
	}
	defer pub.Close()
	var m redisstream.DefaultMarshallerUnmarshaller
	pool := make([][]any, n)
	for i := range pool {
		msg, err := pub.NewMessage(ctx, newEmail())
		if err != nil {
			return nil, err
		}
		vals, err := m.Marshal("", msg)
		if err != nil {
			return nil, err
		}
		flat := make([]any, 0, 2*len(vals))
		for k, v := range vals {
			flat = append(flat, k, v)
		}
		pool[i] = flat
	}
	return pool, nil
}

// xaddLoop appends entries from pool to stream in pipelines of
// pipelineSize from xaddWorkers goroutines, until limit entries were
// added (limit > 0) or ctx ends. count is advanced after each pipeline.
func xaddLoop(ctx context.Context, rdb redis.UniversalClient, stream string, pool [][]any, limit int64, count *atomic.Int64) error {
	var next atomic.Int64
	g, ctx := errgroup.WithContext(ctx)
	for range xaddWorkers {
		g.Go(func() error {
			for ctx.Err() == nil {
				start := next.Add(pipelineSize) - pipelineSize
				if limit > 0 && start >= limit {
					return nil
				}
				n := int64(pipelineSize)
				if limit > 0 {
					n = min(n, limit-start)
				}
				pipe := rdb.Pipeline()
				for i := range n {
					pipe.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: pool[(start+i)%int64(len(pool))]})
				}
				if _, err := pipe.Exec(ctx); err != nil {
					if ctx.Err() != nil {
						return nil
					}
					return fmt.Errorf("xadd: %w", err)
				}
				count.Add(n)
			}
			return nil
		})
	}
	return g.Wait()
}

// prefill appends n entries to stream.
func prefill(ctx context.Context, rdb redis.UniversalClient, stream string, pool [][]any, n int64) error {
	var c atomic.Int64
	return xaddLoop(ctx, rdb, stream, pool, n, &c)
}

func runCeiling(ctx context.Context, b *bench) error {
	rdb, err := newRedis(b.env.redisURL, 16)
	if err != nil {
		return err
	}
	defer rdb.Close()
	pool, err := entryPool(ctx, rdb, poolSize)
	if err != nil {
		return err
	}

	// Pipelined XADD.
	const wstream = "bench:ceiling:write"
	var written atomic.Int64
	wctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- xaddLoop(wctx, rdb, wstream, pool, 0, &written) }()
	w, err := measureCounter(ctx, written.Load, 0, b.opts.warmup, b.opts.duration, b.snap)
	stop()
	if derr := <-done; err == nil {
		err = derr
	}
	if err != nil {
		return err
	}
	b.add(line{key: "ceiling.xadd", what: "1a. go-redis XADD, pipelines of 100 (ceiling)", value: w.rate(), unit: "msg/s",
		role: roleBaseline, chart: "throughput", notes: fmt.Sprintf("%d goroutines; %s; %s", xaddWorkers, w, w.cpuNotes("msg"))})
	if err := rdb.Unlink(ctx, wstream).Err(); err != nil {
		return err
	}

	// XREADGROUP COUNT 100 + pipelined XACK on a pre-filled stream.
	const rstream, group = "bench:ceiling:read", "ceiling"
	total := int64(b.opts.prefill)
	if err := prefill(ctx, rdb, rstream, pool, total); err != nil {
		return err
	}
	if err := rdb.XGroupCreate(ctx, rstream, group, "0").Err(); err != nil {
		return err
	}
	var read atomic.Int64
	rctx, stopRead := context.WithCancel(ctx)
	g, gctx := errgroup.WithContext(rctx)
	for i := range ceilReaders {
		g.Go(func() error { return ceilingReader(gctx, rdb, rstream, group, fmt.Sprintf("c%d", i), &read) })
	}
	w, err = measureCounter(ctx, read.Load, total, b.opts.warmup, b.opts.duration, b.snap)
	stopRead()
	if gerr := g.Wait(); err == nil {
		err = gerr
	}
	if err != nil {
		return err
	}
	b.add(line{key: "ceiling.read", what: "1b. go-redis XREADGROUP COUNT 100 + pipelined XACK (ceiling)", value: w.rate(), unit: "msg/s",
		role: roleBaseline, chart: "throughput", notes: fmt.Sprintf("%d consumers of one group; %s; %s", ceilReaders, w, w.cpuNotes("msg"))})
	return rdb.Unlink(ctx, rstream).Err()
}

// ceilingReader reads batches and acknowledges each batch in the same
// pipeline as the next read.
func ceilingReader(ctx context.Context, rdb *redis.Client, stream, group, consumer string, count *atomic.Int64) error {
	args := &redis.XReadGroupArgs{Group: group, Consumer: consumer, Streams: []string{stream, ">"}, Count: pipelineSize, Block: 100 * time.Millisecond}
	var ids []string
	for ctx.Err() == nil {
		pipe := rdb.Pipeline()
		var ack *redis.IntCmd
		if len(ids) > 0 {
			ack = pipe.XAck(ctx, stream, group, ids...)
		}
		read := pipe.XReadGroup(ctx, args)
		_, err := pipe.Exec(ctx)
		if ctx.Err() != nil {
			return nil
		}
		if ack != nil {
			if err := ack.Err(); err != nil {
				return fmt.Errorf("xack: %w", err)
			}
			count.Add(int64(len(ids)))
		}
		ids = ids[:0]
		if err != nil && !errors.Is(err, redis.Nil) {
			return fmt.Errorf("xreadgroup: %w", err)
		}
		res, _ := read.Result()
		for _, s := range res {
			for _, m := range s.Messages {
				ids = append(ids, m.ID)
			}
		}
	}
	return nil
}

func runWatermill(ctx context.Context, b *bench) error {
	rdb, err := newRedis(b.env.redisURL, 16)
	if err != nil {
		return err
	}
	defer rdb.Close()
	pool, err := entryPool(ctx, rdb, poolSize)
	if err != nil {
		return err
	}
	const stream, group, subs = "bench:watermill", "watermill", 8
	// Enough for the warm-up and the window at well above the rate the
	// stock subscriber reaches.
	total := min(int64(b.opts.prefill), int64(40_000*(b.opts.warmup+b.opts.duration).Seconds()))
	if err := prefill(ctx, rdb, stream, pool, total); err != nil {
		return err
	}
	var n atomic.Int64
	sctx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	var closers []func() error
	for i := range subs {
		// The stock subscriber closes the client it is given.
		c, err := newRedis(b.env.redisURL, 0)
		if err != nil {
			return err
		}
		sub, err := redisstream.NewSubscriber(redisstream.SubscriberConfig{
			Client: c, ConsumerGroup: group, Consumer: fmt.Sprintf("wm-%d", i), OldestId: "0",
		}, watermill.NopLogger{})
		if err != nil {
			_ = c.Close()
			return err
		}
		closers = append(closers, sub.Close)
		ch, err := sub.Subscribe(sctx, stream)
		if err != nil {
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for msg := range ch {
				msg.Ack()
				n.Add(1)
			}
		}()
	}
	w, err := measureCounter(ctx, n.Load, total, b.opts.warmup, b.opts.duration, b.snap)
	stop()
	for _, c := range closers {
		_ = c()
	}
	wg.Wait()
	if err != nil {
		return err
	}
	b.add(line{key: "watermill", what: "2. watermill-redisstream v1.4.5 Subscriber, 8 consumers, no-op", value: w.rate(), unit: "msg/s",
		baseline: "ceiling.read", role: roleBaseline, chart: "throughput", notes: "stock config, ack at once; " + w.String() + "; " + w.cpuNotes("msg")})
	return rdb.Unlink(ctx, stream).Err()
}

func runHop(ctx context.Context, b *bench) error {
	rdb, err := newRedis(b.env.redisURL, 16)
	if err != nil {
		return err
	}
	defer rdb.Close()
	pool, err := entryPool(ctx, rdb, poolSize)
	if err != nil {
		return err
	}
	for _, conc := range []int{64, 256} {
		prefix := fmt.Sprintf("bench:hop%d:", conc)
		stream := prefix + events.TypeEmailRequested
		group := "bench-hop"
		total := int64(b.opts.prefill)
		if err := prefill(ctx, rdb, stream, pool, total); err != nil {
			return err
		}
		if err := bus.EnsureGroups(ctx, rdb, map[string][]string{group: {stream}}); err != nil {
			return err
		}
		router, err := bus.NewRouter(bus.RouterConfig{
			Client: rdb, Consumer: "bench-1", StreamPrefix: prefix, Concurrency: conc,
			DrainTimeout: 5 * time.Second, Logger: b.log,
		})
		if err != nil {
			return err
		}
		var n atomic.Int64
		if err := bus.Handle(router, group, func(ctx context.Context, ev *events.EmailRequested) error {
			n.Add(1)
			return nil
		}); err != nil {
			return err
		}
		rctx, stop := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- router.Run(rctx) }()
		var w window
		key := fmt.Sprintf("hop.c%d", conc)
		prof, err := b.profiled(key, func() error {
			var err error
			w, err = measureCounter(ctx, n.Load, total, b.opts.warmup, b.opts.duration, b.snap)
			return err
		})
		stop()
		if rerr := <-done; err == nil {
			err = rerr
		}
		if err != nil {
			return err
		}
		what := fmt.Sprintf("3. Conveyor bus.Router + bus.Handle, no-op, concurrency %d", conc)
		notes := fmt.Sprintf("typed decode + envelope, batched acks; %s; %s", w, w.cpuNotes("msg"))
		b.add(line{key: key, what: what + " vs ceiling", value: w.rate(), unit: "msg/s", baseline: "ceiling.read",
			target: target{ratioAtLeast, 0.5}, role: roleConveyor, chart: "throughput", notes: notes, profile: prof})
		b.add(line{what: what + " vs watermill", value: w.rate(), unit: "msg/s", baseline: "watermill",
			target: target{ratioAtLeast, 8}, role: roleConveyor, profile: prof})
		if err := rdb.Unlink(ctx, stream).Err(); err != nil {
			return err
		}
	}
	return nil
}
