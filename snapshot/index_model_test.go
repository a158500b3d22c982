package snapshot

import "github.com/google/btree"

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

// index is the in-memory index the store kept before it moved onto the
// metadata layer: the model TestPagedIndexMatchesIndex checks pagedIndex
// against.
type index struct {
	byChunk *btree.BTreeG[entry] // ordered (b, c, e): lookups
	byEpoch *btree.BTreeG[entry] // ordered (b, e, c): delete, diff, checkpoint
}

func newIndex() index {
	return index{byChunk: btree.NewG(btreeDegree, lessBCE), byEpoch: btree.NewG(btreeDegree, lessBEC)}
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
