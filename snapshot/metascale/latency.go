package metascale

import (
	"math/bits"
	"time"
)

// latency is a histogram of durations in microseconds with log-linear
// buckets: exact below 64 µs, then 64 buckets per power of two (at most
// 1.6% wide), up to 2^40 µs. It is a fixed array, so recording a put
// allocates nothing and the histogram does not grow with the run.
type latency struct {
	n      uint64
	counts [64 + 34*64]uint64
}

const latSub = 64 // exact values below this; sub-buckets per power of two above

func latBucket(us uint64) int {
	if us < latSub {
		return int(us)
	}
	e := bits.Len64(us) - 7 // us>>e is in [64, 128)
	i := latSub + e*latSub + int(us>>uint(e)) - latSub
	return min(i, len(latency{}.counts)-1)
}

// latUpper is the largest value in bucket i, so a quantile is never
// understated.
func latUpper(i int) uint64 {
	if i < latSub {
		return uint64(i)
	}
	e := uint((i - latSub) / latSub)
	m := uint64((i-latSub)%latSub + latSub)
	return (m+1)<<e - 1
}

func (l *latency) add(d time.Duration) {
	l.n++
	l.counts[latBucket(uint64(d.Microseconds()))]++
}

// quantile returns the upper bound of the bucket that holds the q-th
// quantile (q in [0, 1]); 0 when empty.
func (l *latency) quantile(q float64) time.Duration {
	if l.n == 0 {
		return 0
	}
	rank := uint64(q * float64(l.n))
	rank = min(max(rank, 1), l.n)
	var seen uint64
	for i, c := range l.counts {
		seen += c
		if seen >= rank {
			return time.Duration(latUpper(i)) * time.Microsecond
		}
	}
	return time.Duration(latUpper(len(l.counts)-1)) * time.Microsecond
}

// over counts the recorded durations in buckets wholly above d.
func (l *latency) over(d time.Duration) uint64 {
	var sum uint64
	for i := latBucket(uint64(d.Microseconds())) + 1; i < len(l.counts); i++ {
		sum += l.counts[i]
	}
	return sum
}

// merge adds o's durations to l.
func (l *latency) merge(o *latency) {
	l.n += o.n
	for i, c := range o.counts {
		l.counts[i] += c
	}
}
