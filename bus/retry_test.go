package bus_test

import (
	"math"
	"testing"
	"time"

	"github.com/conveyor/conveyor/bus"
)

// TestRetryWindow: the window is the delays after every failed attempt but
// the last, each at the top of its jitter, and it saturates.
func TestRetryWindow(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		p    bus.RetryPolicy
		want time.Duration
	}{
		// 1 s doubling to 10 min over 19 delays: 1023 s + 9 × 600 s.
		{bus.RetryPolicy{MaxAttempts: 20, MinBackoff: time.Second, MaxBackoff: 10 * time.Minute}, 6423 * time.Second * 6 / 5},
		{bus.RetryPolicy{MaxAttempts: 3, MinBackoff: time.Minute, MaxBackoff: time.Hour, Jitter: 0.5}, 3 * time.Minute * 3 / 2},
		{bus.RetryPolicy{MaxAttempts: 1}, 0},
		{bus.RetryPolicy{MaxAttempts: 2_000_000_000, MaxBackoff: 1_000_000 * time.Hour}, math.MaxInt64},
	} {
		if got := tt.p.Window(); got != tt.want {
			t.Errorf("%+v: window %s, want %s", tt.p, got, tt.want)
		}
	}
	// Every delay Backoff draws lies within its share of the window.
	p := bus.RetryPolicy{MaxAttempts: 6, MinBackoff: time.Second, MaxBackoff: 4 * time.Second}
	for range 100 {
		var sum time.Duration
		for a := 1; a < p.MaxAttempts; a++ {
			sum += p.Backoff(a)
		}
		if sum > p.Window() {
			t.Fatalf("delays drawn %s exceed the window %s", sum, p.Window())
		}
	}
}
