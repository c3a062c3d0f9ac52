package idem_test

import (
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/conveyor/conveyor/idem"
	"github.com/conveyor/conveyor/internal/testenv"
)

// TestMain stops the shared redis-server after the tests.
func TestMain(m *testing.M) { testenv.Main(m) }

func newStore(t *testing.T) (*idem.Store, func(key string) string) {
	t.Helper()
	prefix := testenv.Prefix(t)
	s, err := idem.New(idem.Config{Redis: testenv.Redis(t), Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	return s, func(key string) string { return prefix + key }
}

func pending(id string) *idem.Pending {
	return &idem.Pending{EventType: "email.requested", EventID: id, Payload: json.RawMessage(`{}`)}
}

// TestClaimOwner: only the request that holds a claim writes its record. A
// first request whose claim ran out while it worked, and which a second
// request then claimed, can neither prepare, complete, keep nor release
// it; the second request's claim and work stay.
func TestClaimOwner(t *testing.T) {
	t.Parallel()
	s, full := newStore(t)
	rdb := testenv.Redis(t)
	ctx := t.Context()

	first, claimed, err := s.Claim(ctx, "k", "fp", time.Minute)
	if err != nil || !claimed || first.Owner == "" {
		t.Fatalf("first claim: %+v, %v, %v; want claimed with an owner", first, claimed, err)
	}
	if rec, claimed, err := s.Claim(ctx, "k", "fp", time.Minute); err != nil || claimed || rec.Done || rec.Pending != nil {
		t.Fatalf("claim of a claimed key: %+v, %v, %v; want the in-progress record", rec, claimed, err)
	}

	// The first claim runs out; a second request claims the key.
	if err := rdb.Del(ctx, full("k")).Err(); err != nil {
		t.Fatal(err)
	}
	second, claimed, err := s.Claim(ctx, "k", "fp", time.Minute)
	if err != nil || !claimed || second.Owner == first.Owner {
		t.Fatalf("second claim: %+v, %v, %v; want claimed with an owner of its own", second, claimed, err)
	}

	late := idem.Record{Fingerprint: "fp", Owner: first.Owner, Status: 202, Body: json.RawMessage(`{"id":"first"}`), Pending: pending("first")}
	for name, err := range map[string]error{
		"prepare":  s.Prepare(ctx, "k", late),
		"complete": s.Complete(ctx, "k", late),
		"keep":     s.Keep(ctx, "k", first.Owner, time.Hour),
	} {
		if !errors.Is(err, idem.ErrClaimLost) {
			t.Errorf("%s by the first request: %v, want ErrClaimLost", name, err)
		}
	}
	if err := s.Release(ctx, "k", first.Owner); err != nil {
		t.Errorf("release by the first request: %v, want nil (nothing to release)", err)
	}
	rec, claimed, err := s.Claim(ctx, "k", "fp", time.Minute)
	if err != nil || claimed || rec.Owner != second.Owner || rec.Pending != nil || rec.Done {
		t.Fatalf("after the first request's writes: %+v, %v, %v; want the second request's claim", rec, claimed, err)
	}
	if ttl := rdb.PTTL(ctx, full("k")).Val(); ttl > time.Minute {
		t.Errorf("claim's TTL %s after the first request's keep, want at most its lease", ttl)
	}

	// The second request's writes land.
	own := idem.Record{Fingerprint: "fp", Owner: second.Owner, Status: 202, Body: json.RawMessage(`{"id":"second"}`), Pending: pending("second")}
	if err := s.Prepare(ctx, "k", own); err != nil {
		t.Fatalf("prepare by the owner: %v", err)
	}
	if rec, _, _ := s.Claim(ctx, "k", "fp", time.Minute); rec.Pending == nil || rec.Pending.EventID != "second" {
		t.Fatalf("after prepare: %+v, want the second request's event", rec)
	}
	if err := s.Complete(ctx, "k", own); err != nil {
		t.Fatalf("complete by the owner: %v", err)
	}
	if rec, _, _ := s.Claim(ctx, "k", "fp", time.Minute); !rec.Done || string(rec.Body) != `{"id":"second"}` {
		t.Errorf("after complete: %+v, want the second request's response", rec)
	}
}

// TestKeep: a claim kept by its owner outlives its lease; a prepared
// record keeps its TTL (Keep does not shorten it) and is never released.
func TestKeep(t *testing.T) {
	t.Parallel()
	s, full := newStore(t)
	rdb := testenv.Redis(t)
	ctx := t.Context()

	// The lease is long against the 500 ms between keeps: only a stall of
	// a second and a half loses the claim. Ten keeps take it past two
	// leases.
	const lease = 2 * time.Second
	rec, claimed, err := s.Claim(ctx, "k", "fp", lease)
	if err != nil || !claimed {
		t.Fatalf("claim: %v, %v", claimed, err)
	}
	for i := range 10 {
		time.Sleep(500 * time.Millisecond)
		before := rdb.PTTL(ctx, full("k")).Val()
		if err := s.Keep(ctx, "k", rec.Owner, lease); err != nil {
			t.Fatalf("keep %d: %v", i+1, err)
		}
		// The TTL only falls while nothing renews it: a higher one than
		// before the keep is the keep's doing, however long each step took.
		if after := rdb.PTTL(ctx, full("k")).Val(); after <= before || after > lease {
			t.Fatalf("claim's TTL %s after keep %d (%s before it), want it pushed back up to at most the lease %s", after, i+1, before, lease)
		}
	}
	if got, claimed, err := s.Claim(ctx, "k", "fp", time.Minute); err != nil || claimed || got.Owner != rec.Owner {
		t.Fatalf("after keeping the claim past its lease: %+v, %v, %v; want it still held", got, claimed, err)
	}

	rec.Pending = pending("e1")
	if err := s.Prepare(ctx, "k", rec); err != nil {
		t.Fatal(err)
	}
	if err := s.Keep(ctx, "k", rec.Owner, lease); err != nil {
		t.Fatalf("keep of a prepared record: %v", err)
	}
	if ttl := rdb.PTTL(ctx, full("k")).Val(); ttl < time.Hour {
		t.Errorf("prepared record's TTL %s after keep, want the records' TTL", ttl)
	}
	if err := s.Release(ctx, "k", rec.Owner); err != nil {
		t.Fatal(err)
	}
	if got, claimed, _ := s.Claim(ctx, "k", "fp", time.Minute); claimed || got.Pending == nil {
		t.Errorf("a prepared record was released: %+v, claimed %v", got, claimed)
	}
}

// TestRelease: the owner's release frees the key for a retry.
func TestRelease(t *testing.T) {
	t.Parallel()
	s, _ := newStore(t)
	ctx := t.Context()
	rec, _, err := s.Claim(ctx, "k", "fp", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Release(ctx, "k", rec.Owner); err != nil {
		t.Fatal(err)
	}
	if _, claimed, err := s.Claim(ctx, "k", "fp", time.Minute); err != nil || !claimed {
		t.Errorf("claim after release: %v, %v; want claimed", claimed, err)
	}
}

// TestCompleteOwnerless: a prepared record written by a replica that
// predates owners is completed by the retry that finishes it.
func TestCompleteOwnerless(t *testing.T) {
	t.Parallel()
	s, full := newStore(t)
	rdb := testenv.Redis(t)
	ctx := t.Context()
	old := `{"fp":"fp","done":false,"status":202,"body":{"id":"e1"},"pending":{"type":"email.requested","id":"e1","payload":{}}}`
	if err := rdb.Set(ctx, full("k"), old, time.Hour).Err(); err != nil {
		t.Fatal(err)
	}
	rec, claimed, err := s.Claim(ctx, "k", "fp", time.Minute)
	if err != nil || claimed || rec.Pending == nil || rec.Owner != "" {
		t.Fatalf("claim: %+v, %v, %v; want the old prepared record", rec, claimed, err)
	}
	if err := s.Complete(ctx, "k", rec); err != nil {
		t.Fatalf("complete: %v", err)
	}
	if got, _, _ := s.Claim(ctx, "k", "fp", time.Minute); !got.Done || string(got.Body) != `{"id":"e1"}` {
		t.Errorf("after complete: %+v, want done", got)
	}
}

// TestLockAs: a holder that takes its lock again with its token still
// holds it (a retry after a lost reply); another token does not get it.
func TestLockAs(t *testing.T) {
	t.Parallel()
	s, _ := newStore(t)
	ctx := t.Context()
	for i, tt := range []struct {
		token string
		want  bool
	}{{"a", true}, {"a", true}, {"b", false}} {
		got, err := s.LockAs(ctx, "job", tt.token, time.Minute)
		if err != nil || got != tt.want {
			t.Fatalf("LockAs #%d by %s = %v, %v; want %v", i+1, tt.token, got, err, tt.want)
		}
	}
	if err := s.Unlock(ctx, "job", "a"); err != nil {
		t.Fatal(err)
	}
	if got, err := s.LockAs(ctx, "job", "b", time.Minute); err != nil || !got {
		t.Fatalf("LockAs after the unlock = %v, %v; want it taken", got, err)
	}
}

// TestRetainUntil: a record of work held back until a time is kept for
// the TTL after that time, prepared and completed; others for the TTL.
func TestRetainUntil(t *testing.T) {
	t.Parallel()
	s, full := newStore(t)
	rdb := testenv.Redis(t)
	ctx := t.Context()
	later := time.Now().Add(20 * 24 * time.Hour)
	tests := []struct {
		name   string
		retain *time.Time
		want   time.Duration
	}{
		{name: "held back", retain: &later, want: idem.DefaultTTL + time.Until(later)},
		{name: "not held back", want: idem.DefaultTTL},
	}
	for _, tt := range tests {
		claim, claimed, err := s.Claim(ctx, tt.name, "fp", time.Minute)
		if err != nil || !claimed {
			t.Fatalf("%s: claim: %v, %v", tt.name, claimed, err)
		}
		rec := idem.Record{Fingerprint: "fp", Owner: claim.Owner, Status: 202, Pending: pending(tt.name), RetainUntil: tt.retain}
		for step, write := range []func() error{
			func() error { return s.Prepare(ctx, tt.name, rec) },
			func() error { return s.Complete(ctx, tt.name, rec) },
		} {
			if err := write(); err != nil {
				t.Fatalf("%s: write %d: %v", tt.name, step, err)
			}
			if ttl := rdb.PTTL(ctx, full(tt.name)).Val(); ttl < tt.want-time.Minute || ttl > tt.want {
				t.Errorf("%s: after write %d the record is kept %s, want %s", tt.name, step, ttl, tt.want)
			}
		}
	}
}
