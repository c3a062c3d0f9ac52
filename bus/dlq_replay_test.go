package bus

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/internal/testenv"
)

// replayFixture is a group of the test's own with dead letters of a stream
// of the test's own, on the shared test Redis; every key it touches is
// removed after the test.
type replayFixture struct {
	rdb           *redis.Client
	group, stream string
}

func newReplayFixture(t *testing.T) *replayFixture {
	t.Helper()
	p := testenv.Prefix(t)
	f := &replayFixture{rdb: testenv.Redis(t), group: p + "group", stream: p + "stream"}
	t.Cleanup(func() {
		ctx := context.Background()
		keys := []string{DeadLetterStream(f.group), RetryStream(f.stream, f.group)}
		for _, s := range []string{f.stream, p + "other"} {
			iter := f.rdb.Scan(ctx, 0, replayedMarker(s, f.group, "*"), 1000).Iterator()
			for iter.Next(ctx) {
				keys = append(keys, iter.Val())
			}
		}
		_ = f.rdb.Del(ctx, keys...).Err()
	})
	return f
}

// deadLetter adds a dead letter of stream (the fixture's if "") and returns
// its id.
func (f *replayFixture) deadLetter(t *testing.T, stream, event string) string {
	t.Helper()
	if stream == "" {
		stream = f.stream
	}
	id, err := f.rdb.XAdd(t.Context(), &redis.XAddArgs{Stream: DeadLetterStream(f.group), Values: []any{
		dlqStream, stream, dlqEntryID, "1-1", dlqGroup, f.group, dlqError, "boom", dlqAttempts, "20",
		fieldUUID, event, fieldPayload, "{}",
	}}).Result()
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// counts returns how many dead letters the group holds and how many
// entries its retry stream of the fixture's stream holds.
func (f *replayFixture) counts(t *testing.T) (dead, retry int64) {
	t.Helper()
	dead, err := f.rdb.XLen(t.Context(), DeadLetterStream(f.group)).Result()
	if err != nil {
		t.Fatal(err)
	}
	retry, err = f.rdb.XLen(t.Context(), RetryStream(f.stream, f.group)).Result()
	if err != nil {
		t.Fatal(err)
	}
	return dead, retry
}

// failFirst fails the first command named name that its client sends, as a
// timeout or a lost connection would, without sending it.
type failFirst struct {
	name  string
	fired atomic.Bool
}

func (h *failFirst) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *failFirst) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}
func (h *failFirst) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if strings.EqualFold(cmd.Name(), h.name) && h.fired.CompareAndSwap(false, true) {
			err := errors.New("i/o timeout (injected)")
			cmd.SetErr(err)
			return err
		}
		return next(ctx, cmd)
	}
}

// Two replays of every dead letter at once put each letter back once, and
// count it once between them.
func TestDeadLetterReplayConcurrentRunsAddEachOnce(t *testing.T) {
	t.Parallel()
	f := newReplayFixture(t)
	const n = 2000 // pages of 500: the runs overlap
	for i := range n {
		f.deadLetter(t, "", fmt.Sprint("event-", i))
	}
	var (
		wg       sync.WaitGroup
		replayed [2]int
		errs     [2]error
	)
	for i := range 2 {
		wg.Go(func() {
			replayed[i], errs[i] = NewDeadLetters(f.rdb).Replay(t.Context(), f.group)
		})
	}
	wg.Wait()
	if err := errors.Join(errs[:]...); err != nil {
		t.Fatal(err)
	}
	dead, retry := f.counts(t)
	if retry != n || dead != 0 || replayed[0]+replayed[1] != n {
		t.Errorf("two replays at once: %d entries on the retry stream, %d dead letters left, replayed %d+%d; want %d, 0, %d in all",
			retry, dead, replayed[0], replayed[1], n, n)
	}
}

// A replay stopped between adding a letter to the retry stream and
// deleting it (here: the delete fails) leaves the letter in both; the next
// replay only deletes it.
func TestDeadLetterReplayAfterInterruptAddsNothingTwice(t *testing.T) {
	t.Parallel()
	f := newReplayFixture(t)
	ids := []string{f.deadLetter(t, "", "a"), f.deadLetter(t, "", "b"), f.deadLetter(t, "", "c")}
	opt := *f.rdb.Options()
	flaky := redis.NewClient(&opt)
	t.Cleanup(func() { _ = flaky.Close() })
	flaky.AddHook(&failFirst{name: "xdel"})

	if n, err := NewDeadLetters(flaky).Replay(t.Context(), f.group); err == nil || n != 0 {
		t.Fatalf("interrupted replay: replayed %d (%v), want 0 and the error", n, err)
	}
	if dead, retry := f.counts(t); dead != 3 || retry != 1 {
		t.Fatalf("after the interrupted replay: %d dead letters, %d retries; want 3 and 1", dead, retry)
	}
	// Rerun, by id this time.
	if n, err := NewDeadLetters(flaky).Replay(t.Context(), f.group, ids...); err != nil || n != 3 {
		t.Errorf("replay after the interrupted one: replayed %d (%v), want 3", n, err)
	}
	if dead, retry := f.counts(t); dead != 0 || retry != 3 {
		t.Errorf("after both replays: %d dead letters, %d entries on the retry stream; want 0 and 3", dead, retry)
	}
	// Again: nothing left, nothing added.
	if n, err := NewDeadLetters(f.rdb).Replay(t.Context(), f.group); err != nil || n != 0 {
		t.Errorf("third replay: %d (%v), want 0", n, err)
	}
	if _, retry := f.counts(t); retry != 3 {
		t.Errorf("third replay: %d entries on the retry stream, want 3", retry)
	}
}

