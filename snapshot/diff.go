package snapshot

import (
	"fmt"
	"iter"
	"slices"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Extent is a byte range of a volume; Zero says it now reads as zeros
// (discarded), where the store can tell without reading data. It is
// blockdev.Extent, which diffstream shares.
type Extent = blockdev.Extent

// ErrUnrelated: Diff of two volumes that share no history (no branch of
// the store is in both of their chains), so no list of changes can take
// one to the other. It wraps ErrBadOptions.
var ErrUnrelated = fmt.Errorf("%w: volumes share no history", ErrBadOptions)

// Diff yields the extents where two related volumes can read different
// data, in offset order: the chunks whose answer comes from an index
// entry that one volume sees and the other does not. Applying the extents
// read from to onto a copy of from gives to.
//
// Any two volumes whose chains of clone parents meet are related: two
// snapshots of one volume (either order), a snapshot and the live volume
// it was taken of, a clone and its snapshot, and across clones: golden@v1
// to a snapshot of a clone of it (`zfs send -i golden@v1 vm1@snap`), a
// snapshot to a later snapshot of a clone of its clone, or two clones of
// one snapshot. Volumes whose chains share no branch yield ErrUnrelated.
//
// It reads metadata only, on a committed view of the index (readView),
// so writers are not held up. Its cost is proportional to the index
// entries in the answer, per level where the two chains differ, not to
// the volumes' size. Zero is reported for the newer side: the one that
// descends from the other (the later snapshot, the clone), else to.
func (s *Store) Diff(from, to *Volume) iter.Seq2[Extent, error] {
	return s.diff(from, to, nil)
}

// diff is Diff; with zeroFor set, Zero is reported only when zeroFor is
// the newer side (otherwise it describes the other volume).
func (s *Store) diff(from, to, zeroFor *Volume) iter.Seq2[Extent, error] {
	return func(yield func(Extent, error) bool) {
		chunks, newer, err := s.diffChunks(from, to)
		if err != nil {
			yield(Extent{}, err)
			return
		}
		trustZero := zeroFor == nil || zeroFor == newer
		var cur Extent
		for i, c := range chunks {
			off, n := int64(c.c)*s.cs, s.chunkLen(c.c)
			zero := trustZero && s.chunkZero(newer, c)
			if i > 0 && cur.Off+cur.Len == off && cur.Zero == zero {
				cur.Len += n
				continue
			}
			if i > 0 && !yield(cur, nil) {
				return
			}
			cur = Extent{Off: off, Len: n, Zero: zero}
		}
		if len(chunks) > 0 {
			yield(cur, nil)
		}
	}
}

// diffPlan says where two resolution orders differ. Levels are compared
// from the bottom (branch 0, or whatever root the chains share) up:
// below the first difference both volumes read alike.
type diffPlan struct {
	// onlyA, onlyB: the levels of each chain above the shared branch.
	onlyA, onlyB []level
	// split: both chains pass through branch br, at epochs lo < hi; the
	// entries of br in [lo, hi) are where the two views of it differ.
	split  bool
	br     *branch
	lo, hi uint32
	// bNewer: B descends from A (A's chain is B's below the shared
	// point, and A sees the shared branch no later than B); aNewer the
	// other way round. Neither: two volumes on sibling lines.
	aNewer, bNewer bool
}

// planDiff compares the resolution orders a and b (each from the
// volume's own level down to its root). ok is false when they share no
// branch.
func planDiff(a, b []level) (p diffPlan, ok bool) {
	i, j := len(a), len(b)
	for i > 0 && j > 0 && a[i-1] == b[j-1] {
		i, j = i-1, j-1
	}
	shared := i < len(a) // a common suffix of equal levels
	p.onlyA, p.onlyB = a[:i], b[:j]
	if i > 0 && j > 0 && a[i-1].br == b[j-1].br {
		// One branch seen at two epochs: a snapshot and a later snapshot
		// or the live volume of the same line.
		shared = true
		ea, eb := a[i-1].e, b[j-1].e
		p.split, p.br, p.lo, p.hi = true, a[i-1].br, min(ea, eb), max(ea, eb)
		p.onlyA, p.onlyB = a[:i-1], b[:j-1]
		p.bNewer = len(p.onlyA) == 0 && ea < eb
		p.aNewer = len(p.onlyB) == 0 && eb < ea
		return p, true
	}
	if !shared {
		return p, false
	}
	p.bNewer = len(p.onlyA) == 0 && len(p.onlyB) > 0
	p.aNewer = len(p.onlyB) == 0 && len(p.onlyA) > 0
	return p, true
}

// diffChunk is a changed chunk and, when the walk learned it, what the
// newer volume reads there.
type diffChunk struct {
	c        uint64
	loc      uint64 // a store chunk or locZero; meaningful when known && !origin
	known    bool
	fromOrig bool // the newer volume reads the chunk from the origin device
}

// diffChunks returns the sorted chunks that differ, and the newer volume.
func (s *Store) diffChunks(from, to *Volume) ([]diffChunk, *Volume, error) {
	if err := from.check(0, 0); err != nil {
		return nil, nil, err
	}
	if err := to.check(0, 0); err != nil {
		return nil, nil, err
	}
	// Levels are fixed when a handle opens (a branch's parent point never
	// changes), so the plan needs no lock.
	p, ok := planDiff(from.levels, to.levels)
	if !ok {
		return nil, nil, fmt.Errorf("%w: volume %d (%s) and volume %d (%s)", ErrUnrelated, from.meta.id, from.kind, to.meta.id, to.kind)
	}
	newer, newerOnly, older := to, p.onlyB, p.onlyA
	if p.aNewer {
		newer, newerOnly, older = from, p.onlyA, p.onlyB
	}
	// The walk reads a committed view (readView), so writers are not held
	// up by a large diff. A volume deleted by the view's instant has lost
	// the entries it needed.
	var gone error
	ix, done, err := s.readView(func() {
		for _, v := range []*Volume{from, to} {
			if err := v.notDeleted(); err != nil && gone == nil {
				gone = err
			}
		}
	}, false)
	if err != nil {
		return nil, nil, err
	}
	if gone != nil {
		done()
		return nil, nil, gone
	}
	out, err := s.walkDiff(ix, p, newer, newerOnly, older)
	done()
	if err != nil {
		return nil, nil, metaErr("diff walk", err)
	}
	return out, newer, nil
}

// walkDiff collects the changed chunks of plan p on ix: where the newer
// side's own levels have a say (what it reads there is then known), where
// the older side's own levels have one, and the shared branch's entries
// between the two epochs. The newer side is then resolved, on the same
// view, where its own levels did not answer.
func (s *Store) walkDiff(ix pagedIndex, p diffPlan, newer *Volume, newerOnly, older []level) ([]diffChunk, error) {
	known := map[uint64]uint64{} // chunk -> what the newer side's own levels map it to
	for _, l := range newerOnly {
		err := levelSay(ix, l, func(c, loc uint64) {
			if _, ok := known[c]; !ok { // a higher level answered already
				known[c] = loc
			}
		})
		if err != nil {
			return nil, err
		}
	}
	var other []uint64
	for _, l := range older {
		if err := levelSay(ix, l, func(c, _ uint64) { other = append(other, c) }); err != nil {
			return nil, err
		}
	}
	if p.split {
		err := ix.epochRange(p.br.id, p.lo, p.hi, func(x entry) bool {
			other = append(other, x.c)
			return true
		})
		if err != nil {
			return nil, err
		}
	}
	out := make([]diffChunk, 0, len(known)+len(other))
	for c, loc := range known {
		out = append(out, diffChunk{c: c, loc: loc, known: true})
	}
	for _, c := range other {
		if _, ok := known[c]; !ok {
			out = append(out, diffChunk{c: c})
		}
	}
	slices.SortFunc(out, func(a, b diffChunk) int {
		switch {
		case a.c < b.c:
			return -1
		case a.c > b.c:
			return 1
		}
		return 0
	})
	out = slices.CompactFunc(out, func(a, b diffChunk) bool { return a.c == b.c })
	// The rest of the newer chain, below its own levels.
	rest := newer.levels[len(newerOnly):]
	for i := range out {
		if out[i].known {
			continue
		}
		loc, fromOrig, err := resolveView(ix, rest, out[i].c)
		if err != nil {
			return nil, err
		}
		out[i].loc, out[i].fromOrig, out[i].known = loc, fromOrig, true
	}
	return out, nil
}

// levelSay calls fn for each chunk that level l answers: the first entry
// of (l.br, c) at or above l.e (for a live level, the live entry) is not
// an inherit, so a read there stops at this level. Its cost is the
// level's entries at or above l.e.
func levelSay(ix pagedIndex, l level, fn func(c, loc uint64)) error {
	if l.e == epochLive {
		return ix.epochEntries(l.br.id, epochLive, 0, func(x entry) bool {
			if x.loc != locInherit {
				fn(x.c, x.loc)
			}
			return true
		})
	}
	// Epochs are walked in increasing order, so a chunk's first visit is
	// its first entry at or above l.e.
	seen := map[uint64]struct{}{}
	visit := func(x entry) bool {
		if _, ok := seen[x.c]; ok {
			return true
		}
		seen[x.c] = struct{}{}
		if x.loc != locInherit {
			fn(x.c, x.loc)
		}
		return true
	}
	if err := ix.epochRange(l.br.id, l.e, epochLive, visit); err != nil {
		return err
	}
	return ix.epochEntries(l.br.id, epochLive, 0, visit)
}

// resolveView is resolveLocked on a view, without the branch summaries
// (they are guarded by Store.mu, which the view's reader does not hold):
// one lookup per level.
func resolveView(ix pagedIndex, levels []level, c uint64) (loc uint64, fromOrigin bool, err error) {
	for _, l := range levels {
		var x entry
		var ok bool
		if l.e == epochLive {
			x, ok, err = ix.get(l.br.id, c, epochLive)
		} else {
			x, ok, err = ix.seek(l.br.id, c, l.e)
		}
		if err != nil {
			return 0, false, err
		}
		if ok && x.loc != locInherit {
			return x.loc, false, nil
		}
	}
	return 0, true, nil
}

// chunkZero reports whether the newer volume v reads changed chunk d as
// zeros, as far as the walk's metadata (or the origin device's allocation
// map) can tell.
func (s *Store) chunkZero(v *Volume, d diffChunk) bool {
	if !d.fromOrig {
		return d.loc == locZero
	}
	c := d.c
	if v.kind == KindOrigin {
		st := &s.originLocks[c%nStripes]
		st.RLock()
		e := s.bufferedLocked(c)
		zero := e != nil && e.discard
		st.RUnlock()
		if e != nil {
			return zero
		}
	}
	m, ok := s.origin.(blockdev.AllocationMapper)
	if !ok {
		return false
	}
	n := s.chunkLen(c)
	got, st, err := m.MapAllocation(int64(c)*s.cs, n)
	return err == nil && got == n && st != blockdev.Allocated
}
