package snapshot

import (
	"math"

	"github.com/google/btree"
)

// The index maps (branch, chunk, epoch) to a store location.
//
// An entry (b, c, e) -> loc says: for the snapshots of branch b numbered in
// (e', e], where e' is the epoch of the previous entry for (b, c) (0 if
// none), chunk c reads from loc. epochLive (the largest epoch) holds a
// clone's live chunk. Reading chunk c of snapshot k of branch b is one seek:
// the first entry at or after (b, c, k); if there is none the chunk is as the
// branch's parent point sees it (branch 0: the origin device).
//
// Invariants (Check verifies them): every entry's epoch is a held epoch of
// its branch (a live snapshot, a hidden parent of clones, or epochLive on a
// live clone), except entries queued for the background collector; each
// store chunk is referenced by at most one entry; the byEpoch tree holds
// exactly the entries of byChunk.

const (
	// epochLive is the epoch of a writable clone's live entries.
	epochLive = math.MaxUint32
	// locZero: the chunk reads as zeros (a discarded clone chunk).
	locZero = math.MaxUint64
	// locInherit: the chunk reads as the branch's parent point sees it.
	locInherit = math.MaxUint64 - 1
)

// entry is one index entry; both trees hold the whole entry.
type entry struct {
	b   uint32
	e   uint32
	c   uint64
	loc uint64
}

func (x entry) isData() bool { return x.loc < locInherit }

func lessBCE(x, y entry) bool {
	if x.b != y.b {
		return x.b < y.b
	}
	if x.c != y.c {
		return x.c < y.c
	}
	return x.e < y.e
}

func lessBEC(x, y entry) bool {
	if x.b != y.b {
		return x.b < y.b
	}
	if x.e != y.e {
		return x.e < y.e
	}
	return x.c < y.c
}

const btreeDegree = 32

// index is the in-memory mapping. Guarded by Store.mu.
type index struct {
	byChunk *btree.BTreeG[entry] // ordered (b, c, e): lookups
	byEpoch *btree.BTreeG[entry] // ordered (b, e, c): delete, diff, checkpoint
}

func newIndex() index {
	return index{byChunk: btree.NewG(btreeDegree, lessBCE), byEpoch: btree.NewG(btreeDegree, lessBEC)}
}

// clone returns a lazily copied, consistent view for a background reader.
func (ix index) clone() index {
	return index{byChunk: ix.byChunk.Clone(), byEpoch: ix.byEpoch.Clone()}
}

func (ix index) len() int { return ix.byChunk.Len() }

// put inserts x; it reports false if (b, c, e) is already present.
func (ix index) put(x entry) bool {
	if ix.byChunk.Has(x) {
		return false
	}
	ix.byChunk.ReplaceOrInsert(x)
	ix.byEpoch.ReplaceOrInsert(x)
	return true
}

// del removes (b, c, e) and returns the removed entry.
func (ix index) del(b uint32, c uint64, e uint32) (entry, bool) {
	x, ok := ix.byChunk.Delete(entry{b: b, c: c, e: e})
	if ok {
		ix.byEpoch.Delete(x)
	}
	return x, ok
}

// get returns the entry exactly at (b, c, e).
func (ix index) get(b uint32, c uint64, e uint32) (entry, bool) {
	return ix.byChunk.Get(entry{b: b, c: c, e: e})
}

// seek returns the first entry of (b, c) with epoch >= e.
func (ix index) seek(b uint32, c uint64, e uint32) (out entry, ok bool) {
	ix.byChunk.AscendGreaterOrEqual(entry{b: b, c: c, e: e}, func(x entry) bool {
		if x.b == b && x.c == c {
			out, ok = x, true
		}
		return false
	})
	return out, ok
}

// prev returns the last entry of (b, c) with epoch < e.
func (ix index) prev(b uint32, c uint64, e uint32) (out entry, ok bool) {
	if e == 0 {
		return out, false
	}
	ix.byChunk.DescendLessOrEqual(entry{b: b, c: c, e: e - 1}, func(x entry) bool {
		if x.b == b && x.c == c {
			out, ok = x, true
		}
		return false
	})
	return out, ok
}

// last returns the entry of (b, c) with the greatest epoch.
func (ix index) last(b uint32, c uint64) (entry, bool) {
	return ix.prev(b, c, epochLive)
}

// epochEntries calls fn for the entries of branch b at epoch e in chunk
// order, starting at chunk from, until fn returns false.
func (ix index) epochEntries(b uint32, e uint32, from uint64, fn func(entry) bool) {
	ix.byEpoch.AscendGreaterOrEqual(entry{b: b, e: e, c: from}, func(x entry) bool {
		if x.b != b || x.e != e {
			return false
		}
		return fn(x)
	})
}

// branchEpochs calls fn with each distinct epoch that has entries in branch
// b, in increasing order; a seek per epoch.
func (ix index) branchEpochs(b uint32, fn func(e uint32) bool) {
	next := entry{b: b}
	for {
		var got entry
		found := false
		ix.byEpoch.AscendGreaterOrEqual(next, func(x entry) bool {
			got, found = x, x.b == b
			return false
		})
		if !found || !fn(got.e) || got.e == epochLive {
			return
		}
		next = entry{b: b, e: got.e + 1}
	}
}

// branchLen reports whether branch b has any entries.
func (ix index) branchHas(b uint32) bool {
	has := false
	ix.byChunk.AscendGreaterOrEqual(entry{b: b}, func(x entry) bool {
		has = x.b == b
		return false
	})
	return has
}

// chunkGroups is a coarse per-branch summary of the chunks that have
// entries: one bit per group of chunks, set when an entry is added, never
// cleared until the next Open. A clear bit lets a read skip a level of the
// clone chain without a seek, which keeps deep chains cheap. At most
// maxGroupBits bits per branch.
type chunkGroups struct {
	shift uint
	bits  []uint64
}

const maxGroupBits = 1 << 16

func newChunkGroups(chunks uint64) chunkGroups {
	shift := uint(0)
	for chunks>>shift > maxGroupBits {
		shift++
	}
	n := (chunks>>shift)/64 + 1
	return chunkGroups{shift: shift, bits: make([]uint64, n)}
}

func (g *chunkGroups) has(i uint64) bool { return g.bits[i/64]&(1<<(i%64)) != 0 }

func (g *chunkGroups) setBit(i uint64) { g.bits[i/64] |= 1 << (i % 64) }

func (g *chunkGroups) clone() chunkGroups {
	return chunkGroups{shift: g.shift, bits: append([]uint64(nil), g.bits...)}
}

func (g *chunkGroups) mayHave(c uint64) bool {
	i := c >> g.shift
	return g.bits[i/64]&(1<<(i%64)) != 0
}
