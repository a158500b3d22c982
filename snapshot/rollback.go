package snapshot

import (
	"context"
	"fmt"
	"iter"
	"slices"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Rollback reverts a writable volume (the origin or a clone) to one of its
// own snapshots, online: only the chunks that differ are rewritten, through
// the normal write path, so every other snapshot stays intact and a clone's
// chain does not deepen. Writes racing with the rollback land before or
// after it, chunk by chunk. The branch gate is held shared throughout, so
// neither volume can be deleted (nor a snapshot of it taken) meanwhile.
func (s *Store) Rollback(ctx context.Context, vol, to *Volume) error {
	if err := vol.writable(); err != nil {
		return err
	}
	if err := to.check(0, 0); err != nil {
		return err
	}
	if to.kind != KindSnapshot || to.meta.branch != vol.br.id {
		return fmt.Errorf("%w: volume %d is not a snapshot of volume %d", ErrBadOptions, to.meta.id, vol.meta.id)
	}
	if err := s.writable(); err != nil {
		return err
	}
	vol.br.gate.RLock()
	defer vol.br.gate.RUnlock()
	if err := vol.notDeleted(); err != nil {
		return err
	}
	if err := to.notDeleted(); err != nil {
		return err
	}
	b, k := vol.br.id, to.meta.epoch
	type change struct {
		c       uint64
		x       entry
		inherit bool // k sees the parent point (clones)
	}
	var changes []change
	s.mu.RLock()
	last := uint64(1<<64 - 1)
	s.ix.byChunk.AscendGreaterOrEqual(entry{b: b}, func(x entry) bool {
		if x.b != b {
			return false
		}
		if x.c == last {
			return true
		}
		last = x.c
		kv, ok := s.ix.seek(b, x.c, k)
		switch {
		case !ok && b != 0:
			if _, live := s.ix.get(b, x.c, epochLive); live {
				changes = append(changes, change{c: x.c, inherit: true})
			}
		case !ok:
		case kv.e == epochLive:
		default:
			changes = append(changes, change{c: x.c, x: kv, inherit: kv.loc == locInherit})
		}
		return true
	})
	s.mu.RUnlock()
	bp := s.getBuf()
	defer s.putBuf(bp)
	for _, ch := range changes {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := s.writable(); err != nil {
			return err
		}
		off := int64(ch.c) * s.cs
		cl := s.chunkLen(ch.c)
		var err error
		switch {
		case ch.inherit:
			err = s.cloneInherit(vol.br, ch.c)
		case ch.x.loc == locZero:
			err = s.cloneWriteGated(vol.br, nil, off, cl, true)
		default:
			buf := (*bp)[:cl]
			if err = s.readLevels(to.levels, buf, off); err != nil {
				return err
			}
			// Only NoSpaceInvalidate can delete to now (the gate keeps
			// Delete out); if it did, what was read may be collected.
			if err = to.notDeleted(); err != nil {
				return err
			}
			if b == 0 {
				err = s.originWriteGated(buf, off, cl, false)
			} else {
				err = s.cloneWriteGated(vol.br, buf, off, cl, false)
			}
		}
		if err != nil {
			return fmt.Errorf("snapshot: rollback of chunk %d: %w", ch.c, err)
		}
	}
	if b == 0 {
		return vol.Flush()
	}
	return s.flushStore()
}

// cloneInherit makes clone chunk c read as its parent point again: the
// live entry is re-keyed to the newest snapshot that still needs it, or
// dropped. Called with br's gate held shared.
func (s *Store) cloneInherit(br *branch, c uint64) error {
	if err := s.writable(); err != nil {
		return err
	}
	l := s.cloneStripe(br.id, c)
	l.Lock()
	defer l.Unlock()
	v := s.liveViewOf(br, c)
	if !v.hasLive {
		return nil
	}
	sc := s.getScratch()
	defer s.putScratch(sc)
	if v.needAt != 0 {
		sc.ops = append(sc.ops, op{kind: opMove, b: br.id, c: c, e: epochLive, e2: v.needAt})
	} else {
		sc.ops = append(sc.ops, op{kind: opDel, b: br.id, c: c, e: epochLive, n: 1})
	}
	_, err := s.log(sc)
	return err
}

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
	if lo == epochLive {
		s.ix.epochEntries(br, epochLive, 0, visit)
	} else {
		s.ix.byEpoch.AscendRange(entry{b: br, e: lo}, entry{b: br, e: hi}, visit)
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
		s.mu.RLock()
		loc, fromOrigin = s.resolveLocked(v.levels, c)
		s.mu.RUnlock()
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
