package bus

import (
	"errors"
	"math"
	"math/rand/v2"
	"time"
)

// RetryPolicy decides how often and when a failed message is tried again.
// Retries wait in a Redis sorted set, not in the consumer, so a retrying
// message never blocks the messages behind it.
type RetryPolicy struct {
	// MaxAttempts is the total number of attempts, the first included. After
	// the last one fails the message goes to the dead-letter stream.
	// Defaults to 8.
	MaxAttempts int
	// MinBackoff is the delay before the first retry; each further retry
	// doubles it. Defaults to 1s.
	MinBackoff time.Duration
	// MaxBackoff caps the delay. Defaults to 10m.
	MaxBackoff time.Duration
	// Jitter spreads each delay uniformly by ±Jitter of itself, so that many
	// messages failing together do not retry together. Defaults to 0.2.
	Jitter float64
}

func (p *RetryPolicy) setDefaults() {
	if p.MaxAttempts == 0 {
		p.MaxAttempts = 8
	}
	if p.MinBackoff == 0 {
		p.MinBackoff = time.Second
	}
	if p.MaxBackoff == 0 {
		p.MaxBackoff = 10 * time.Minute
	}
	if p.Jitter == 0 {
		p.Jitter = 0.2
	}
}

// Validate reports every problem with the policy.
func (p RetryPolicy) Validate() error {
	var errs []error
	if p.MaxAttempts < 1 {
		errs = append(errs, errors.New("retry: MaxAttempts must be at least 1"))
	}
	if p.MinBackoff < 0 || p.MaxBackoff < p.MinBackoff {
		errs = append(errs, errors.New("retry: need 0 <= MinBackoff <= MaxBackoff"))
	}
	if p.Jitter < 0 || p.Jitter > 1 {
		errs = append(errs, errors.New("retry: Jitter must be within [0, 1]"))
	}
	return errors.Join(errs...)
}

// Backoff returns the delay after the given failed attempt (1 for the
// first): exponential, capped, with jitter.
func (p RetryPolicy) Backoff(failedAttempt int) time.Duration {
	if failedAttempt < 1 {
		failedAttempt = 1
	}
	d := p.MinBackoff
	for i := 1; i < failedAttempt && d < p.MaxBackoff; i++ {
		d *= 2
	}
	if d > p.MaxBackoff {
		d = p.MaxBackoff
	}
	if p.Jitter > 0 && d > 0 {
		spread := float64(d) * p.Jitter
		d = time.Duration(float64(d) - spread + rand.Float64()*2*spread)
	}
	return max(d, 0)
}

// Window is the longest a message can wait for its retries: the delays
// after each failed attempt but the last, each at the top of its jitter.
// (The attempts' own run time comes on top.) It saturates instead of
// overflowing.
func (p RetryPolicy) Window() time.Duration {
	p.setDefaults()
	const most = time.Duration(math.MaxInt64)
	var total time.Duration
	left := int64(p.MaxAttempts - 1)
	d := p.MinBackoff
	if d <= 0 {
		left = 0 // no delays
	}
	for ; left > 0 && d < p.MaxBackoff; left-- {
		total += d
		d = min(2*d, most/2)
	}
	if left > 0 {
		if left > int64(most/p.MaxBackoff) || total > most-time.Duration(left)*p.MaxBackoff {
			return most
		}
		total += time.Duration(left) * p.MaxBackoff
	}
	top := 1 + p.Jitter
	if float64(total)*top >= float64(most) {
		return most
	}
	return time.Duration(float64(total) * top)
}
