package cache_test

import (
	"context"
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"

	"github.com/conveyor/conveyor/internal/testenv"
)

// exampleRedisURL is the Redis of the Example functions. Examples take no
// *testing.T to hand to testenv, so TestMain fetches it before they run.
var exampleRedisURL string

func TestMain(m *testing.M) {
	exampleRedisURL = testenv.RedisURL(mainTB{})
	// Fetch runs loads on goroutines of their own (singleflight), so leaks
	// are worth checking. testenv.Wrap stops the shared redis-server before
	// goleak looks; every go-redis client is closed by then, and a closed
	// client leaves no goroutine behind, so no ignore is needed.
	goleak.VerifyTestMain(testenv.Wrap(m))
}

// mainTB lets TestMain call testenv.RedisURL, which takes a testing.TB,
// before any test exists. It implements what RedisURL uses; any other
// method hits the nil embedded TB and panics, which shows at once if
// testenv starts to need more.
type mainTB struct{ testing.TB }

func (mainTB) Helper()                  {}
func (mainTB) Context() context.Context { return context.Background() }

func (mainTB) Fatalf(format string, args ...any) {
	// A missing redis-server fails the run; it never skips the tests.
	fmt.Fprintf(os.Stderr, "TestMain: "+format+"\n", args...)
	os.Exit(1)
}
