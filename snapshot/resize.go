package snapshot

import (
	"errors"
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
)

// Resize of a clone or blank volume.
//
// The size is one journal record (type 12); a handle's bounds checks read
// it atomically, so open handles see the new size at once. The branch gate
// is held exclusively throughout: no write of the volume runs meanwhile.
//
// A shrink logs the new size first, so nothing past it can be read or
// written, and then drops the live entries of the whole chunks past it
// (a snapshot that still needs one gets it re-keyed, as a write would),
// in records of at most shrinkBatch operations. A crash in between leaves
// live entries past the end: invisible, and dealt with by the next grow.
// Those records free metadata (or re-key it), so, like the collector's,
// they may use the metadata region's delete reserve (logFreeing): a shrink
// is how a full region's volume gives room back.
//
// A grow must make the new range read as zeros, whatever lies below it:
// the volume's own leftovers, or a parent that is larger or still holds
// data there (a clone of a snapshot taken before a shrink). The rest of
// the old last chunk, if it is not already zero, is written with zeros;
// every whole chunk in the new range that the volume's chain does not
// already resolve to zeros gets a zero mapping (metadata only, as
// WriteZeroes does). Only then is the new size logged: a crash before it
// leaves zero mappings past the end, which are harmless.

// ResizeOptions says how Resize may change a volume.
type ResizeOptions struct {
	// Shrink allows a size below the current one: the tail is discarded
	// (its store chunks freed unless a snapshot needs them), and a later
	// grow reads zeros there. Without it a smaller size is refused.
	Shrink bool
}

// shrinkBatch bounds the operations of one record of a shrink.
const shrinkBatch = 1024

