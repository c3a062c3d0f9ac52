package main

import (
	"math"
	"testing"
	"time"

	"github.com/conveyor/conveyor/config"
)

// TestStuckAfterOutlastsTheRetries: by default the stuck-document re-drive
// waits out every retry of a document (the retry window: 6,423 s at the
// default settings, up to 20% more with jitter), a minute for each of the
// 20 attempts, and 15 minutes more, so it re-publishes no document that is
// only waiting for a retry; it follows the retry settings, saturating on
// absurd ones; a value set is kept.
func TestStuckAfterOutlastsTheRetries(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		env  map[string]string
		want time.Duration
	}{
		{map[string]string{}, 6423*time.Second*6/5 + 20*time.Minute + 15*time.Minute},
		{map[string]string{"RETRY_MAX_ATTEMPTS": "3", "RETRY_BACKOFF_MIN": "1m"}, 3*time.Minute*6/5 + 3*time.Minute + 15*time.Minute},
		{map[string]string{"RETRY_MAX_ATTEMPTS": "2000000000"}, time.Duration(math.MaxInt64)},
		{map[string]string{"STUCK_AFTER": "5m"}, 5 * time.Minute},
	} {
		tt.env["REDIS_URL"] = "redis://127.0.0.1:6379/0"
		cfg, err := config.Load(func(k string) string { return tt.env[k] })
		if err != nil {
			t.Fatal(err)
		}
		if got := stuckAfter(cfg); got != tt.want {
			t.Errorf("%v: STUCK_AFTER %s, want %s", tt.env, got, tt.want)
		}
	}
}
