package clone

import "time"

// The in-flight window of background hydration follows the bandwidth-delay
// product of the source, in the manner of BBR: every completed background
// copy gives a delivery rate sample (the bytes completed between the last
// completion before the copy was issued and its own, over that interval,
// which is at least the copy's latency; the estimate is the recent
// maximum) and a latency sample (from issuing the source read to the
// destination write's return; the estimate is the recent minimum).
// Sampling per copy rather than per fixed interval matters
// at the start: the first copies of a full initial window complete
// together, and a rate measured over the first completion alone would be a
// fraction of the pipe's and collapse the window for several round trips.
// Two windows follow:
//
//   - bulk, while no user I/O reads the source: bulkGain times rate times
//     latency. Above 1 the window grows every round trip while the delivery
//     rate keeps growing (a window-limited pipe delivers more when given
//     more) and settles a bounded queue above the product once the source
//     is saturated; a remote source 20 ms away gets tens of MiB in flight.
//   - yield, while user I/O reads the source: yieldGain times rate times
//     latency plus one batch, in batches a quarter of that. The pipe stays
//     full but little queues ahead of the user's requests: on a link of
//     128 MB/s and 1 ms that is about 200 KiB in 64 KiB copies, where a
//     fixed four 1 MiB copies made a user read wait 32 ms. A gain above 1
//     matters: a window-limited pipe (one copy at a time, as when a user
//     read came before any measurement) measures the rate as the window
//     over the latency, and only a window larger than that product lets
//     the estimate grow; it stops growing once a queue a quarter of the
//     latency long builds.
//
// Both are clamped to [one region, the cap].

const (
	// bwSpan and rttSpan are the lengths of the buckets of the windowed
	// max and min filters (two buckets each): the bandwidth estimate
	// forgets within 2 s, the latency estimates within 20 s.
	bwSpan  = time.Second
	rttSpan = 10 * time.Second
	// DefaultMaxInFlight is the cap on the bytes background hydration keeps
	// in flight when Options.HydrationThreshold is 0.
	DefaultMaxInFlight = 64 << 20
	// initialWindow is the window until the source has been measured (at
	// least four batches), what nbdcopy keeps in flight over its first
	// connection: a remote source is not starved while its rate is
	// unknown, and the first measurement is of a full pipe.
	initialWindow = 16 << 20
	// yieldFor is how long after a user read of the source background
	// hydration keeps yielding.
	yieldFor = 500 * time.Millisecond
	// bulkGain is the bulk window's gain over the bandwidth-delay product.
	bulkGain = 3.0
	// yieldGain is the yielding window's: a little above 1, so that a
	// rate estimate below the source's true rate grows back, at the cost
	// of a queue a quarter of the latency long.
	yieldGain = 1.25
)

// pacer estimates the source pipeline and sizes the window. It is guarded
// by hydrator.mu.
type pacer struct {
	minWin, maxWin int64 // bytes
	initWin        int64 // until the first rate is measured
	region         int64

	delivered   int64     // bytes completed by background copies, total
	deliveredAt time.Time // when delivered last grew (or the pipe restarted)

	bw  maxFilter // bytes/s
	rtt minFilter // whole copy latency
}

// maxFilter is a windowed maximum over two buckets of span: the current
// one and the previous one. 0 is "no sample".
type maxFilter struct {
	v    [2]float64
	at   time.Time
	span time.Duration
}

func (m *maxFilter) add(now time.Time, x float64) {
	if now.Sub(m.at) >= m.span {
		m.v[1], m.v[0], m.at = m.v[0], 0, now
	}
	m.v[0] = max(m.v[0], x)
}

func (m *maxFilter) get() float64 { return max(m.v[0], m.v[1]) }

// minFilter is a windowed minimum of latencies over two buckets of span.
// 0 is "no sample".
type minFilter struct {
	v    [2]time.Duration
	at   time.Time
	span time.Duration
}

func (m *minFilter) add(now time.Time, x time.Duration) {
	if now.Sub(m.at) >= m.span {
		m.v[1], m.v[0], m.at = m.v[0], 0, now
	}
	if m.v[0] == 0 || x < m.v[0] {
		m.v[0] = x
	}
}

func (m *minFilter) get() time.Duration {
	if m.v[0] == 0 || (m.v[1] != 0 && m.v[1] < m.v[0]) {
		return m.v[1]
	}
	return m.v[0]
}

func newPacer(region, maxWin, initWin int64, now time.Time) pacer {
	return pacer{
		minWin: region, maxWin: max(region, maxWin), initWin: initWin, region: region,
		deliveredAt: now,
		bw:          maxFilter{at: now, span: bwSpan},
		rtt:         minFilter{at: now, span: rttSpan},
	}
}

// stamp is what a copy remembers of the pacer when it is issued.
type stamp struct {
	start       time.Time
	delivered   int64
	deliveredAt time.Time
}

// issue stamps a copy issued at now.
func (p *pacer) issue(now time.Time) stamp {
	return stamp{start: now, delivered: p.delivered, deliveredAt: p.deliveredAt}
}

// sample records a copy of n bytes, stamped s at issue, completed at now.
func (p *pacer) sample(now time.Time, s stamp, n int64) {
	p.delivered += n
	p.deliveredAt = now
	p.rtt.add(now, max(now.Sub(s.start), time.Microsecond))
	if iv := now.Sub(s.deliveredAt); iv > 0 {
		p.bw.add(now, float64(p.delivered-s.delivered)/iv.Seconds())
	}
}

// restart begins the rate measurement anew: the time before now (paused,
// waiting for the map, idle) says nothing about the source.
func (p *pacer) restart(now time.Time) { p.deliveredAt = now }

// rate is the bandwidth estimate in bytes/s (0 before it is measured).
func (p *pacer) rate() float64 { return p.bw.get() }

// latency is the copy latency estimate (0 before the first sample).
func (p *pacer) latency() time.Duration { return p.rtt.get() }

// window is the bytes background copies may have in flight.
func (p *pacer) window(yield bool) int64 {
	bw, rtt := p.rate(), p.latency()
	if bw == 0 || rtt == 0 {
		if yield {
			return p.minWin
		}
		return min(p.initWin, p.maxWin)
	}
	var w int64
	if yield {
		bdp := int64(yieldGain * bw * rtt.Seconds())
		w = bdp + p.yieldBatch(bdp)
	} else {
		w = int64(bulkGain * bw * rtt.Seconds())
		if p.delivered < p.initWin {
			// The initial window is still on its way back: its
			// first completions underestimate the pipe.
			w = max(w, p.initWin)
		}
	}
	return min(max(w, p.minWin), p.maxWin)
}

// yieldBatch is the copy size while yielding with a bandwidth-delay
// product of bdp bytes: a quarter of it, at least one region.
func (p *pacer) yieldBatch(bdp int64) int64 {
	return max(p.region, bdp/4/p.region*p.region)
}
