package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// CPU accounting from /proc (Linux): where the cores went during a window,
// since a CPU profile only shows this process. Times are in clock ticks of
// 1/100 s, the value of USER_HZ on Linux.
const clockTicks = 100

// cpuSnap is the CPU time used so far by the machine and by the processes
// of the run.
type cpuSnap struct {
	at       time.Time
	busy     uint64 // the whole machine
	self     uint64 // this process
	redis    uint64 // redis-server
	postgres uint64 // the postmaster and its children
	api      uint64 // the API's own process, if any
	ok       bool
}

// cpuSnapshot reads the CPU times now; apiPID, if not 0, is the API's own
// process. Servers given by URL are not accounted separately (they count as
// the rest of the machine).
func (b *bench) cpuSnapshot(apiPID int) cpuSnap {
	s := cpuSnap{at: time.Now()}
	busy, err := machineBusy()
	if err != nil {
		return s
	}
	s.busy, s.ok = busy, true
	s.self, _, _ = procTimes(os.Getpid())
	if b.env.redis != nil {
		s.redis, _, _ = procTimes(b.env.redis.PID())
	}
	if b.env.pg != nil {
		s.postgres = treeTimes(b.env.pg.PID())
	}
	s.api, _, _ = procTimes(apiPID)
	return s
}

// snap is cpuSnapshot without an API process.
func (b *bench) snap() cpuSnap { return b.cpuSnapshot(0) }

// cpuUse is the CPU time spent between two snapshots, in cores.
type cpuUse struct {
	ok                               bool
	self, api, redis, postgres, rest float64
	hasAPI                           bool
}

func cpuBetween(a, z cpuSnap) cpuUse {
	if !a.ok || !z.ok {
		return cpuUse{}
	}
	secs := z.at.Sub(a.at).Seconds()
	if secs <= 0 {
		return cpuUse{}
	}
	cores := func(x, y uint64) float64 {
		if y < x {
			return 0
		}
		return float64(y-x) / clockTicks / secs
	}
	u := cpuUse{ok: true, self: cores(a.self, z.self), redis: cores(a.redis, z.redis), postgres: cores(a.postgres, z.postgres),
		api: cores(a.api, z.api), hasAPI: z.api > 0}
	u.rest = max(0, cores(a.busy, z.busy)-u.self-u.redis-u.postgres-u.api)
	return u
}

// String describes the use in cores.
func (u cpuUse) String() string {
	if !u.ok {
		return ""
	}
	apiPart := ""
	if u.hasAPI {
		apiPart = fmt.Sprintf(", conveyor api %.2f", u.api)
	}
	return fmt.Sprintf("cores busy in the window: bench process %.2f%s, redis-server %.2f, postgres %.2f, everything else %.2f",
		u.self, apiPart, u.redis, u.postgres, u.rest)
}

// perUnit is the CPU time of the bench process, the API, Redis and
// PostgreSQL per unit of work at rate units a second (other programs on
// the machine left out). Unlike a rate it barely moves when other programs
// share the cores, so it compares runs and rows on a noisy machine.
func (u cpuUse) perUnit(rate float64, unit string) string {
	if !u.ok || rate <= 0 {
		return ""
	}
	us := func(cores float64) float64 { return cores * 1e6 / rate }
	apiPart := ""
	if u.hasAPI {
		apiPart = fmt.Sprintf(", conveyor api %.1f", us(u.api))
	}
	return fmt.Sprintf("CPU per %s: %.1f µs (bench process %.1f%s, redis-server %.1f, postgres %.1f)",
		unit, us(u.self+u.api+u.redis+u.postgres), us(u.self), apiPart, us(u.redis), us(u.postgres))
}

// cpuNote describes the CPU use between two snapshots in cores.
func cpuNote(a, z cpuSnap) string { return cpuBetween(a, z).String() }

// machineBusy returns the non-idle time of all cores from /proc/stat.
func machineBusy() (uint64, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	first, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(first)
	if len(f) < 8 || f[0] != "cpu" {
		return 0, fmt.Errorf("unexpected /proc/stat")
	}
	var total uint64
	for i, v := range f[1:] {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, err
		}
		// idle and iowait are the 4th and 5th values; guest time is
		// already part of user time.
		if i == 3 || i == 4 || i >= 8 {
			continue
		}
		total += n
	}
	return total, nil
}

// procTimes returns a process's own CPU time (utime+stime), the time of its
// reaped children (cutime+cstime), and its parent's pid.
func procTimes(pid int) (own, children uint64, ppid int) {
	if pid <= 0 {
		return 0, 0, 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, 0, 0
	}
	// Fields after the command: state(3) ppid(4) ... utime(14) stime(15)
	// cutime(16) cstime(17).
	f := strings.Fields(s[i+1:])
	if len(f) < 15 {
		return 0, 0, 0
	}
	num := func(k int) uint64 {
		n, _ := strconv.ParseUint(f[k-3], 10, 64)
		return n
	}
	p, _ := strconv.Atoi(f[4-3])
	return num(14) + num(15), num(16) + num(17), p
}

// treeTimes returns the CPU time of a process and its direct children,
// including children already reaped.
func treeTimes(pid int) uint64 {
	own, reaped, _ := procTimes(pid)
	total := own + reaped
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		child, err := strconv.Atoi(filepath.Base(d))
		if err != nil || child == pid {
			continue
		}
		if o, _, ppid := procTimes(child); ppid == pid {
			total += o
		}
	}
	return total
}
