package projector_test

import (
	"context"
	"database/sql"
	"github.com/prometheus/client_golang/prometheus"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/cache"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/internal/testenv"
	"github.com/conveyor/conveyor/projector"
	"github.com/conveyor/conveyor/store"
)

// BenchmarkApply measures the projector's throughput when many events are
// applied at once (the router's in-flight window): each op is one event,
// email.requested then email.sent of one email.
func BenchmarkApply(b *testing.B) {
	url := testenv.DatabaseURL(b)
	st, err := store.Open(store.Config{URL: url})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	if _, err := st.Migrate(b.Context()); err != nil {
		b.Fatal(err)
	}
	c, err := cache.New(cache.Config{Redis: testenv.Redis(b), Prefix: testenv.Prefix(b)})
	if err != nil {
		b.Fatal(err)
	}
	p, err := projector.New(projector.Config{Store: st, Cache: c, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	const inFlight = 1024 // `conveyor projector` default
	work := make(chan int, inFlight)
	var wg sync.WaitGroup
	var ru0 syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	b.ResetTimer()
	for w := 0; w < inFlight; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range work {
				id := events.NewID()
				now := time.Now()
				for _, ev := range []events.Event{
					&events.EmailRequested{EmailID: id, To: "a@example.com", Subject: "s", Body: "b", RequestedAt: now},
					&events.EmailSent{EmailID: id, To: "a@example.com", Attempts: 1, SentAt: now},
				} {
					if err := apply(context.Background(), p, events.NewID(), ev); err != nil {
						b.Error(err)
						return
					}
				}
			}
		}()
	}
	for i := 0; i < b.N; i += 2 {
		work <- i
	}
	close(work)
	wg.Wait()
	b.StopTimer()
	var ru1 syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
	cpu := time.Duration(ru1.Utime.Nano() + ru1.Stime.Nano() - ru0.Utime.Nano() - ru0.Stime.Nano())
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/event")
}

// BenchmarkPipeline measures events through the bus: each op is one
// email.requested published, handled by a no-op handler that publishes its
// email.sent, and both projected (two hops plus a projection).
func BenchmarkPipeline(b *testing.B) {
	url := testenv.DatabaseURL(b)
	st, err := store.Open(store.Config{URL: url})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	if _, err := st.Migrate(b.Context()); err != nil {
		b.Fatal(err)
	}
	rdb := testenv.Redis(b)
	prefix := testenv.Prefix(b)
	c, err := cache.New(cache.Config{Redis: rdb, Prefix: prefix})
	if err != nil {
		b.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	reg := prometheus.NewRegistry()
	p, err := projector.New(projector.Config{Store: st, Cache: c, Logger: log, Registerer: reg, Workers: benchWorkers()})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, StreamPrefix: prefix})
	if err != nil {
		b.Fatal(err)
	}
	defer pub.Close()
	r, err := bus.NewRouter(bus.RouterConfig{Client: rdb, Consumer: "bench", StreamPrefix: prefix, Concurrency: benchConcurrency(), Logger: log})
	if err != nil {
		b.Fatal(err)
	}
	if err := p.Register(r); err != nil {
		b.Fatal(err)
	}
	if err := bus.Handle(r, prefix+"sender", func(ctx context.Context, ev *events.EmailRequested) error {
		env, _ := bus.EnvelopeFrom(ctx)
		_, err := pub.PublishEvent(ctx, &events.EmailSent{EmailID: ev.EmailID, To: ev.To, Attempts: 1, SentAt: time.Now()},
			bus.WithID(events.DerivedID(env.ID, "sent")))
		return err
	}); err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	runErr := make(chan error, 1)
	go func() { runErr <- r.Run(ctx) }()
	<-r.Running()

	var ru0 syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	b.ResetTimer()
	go func() {
		batch := make([]events.Event, 0, 250)
		for i := 0; i < b.N; i++ {
			batch = append(batch, &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "s", Body: "b", RequestedAt: time.Now()})
			if len(batch) == cap(batch) || i == b.N-1 {
				for _, res := range pub.PublishBatch(context.Background(), batch, nil) {
					if res.Err != nil {
						b.Error(res.Err)
					}
				}
				batch = batch[:0]
			}
		}
	}()
	// Completion: every email is sent in the read model.
	deadline := time.Now().Add(10 * time.Minute)
	for {
		n := countSent(b, url)
		if n >= b.N {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("only %d of %d emails projected as sent", n, b.N)
		}
		time.Sleep(20 * time.Millisecond)
	}
	b.StopTimer()
	var ru1 syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
	cpu := time.Duration(ru1.Utime.Nano() + ru1.Stime.Nano() - ru0.Utime.Nano() - ru0.Stime.Nano())
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/event")
	if count, sum := batchSizes(b, reg); count > 0 {
		b.ReportMetric(sum/float64(count), "events/tx")
	}
	cancel()
	<-runErr
}

func countSent(b *testing.B, url string) int {
	db, err := sql.Open("postgres", url)
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	var n int
	if err := db.QueryRow("SELECT count(*) FROM emails WHERE status = 'sent'").Scan(&n); err != nil {
		b.Fatal(err)
	}
	return n
}

func benchConcurrency() int {
	if n, err := strconv.Atoi(os.Getenv("BENCH_CONCURRENCY")); err == nil {
		return n
	}
	return 1024 // `conveyor projector` default
}

func benchWorkers() int {
	if n, err := strconv.Atoi(os.Getenv("BENCH_WORKERS")); err == nil {
		return n
	}
	return 0
}
