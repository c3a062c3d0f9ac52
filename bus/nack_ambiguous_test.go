package bus_test

import (
	"context"
	"errors"
	"net"
	"os"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/bus"
)

// replyLost lets the first command or pipeline that match selects run,
// then reports a read timeout, as when a reply is lost: the write was
// applied, and the caller cannot tell.
type replyLost struct {
	match func(args []any) bool
	fired atomic.Int32
}

func (h *replyLost) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *replyLost) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if err := next(ctx, cmd); err != nil || !h.lose([]redis.Cmder{cmd}) {
			return err
		}
		return cmd.Err()
	}
}

func (h *replyLost) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if err := next(ctx, cmds); err != nil || !h.lose(cmds) {
			return err
		}
		return cmds[0].Err()
	}
}

// lose sets a timeout on cmds, the first time they match.
func (h *replyLost) lose(cmds []redis.Cmder) bool {
	var args []any
	for _, c := range cmds {
		args = append(args, c.Args()...)
	}
	if !h.match(args) || !h.fired.CompareAndSwap(0, 1) {
		return false
	}
	err := &net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}
	for _, c := range cmds {
		c.SetErr(err)
	}
	return true
}

// hasArgs reports whether args hold every one of want.
func hasArgs(args []any, want ...string) bool {
	for _, w := range want {
		if !slices.Contains(args, any(w)) {
			return false
		}
	}
	return true
}

// A nack whose write was applied but whose reply was lost is written again
// without effect: one retry, one dead letter. And a consumer nacking an
// entry that another consumer took over and finished adds no retry.
func TestNackWrittenOnceWhenItsReplyIsLost(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		// fail is the handler's failure.
		fail error
		// lost selects the write whose reply is lost; nil loses none.
		lost func(f *fixture, args []any) bool
		// takenOver: before the nack, another consumer claims the entry
		// and acknowledges it.
		takenOver bool
		// runs is how often the handler runs; letters how many dead
		// letters there are in the end.
		runs, letters int
	}{
		{
			name: "retry", fail: errors.New("flaky"),
			// The nack's write: the entry's stream and the retry set.
			lost: func(f *fixture, args []any) bool {
				return hasArgs(args, f.topic, bus.RetrySet(f.topic, f.group))
			},
			runs: 2,
		},
		{
			name: "dead letter", fail: bus.Permanent(errors.New("bad input")),
			lost: func(f *fixture, args []any) bool {
				return hasArgs(args, bus.DeadLetterStream(f.group)) && !hasArgs(args, "xlen")
			},
			runs: 1, letters: 1,
		},
		{
			name: "entry taken over", fail: errors.New("flaky"), takenOver: true,
			runs: 1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t)
			hook := &replyLost{match: func(args []any) bool { return tt.lost != nil && tt.lost(f, args) }}
			s := f.subscriber("c1", func(c *bus.SubscriberConfig) { c.Client = hookedClient(t, f, hook) })
			ch := f.subscribe(s)
			f.publish(1)
			runs := 0
			m := receive(t, ch)
			runs++
			if tt.takenOver {
				ctx := t.Context()
				ids, err := f.rdb.XClaimJustID(ctx, &redis.XClaimArgs{Stream: f.topic, Group: f.group, Consumer: "c2", Messages: []string{entryID(t, f)}}).Result()
				if err != nil || len(ids) != 1 {
					t.Fatalf("claim as c2: %v, %v", ids, err)
				}
				if err := f.rdb.XAck(ctx, f.topic, f.group, ids[0]).Err(); err != nil {
					t.Fatal(err)
				}
			}
			bus.RecordFailure(m, tt.fail)
			m.Nack()
			// Every later delivery succeeds; count them until the stream,
			// the retry stream and the retry set are settled, and for a
			// while after (retries are due within 50ms here).
			retrySet := bus.RetrySet(f.topic, f.group)
			settled := func() bool {
				return pendingCount(t, f.rdb, f.topic, f.group) == 0 &&
					pendingCount(t, f.rdb, bus.RetryStream(f.topic, f.group), f.group) == 0 &&
					f.rdb.ZCard(t.Context(), retrySet).Val() == 0
			}
			quiet := time.Now()
			for time.Since(quiet) < time.Second {
				select {
				case m := <-ch:
					runs++
					m.Ack()
					quiet = time.Now()
				case <-time.After(20 * time.Millisecond):
					if !settled() {
						quiet = time.Now()
					}
				}
				if runs > 5 {
					break
				}
			}
			if tt.lost != nil && hook.fired.Load() == 0 {
				t.Fatal("the write whose reply is to be lost never came")
			}
			if runs != tt.runs {
				t.Errorf("handler ran %d times; want %d", runs, tt.runs)
			}
			if n, err := bus.NewDeadLetters(f.rdb).Count(t.Context(), f.group); err != nil || n != int64(tt.letters) {
				t.Errorf("%d dead letters (%v); want %d", n, err, tt.letters)
			}
			// A letter's marker goes once its entry is acknowledged: left to
			// their TTL, markers would pile up whatever the stream's cap.
			if keys, err := f.rdb.Keys(t.Context(), "*dlq-written:"+f.topic+"/*").Result(); err != nil || len(keys) > 0 {
				t.Errorf("dead-letter markers left: %q (%v)", keys, err)
			}
		})
	}
}

