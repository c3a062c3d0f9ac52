package testenv

import (
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// renewWait bounds WaitRenewed beyond the lease it waits out. It is only
// there so that a broken renewal ends the test; a live one is seen within
// a third of the lease.
const renewWait = 30 * time.Second

// WaitRenewed waits until the TTL of key, a lock or claim with the given
// lease that its holder renews, has been pushed back up at least times
// times and more than lease has passed since the call: without the
// renewals, the key would have expired by then. It fails the test if the
// key disappears, has no TTL, or is not renewed so in time.
//
// Tests use it instead of sleeping for a few leases: a sleep must be
// short to keep the test fast, and a short lease is lost by a holder that
// a loaded machine stalls. A TTL only falls while nothing renews the key,
// so a higher one than the last read is a renewal, however long the reads
// are delayed.
func WaitRenewed(t testing.TB, rdb redis.UniversalClient, key string, lease time.Duration, times int) {
	t.Helper()
	start := time.Now()
	deadline := start.Add(lease + renewWait)
	renewals := 0
	last := time.Duration(-1)
	for {
		ttl, err := rdb.PTTL(t.Context(), key).Result()
		if err != nil {
			t.Fatalf("TTL of %s: %v", key, err)
		}
		if ttl < 0 {
			state := "gone"
			if ttl == -1 {
				state = "kept without a TTL"
			}
			t.Fatalf("%s %s after %d renewals in %s, want it held with its lease %s", key, state, renewals, time.Since(start), lease)
		}
		if last >= 0 && ttl > last {
			renewals++
		}
		last = ttl
		if renewals >= times && time.Since(start) > lease {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s renewed %d times in %s, want %d (its TTL is %s)", key, renewals, time.Since(start), times, ttl)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
