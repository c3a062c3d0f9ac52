package store_test

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/conveyor/conveyor/internal/testenv"
)

// TestMain stops the shared PostgreSQL before goleak looks. Every Store and
// sql.DB a test opens is closed at its cleanup, and a closed pool leaves no
// goroutine behind.
func TestMain(m *testing.M) { goleak.VerifyTestMain(testenv.Wrap(m)) }