// Resize sets the size, in bytes, of the named clone or blank volume (a
// positive multiple of the volume block size, at most MaxVolumeSize). The
// origin's size is its device's, and snapshots never change: both are
// refused. Its snapshots keep the size they were taken at, and a new clone
// or snapshot takes the volume's size of the moment.
func (s *Store) Resize(name string, size int64, opts ResizeOptions) error {
	if err := s.writable(); err != nil {
		return err
	}
	if err := s.checkVolumeSize(size); err != nil {
		return err
	}
	s.mu.RLock()
	id, ok := s.byName[name]
	var v *volume
	var br *branch
	if ok {
		v = s.volumes[id]
		br = s.branches[v.branch]
	}
	s.mu.RUnlock()
	switch {
	case !ok:
		return fmt.Errorf("%w: %q", ErrNotFound, name)
	case v.kind == KindOrigin:
		return fmt.Errorf("%w: the origin's size is its device's", ErrBadOptions)
	case v.kind == KindSnapshot:
		return fmt.Errorf("%w: snapshot %q cannot be resized", ErrReadOnly, name)
	}
	br.gate.Lock()
	defer br.gate.Unlock()
	if v.dead.Load() { // deleted while this waited for the gate
		return fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	old := v.size.Load()
	switch {
	case size == old:
		return nil
	case size < old && !opts.Shrink:
		return fmt.Errorf("%w: %q from %d to %d bytes would discard its tail (ResizeOptions.Shrink, --shrink)", ErrBadOptions, name, old, size)
	case size < old:
		return s.shrink(v, br, size, old)
	}
	return s.grow(v, br, old, size)
}

// logSize logs v's new size and commits it.
func (s *Store) logSize(v *volume, size int64) error {
	sc := s.getScratch()
	defer s.putScratch(sc)
	sc.ops = append(sc.ops, op{kind: opResize, id: v.id, size: size})
	if _, err := s.log(sc); err != nil {
		return err
	}
	return s.commit(s.ctx)
}

// shrink sets v's size to size and drops the live entries of the whole
// chunks past it, up to old. Called with br's gate held exclusively.
func (s *Store) shrink(v *volume, br *branch, size, old int64) error {
	if err := s.logSize(v, size); err != nil {
		return err
	}
	return s.dropTail(br, uint64((size+s.cs-1)/s.cs), uint64((old+s.cs-1)/s.cs))
}

// dropTail drops br's live entries of chunks [first, end), re-keying those
// a snapshot of br still needs. Called with br's gate held exclusively.
func (s *Store) dropTail(br *branch, first, end uint64) error {
	sc := s.getScratch()
	defer s.putScratch(sc)
	flush := func() error {
		s.readMapAhead(sc)
		err := s.logFreeing(sc)
		sc.ops = sc.ops[:0]
		return err
	}
	for c := first; c < end; c++ {
		s.mu.RLock()
		may := br.groups.mayHave(c)
		s.mu.RUnlock()
		if !may {
			continue
		}
		lv, err := s.liveViewOf(br, c)
		if err != nil {
			return err
		}
		switch {
		case !lv.hasLive:
			continue
		case lv.needAt != 0:
			sc.ops = append(sc.ops, op{kind: opMove, b: br.id, c: c, e: epochLive, e2: lv.needAt})
		default:
			sc.ops = append(sc.ops, op{kind: opDel, b: br.id, c: c, e: epochLive, n: 1})
			if lv.live.isData() {
				sc.frees = append(sc.frees, lv.live.loc)
			}
		}
		if len(sc.ops) >= shrinkBatch {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	if err := flush(); err != nil {
		return err
	}
	return s.commit(s.ctx)
}

// logFreeing logs sc.ops, a shrink's deletes and moves, which free
// metadata or move it (never add to it), as the collector's records are
// logged: they may use the metadata region's delete reserve, and a batch
// the region has no room for (its worst case counts every change) is
// logged in halves, down to one operation, which always fits the reserve.
// So a shrink works on a full region and frees room in it, as Delete does.
func (s *Store) logFreeing(sc *scratch) error {
	all := sc.ops
	sc.reclaiming = true
	defer func() { sc.ops, sc.reclaiming = all, false }()
	for rest, n := all, len(all); len(rest) > 0; {
		sc.ops = rest[:min(n, len(rest))]
		_, err := s.log(sc)
		if errors.Is(err, ErrNoSpace) && len(sc.ops) > 1 {
			n = len(sc.ops) / 2
			continue
		}
		if err != nil {
			return err
		}
		rest = rest[len(sc.ops):]
	}
	return nil
}

// grow makes [old, size) of v read as zeros and then sets its size. Called
// with br's gate held exclusively.
func (s *Store) grow(v *volume, br *branch, old, size int64) error {
	s.mu.RLock()
	levels := levelsOf(br, epochLive)
	s.mu.RUnlock()
	if r := old % s.cs; r != 0 {
		n := min(s.cs-r, size-old)
		zero, err := s.rangeReadsZero(levels, old, n)
		if err != nil {
			return err
		}
		if !zero {
			if err := s.cloneWriteGated(br, nil, old, n, true); err != nil {
				return err
			}
		}
	}
	for c, end := uint64((old+s.cs-1)/s.cs), uint64((size+s.cs-1)/s.cs); c < end; c++ {
		if err := s.writable(); err != nil {
			return err
		}
		s.mu.RLock()
		loc, fromOrigin, err := s.resolveLocked(levels, c)
		s.mu.RUnlock()
		if err != nil {
			return err
		}
		if !fromOrigin && loc == locZero {
			continue
		}
		if err := s.cloneChunk(br, c, nil, 0, s.cs, true); err != nil {
			return err
		}
	}
	return s.logSize(v, size)
}

// rangeReadsZero reports whether [off, off+n), within one chunk, reads as zeros
// through levels.
func (s *Store) rangeReadsZero(levels []level, off, n int64) (bool, error) {
	bp := s.getBuf()
	defer s.putBuf(bp)
	p := (*bp)[:n]
	if err := s.readLevels(levels, p, off); err != nil {
		return false, err
	}
	return blockdev.IsZero(p), nil
}
