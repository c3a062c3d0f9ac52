package bus

import (
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/internal/testenv"
)

// The acks exchange writes ahead of a read delete only entries of the
// subscription's own retry stream (delivery.ofRetry), not those of a topic
// whose name merely ends in ":retry".
func TestExchangeDeletesOnlyOwnRetryEntries(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	c := testenv.Redis(t)
	p := testenv.Prefix(t)
	topic := p + "topic:retry"
	retry := RetryStream(topic, "g")
	for _, s := range []string{topic, retry} {
		for i := range 2 {
			if err := c.XAdd(ctx, &redis.XAddArgs{Stream: s, Values: []any{"i", i}}).Err(); err != nil {
				t.Fatal(err)
			}
		}
		if err := c.XGroupCreate(ctx, s, "g", "0").Err(); err != nil {
			t.Fatal(err)
		}
	}
	rc := newReadConn(c)
	t.Cleanup(rc.close)
	if up, err := rc.ready(ctx); !up {
		t.Fatal(err)
	}
	ids := []string{topic, retry, ">", ">"}
	res, err := rc.exchange(ctx, nil, "g", "c", ids, 10, 10*time.Millisecond, nil)
	if err != nil {
		t.Fatal(err)
	}
	sub := &subscription{topic: topic, retry: retry}
	var acked []*delivery
	for _, st := range res {
		for _, e := range st.entries {
			acked = append(acked, &delivery{sub: sub, stream: st.stream, id: e.id, ofRetry: st.stream == sub.retry})
		}
	}
	if len(acked) != 4 {
		t.Fatalf("read %d entries; want 4", len(acked))
	}
	written := false
	if _, err := rc.exchange(ctx, sortByStream(acked), "g", "c", ids, 10, 10*time.Millisecond, func() { written = true }); err != nil || !written {
		t.Fatalf("exchange with acks = %v, written %v", err, written)
	}
	for _, s := range []string{topic, retry} {
		if n := pendingOf(t, c, s, "g"); n != 0 {
			t.Errorf("%d entries of %s still pending", n, s)
		}
	}
	if n := c.XLen(ctx, topic).Val(); n != 2 {
		t.Errorf("topic %s holds %d entries after the acks; want 2 (other groups read it)", topic, n)
	}
	if n := c.XLen(ctx, retry).Val(); n != 0 {
		t.Errorf("retry stream holds %d entries after the acks; want 0", n)
	}
}

func pendingOf(t *testing.T, c *redis.Client, stream, group string) int64 {
	t.Helper()
	p, err := c.XPending(t.Context(), stream, group).Result()
	if err != nil {
		t.Fatal(err)
	}
	return p.Count
}