// A replay whose add fails keeps the letter, and the next replay adds it;
// a retry stream whose group was lost gets it back, so that the group reads
// what is replayed.
func TestDeadLetterReplayKeepsWhatItCouldNotAdd(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newReplayFixture(t)
	id := f.deadLetter(t, "", "a")
	retryKey := RetryStream(f.stream, f.group)
	if err := f.rdb.Set(ctx, retryKey, "not a stream", 0).Err(); err != nil {
		t.Fatal(err)
	}
	d := NewDeadLetters(f.rdb)
	if n, err := d.Replay(ctx, f.group, id); err == nil || n != 0 {
		t.Fatalf("replay onto a key that is not a stream: replayed %d (%v), want 0 and an error", n, err)
	}
	if dead, _ := f.rdb.XLen(ctx, DeadLetterStream(f.group)).Result(); dead != 1 {
		t.Fatalf("a replay that could not add deleted the letter: %d left", dead)
	}
	if err := f.rdb.Del(ctx, retryKey).Err(); err != nil {
		t.Fatal(err)
	}
	if n, err := d.Replay(ctx, f.group, id); err != nil || n != 1 {
		t.Fatalf("replay once the retry stream can take it: replayed %d (%v), want 1", n, err)
	}
	xs, err := f.rdb.XReadGroup(ctx, &redis.XReadGroupArgs{Group: f.group, Consumer: "c", Streams: []string{retryKey, ">"}, Count: 10, Block: -1}).Result()
	if err != nil || len(xs) != 1 || len(xs[0].Messages) != 1 || xs[0].Messages[0].Values[fieldUUID] != "a" {
		t.Fatalf("group %s reads %v (%v) from its retry stream, want the replayed letter", f.group, xs, err)
	}
}

// Replay with ids tries each: those missing are reported together, after
// the others were replayed.
func TestDeadLetterReplayTriesEveryID(t *testing.T) {
	t.Parallel()
	f := newReplayFixture(t)
	first, last := f.deadLetter(t, "", "a"), f.deadLetter(t, "", "b")
	n, err := NewDeadLetters(f.rdb).Replay(t.Context(), f.group, first, "1-1", last, "1-2")
	if n != 2 || !errors.Is(err, ErrDeadLetterNotFound) || !strings.Contains(fmt.Sprint(err), "1-1, 1-2") {
		t.Errorf("replay of two letters and two missing ids: replayed %d (%v), want 2 and both missing ids named", n, err)
	}
	if dead, retry := f.counts(t); dead != 0 || retry != 2 {
		t.Errorf("%d dead letters, %d retries; want 0 and 2", dead, retry)
	}
}

// Given a topology, Replay keeps the letters of a stream their group does
// not read (they would go to a retry stream nobody reads) and names the
// group, the stream and the known groups; it replays the others. Without
// one (conveyor dlq replay --force) it replays all.
func TestDeadLetterReplayKeepsLettersNoRoleReads(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	f := newReplayFixture(t)
	other := strings.TrimSuffix(f.stream, "stream") + "other"
	f.deadLetter(t, "", "read")
	f.deadLetter(t, other, "unread-1")
	f.deadLetter(t, other, "unread-2")
	for _, tc := range []struct {
		name     string
		topology map[string][]string
		want     string // in the error
	}{
		{"group reads another stream", map[string][]string{f.group: {f.stream}, "projector": {"x"}},
			"group " + f.group + " does not read stream " + other + " in any role (it reads " + f.stream + "; known groups: projector, " + f.group + "); 2 dead letter(s) kept"},
		{"retired group", map[string][]string{"projector": {f.stream, other}, "email-sender": {other}},
			"group " + f.group + " does not read stream " + other + " in any role (known groups: email-sender, projector); 2 dead letter(s) kept"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n, err := NewDeadLetters(f.rdb).WithTopology(tc.topology).Replay(ctx, f.group)
			if !errors.Is(err, ErrNotInTopology) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Replay: %v; want ErrNotInTopology saying %q", err, tc.want)
			}
			want := 0
			if tc.name == "group reads another stream" {
				want = 1 // the letter of f.stream
			}
			if n != want {
				t.Errorf("replayed %d, want %d", n, want)
			}
			if dead, _ := f.counts(t); dead != 2 {
				t.Errorf("%d dead letters left, want the 2 of %s", dead, other)
			}
			if k, _ := f.rdb.Exists(ctx, RetryStream(other, f.group)).Result(); k != 0 {
				t.Errorf("replay made the retry stream %s that no role reads", RetryStream(other, f.group))
			}
		})
	}
	t.Cleanup(func() { _ = f.rdb.Del(context.Background(), RetryStream(other, f.group)).Err() })
	n, err := NewDeadLetters(f.rdb).Replay(ctx, f.group)
	if err != nil || n != 2 {
		t.Errorf("replay without a topology: replayed %d (%v), want 2", n, err)
	}
}
