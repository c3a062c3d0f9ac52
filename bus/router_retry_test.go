package bus_test

import (
	"context"
	"testing"
	"time"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/events"
)

// The handlers of one group share one retry policy: registering a handler
// whose WithRetry differs from the policy its group already has is an
// error, not silently ignored.
func TestGroupHasOneRetryPolicy(t *testing.T) {
	t.Parallel()
	quick := bus.RetryPolicy{MaxAttempts: 2, MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond}
	slow := bus.RetryPolicy{MaxAttempts: 5, MinBackoff: time.Second, MaxBackoff: time.Minute}
	tests := []struct {
		name          string
		first, second []bus.HandlerOption
		wantErr       bool
	}{
		// newRouter's default policy is quick.
		{name: "default, then another", second: []bus.HandlerOption{bus.WithRetry(slow)}, wantErr: true},
		{name: "one, then another", first: []bus.HandlerOption{bus.WithRetry(slow)}, second: []bus.HandlerOption{bus.WithRetry(quick)}, wantErr: true},
		{name: "default, then the same", second: []bus.HandlerOption{bus.WithRetry(quick)}},
		{name: "one, then the same", first: []bus.HandlerOption{bus.WithRetry(slow)}, second: []bus.HandlerOption{bus.WithRetry(slow)}},
		{name: "one, then none", first: []bus.HandlerOption{bus.WithRetry(slow)}},
		// Defaults filled in count as given.
		{name: "defaults spelled out", first: []bus.HandlerOption{bus.WithRetry(bus.RetryPolicy{MaxAttempts: 3})},
			second: []bus.HandlerOption{bus.WithRetry(bus.RetryPolicy{MaxAttempts: 3, MinBackoff: time.Second, MaxBackoff: 10 * time.Minute, Jitter: 0.2})}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t)
			r := newRouter(t, f, time.Second)
			if err := bus.Handle(r, f.group, func(context.Context, *events.EmailRequested) error { return nil }, tt.first...); err != nil {
				t.Fatalf("first handler: %v", err)
			}
			err := bus.Handle(r, f.group, func(context.Context, *events.EmailSent) error { return nil }, tt.second...)
			if (err != nil) != tt.wantErr {
				t.Fatalf("second handler: %v; want an error: %v", err, tt.wantErr)
			}
		})
	}
}
