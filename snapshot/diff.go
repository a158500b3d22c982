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

// Diff yields the extents that differ between two volumes of one line of
// history, in offset order: two snapshots of one volume (either order), a
// snapshot and the live volume it was taken of, or a clone and the
// snapshot it was cloned from. Its cost is proportional to the number of
// index entries in the answer, not to the volume's size. Zero is reported
// for the newer side. An unrelated pair yields ErrBadOptions.
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
			off, n := int64(c)*s.cs, s.chunkLen(c)
			zero := trustZero && s.readsZero(newer, c)
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

// diffChunks returns the sorted chunks that differ, and the newer volume.
func (s *Store) diffChunks(from, to *Volume) ([]uint64, *Volume, error) {
	if err := from.check(0, 0); err != nil {
		return nil, nil, err
	}
	if err := to.check(0, 0); err != nil {
		return nil, nil, err
	}
	a, b := from, to
	if a.kind != KindSnapshot || (b.kind == KindSnapshot && b.meta.branch == a.meta.branch && b.meta.epoch < a.meta.epoch) {
		a, b = b, a
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	var br uint32
	var lo, hi uint32
	switch {
	case a.kind == KindSnapshot && b.meta.branch == a.meta.branch:
		br, lo, hi = a.meta.branch, a.meta.epoch, b.meta.epoch // b's epoch is epochLive for a live volume
	case a.kind == KindSnapshot && b.kind == KindClone && b.br.parent == a.meta.branch && b.br.parentEpoch == a.meta.epoch:
		br, lo, hi = b.br.id, epochLive, epochLive
	default:
		return nil, nil, fmt.Errorf("%w: volumes %d and %d are not snapshots of one volume, nor a clone and its parent", ErrBadOptions, from.meta.id, to.meta.id)
	}
	var out []uint64
	visit := func(x entry) bool {
		if x.loc != locInherit || lo != epochLive {
			out = append(out, x.c)
		}
		return true
	}
	var err error
	if lo == epochLive {
		err = s.ix.epochEntries(br, epochLive, 0, visit)
	} else {
		err = s.ix.epochRange(br, lo, hi, visit)
	}
	if err != nil {
		return nil, nil, metaErr("index walk", err)
	}
	slices.Sort(out)
	return slices.Compact(out), b, nil
}

// readsZero reports whether chunk c of v reads as zeros, as far as the
// metadata (or the origin device's allocation map) can tell.
func (s *Store) readsZero(v *Volume, c uint64) bool {
	var loc uint64
	fromOrigin := true
	if v.kind != KindOrigin {
		var err error
		s.mu.RLock()
		loc, fromOrigin, err = s.resolveLocked(v.levels, c)
		s.mu.RUnlock()
		if err != nil {
			return false // unknown: the caller reads the chunk
		}
	}
	if !fromOrigin {
		return loc == locZero
	}
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
