package bus_test

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
	"github.com/conveyor/conveyor/internal/testenv"
)

// sendTwice is a go-redis hook that runs the first script call Redis
// answers without an error a second time, alone or in a pipeline, as the
// client does when a connection breaks after Redis ran the command and
// before its reply arrived: the caller sees the second run's reply.
type sendTwice struct{ done atomic.Bool }

func isScript(cmd redis.Cmder) bool {
	name := strings.ToLower(cmd.Name())
	return name == "eval" || name == "evalsha"
}

func (h *sendTwice) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *sendTwice) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if err := next(ctx, cmd); err != nil || !isScript(cmd) || !h.done.CompareAndSwap(false, true) {
			return err
		}
		return next(ctx, cmd)
	}
}

func (h *sendTwice) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		if err != nil || len(cmds) != 1 || !isScript(cmds[0]) || cmds[0].Err() != nil || !h.done.CompareAndSwap(false, true) {
			return err
		}
		return next(ctx, cmds)
	}
}

// TestOnceSentTwiceIsNotADuplicate: the Redis client sends a publish made
// once a second time, as after a connection that broke once Redis had run
// it. The second run finds the marker its first run set: the publish
// succeeds, as it did, and appends (or holds back) nothing more. Another
// publish with the same id is still refused.
func TestOnceSentTwiceIsNotADuplicate(t *testing.T) {
	t.Parallel()
	email := func() *events.EmailRequested {
		return &events.EmailRequested{EmailID: events.NewID(), To: "a@example.com", Subject: "s", Body: "b", RequestedAt: time.Now().UTC()}
	}
	tests := []struct {
		name string
		// publish publishes once with id; already reports whether it was
		// refused as published before.
		publish func(ctx context.Context, pub *bus.Publisher, id string) (already bool, err error)
		// count counts what was published to stream.
		count func(ctx context.Context, rdb *redis.Client, stream string) (int64, error)
	}{
		{
			name: "PublishEvent",
			publish: func(ctx context.Context, pub *bus.Publisher, id string) (bool, error) {
				_, err := pub.PublishEvent(ctx, email(), bus.WithID(id), bus.WithOnce(time.Hour))
				if errors.Is(err, bus.ErrAlreadyPublished) {
					return true, nil
				}
				return false, err
			},
			count: func(ctx context.Context, rdb *redis.Client, stream string) (int64, error) {
				return rdb.XLen(ctx, stream).Result()
			},
		},
		{
			name: "PublishAt",
			publish: func(ctx context.Context, pub *bus.Publisher, id string) (bool, error) {
				_, err := pub.PublishAt(ctx, time.Now().Add(time.Hour), email(), bus.WithID(id), bus.WithOnce(2*time.Hour))
				if errors.Is(err, bus.ErrAlreadyPublished) {
					return true, nil
				}
				return false, err
			},
			count: func(ctx context.Context, rdb *redis.Client, stream string) (int64, error) {
				return rdb.ZCard(ctx, bus.DelayedSet(stream)).Result()
			},
		},
		{
			name: "PublishOnce",
			publish: func(ctx context.Context, pub *bus.Publisher, id string) (bool, error) {
				won, _, err := pub.PublishOnce(ctx, id, time.Hour, email(), bus.WithID(id))
				return !won, err
			},
			count: func(ctx context.Context, rdb *redis.Client, stream string) (int64, error) {
				return rdb.XLen(ctx, stream).Result()
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			opt, err := redis.ParseURL(testenv.RedisURL(t))
			if err != nil {
				t.Fatal(err)
			}
			// A client with an OnConnect hook gets no connection of the
			// publisher's own: every publish goes through go-redis, and
			// through the hook.
			opt.OnConnect = func(context.Context, *redis.Conn) error { return nil }
			rdb := redis.NewClient(opt)
			t.Cleanup(func() { _ = rdb.Close() })
			twice := &sendTwice{}
			rdb.AddHook(twice)
			prefix := testenv.Prefix(t)
			pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, StreamPrefix: prefix, Logger: testLogger()})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = pub.Close() })
			stream := prefix + events.TypeEmailRequested
			id := events.NewID()

			if already, err := tt.publish(ctx, pub, id); already || err != nil {
				t.Fatalf("first publish: already published %v, error %v; want it published", already, err)
			}
			if !twice.done.Load() {
				t.Fatal("the publish was not sent twice")
			}
			if n, err := tt.count(ctx, rdb, stream); err != nil || n != 1 {
				t.Fatalf("%d published (%v), want 1", n, err)
			}
			if already, err := tt.publish(ctx, pub, id); !already || err != nil {
				t.Errorf("second publish with the id: already published %v, error %v; want it refused", already, err)
			}
			if n, err := tt.count(ctx, rdb, stream); err != nil || n != 1 {
				t.Errorf("%d published after the second publish (%v), want 1", n, err)
			}
		})
	}
}
