package bus_test

import (
	"context"
	"errors"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/internal/testenv"
)

// A topic whose name ends in ":retry" is not a retry stream: acking its
// entries must not delete them, since other groups still read them. Only
// entries of the group's own retry stream are deleted once acked. Both ack
// paths are covered: the ack loop's pipeline (a client without an own read
// connection) and the acks written ahead of a read on the own connection.
func TestAckKeepsEntriesOfATopicNamedLikeARetryStream(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		// client returns the subscriber's client for the fixture.
		client func(t *testing.T, f *fixture) *redis.Client
	}{
		{name: "own read connection", client: func(t *testing.T, f *fixture) *redis.Client { return f.rdb }},
		{name: "client's pool", client: func(t *testing.T, f *fixture) *redis.Client {
			opt, err := redis.ParseURL(testenv.RedisURL(t))
			if err != nil {
				t.Fatal(err)
			}
			// An OnConnect hook: no own read connection, every ack goes
			// through the ack loop.
			opt.OnConnect = func(context.Context, *redis.Conn) error { return nil }
			c := redis.NewClient(opt)
			t.Cleanup(func() { _ = c.Close() })
			return c
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t)
			f.topic += ":retry"
			other := f.group + "-other"
			if err := f.rdb.XGroupCreateMkStream(t.Context(), f.topic, other, "0").Err(); err != nil {
				t.Fatal(err)
			}
			const n = 5
			f.publish(n)
			s := f.subscriber("c1", func(c *bus.SubscriberConfig) { c.Client = tt.client(t, f) })
			ch := f.subscribe(s)
			for range n {
				receive(t, ch).Ack()
			}
			eventually(t, "all acked", func() bool { return pendingCount(t, f.rdb, f.topic, f.group) == 0 })
			// Close flushes whatever ack is still waiting.
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			if l := f.rdb.XLen(t.Context(), f.topic).Val(); l != n {
				t.Errorf("stream holds %d entries after group %s acked them; want %d (the other group has not read them)", l, f.group, n)
			}
			// Not readAsGroup: BLOCK 0 would wait for ever if they are gone.
			xs, err := f.rdb.XReadGroup(t.Context(), &redis.XReadGroupArgs{
				Group: other, Consumer: "c", Streams: []string{f.topic, ">"}, Count: 10, Block: -1,
			}).Result()
			if err != nil && !errors.Is(err, redis.Nil) {
				t.Fatal(err)
			}
			read := 0
			if len(xs) > 0 {
				read = len(xs[0].Messages)
			}
			if read != n {
				t.Errorf("other group read %d of %d entries", read, n)
			}
		})
	}
}
