package snapshot

import (
	"math/bits"
	"sync"
)

// allocator is the store's allocation bitmap: one bit per data chunk, set
// while the chunk is referenced by an index entry, allocated for a copy in
// flight, or freed by a transaction that is not durable yet. It is derived
// state: Open rebuilds it from the index, so it is never written to disk.
type allocator struct {
	mu sync.Mutex // guards the fields below; taken after Store.mu, never before

	used     []uint64
	n        uint64 // data chunks
	nused    uint64 // bits set
	cursor   uint64 // next place to look (allocation rotates through the store)
	pending  []freed
	inflight int64 // allocated and not yet referenced by the index
}

// freed is a chunk released by the transaction whose last record is seq; it
// may be reused once that record is durable.
type freed struct {
	seq uint64
	loc uint64
}

func newAllocator(n uint64) *allocator {
	return &allocator{used: make([]uint64, (n+63)/64), n: n}
}

func (a *allocator) isUsed(loc uint64) bool { return a.used[loc/64]&(1<<(loc%64)) != 0 }

func (a *allocator) set(loc uint64) {
	a.used[loc/64] |= 1 << (loc % 64)
	a.nused++
}

func (a *allocator) clear(loc uint64) {
	a.used[loc/64] &^= 1 << (loc % 64)
	a.nused--
}

// allocRun allocates up to want chunks at consecutive locations (at least
// one) and returns the first and the count; ok is false when the store is
// full. The chunks count as in flight until adopt or release.
func (a *allocator) allocRun(want int) (start uint64, got int, ok bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.nused >= a.n {
		return 0, 0, false
	}
	loc, found := a.findClear(a.cursor)
	if !found {
		loc, found = a.findClear(0)
	}
	if !found {
		return 0, 0, false
	}
	start = loc
	for got < want && loc < a.n && !a.isUsed(loc) {
		a.set(loc)
		loc++
		got++
	}
	a.cursor = loc
	if a.cursor >= a.n {
		a.cursor = 0
	}
	a.inflight += int64(got)
	return start, got, true
}

// findClear returns the first clear bit at or after from.
func (a *allocator) findClear(from uint64) (uint64, bool) {
	for w := from / 64; w < uint64(len(a.used)); w++ {
		word := a.used[w]
		if w == from/64 {
			word |= (1 << (from % 64)) - 1
		}
		if word != ^uint64(0) {
			loc := w*64 + uint64(bits.TrailingZeros64(^word))
			if loc < a.n {
				return loc, true
			}
			return 0, false
		}
	}
	return 0, false
}

// adopt moves n in-flight chunks to referenced (their entries are in the
// index now).
func (a *allocator) adopt(n int) {
	a.mu.Lock()
	a.inflight -= int64(n)
	a.mu.Unlock()
}

// release returns in-flight chunks that were never referenced.
func (a *allocator) release(start uint64, n int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for i := uint64(0); i < uint64(n); i++ {
		a.clear(start + i)
	}
	a.inflight -= int64(n)
}

// free releases a referenced chunk: at once when seq is 0 (nothing to wait
// for), otherwise when the record seq is durable (see durable).
func (a *allocator) free(loc, seq uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if seq == 0 {
		a.clear(loc)
		return
	}
	a.pending = append(a.pending, freed{seq: seq, loc: loc})
}

// durable makes chunks freed by records up to seq reusable and reports how
// many were.
func (a *allocator) durable(seq uint64) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	kept := a.pending[:0]
	n := 0
	for _, f := range a.pending {
		if f.seq <= seq {
			a.clear(f.loc)
			n++
		} else {
			kept = append(kept, f)
		}
	}
	a.pending = kept
	return n
}

// hasPending reports whether some freed chunks wait for a durable record.
func (a *allocator) hasPending() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.pending) > 0
}

// mark sets loc as referenced (Open, rebuilding from the index); false if it
// was already set.
func (a *allocator) mark(loc uint64) bool {
	if loc >= a.n || a.isUsed(loc) {
		return false
	}
	a.set(loc)
	return true
}

// counts returns used and free chunks.
func (a *allocator) counts() (used, free uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.nused, a.n - a.nused
}
