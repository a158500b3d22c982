package clone

import "time"

// The in-flight window of background hydration follows the bandwidth-delay
// product of the source, as BBR sizes a TCP window: every background copy
// is a sample of the pipeline's latency (from issuing the source read to the
// destination write's return) and of the delivery rate (bytes completed by
// all copies while it was in flight, over its lifetime). The window is
//
//	gain * max(delivery rate, recent) * min(latency, recent)
//
// clamped to [one batch, the cap]. With gain 2 the window doubles every
// round trip while the delivery rate keeps growing and settles at twice the
// product once the source is saturated (more in flight would only queue).
// While user I/O is reading the source the gain is 1: the pipe stays full
// but no queue builds in front of the user's requests (background batches
// yield). A fixed count could not do both: a remote source 20 ms away needs
// tens of MiB in flight, a 1 ms one a few hundred KiB, and every byte above
// the product is a byte a user read waits behind.

const (
	// bwSpan and rttSpan are the lengths of the buckets of the windowed
	// max and min filters (two buckets each): the bandwidth estimate
	// forgets within 2 s, the latency estimate within 20 s.
	bwSpan  = time.Second
	rttSpan = 10 * time.Second
	// DefaultMaxInFlight is the cap on the bytes background hydration keeps
	// in flight when Options.HydrationThreshold is 0.
	DefaultMaxInFlight = 64 << 20
	// yieldFor is how long after a user read of the source background
	// hydration keeps yielding.
	yieldFor = 50 * time.Millisecond
)

// pacer estimates the source pipeline and sizes the window. It is guarded
// by hydrator.mu.
type pacer struct {
	minWin, maxWin int64 // bytes
	initWin        int64 // until the first sample

	delivered int64 // bytes completed by background copies, total

	bw    [2]float64 // bytes/s: max of the current and the previous bucket
	bwAt  time.Time  // start of the current bandwidth bucket
	rtt   [2]time.Duration
	rttAt time.Time
}

func newPacer(minWin, maxWin, initWin int64, now time.Time) pacer {
	return pacer{minWin: minWin, maxWin: max(minWin, maxWin), initWin: initWin, bwAt: now, rttAt: now}
}

// sample records a copy of n bytes issued at start, when delivered was
// delivered0.
func (p *pacer) sample(now, start time.Time, delivered0, n int64) {
	p.delivered += n
	el := now.Sub(start)
	if el <= 0 {
		el = time.Microsecond
	}
	if now.Sub(p.bwAt) >= bwSpan {
		p.bw[1], p.bw[0], p.bwAt = p.bw[0], 0, now
	}
	p.bw[0] = max(p.bw[0], float64(p.delivered-delivered0)/el.Seconds())
	if now.Sub(p.rttAt) >= rttSpan {
		p.rtt[1], p.rtt[0], p.rttAt = p.rtt[0], 0, now
	}
	if p.rtt[0] == 0 || el < p.rtt[0] {
		p.rtt[0] = el
	}
}

// rate is the bandwidth estimate in bytes/s (0 before the first sample).
func (p *pacer) rate() float64 { return max(p.bw[0], p.bw[1]) }

// latency is the latency estimate (0 before the first sample).
func (p *pacer) latency() time.Duration {
	switch {
	case p.rtt[1] == 0:
		return p.rtt[0]
	case p.rtt[0] == 0:
		return p.rtt[1]
	}
	return min(p.rtt[0], p.rtt[1])
}

// window is the bytes background copies may have in flight.
func (p *pacer) window(yield bool) int64 {
	bw, rtt := p.rate(), p.latency()
	if bw == 0 || rtt == 0 {
		return min(p.initWin, p.maxWin)
	}
	gain := 2.0
	if yield {
		gain = 1
	}
	w := int64(gain * bw * rtt.Seconds())
	return min(max(w, p.minWin), p.maxWin)
}
