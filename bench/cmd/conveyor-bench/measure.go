package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/conveyor/conveyor/events"
)

// window is the outcome of one throughput measurement.
type window struct {
	n       int64
	elapsed time.Duration
	// drained reports that the work ran out before the window ended (a
	// pre-filled stream or queue was consumed completely).
	drained bool
	// cpu is the CPU used in the window, if measured.
	cpu cpuUse
}

// cpuNotes describes the window's CPU use in cores and per unit.
func (w window) cpuNotes(unit string) string {
	if !w.cpu.ok {
		return ""
	}
	return w.cpu.String() + "; " + w.cpu.perUnit(w.rate(), unit)
}

func (w window) rate() float64 {
	if w.elapsed <= 0 {
		return 0
	}
	return float64(w.n) / w.elapsed.Seconds()
}

func (w window) String() string {
	s := fmt.Sprintf("%s in %.1f s", formatNum(float64(w.n)), w.elapsed.Seconds())
	if w.drained {
		s += " (drained)"
	}
	return s
}

// measureCounter measures how fast count grows. It waits for the warm-up
// (warm-up time, or a tenth of total when total is known, whichever comes
// first), then measures for d or until count reaches total. snap, if not
// nil, takes the CPU snapshots at both ends of the measured window.
func measureCounter(ctx context.Context, count func() int64, total int64, warmup, d time.Duration, snap func() cpuSnap) (window, error) {
	const tick = 10 * time.Millisecond
	warmEnd := time.Now().Add(warmup)
	for time.Now().Before(warmEnd) {
		if total > 0 && count() >= total/10 {
			break
		}
		if err := sleep(ctx, tick); err != nil {
			return window{}, err
		}
	}
	var s0 cpuSnap
	if snap != nil {
		s0 = snap()
	}
	c0, t0 := count(), time.Now()
	if total > 0 && c0 >= total {
		return window{}, fmt.Errorf("the pre-filled work (%d) was used up during the warm-up; raise -prefill", total)
	}
	for {
		if err := sleep(ctx, tick); err != nil {
			return window{}, err
		}
		c, now := count(), time.Now()
		drained := total > 0 && c >= total
		if drained || now.Sub(t0) >= d {
			w := window{n: c - c0, elapsed: now.Sub(t0), drained: drained}
			if snap != nil {
				w.cpu = cpuBetween(s0, snap())
			}
			return w, nil
		}
	}
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// loadResult is the outcome of an HTTP load.
type loadResult struct {
	window
	requests int64
	failures int64
	// firstFailure describes one failed request.
	firstFailure string
}

// httpLoad runs conc clients, each sending requests made by newReq over a
// keep-alive connection, for the warm-up and then d. check inspects a
// response and returns how many units (events, bytes) it carried, or an
// error. Only the units of requests finished in the measured window count.
func httpLoad(ctx context.Context, conc int, warmup, d time.Duration, newReq func() (*http.Request, error), check func(*http.Response, []byte) (int64, error)) (loadResult, error) {
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:        conc,
		MaxIdleConnsPerHost: conc,
		MaxConnsPerHost:     conc,
		IdleConnTimeout:     time.Minute,
		DisableCompression:  true,
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: time.Minute}
	var units, requests, failures atomic.Int64
	var firstFailure atomic.Value
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := bytes.NewBuffer(make([]byte, 0, 64<<10))
			for ctx.Err() == nil {
				req, err := newReq()
				if err != nil {
					firstFailure.CompareAndSwap(nil, err.Error())
					failures.Add(1)
					return
				}
				resp, err := client.Do(req.WithContext(ctx))
				if err != nil {
					if ctx.Err() == nil {
						firstFailure.CompareAndSwap(nil, err.Error())
						failures.Add(1)
					}
					continue
				}
				buf.Reset()
				_, err = io.Copy(buf, resp.Body)
				_ = resp.Body.Close()
				if err != nil {
					if ctx.Err() == nil {
						firstFailure.CompareAndSwap(nil, err.Error())
						failures.Add(1)
					}
					continue
				}
				n, err := check(resp, buf.Bytes())
				if err != nil {
					firstFailure.CompareAndSwap(nil, err.Error())
					failures.Add(1)
					continue
				}
				units.Add(n)
				requests.Add(1)
			}
		}()
	}
	w, err := measureCounter(ctx, units.Load, 0, warmup, d, nil)
	cancel()
	wg.Wait()
	res := loadResult{window: w, requests: requests.Load(), failures: failures.Load()}
	if s, ok := firstFailure.Load().(string); ok {
		res.firstFailure = s
	}
	return res, err
}

// expectStatus returns a check that wants status and counts units per
// response.
func expectStatus(status int, units int64) func(*http.Response, []byte) (int64, error) {
	return func(resp *http.Response, body []byte) (int64, error) {
		if resp.StatusCode != status {
			return 0, fmt.Errorf("status %d: %.200s", resp.StatusCode, body)
		}
		return units, nil
	}
}

// percentile returns the p-th percentile (0..100) of sorted durations.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted)-1) * p / 100)
	return sorted[i]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// sortDurations sorts in place and returns s.
func sortDurations(s []time.Duration) []time.Duration {
	slices.Sort(s)
	return s
}

// emailBody is the body of every benchmark email: the same bytes for
// Conveyor and its peers.
const emailBody = "Hello,\n\nyour report is ready. This message was sent by the Conveyor benchmark; nothing is delivered.\n"

// newEmail returns a valid email.requested event.
func newEmail() *events.EmailRequested {
	return &events.EmailRequested{
		EmailID:     events.NewID(),
		To:          "bench@example.com",
		Subject:     "Benchmark",
		Body:        emailBody,
		RequestedAt: time.Now().UTC().Truncate(time.Microsecond),
	}
}

// parseAccepted reads the "accepted" count from a batch response.
func parseAccepted(body []byte) (int64, error) {
	const field = `"accepted":`
	i := bytes.Index(body, []byte(field))
	if i < 0 {
		return 0, fmt.Errorf("no accepted count in %.200s", body)
	}
	rest := body[i+len(field):]
	j := 0
	for j < len(rest) && rest[j] >= '0' && rest[j] <= '9' {
		j++
	}
	return strconv.ParseInt(string(rest[:j]), 10, 64)
}