// entryID returns the id of the fixture topic's only entry.
func entryID(t *testing.T, f *fixture) string {
	t.Helper()
	xs, err := f.rdb.XRange(t.Context(), f.topic, "-", "+").Result()
	if err != nil || len(xs) != 1 {
		t.Fatalf("entries of %s: %v, %v", f.topic, xs, err)
	}
	return xs[0].ID
}

// A consumer whose entry another consumer claimed and still runs (its
// heartbeat lost the entry) adds no retry and writes no dead letter for it,
// and leaves it pending with the other: the other's run decides.
func TestNackOfEntryAnotherConsumerRunsChangesNothing(t *testing.T) {
	t.Parallel()
	for _, fail := range []error{errors.New("flaky"), bus.Permanent(errors.New("bad input"))} {
		t.Run(fail.Error(), func(t *testing.T) {
			t.Parallel()
			f := newFixture(t)
			// c2 never heartbeats: c1 must not claim the entry back meanwhile.
			s := f.subscriber("c1", func(c *bus.SubscriberConfig) { c.ClaimMinIdle, c.ClaimInterval = time.Hour, time.Hour })
			ch := f.subscribe(s)
			f.publish(1)
			m := receive(t, ch)
			ctx := t.Context()
			ids, err := f.rdb.XClaimJustID(ctx, &redis.XClaimArgs{Stream: f.topic, Group: f.group, Consumer: "c2", Messages: []string{entryID(t, f)}}).Result()
			if err != nil || len(ids) != 1 {
				t.Fatalf("claim as c2: %v, %v", ids, err)
			}
			bus.RecordFailure(m, fail)
			m.Nack()
			retrySet, retryStream := bus.RetrySet(f.topic, f.group), bus.RetryStream(f.topic, f.group)
			deadline := time.Now().Add(2 * time.Second)
			for time.Now().Before(deadline) {
				if f.rdb.ZCard(ctx, retrySet).Val() > 0 || f.rdb.XLen(ctx, retryStream).Val() > 0 {
					t.Fatal("a retry was added for an entry another consumer runs")
				}
				if n, err := bus.NewDeadLetters(f.rdb).Count(ctx, f.group); err != nil || n > 0 {
					t.Fatalf("%d dead letters (%v) for an entry another consumer runs", n, err)
				}
				time.Sleep(20 * time.Millisecond)
			}
			p, err := f.rdb.XPendingExt(ctx, &redis.XPendingExtArgs{Stream: f.topic, Group: f.group, Start: "-", End: "+", Count: 10}).Result()
			if err != nil || len(p) != 1 || p[0].Consumer != "c2" {
				t.Errorf("pending %+v (%v); want the entry pending with c2", p, err)
			}
		})
	}
}
