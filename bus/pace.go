package bus

import (
	"sync"
	"time"
)

// paceSample is the shortest time pace measures over.
const paceSample = 10 * time.Millisecond

// pace measures how fast a count grows (window slots released), over the
// last paceSample or more.
type pace struct {
	mu     sync.Mutex
	at     int64 // unix nanos of the last sample
	count  int64 // the count at the last sample
	perSec float64
}

// rate returns the count's growth per second, given its value now. It is
// measured from the last sample at least paceSample old, so it falls to 0
// within two samples after the count stops growing, and a first call, or
// one after a long pause, sees the pause. A caller whose count is older
// than the last sample's (it read the count, then waited for the lock)
// only gets the rate.
func (p *pace) rate(now, count int64) float64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	if d := now - p.at; d >= int64(paceSample) && count >= p.count {
		if p.at != 0 {
			p.perSec = float64(count-p.count) * float64(time.Second) / float64(d)
		}
		p.at, p.count = now, count
	}
	return p.perSec
}
