package projector_test

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/conveyor/conveyor/internal/testenv"
)

// TestMain checks for leaks after testenv stopped the shared servers: every
// projector, router, publisher, store and Redis client a test starts is
// closed at its cleanup.
func TestMain(m *testing.M) { goleak.VerifyTestMain(testenv.Wrap(m)) }
