package bus_test

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/embedded"
	"github.com/conveyor/conveyor/internal/testenv"
)

// Close with a Redis that stopped answering (SIGSTOP) and nothing in
// flight does not wait for the readers' replies: a read over the own
// connection is cut short at once, and one through go-redis, which cannot
// be (it waits BlockTime plus 10s), is waited for no longer than
// DrainTimeout, counted from the call of Close.
func TestCloseWithStalledRedis(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		// pooled reads through go-redis: the client has an OnConnect hook.
		pooled bool
		drain  time.Duration
		// within bounds Close: a liveness bound, far from the 11s a read
		// waits for its reply.
		within time.Duration
	}{
		// Nothing to drain: DrainTimeout must not even come into it.
		{name: "own connection", drain: 30 * time.Second, within: 5 * time.Second},
		{name: "client's pool", pooled: true, drain: 2 * time.Second, within: 2*time.Second + 3*time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			off := false
			r := testenv.StartRedis(t, embedded.RedisConfig{AppendOnly: &off})
			opt, err := redis.ParseURL(r.URL())
			if err != nil {
				t.Fatal(err)
			}
			// Other calls to the stopped server fail fast, so that only
			// the reads are left to wait for.
			opt.ReadTimeout = 500 * time.Millisecond
			opt.MaxRetries = -1
			if tt.pooled {
				opt.OnConnect = func(context.Context, *redis.Conn) error { return nil }
			}
			rdb := redis.NewClient(opt)
			t.Cleanup(func() { _ = rdb.Close() })
			pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, Logger: testLogger()})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = pub.Close() })
			s, err := bus.NewSubscriber(bus.SubscriberConfig{
				Client:        rdb,
				ConsumerGroup: "g",
				Consumer:      "c1",
				BlockTime:     time.Second,
				ClaimMinIdle:  time.Minute, // no claim or heartbeat during the test
				DrainTimeout:  tt.drain,
				Logger:        testLogger(),
			})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = s.Close() })
			ch, err := s.Subscribe(t.Context(), "topic")
			if err != nil {
				t.Fatal(err)
			}
			if err := pub.Publish("topic", message.NewMessage(watermill.NewUUID(), []byte("x"))); err != nil {
				t.Fatal(err)
			}
			receive(t, ch).Ack()
			eventually(t, "acked", func() bool { return pendingCount(t, rdb, "topic", "g") == 0 })

			pid := r.PID()
			if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
				t.Fatal(err)
			}
			// Before the server's own cleanup, which stops it.
			t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGCONT) })
			start := time.Now()
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if took := time.Since(start); took > tt.within {
				t.Errorf("Close took %v with Redis stopped and nothing in flight (BlockTime 1s, DrainTimeout %v); want at most %v",
					took.Round(time.Millisecond), tt.drain, tt.within)
			}
		})
	}
}
