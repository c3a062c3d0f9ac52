package projector_test

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/conveyor/conveyor/internal/testenv"
)

// TestMain checks for leaks after testenv stopped the shared servers: every
// projector, router, publisher, store and Redis client a test starts is
// closed at its cleanup. One go-redis goroutine is let go: after a dial
// fails (TestCacheUnreachable's cache refuses connections), the pool
// sleeps a second in the background before it looks whether it was closed,
// so a run of only the fast tests ends before it does.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(testenv.Wrap(m),
		goleak.IgnoreAnyFunction("github.com/redis/go-redis/v9/internal/pool.(*ConnPool).tryDial"))
}
