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

// cpuNote describes the CPU use between two snapshots in cores.
func cpuNote(a, z cpuSnap) string {
	if !a.ok || !z.ok {
		return ""
	}
	secs := z.at.Sub(a.at).Seconds()
	cores := func(x, y uint64) float64 {
		if y < x {
			return 0
		}
		return float64(y-x) / clockTicks / secs
	}
	self, rds, pg, api, all := cores(a.self, z.self), cores(a.redis, z.redis), cores(a.postgres, z.postgres), cores(a.api, z.api), cores(a.busy, z.busy)
	rest := max(0, all-self-rds-pg-api)
	apiPart := ""
	if z.api > 0 {
		apiPart = fmt.Sprintf(", conveyor api %.2f", api)
	}
	return fmt.Sprintf("cores busy in the window: bench process %.2f%s, redis-server %.2f, postgres %.2f, everything else %.2f",
		self, apiPart, rds, pg, rest)
}

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
