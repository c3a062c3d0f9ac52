package main

import (
	"math"
	"testing"
	"time"
)

func TestProbeSpeed(t *testing.T) {
	v := probeSpeed(20 * time.Millisecond)
	// One round of probeWork takes microseconds: tens of thousands per
	// second on any machine, never none.
	if math.IsNaN(v) || math.IsInf(v, 0) || v < 1_000 {
		t.Fatalf("probeSpeed = %v rounds/s, want a finite rate of at least 1,000", v)
	}
}
