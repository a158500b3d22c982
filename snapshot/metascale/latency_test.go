package metascale

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/blocksnap/blocksnap/blockdev/blockdevtest"
)

// TestLatencyBuckets: every value lies in a bucket whose upper bound is at
// least the value and at most 1/64 above it, and buckets are in order.
func TestLatencyBuckets(t *testing.T) {
	prev := -1
	for _, us := range []uint64{0, 1, 63, 64, 65, 127, 128, 129, 1000, 4095, 4096, 1 << 20, 1<<30 + 12345} {
		i := latBucket(us)
		require.GreaterOrEqual(t, i, prev, "value %d", us)
		prev = i
		up := latUpper(i)
		require.GreaterOrEqual(t, up, us, "value %d bucket %d", us, i)
		require.LessOrEqual(t, float64(up), float64(us)*(1+1.0/64)+1, "value %d bucket %d", us, i)
		if i > 0 {
			require.Less(t, latUpper(i-1), us, "value %d bucket %d", us, i)
		}
	}
}

// TestLatencyQuantiles compares quantiles with a sorted copy of random
// durations.
func TestLatencyQuantiles(t *testing.T) {
	seed := blockdevtest.Seed(t)
	rng := rand.New(rand.NewPCG(seed, 1))
	var l latency
	var all []time.Duration
	for range 20000 {
		d := time.Duration(rng.ExpFloat64()*200) * time.Microsecond
		if rng.IntN(1000) == 0 {
			d = time.Duration(rng.IntN(500)) * time.Millisecond
		}
		l.add(d)
		all = append(all, d)
	}
	slices.Sort(all)
	for _, q := range []float64{0.5, 0.99, 0.999, 1} {
		want := all[max(int(q*float64(len(all)))-1, 0)]
		got := l.quantile(q)
		require.GreaterOrEqual(t, got, want.Truncate(time.Microsecond), "q %v", q)
		require.LessOrEqual(t, float64(got), float64(want)*(1+1.0/64)+float64(time.Microsecond), "q %v", q)
	}
	limit := time.Duration(latUpper(latBucket(10000))) * time.Microsecond
	over := uint64(0)
	for _, d := range all {
		if d.Truncate(time.Microsecond) > limit {
			over++
		}
	}
	require.Equal(t, over, l.over(10*time.Millisecond))
	var empty latency
	require.Zero(t, empty.quantile(0.99))
}
