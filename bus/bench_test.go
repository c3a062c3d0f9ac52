package bus_test

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/internal/testenv"
)

// BenchmarkRouterHop measures the handler hop: a pre-filled stream consumed
// by a bus.Router with a no-op typed handler (decode, envelope, ack).
func BenchmarkRouterHop(b *testing.B) {
	for _, conc := range []int{64, 256} {
		b.Run(fmt.Sprintf("concurrency=%d", conc), func(b *testing.B) {
			rdb := testenv.Redis(b)
			prefix := testenv.Prefix(b)
			pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, StreamPrefix: prefix})
			if err != nil {
				b.Fatal(err)
			}
			defer pub.Close()
			evs := make([]events.Event, 0, 1000)
			for len(evs) < cap(evs) {
				evs = append(evs, &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "s", Body: "b", RequestedAt: time.Now()})
			}
			for n := 0; n < b.N; n += len(evs) {
				batch := evs[:min(len(evs), b.N-n)]
				for _, r := range pub.PublishBatch(b.Context(), batch, nil) {
					if r.Err != nil {
						b.Fatal(r.Err)
					}
				}
			}
			r, err := bus.NewRouter(bus.RouterConfig{Client: rdb, Consumer: "bench", StreamPrefix: prefix, Concurrency: conc, Logger: testLogger()})
			if err != nil {
				b.Fatal(err)
			}
			var done atomic.Int64
			finished := make(chan struct{})
			target := int64(b.N)
			if err := bus.Handle(r, prefix+"g", func(context.Context, *events.EmailRequested) error {
				if done.Add(1) == target {
					close(finished)
				}
				return nil
			}); err != nil {
				b.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			runErr := make(chan error, 1)
			cpu0, rcpu0 := processCPU(), redisCPU(b, rdb)
			b.ResetTimer()
			go func() { runErr <- r.Run(ctx) }()
			<-finished
			b.StopTimer()
			// CPU per message, of this process and of Redis: unlike
			// msg/s, it holds when other programs share the cores.
			b.ReportMetric(float64((processCPU()-cpu0).Microseconds())/float64(b.N), "cpu-µs/msg")
			b.ReportMetric(float64((redisCPU(b, rdb)-rcpu0).Microseconds())/float64(b.N), "redis-cpu-µs/msg")
			cancel()
			if err := <-runErr; err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msg/s")
		})
	}
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// redisCPU reads the CPU time Redis has used from INFO cpu.
func redisCPU(b *testing.B, rdb *redis.Client) time.Duration {
	info, err := rdb.Info(context.Background(), "cpu").Result()
	if err != nil {
		b.Fatal(err)
	}
	var total float64
	for _, line := range strings.Split(info, "\r\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok && (k == "used_cpu_sys" || k == "used_cpu_user") {
			f, _ := strconv.ParseFloat(v, 64)
			total += f
		}
	}
	return time.Duration(total * float64(time.Second))
}

// BenchmarkPublish measures concurrent single-event publishes, as 64
// handlers publishing their completion events make them: over the
// publisher's own connections, and through go-redis's pool (a client that
// gets no own connection: it has an OnConnect hook) as the baseline.
func BenchmarkPublish(b *testing.B) {
	for _, path := range []string{"own", "pool"} {
		b.Run("path="+path, func(b *testing.B) {
			opt, err := redis.ParseURL(testenv.RedisURL(b))
			if err != nil {
				b.Fatal(err)
			}
			if path == "pool" {
				opt.OnConnect = func(context.Context, *redis.Conn) error { return nil }
			}
			rdb := redis.NewClient(opt)
			defer rdb.Close()
			pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, StreamPrefix: testenv.Prefix(b)})
			if err != nil {
				b.Fatal(err)
			}
			defer pub.Close()
			ev := &events.EmailSent{EmailID: events.NewID(), To: "a@example.com", Attempts: 1, SentAt: time.Now().UTC()}
			b.SetParallelism(32) // 64 publishers on 2 cores
			cpu0, rcpu0 := processCPU(), redisCPU(b, rdb)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := pub.PublishEvent(context.Background(), ev); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.StopTimer()
			b.ReportMetric(float64((processCPU()-cpu0).Microseconds())/float64(b.N), "cpu-µs/msg")
			b.ReportMetric(float64((redisCPU(b, rdb)-rcpu0).Microseconds())/float64(b.N), "redis-cpu-µs/msg")
		})
	}
}
