package main

import (
	"strings"
	"testing"
)

func TestPerUnitByCommand(t *testing.T) {
	before := parseCommandStats("# Commandstats\r\n" +
		"cmdstat_xadd:calls=100,usec=300,usec_per_call=3.00,rejected_calls=0,failed_calls=0\r\n" +
		"cmdstat_xinfo|groups:calls=1,usec=4,usec_per_call=4.00,rejected_calls=0,failed_calls=0\r\n")
	if got := before["xinfo|groups"]; got != (cmdStat{calls: 1, usec: 4}) {
		t.Fatalf("xinfo|groups = %+v, want calls 1, usec 4", got)
	}
	after := parseCommandStats("# Commandstats\r\n" +
		"cmdstat_xadd:calls=300,usec=800,usec_per_call=2.67,rejected_calls=0,failed_calls=0\r\n" +
		"cmdstat_xreadgroup:calls=10,usec=1500,usec_per_call=150.00,rejected_calls=0,failed_calls=0\r\n" +
		"cmdstat_xinfo|groups:calls=2,usec=8,usec_per_call=4.00,rejected_calls=0,failed_calls=0\r\n")
	// 100 events: XADD 2 calls and 5 µs each, XREADGROUP 0.1 call and 15 µs,
	// XINFO 0.04 µs (under 1% of 20.04: left out).
	got := perUnitByCommand(before, after, 100, "event")
	want := "Redis time in commands per event: 20.0 µs: XREADGROUP 15.0 µs (calls: 0.1), XADD 5.0 µs (calls: 2)"
	if got != want {
		t.Fatalf("perUnitByCommand =\n%q, want\n%q", got, want)
	}
	for _, empty := range []string{perUnitByCommand(nil, after, 100, "event"), perUnitByCommand(before, after, 0, "event"), perUnitByCommand(after, after, 100, "event")} {
		if empty != "" {
			t.Fatalf("without snapshots, units or time: %q, want nothing", empty)
		}
	}
	if strings.Contains(got, "XINFO") {
		t.Fatal("a command under 1% of the time is listed")
	}
}
