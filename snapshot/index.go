package snapshot

import "math"

// The index maps (branch, chunk, epoch) to a store location.
//
// An entry (b, c, e) -> loc says: for the snapshots of branch b numbered in
// (e', e], where e' is the epoch of the previous entry for (b, c) (0 if
// none), chunk c reads from loc. epochLive (the largest epoch) holds a
// clone's live chunk. Reading chunk c of snapshot k of branch b is one seek:
// the first entry at or after (b, c, k); if there is none the chunk is as the
// branch's parent point sees it (branch 0: the origin device).
//
// The index lives in the metadata region (pagedindex.go). Invariants
// (Check verifies them): every entry's epoch is a held epoch of its branch
// (a live snapshot, a hidden parent of clones, or epochLive on a live
// clone), except entries queued for the background collector; each store
// chunk is referenced by at most one entry; the epoch tree holds exactly
// the entries of the chunk tree (meta's Check).

const (
	// epochLive is the epoch of a writable clone's live entries.
	epochLive = math.MaxUint32
	// locZero: the chunk reads as zeros (a discarded clone chunk).
	locZero = math.MaxUint64
	// locInherit: the chunk reads as the branch's parent point sees it.
	locInherit = math.MaxUint64 - 1
)

// entry is one index entry.
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

// mayHave reports whether chunk c's group may have entries; a chunk past
// the summary's space (branch 0's is the origin's) has none.
func (g *chunkGroups) mayHave(c uint64) bool {
	i := c >> g.shift
	return i/64 < uint64(len(g.bits)) && g.bits[i/64]&(1<<(i%64)) != 0
}
