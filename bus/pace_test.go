package bus

import (
	"testing"
	"time"
)

func TestPaceFollowsTheCountAndFallsWhenItStops(t *testing.T) {
	var p pace
	ms := int64(time.Millisecond)
	t0 := int64(1_000_000) * ms
	steps := []struct {
		at, count int64
		want      float64
		why       string
	}{
		{t0, 500, 0, "the first call has nothing to measure from"},
		{t0 + 5*ms, 550, 0, "less than a sample later: the last rate stands"},
		{t0 + 10*ms, 600, 10_000, "100 in 10ms"},
		{t0 + 15*ms, 9_000, 10_000, "a burst inside the sample is not seen yet"},
		{t0 + 30*ms, 9_000, 420_000, "8,400 in 20ms"},
		{t0 + 40*ms, 9_000, 0, "stopped for a whole sample"},
		{t0 + 40*ms + int64(time.Hour), 9_100, 100.0 / 3600.000, "a pause counts in the sample after it"},
		{t0 + 50*ms + int64(time.Hour), 9_000, 100.0 / 3600.000, "a count older than the last sample's is no sample"},
		{t0 + 60*ms + int64(time.Hour), 9_300, 10_000, "200 in 20ms since the last sample"},
	}
	for _, s := range steps {
		if got := p.rate(s.at, s.count); got < s.want*0.999 || got > s.want*1.001 {
			t.Errorf("rate at +%v with count %d = %.3f, want %.3f: %s", time.Duration(s.at-t0), s.count, got, s.want, s.why)
		}
	}
}

func TestReadAheadIsCappedAndCanBeTurnedOff(t *testing.T) {
	s := &Subscriber{cfg: SubscriberConfig{BatchSize: 100, ReadAhead: 5 * time.Millisecond}}
	now := time.Now().UnixNano()
	s.pace.rate(now-int64(20*time.Millisecond), 0)
	s.released.Store(100) // 100 in 20ms: 5,000/s, so 25 in 5ms
	if got := s.readAheadAt(now); got != 25 {
		t.Errorf("read-ahead at 5,000/s = %d, want 25", got)
	}
	s.pace = pace{}
	s.pace.rate(now-int64(20*time.Millisecond), 0)
	s.released.Store(1_000_000)
	if got := s.readAheadAt(now); got != 200 {
		t.Errorf("read-ahead at 50M/s = %d, want 2×BatchSize, 200 (a read for each lane)", got)
	}
	s.cfg.ReadAhead = -1
	if got := s.readAhead(); got != 0 {
		t.Errorf("read-ahead turned off = %d, want 0", got)
	}
	if got := s.readAheadAt(now); got != 0 {
		t.Errorf("read-ahead turned off, at a given time = %d, want 0", got)
	}
}
