package scheduler

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/conveyor/conveyor/bus"
)

// FakeClock is a clock for tests that stall a scheduler, or step its clock,
// without waiting. Its sleepers, like timers, count elapsed time: Advance
// moves the clock as time passes (also while a process is stopped), Step
// moves only the wall clock, as a clock step or a suspended machine does.
type FakeClock struct {
	mu       sync.Mutex
	wall     time.Time
	elapsed  time.Duration
	sleepers []*fakeSleeper
}

type fakeSleeper struct {
	until time.Duration
	wake  chan struct{}
}

// NewFakeClock returns a FakeClock that reads now.
func NewFakeClock(now time.Time) *FakeClock { return &FakeClock{wall: now} }

// Now returns the wall clock.
func (c *FakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.wall
}

// Sleep waits until the clock has advanced by d or ctx ends.
func (c *FakeClock) Sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	c.mu.Lock()
	s := &fakeSleeper{until: c.elapsed + d, wake: make(chan struct{})}
	c.sleepers = append(c.sleepers, s)
	c.mu.Unlock()
	select {
	case <-s.wake:
		return ctx.Err() == nil
	case <-ctx.Done():
		c.mu.Lock()
		c.sleepers = slices.DeleteFunc(c.sleepers, func(o *fakeSleeper) bool { return o == s })
		c.mu.Unlock()
		return false
	}
}

// Advance moves the clock on by d and wakes the sleepers whose time is up.
// They are no longer sleeping when it returns.
func (c *FakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.wall = c.wall.Add(d)
	c.elapsed += d
	c.sleepers = slices.DeleteFunc(c.sleepers, func(s *fakeSleeper) bool {
		if s.until > c.elapsed {
			return false
		}
		close(s.wake)
		return true
	})
}

// Step moves the wall clock by d, waking no sleeper.
func (c *FakeClock) Step(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.wall = c.wall.Add(d)
}

// Sleepers returns how many goroutines sleep on c.
func (c *FakeClock) Sleepers() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.sleepers)
}

// WaitSleepers waits until n goroutines sleep on c: the schedules it runs
// are done with what is due.
func (c *FakeClock) WaitSleepers(t testing.TB, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for c.Sleepers() < n {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %d sleepers on the fake clock (%d)", n, c.Sleepers())
		}
		time.Sleep(time.Millisecond)
	}
}

// UseClock makes sc read c; call it before Run.
func UseClock(sc *Scheduler, c *FakeClock) { sc.clock = c }

// UseJobLease sets the lease of sc's run locks; call it before Run.
func UseJobLease(sc *Scheduler, d time.Duration) { sc.lease = d }

func schedule(t testing.TB, sc *Scheduler, name string) *Schedule {
	t.Helper()
	for _, s := range sc.schedules {
		if s.Name == name {
			return s
		}
	}
	t.Fatalf("no schedule %q", name)
	return nil
}

// Record records tick as fired by sc, as firing it does.
func Record(t testing.TB, sc *Scheduler, name string, tick time.Time) {
	sc.record(t.Context(), schedule(t, sc, name), tick, "published")
}

// TickMarker returns the key and life of the marker of an event schedule's
// tick.
func TickMarker(t testing.TB, sc *Scheduler, name string, tick time.Time) (string, time.Duration) {
	s := schedule(t, sc, name)
	return bus.OnceKey(sc.cfg.Publisher.Stream(s.Event), s.tickKey(tick)), s.markerTTL(tick)
}

// Ticks returns the ticks of a schedule after from, up to to.
func Ticks(t testing.TB, sc *Scheduler, name string, from, to time.Time) []time.Time {
	s := schedule(t, sc, name)
	var ticks []time.Time
	for tick := s.next(from); !tick.IsZero() && !tick.After(to); tick = s.next(tick) {
		ticks = append(ticks, tick)
	}
	return ticks
}

// RunLock is the key of a built-in job's run lock.
func RunLock(name string) string { return lockKey(name) }
