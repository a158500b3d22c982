package snapshot

import (
	"context"
	"errors"
	"fmt"
)

// Rollback reverts a writable volume (the origin, a clone or a blank
// volume) to one of its own snapshots, online, size included (a clone
// takes the snapshot's size: a smaller one before any chunk changes, see
// shrinkFirst; a larger one after): only the chunks that differ are rewritten, through
// the normal write path, so every other snapshot stays intact and a clone's
// chain does not deepen. Writes racing with the rollback land before or
// after it, chunk by chunk. The branch gate is held shared throughout, so
// neither volume can be deleted (nor a snapshot of it taken) meanwhile.
//
// A clone may also be reset to a snapshot of one of its ancestors (the
// snapshot it was cloned from, or any other snapshot of a branch in its
// chain): see resetToAncestor.
func (s *Store) Rollback(ctx context.Context, vol, to *Volume) error {
	if err := vol.writable(); err != nil {
		return err
	}
	if err := to.check(0, 0); err != nil {
		return err
	}
	if to.kind == KindSnapshot && to.meta.branch != vol.br.id && vol.inChain(to.meta.branch) {
		return s.resetToAncestor(ctx, vol, to)
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
	// Plan on a committed view (readView): the walk covers every chunk the
	// branch ever wrote, and must not hold writers up meanwhile.
	ix, done, err := s.readView(func() {}, false)
	if err != nil {
		return err
	}
	last := uint64(1<<64 - 1)
	var lerr error
	err = ix.branchAscend(b, func(x entry) bool {
		if x.c == last {
			return true
		}
		last = x.c
		kv, ok, err := ix.seek(b, x.c, k)
		if err != nil {
			lerr = err
			return false
		}
		switch {
		case !ok && b != 0:
			_, live, err := ix.get(b, x.c, epochLive)
			if err != nil {
				lerr = err
				return false
			}
			if live {
				changes = append(changes, change{c: x.c, inherit: true})
			}
		case !ok:
		case kv.e == epochLive:
		default:
			changes = append(changes, change{c: x.c, x: kv, inherit: kv.loc == locInherit})
		}
		return true
	})
	done()
	if err = errors.Join(err, lerr); err != nil {
		return metaErr("rollback planning", err)
	}
	old := vol.Size()
	if b != 0 {
		if err := s.shrinkFirst(vol, to); err != nil {
			return err
		}
	}
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
		cl := s.volChunkLen(ch.c, to.Size())
		if cl == 0 {
			continue // past the target's size: the size change below hides it
		}
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
	if err := s.inheritPast(ctx, vol, to, old); err != nil {
		return err
	}
	return s.resetSize(vol, to)
}

// shrinkFirst gives vol, a clone about to be rolled back or reset to the
// snapshot to, to's size before any chunk changes when that is smaller.
// The chunk that holds to's end may come to read as its parent's again,
// and the parent may hold data past to's end there (left by a shrink
// before to was taken): at vol's old size, a crash or a reader before the
// size change would see that discarded data. Shrunk first, it is past the
// end; a later grow zeroes it.
func (s *Store) shrinkFirst(vol, to *Volume) error {
	if size := to.Size(); size < vol.Size() {
		return s.logSize(vol.meta, size)
	}
	return nil
}

// inheritPast makes the chunks of clone vol past the end of to, a smaller
// snapshot it was just rolled back or reset to, and up to its old size
// inherit again (cloneInherit): nothing reads them now, and the store
// chunks it wrote there are freed (or kept by a snapshot of it that needs
// them) instead of waiting for a grow. Called with vol's gate held shared,
// after shrinkFirst: no write reaches past the new end.
func (s *Store) inheritPast(ctx context.Context, vol, to *Volume, old int64) error {
	br := vol.br
	for c, end := uint64((to.Size()+s.cs-1)/s.cs), uint64((old+s.cs-1)/s.cs); c < end; c++ {
		if err := ctx.Err(); err != nil {
			return err
		}
		s.mu.RLock()
		may := br.groups.mayHave(c)
		s.mu.RUnlock()
		if !may {
			continue
		}
		if err := s.cloneInherit(br, c); err != nil {
			return fmt.Errorf("snapshot: rollback of chunk %d past the end: %w", c, err)
		}
	}
	return nil
}

// resetSize gives a clone rolled back or reset to snapshot to the size to
// was taken at, and makes the rollback durable. Entries the clone keeps
// past a smaller size are invisible, and a later grow zeroes them (see
// resize.go).
func (s *Store) resetSize(vol, to *Volume) error {
	if size := to.Size(); size != vol.Size() {
		return s.logSize(vol.meta, size)
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
	v, err := s.liveViewOf(br, c)
	if err != nil {
		return err
	}
	if !v.hasLive {
		return nil
	}
	sc := s.getScratch()
	defer s.putScratch(sc)
	if v.needAt != 0 {
		sc.ops = append(sc.ops, op{kind: opMove, b: br.id, c: c, e: epochLive, e2: v.needAt})
	} else {
		sc.ops = append(sc.ops, op{kind: opDel, b: br.id, c: c, e: epochLive, n: 1})
		if v.live.isData() {
			sc.frees = append(sc.frees, v.live.loc)
		}
	}
	s.readMapAhead(sc)
	_, err = s.log(sc)
	return err
}
