// Package pace lets long background work share a small machine's
// processors with the goroutines a user waits for.
//
// Go's scheduler preempts a goroutine after a 10 ms time slice. A
// goroutine that another wakes (an unlock, a channel send) runs next on
// the waker's processor, but only when the waker blocks, yields or has
// used up its slice; a system call that returns quickly keeps the
// processor. So on a machine with two processors, a store writer that
// becomes runnable while a Diff walks a view, a tree commit encodes and
// writes its pages and the write-back goroutine writes its own could wait
// most of 10 ms for a processor, holding whatever lock it held. Work that
// no caller waits for step by step yields every Slice instead: a Pacer
// counts the steps of one such loop and reads the clock every few.
package pace

import (
	"runtime"
	"slices"
	"time"
)

// Slice is how long paced work runs between yields.
const Slice = 500 * time.Microsecond

// every is how many steps pass between clock reads: a step is a node
// load, a page write or a batch of entries, a microsecond or more.
const every = 16

var base = time.Now()

// Pacer paces one loop (one goroutine). The zero value is ready.
type Pacer struct {
	n    uint32
	last time.Duration
}

// Step counts a step of the loop and yields the processor if the loop
// has run Slice since it last yielded (or since its first step).
func (p *Pacer) Step() {
	p.n++
	if p.n%every != 0 {
		return
	}
	t := time.Since(base)
	if p.last == 0 {
		p.last = t
		return
	}
	if t-p.last >= Slice {
		p.last = t
		runtime.Gosched()
	}
}

// SortUint64 sorts xs in increasing order as slices.Sort does, yielding
// through p between blocks, so that sorting the million chunk numbers of
// a large Diff does not hold a processor for tens of milliseconds: it
// sorts blocks of a few thousand, then merges them pairwise through a
// buffer as long as xs.
func SortUint64(xs []uint64, p *Pacer) {
	const block = 4096
	if len(xs) <= block {
		sortBlock(xs)
		return
	}
	for i := 0; i < len(xs); i += block {
		sortBlock(xs[i:min(i+block, len(xs))])
		p.Step()
	}
	src, dst := xs, make([]uint64, len(xs))
	for w := block; w < len(xs); w *= 2 {
		for i := 0; i < len(xs); i += 2 * w {
			mid, end := min(i+w, len(xs)), min(i+2*w, len(xs))
			merge(dst[i:end], src[i:mid], src[mid:end], p)
		}
		src, dst = dst, src
	}
	if &src[0] != &xs[0] {
		copy(xs, src)
	}
}

// merge merges the sorted a and b into out (len(a)+len(b) long).
func merge(out, a, b []uint64, p *Pacer) {
	i, j, k := 0, 0, 0
	for i < len(a) && j < len(b) {
		if b[j] < a[i] {
			out[k] = b[j]
			j++
		} else {
			out[k] = a[i]
			i++
		}
		k++
		if k%1024 == 0 {
			p.Step()
		}
	}
	k += copy(out[k:], a[i:])
	copy(out[k:], b[j:])
}

func sortBlock(xs []uint64) { slices.Sort(xs) }
