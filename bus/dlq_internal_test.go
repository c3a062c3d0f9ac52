package bus

import (
	"context"
	"errors"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/conveyor/conveyor/internal/testenv"
)

// TestDeadLettersAllMeansThoseThereAtTheStart: a replay of every dead
// letter whose letters fail again meanwhile (dead-lettered anew, with newer
// ids) visits each letter once, not again and again; a purge of every one
// leaves those dead-lettered after it started.
func TestDeadLettersAllMeansThoseThereAtTheStart(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	rdb, group, stream := deadLetterFixture(t)
	add := func(values any) string {
		id, err := rdb.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: values}).Result()
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	const n = 1200 // more than a page
	for i := range n {
		add([]any{"i", i})
	}
	d := NewDeadLetters(rdb)
	visited, err := d.each(ctx, group, nil, func(x redis.XMessage) (bool, error) {
		add(x.Values) // it failed again
		return true, nil
	})
	if err != nil || visited != n {
		t.Fatalf("each visited %d letters (%v), want the %d there at its start", visited, err, n)
	}
	if left, _ := rdb.XLen(ctx, stream).Result(); left != 2*n {
		t.Fatalf("%d letters, want %d", left, 2*n)
	}

	// The purge of all reads the newest id first; one dead-lettered after
	// that stays (added here after the purge, to stand for it).
	purged, err := d.Purge(ctx, group)
	if err != nil || purged != 2*n {
		t.Fatalf("purged %d (%v), want %d", purged, err, 2*n)
	}
	later := add([]any{"i", "later"})
	if purged, err := d.Purge(ctx, group); err != nil || purged != 1 {
		t.Fatalf("second purge: %d (%v), want 1", purged, err)
	}
	if _, err := d.Purge(ctx, group, later); !errors.Is(err, ErrDeadLetterNotFound) {
		t.Errorf("purge of an id no longer there: %v, want ErrDeadLetterNotFound", err)
	}
}

// TestDeadLetterIDsAreWhole: an id that is not milliseconds-sequence is
// refused: Redis would take a bare millisecond for the first entry of it.
func TestDeadLetterIDsAreWhole(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	rdb, group, stream := deadLetterFixture(t)
	for _, id := range []string{"1000-0", "1000-1"} {
		if err := rdb.XAdd(ctx, &redis.XAddArgs{Stream: stream, ID: id, Values: []any{"i", id}}).Err(); err != nil {
			t.Fatal(err)
		}
	}
	d := NewDeadLetters(rdb)
	for _, id := range []string{"1000", "1000-", "-1", "1000-x", "a-1", ""} {
		if _, err := d.Get(ctx, group, id); !errors.Is(err, ErrBadDeadLetterID) {
			t.Errorf("Get(%q): %v, want ErrBadDeadLetterID", id, err)
		}
		if _, err := d.Replay(ctx, group, id); !errors.Is(err, ErrBadDeadLetterID) {
			t.Errorf("Replay(%q): %v, want ErrBadDeadLetterID", id, err)
		}
		if _, err := d.Purge(ctx, group, id); !errors.Is(err, ErrBadDeadLetterID) {
			t.Errorf("Purge(%q): %v, want ErrBadDeadLetterID", id, err)
		}
	}
	if n, _ := rdb.XLen(ctx, stream).Result(); n != 2 {
		t.Errorf("%d letters left, want both", n)
	}
	if dl, err := d.Get(ctx, group, "1000-1"); err != nil || dl.ID != "1000-1" {
		t.Errorf("Get(1000-1) = %+v, %v", dl, err)
	}
	if _, err := d.List(ctx, group, "", 0); err == nil {
		t.Error("List with limit 0: no error")
	}
}

// deadLetterFixture returns the test's Redis, a group of the test's own and
// that group's dead-letter stream, removed after the test.
func deadLetterFixture(t *testing.T) (*redis.Client, string, string) {
	rdb := testenv.Redis(t)
	group := testenv.Prefix(t) + "group"
	stream := DeadLetterStream(group)
	t.Cleanup(func() { _ = rdb.Del(context.Background(), stream).Err() })
	return rdb, group, stream
}
