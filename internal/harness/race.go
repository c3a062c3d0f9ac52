//go:build race

package harness

// raceEnabled builds the binary with -race when the tests run with -race,
// so end-to-end runs check the real processes for data races too.
const raceEnabled = true
