package pace

import (
	"math/rand/v2"
	"slices"
	"testing"
)

func TestSortUint64(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{0, 1, 2, 4095, 4096, 4097, 8192, 8193, 3*4096 + 17, 100_000} {
		for _, span := range []uint64{4, 1 << 40} {
			xs := make([]uint64, n)
			for i := range xs {
				xs[i] = rng.Uint64N(span)
			}
			want := slices.Clone(xs)
			slices.Sort(want)
			var p Pacer
			SortUint64(xs, &p)
			if !slices.Equal(xs, want) {
				t.Fatalf("n=%d span=%d: not sorted as slices.Sort sorts", n, span)
			}
		}
	}
}

func TestPacerYields(t *testing.T) {
	// Step must not yield before the loop has run a Slice; it cannot be
	// timed, but it must count: after every steps the clock is read.
	var p Pacer
	for range every {
		p.Step()
	}
	if p.last == 0 {
		t.Fatal("Step did not read the clock after every steps")
	}
}
