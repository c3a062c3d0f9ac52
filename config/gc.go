package config

import (
	"fmt"
	"runtime/debug"
)

// GCPercent is the garbage collector's target (GOGC) of Conveyor's
// processes when the environment sets none. Their heap is small (tens of
// MiB) and their garbage is per message, so collecting less often than
// Go's default of 100 saves much of the CPU the collector takes at full
// load, for a heap that peaks at about five times the live one.
const GCPercent = 400

// TuneGC sets GCPercent unless getenv("GOGC") is set (Go has applied that
// value already), and describes the setting in effect.
func TuneGC(getenv func(string) string) string {
	if v := getenv("GOGC"); v != "" {
		return "GOGC=" + v + " (from the environment)"
	}
	debug.SetGCPercent(GCPercent)
	return fmt.Sprintf("GOGC=%d (Conveyor's default)", GCPercent)
}
