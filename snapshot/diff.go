package snapshot

import (
	"errors"
	"fmt"
	"iter"
	"slices"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot/internal/pace"
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
// entries of the levels where the two chains differ (those at or above
// the epoch each level is seen at), not to the volumes' size. Zero is reported for the newer side: the one that
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
		// Extents cover the larger volume: past the smaller one's end the
		// other has data (or zeros the index maps).
		size := max(from.Size(), to.Size())
		var cur Extent
		for _, c := range chunks {
			off, n := int64(c.c)*s.cs, s.volChunkLen(c.c, size)
			if n == 0 {
				break // past both volumes' ends (entries a shrink left to a snapshot)
			}
			zero := trustZero && s.chunkZero(newer, c)
			if cur.Len > 0 && cur.Off+cur.Len == off && cur.Zero == zero {
				cur.Len += n
				continue
			}
			if cur.Len > 0 && !yield(cur, nil) {
				return
			}
			cur = Extent{Off: off, Len: n, Zero: zero}
		}
		if cur.Len > 0 {
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

// diffChunk is a changed chunk and what the newer volume reads there.
type diffChunk struct {
	c        uint64
	loc      uint64 // a store chunk or locZero, unless fromOrig
	fromOrig bool   // the newer volume reads the chunk from the origin device
}

// diffChunks returns the sorted chunks that differ, and the newer volume.
func (s *Store) diffChunks(from, to *Volume) ([]diffChunk, *Volume, error) {
	if err := from.check(0, 0); err != nil {
		return nil, nil, err
	}
	if err := to.check(0, 0); err != nil {
		return nil, nil, err
	}
	if from.s != s || to.s != s {
		return nil, nil, fmt.Errorf("%w: a volume of another store", ErrUnrelated)
	}
	// Levels are fixed when a handle opens (a branch's parent point never
	// changes), so the plan needs no lock.
	p, ok := planDiff(from.levels, to.levels)
	if !ok {
		return nil, nil, fmt.Errorf("%w: %s %q and %s %q", ErrUnrelated, from.Kind(), from.Info().Name, to.Kind(), to.Info().Name)
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
// side's own levels answer (what it reads there is then known), where the
// older side's own levels answer, and the shared branch's entries between
// the two epochs. The newer side is then resolved, on the same view, where
// its own levels did not answer. Everything is kept in sorted slices, a
// few words per entry walked.
func (s *Store) walkDiff(ix pagedIndex, p diffPlan, newer *Volume, newerOnly, older []level) ([]diffChunk, error) {
	var known []answer // what the newer side's own levels map, topmost first
	for _, l := range newerOnly {
		got, err := levelAnswers(ix, l)
		if err != nil {
			return nil, err
		}
		known = mergeAnswers(known, got)
	}
	var other []uint64
	for _, l := range older {
		got, err := levelAnswers(ix, l)
		if err != nil {
			return nil, err
		}
		for _, a := range got {
			other = append(other, a.c)
		}
	}
	if p.split {
		err := ix.epochChunks(p.br.id, p.lo, p.hi, false, func(c uint64, _ uint32) bool {
			other = append(other, c)
			return true
		})
		if err != nil {
			return nil, err
		}
	}
	var pc pace.Pacer
	pace.SortUint64(other, &pc) // up to one per entry walked: a plain sort held a processor for tens of ms
	other = slices.Compact(other)
	// The rest of the newer chain, below its own levels.
	rest := newer.levels[len(newerOnly):]
	out := make([]diffChunk, 0, len(known)+len(other))
	for i, j := 0, 0; i < len(known) || j < len(other); {
		switch {
		case j == len(other) || (i < len(known) && known[i].c <= other[j]):
			if j < len(other) && known[i].c == other[j] {
				j++
			}
			out = append(out, diffChunk{c: known[i].c, loc: known[i].loc})
			i++
		default:
			loc, fromOrig, err := s.resolveView(ix, rest, other[j])
			if err != nil {
				return nil, err
			}
			out = append(out, diffChunk{c: other[j], loc: loc, fromOrig: fromOrig})
			j++
			pc.Step()
		}
	}
	return out, nil
}

// answer is a chunk a level answers, and the location it maps it to.
type answer struct{ c, loc uint64 }

// levelAnswers returns, in chunk order, the chunks that level l answers:
// the first entry of (l.br, c) at or above l.e (for a live level, the
// live entry) is not an inherit, so a read there stops at this level. Its
// cost is the level's entries at or above l.e: their chunks are read from
// the epoch tree, then each chunk's first entry is sought in the chunk
// tree in chunk order (consecutive lookups in one leaf, each leaf read
// once), not in epoch order (a random leaf per entry).
func levelAnswers(ix pagedIndex, l level) ([]answer, error) {
	var cs []uint64
	err := ix.epochChunks(l.br.id, l.e, epochLive, true, func(c uint64, _ uint32) bool {
		cs = append(cs, c)
		return true
	})
	if err != nil {
		return nil, err
	}
	var pc pace.Pacer
	pace.SortUint64(cs, &pc)
	cs = slices.Compact(cs)
	got := make([]answer, 0, len(cs))
	for _, c := range cs {
		x, ok, err := ix.seek(l.br.id, c, l.e)
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, errors.New("snapshot: paged index: epoch tree lists a chunk the chunk tree lacks")
		}
		if x.loc != locInherit {
			got = append(got, answer{c: c, loc: x.loc})
		}
		pc.Step()
	}
	return got, nil
}

// mergeAnswers merges b, a lower level's answers, into a, keeping a's
// where both answer a chunk.
func mergeAnswers(a, b []answer) []answer {
	if len(a) == 0 {
		return b
	}
	out := make([]answer, 0, len(a)+len(b))
	i, j := 0, 0
	for i < len(a) && j < len(b) {
		switch {
		case a[i].c < b[j].c:
			out = append(out, a[i])
			i++
		case a[i].c > b[j].c:
			out = append(out, b[j])
			j++
		default:
			out = append(out, a[i])
			i, j = i+1, j+1
		}
	}
	out = append(out, a[i:]...)
	return append(out, b[j:]...)
}

// resolveView is resolveLocked on a view, without the branch summaries
// (they are guarded by Store.mu, which the view's reader does not hold):
// one lookup per level. A chunk no level maps reads the origin device if
// the chain ends at branch 0 and the chunk lies within the origin, else
// zeros (a chain of a blank volume, or past the origin's end).
func (s *Store) resolveView(ix pagedIndex, levels []level, c uint64) (loc uint64, fromOrigin bool, err error) {
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
	if len(levels) == 0 || levels[len(levels)-1].br.id != 0 || c >= s.chunks {
		return locZero, false, nil
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
