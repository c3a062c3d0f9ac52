package chaos

import (
	"flag"
	"net/http"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/conveyor/conveyor/internal/harness"
	"github.com/conveyor/conveyor/internal/testenv"
)

var (
	fullFlag     = flag.Bool("chaos.full", false, "full chaos mode: at least 50,000 requests, every fault at least twice, 15s PostgreSQL outages")
	eventsFlag   = flag.Int("chaos.events", 0, "requests the load generator sends (documents, emails and upstream events); 0 means 400 in short mode, 50,000 in full mode")
	seedFlag     = flag.Uint64("chaos.seed", 0, "seed of the load and of the fault schedule; 0 picks one from the clock (it is logged first)")
	durationFlag = flag.Duration("chaos.duration", 0, "how long the load is spread over, with the faults inside it; 0 means 40s in short mode, 10m in full mode")
)

// TestMain stops the test servers and removes the built binary, then
// checks that no goroutine of the tests outlived them.
func TestMain(m *testing.M) { goleak.VerifyTestMain(runner{m}) }

type runner struct{ m *testing.M }

func (r runner) Run() int {
	code := testenv.Wrap(r.m).Run()
	harness.Cleanup()
	// harness.WaitReady polls with the default client.
	http.DefaultClient.CloseIdleConnections()
	return code
}

// mode is the size of a run.
type mode struct {
	name string
	// requests is how many requests the generator sends (each retried
	// until accepted or given up); duration is the time they are spread
	// over, and the window of the fault schedule.
	requests int
	duration time.Duration
	// inFlight bounds the generator's concurrent requests.
	inFlight int
	// handlers and projectors are the replica counts; handlerConcurrency
	// is each handler's --concurrency (its in-flight window per group).
	handlers, projectors int
	handlerConcurrency   int
	// summarizerDelay bounds the time one document summary takes.
	summarizerDelay time.Duration
	// faults is how many faults of each kind the schedule holds.
	faults [numFaults]int
	// poisonBatch is how many poison entries one poison fault writes.
	poisonBatch int
	// postgresOutage is how long PostgreSQL stays stopped.
	postgresOutage time.Duration
	// giveUp is how long one request is retried before it is abandoned;
	// rotateKeyAfter is how long a key answered 409 after a 503 is kept
	// before the request is sent again under a new key.
	giveUp, rotateKeyAfter time.Duration
	// loadBound, drainBound and recoveryBound are liveness bounds: the
	// load must end, the streams drain and a killed consumer's entries be
	// taken over within them.
	loadBound, drainBound, recoveryBound time.Duration
}

func shortMode() mode {
	m := mode{
		name:               "short",
		requests:           400,
		duration:           40 * time.Second,
		inFlight:           8,
		handlers:           3,
		projectors:         2,
		handlerConcurrency: 16,
		summarizerDelay:    500 * time.Millisecond,
		poisonBatch:        6,
		postgresOutage:     5 * time.Second,
		giveUp:             90 * time.Second,
		rotateKeyAfter:     10 * time.Second,
		loadBound:          4 * time.Minute,
		drainBound:         3 * time.Minute,
		recoveryBound:      2 * time.Minute,
	}
	m.faults = [numFaults]int{
		faultKillHandler:   1,
		faultKillProjector: 1,
		faultShortGrace:    1,
		faultRedisKill:     1,
		faultPostgresStop:  1,
		faultPoison:        2,
	}
	return m
}

func fullMode() mode {
	m := mode{
		name:               "full",
		requests:           50_000,
		duration:           10 * time.Minute,
		inFlight:           16,
		handlers:           3,
		projectors:         2,
		handlerConcurrency: 16,
		summarizerDelay:    500 * time.Millisecond,
		poisonBatch:        20,
		postgresOutage:     15 * time.Second,
		// Past the API's 5-minute claim of an Idempotency-Key, so that a
		// key left claimed by a Redis crash frees itself before the
		// request is given up.
		giveUp:         6 * time.Minute,
		rotateKeyAfter: 30 * time.Second,
		loadBound:      45 * time.Minute,
		drainBound:     10 * time.Minute,
		recoveryBound:  3 * time.Minute,
	}
	m.faults = [numFaults]int{
		faultKillHandler:   6,
		faultKillProjector: 4,
		faultShortGrace:    4,
		faultRedisKill:     3,
		faultPostgresStop:  2,
		faultPoison:        5,
	}
	return m
}

// currentMode is the mode the flags ask for.
func currentMode() mode {
	m := shortMode()
	if *fullFlag {
		m = fullMode()
	}
	if *eventsFlag > 0 {
		m.requests = *eventsFlag
	}
	if *durationFlag > 0 {
		m.duration = *durationFlag
	}
	return m
}

// chooseSeed returns -chaos.seed, or a seed from the clock.
func chooseSeed() uint64 {
	if *seedFlag != 0 {
		return *seedFlag
	}
	return uint64(time.Now().UnixNano())
}
