package snapshot

import (
	"context"
	"fmt"
)

// Reset of a clone to a snapshot of an ancestor (Rollback's other case).
//
// A clone chunk with no live entry reads as the clone's parent point P.
// For each chunk, the target snapshot T and P are resolved (metadata
// only). Where both name the same thing (the same store chunk, the origin
// device, or a zero mapping), the chunk is made to inherit again: its live
// entry is dropped, or re-keyed to a snapshot of the clone that still
// needs it. That is the whole reset to the snapshot the clone came from,
// and no data moves. Where they differ (the target is a later snapshot of
// the parent, or a further ancestor), T's chunk is written into the clone
// through the normal write path: a zero mapping stays a zero mapping, and
// data is copied once (store chunks belong to one entry, so they cannot be
// shared). The clone keeps its branch, so open handles and NBD clients
// carry on, and the tree does not deepen.

// inChain reports whether branch b is an ancestor of v's branch.
func (v *Volume) inChain(b uint32) bool {
	for a := v.br.up; a != nil; a = a.up {
		if a.id == b {
			return true
		}
	}
	return false
}

func (s *Store) resetToAncestor(ctx context.Context, vol, to *Volume) error {
	if err := s.writable(); err != nil {
		return err
	}
	br := vol.br
	br.gate.RLock()
	defer br.gate.RUnlock()
	if err := vol.notDeleted(); err != nil {
		return err
	}
	old := vol.Size()
	if err := s.shrinkFirst(vol, to); err != nil {
		return err
	}
	bp := s.getBuf()
	defer s.putBuf(bp)
	for c, end := uint64(0), uint64((to.Size()+s.cs-1)/s.cs); c < end; c++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := s.writable(); err != nil {
			return err
		}
		same, zero, err := s.sameView(vol.levels[1:], to.levels, c) // the parent point's view
		if err != nil {
			return err
		}
		// A delete of the target that raced the resolution may have let
		// the collector re-key what it resolved; it is marked dead first.
		if err := to.notDeleted(); err != nil {
			return err
		}
		off, cl := int64(c)*s.cs, s.volChunkLen(c, to.Size())
		switch {
		case same:
			err = s.cloneInherit(br, c)
		case zero:
			err = s.cloneWriteGated(br, nil, off, cl, true)
		default:
			buf := (*bp)[:cl]
			if err = s.readLevels(to.levels, buf, off); err != nil {
				return err
			}
			if err = to.notDeleted(); err != nil {
				return err
			}
			err = s.cloneWriteGated(br, buf, off, cl, false)
		}
		if err != nil {
			return fmt.Errorf("snapshot: reset of chunk %d: %w", c, err)
		}
	}
	if err := s.inheritPast(ctx, vol, to, old); err != nil {
		return err
	}
	return s.resetSize(vol, to)
}

// sameView resolves chunk c through the parent point levels p and the
// target levels t: same when both read the same thing, zero when t reads a
// zero mapping.
func (s *Store) sameView(p, t []level, c uint64) (same, zero bool, err error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	pl, po, err := s.resolveLocked(p, c)
	if err != nil {
		return false, false, err
	}
	tl, to, err := s.resolveLocked(t, c)
	if err != nil {
		return false, false, err
	}
	return po == to && (po || pl == tl), !to && tl == locZero, nil
}
