package main

import (
	"testing"
	"time"
)

func TestCPUPerUnit(t *testing.T) {
	t0 := time.Now()
	a := cpuSnap{at: t0, busy: 1000, self: 100, redis: 50, postgres: 10, ok: true}
	// 2 s later: the process used 2 s of CPU (1 core), Redis 1 s, PostgreSQL
	// 0.5 s, and something else 0.4 s.
	z := cpuSnap{at: t0.Add(2 * time.Second), busy: 1390, self: 300, redis: 150, postgres: 60, ok: true}
	u := cpuBetween(a, z)
	if want := "cores busy in the window: bench process 1.00, redis-server 0.50, postgres 0.25, everything else 0.20"; u.String() != want {
		t.Errorf("String() = %q, want %q", u.String(), want)
	}
	// At 100,000 msg/s: 1 core is 10 µs per message.
	if got, want := u.perUnit(100_000, "msg"), "CPU per msg: 17.5 µs (bench process 10.0, redis-server 5.0, postgres 2.5)"; got != want {
		t.Errorf("perUnit = %q, want %q", got, want)
	}
	if got := (cpuUse{}).perUnit(100_000, "msg"); got != "" {
		t.Errorf("perUnit without snapshots = %q, want empty", got)
	}
	if got := u.perUnit(0, "msg"); got != "" {
		t.Errorf("perUnit at rate 0 = %q, want empty", got)
	}
}
