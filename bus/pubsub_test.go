package bus_test

import (
	"log/slog"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/tests"

	"github.com/conveyor/conveyor/bus"
	"github.com/conveyor/conveyor/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// testLogger logs warnings and errors to stderr: goroutines of a closing
// subscriber may still log after their test returned, which t.Log forbids.
func testLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

var universalFeatures = tests.Features{
	ConsumerGroups:                      true,
	ExactlyOnceDelivery:                 false,
	GuaranteedOrder:                     false,
	GuaranteedOrderWithSingleSubscriber: false,
	Persistent:                          true,
	RequireSingleInstance:               false,
	NewSubscriberReceivesOldMessages:    true,
}

func newUniversalPubSub(t *testing.T, group string) (message.Publisher, message.Subscriber) {
	rdb := testenv.Redis(t)
	pub, err := bus.NewPublisher(bus.PublisherConfig{Client: rdb, Logger: testLogger()})
	if err != nil {
		t.Fatal(err)
	}
	sub, err := bus.NewSubscriber(bus.SubscriberConfig{
		Client:        rdb,
		ConsumerGroup: group,
		Consumer:      watermill.NewShortUUID(),
		BlockTime:     100 * time.Millisecond,
		ClaimMinIdle:  3 * time.Second,
		// The suite nacks the same messages many times and expects them
		// back quickly, and never dead-lettered.
		Retry:        bus.RetryPolicy{MaxAttempts: 1_000_000, MinBackoff: time.Millisecond, MaxBackoff: 5 * time.Millisecond},
		DrainTimeout: 300 * time.Millisecond,
		Logger:       testLogger(),
	})
	if err != nil {
		t.Fatal(err)
	}
	return pub, sub
}

// TestUniversalPubSub runs Watermill's universal Pub/Sub test suite against
// the bus's subscriber and publisher on a real Redis.
func TestUniversalPubSub(t *testing.T) {
	t.Parallel()
	tests.TestPubSub(t, universalFeatures,
		func(t *testing.T) (message.Publisher, message.Subscriber) {
			return newUniversalPubSub(t, watermill.NewShortUUID())
		},
		newUniversalPubSub,
	)
}

// TestUniversalPubSubStress runs the suite's stress variant: the suite
// several times in parallel. Bounded by STRESS_TEST_COUNT (default 3 here,
// skipped under -short).
func TestUniversalPubSubStress(t *testing.T) {
	if testing.Short() {
		t.Skip("stress variant runs in the full tier")
	}
	if os.Getenv("STRESS_TEST_COUNT") == "" {
		t.Setenv("STRESS_TEST_COUNT", strconv.Itoa(3))
	}
	tests.TestPubSubStressTest(t, universalFeatures,
		func(t *testing.T) (message.Publisher, message.Subscriber) {
			return newUniversalPubSub(t, watermill.NewShortUUID())
		},
		newUniversalPubSub,
	)
}
