package bench

import (
	"math/bits"
	"sync/atomic"
	"time"
)

// Hist is a log-linear latency histogram: 16 linear sub-buckets per power of
// two of nanoseconds, so a percentile is exact to within 1/16 (6%). Record
// is lock-free and allocation-free; many goroutines may record at once.
type Hist struct {
	counts [64 * histSub]atomic.Uint64
	total  atomic.Uint64
}

const histSubBits = 4
const histSub = 1 << histSubBits

func histBucket(ns uint64) int {
	if ns < histSub {
		return int(ns)
	}
	exp := bits.Len64(ns) - 1 - histSubBits // >= 0
	sub := (ns >> uint(exp)) & (histSub - 1)
	return (exp+1)*histSub + int(sub)
}

// histLow returns the smallest value that falls in bucket i.
func histLow(i int) uint64 {
	if i < histSub {
		return uint64(i)
	}
	exp := i/histSub - 1
	sub := uint64(i % histSub)
	return (histSub | sub) << uint(exp)
}

// Record adds one sample.
func (h *Hist) Record(d time.Duration) {
	ns := uint64(max(d, 0))
	h.counts[histBucket(ns)].Add(1)
	h.total.Add(1)
}

// Count is the number of samples.
func (h *Hist) Count() uint64 { return h.total.Load() }

// Percentile returns the latency below which a fraction q (0..1) of the
// samples fall, as the lower bound of the bucket holding it.
func (h *Hist) Percentile(q float64) time.Duration {
	total := h.total.Load()
	if total == 0 {
		return 0
	}
	rank := uint64(q * float64(total))
	if rank >= total {
		rank = total - 1
	}
	var seen uint64
	for i := range h.counts {
		seen += h.counts[i].Load()
		if seen > rank {
			return time.Duration(histLow(i))
		}
	}
	return 0
}

// Reset clears the histogram.
func (h *Hist) Reset() {
	for i := range h.counts {
		h.counts[i].Store(0)
	}
	h.total.Store(0)
}
