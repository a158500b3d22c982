package snapshot

import (
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/blocksnap/blocksnap/blockdev"
	"github.com/blocksnap/blocksnap/snapshot/internal/meta"
)

// Volume is an open volume of a store: the origin, a read-only snapshot, a
// writable clone or a blank volume. It is a blockdev.Device, safe for
// concurrent use, of the volume's own size (Size). Closing it does not
// close the store.
type Volume struct {
	s      *Store
	meta   *volume
	br     *branch
	levels []level // resolution order: (branch, epoch) then the parent chain
	kind   Kind    // as the metadata records it (a blank volume is a KindClone)
	info   Kind    // as Kind reports it (KindVolume for a blank volume)
	closed atomic.Bool
}

// errNoOriginVolume is what the origin volume's calls return in a store
// without an origin.
var errNoOriginVolume = fmt.Errorf("%w: the store has no origin volume", ErrNotFound)

// Origin returns a handle on the live origin volume (in a store without an
// origin, a handle whose every call fails with ErrNotFound). Reads go to the origin
// device (and the origin buffer); writes copy a chunk to the store first
// when a snapshot still needs its old contents. It never returns nil: after
// Close the handle's calls fail with ErrClosed, after a failure its writes
// fail with the store's error.
func (s *Store) Origin() *Volume {
	return &Volume{s: s, meta: s.origVol, br: s.b0, levels: []level{{br: s.b0, e: epochLive}}, kind: KindOrigin, info: KindOrigin}
}

// OpenVolume returns a handle on the volume with the given name.
func (s *Store) OpenVolume(name string) (*Volume, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	id, ok := s.byName[name]
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrNotFound, name)
	}
	return s.openLocked(s.volumes[id])
}

// OpenID returns a handle on the volume with the given ID.
func (s *Store) OpenID(id uint64) (*Volume, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	v := s.volumes[id]
	if v == nil || v.hidden || (v.kind == KindOrigin && s.geo.noOrigin) {
		return nil, fmt.Errorf("%w: id %d", ErrNotFound, id)
	}
	return s.openLocked(v)
}

func (s *Store) openLocked(v *volume) (*Volume, error) {
	if err := s.usable(); err != nil {
		return nil, err
	}
	br := s.branches[v.branch]
	vol := &Volume{s: s, meta: v, br: br, kind: v.kind, info: kindOf(v, br)}
	vol.levels = levelsOf(br, v.epoch)
	return vol, nil
}

// ID returns the volume's stable ID.
func (v *Volume) ID() uint64 { return v.meta.id }

// Kind returns the volume's kind.
func (v *Volume) Kind() Kind { return v.info }

func (v *Volume) check(off, n int64) error {
	if v.closed.Load() {
		return blockdev.ErrClosed
	}
	if v.s.closed.Load() {
		return ErrClosed
	}
	if v.s.opts.ReadOnly && v.s.failed.Load() != nil {
		return v.s.usable() // the store changed under it (livero.go): reopen
	}
	if err := v.notDeleted(); err != nil {
		return err
	}
	if v.kind == KindOrigin && v.s.geo.noOrigin {
		return errNoOriginVolume
	}
	return blockdev.CheckRange(off, n, v.meta.size.Load(), v.s.bs)
}

// notDeleted fails once the volume is deleted. An operation that must not
// run on a deleted volume checks again after taking the branch gate, under
// which Delete marks it.
func (v *Volume) notDeleted() error {
	if v.meta.dead.Load() {
		if v.s.closed.Load() {
			return ErrClosed // Close marks every volume dead (closeVolumes)
		}
		return fmt.Errorf("%w: volume %d", ErrInvalidSnapshot, v.meta.id)
	}
	return nil
}

// ReadAt implements blockdev.Device.
func (v *Volume) ReadAt(p []byte, off int64) (int, error) {
	if err := v.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if v.kind == KindOrigin {
		if err := v.s.readOrigin(p, off); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	if err := v.s.readLevels(v.levels, p, off); err != nil {
		return 0, v.s.failIfChanged(err)
	}
	// A delete that raced the read may have let the collector re-key
	// entries the read resolved; the volume is marked dead before any is.
	if err := v.notDeleted(); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt implements blockdev.Device.
func (v *Volume) WriteAt(p []byte, off int64) (int, error) {
	if err := v.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	var err error
	switch v.kind {
	case KindSnapshot:
		return 0, fmt.Errorf("%w: snapshot %d", ErrReadOnly, v.meta.id)
	case KindOrigin:
		err = v.s.originWrite(p, off, int64(len(p)), false)
	default:
		err = v.s.cloneWrite(v, p, off, int64(len(p)), false)
	}
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// Discard implements blockdev.Device: the range reads as zeros; store
// chunks no snapshot needs are freed.
func (v *Volume) Discard(off, n int64) error {
	if err := v.check(off, n); err != nil {
		return err
	}
	switch v.kind {
	case KindSnapshot:
		return fmt.Errorf("%w: snapshot %d", ErrReadOnly, v.meta.id)
	case KindOrigin:
		return v.s.originWrite(nil, off, n, true)
	}
	return v.s.cloneWrite(v, nil, off, n, true)
}

// Flush implements blockdev.Device.
func (v *Volume) Flush() error {
	if err := v.check(0, 0); err != nil {
		return err
	}
	switch v.kind {
	case KindOrigin:
		return v.s.flushOrigin()
	case KindClone:
		return v.s.flushStore()
	}
	return nil
}

// BlockSize implements blockdev.Device: the larger of the origin's and the
// store's block sizes.
func (v *Volume) BlockSize() int { return v.s.bs }

// Close implements blockdev.Device; the volume itself lives on.
func (v *Volume) Close() error {
	if v.closed.Swap(true) {
		return blockdev.ErrClosed
	}
	return nil
}

// readLevels reads p at off as the volume whose resolution order is levels
// sees it, chunk by chunk.
func (s *Store) readLevels(levels []level, p []byte, off int64) error {
	for len(p) > 0 {
		c := uint64(off / s.cs)
		in := off % s.cs
		n := min(int64(len(p)), s.cs-in)
		if err := s.readChunkPart(levels, c, p[:n], in); err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// readChunkPart reads len(p) bytes at offset in of chunk c as levels sees
// it. reclaim is held shared across the resolution and the read, so a
// store chunk cannot be reused under the read. A read that resolves to the
// origin device also holds the origin stripe of c shared, so a
// copy-on-write cannot slip between the resolution and the read.
//
// A read that resolves to a store chunk needs no stripe: the chunk's
// contents for this volume do not change while reclaim is held. So the
// stripe is only tried, not waited for: an origin writer copying a chunk,
// or the origin buffer's drain writing one out, holds its stripe
// exclusively and would otherwise stall every snapshot read of that
// stripe behind it (the SnapshotRead benchmark right after an overwrite
// read at a fraction of its steady speed while the drain ran). Only a read
// that resolves to the origin without the stripe waits for it, then
// resolves again.
func (s *Store) readChunkPart(levels []level, c uint64, p []byte, in int64) error {
	ol := &s.originLocks[c%nStripes]
	striped := ol.TryRLock()
	loads := 0
	for {
		s.reclaim.RLock()
		// A resolution that reads no page holds mu for a few lookups in
		// memory, so its hold is not timed (lockstat's RLockShort): timing
		// it cost more than the hold. The last try, which may read pages
		// under mu, is timed.
		noRead := loads < maxReadLoads
		if noRead {
			s.mu.RLockShort()
		} else {
			s.mu.RLock()
		}
		ix := s.ix
		ix.noRead = noRead
		loc, fromOrigin, err := s.resolveWith(ix, levels, c)
		if noRead {
			s.mu.RUnlockShort()
		} else {
			s.mu.RUnlock()
		}
		if nc := notCached(err); nc != nil {
			// Read the page with no store lock held, then resolve
			// again (docs/metadata.md section 16).
			s.reclaim.RUnlock()
			loads++
			if err = s.m.Load(nc.Key); err == nil {
				continue
			}
			if striped {
				ol.RUnlock()
			}
			return fmt.Errorf("snapshot: read chunk %d: %w", c, metaErr("index lookup", err))
		}
		if err == nil && fromOrigin && !striped {
			s.reclaim.RUnlock() // lock order: the stripe comes first
			ol.RLock()
			striped = true
			continue
		}
		switch {
		case err != nil:
		case fromOrigin:
			err = s.readOriginPart(p, int64(c)*s.cs+in)
		case loc == locZero:
			clear(p)
		default:
			_, err = s.store.ReadAt(p, s.storeOff(loc)+in)
		}
		s.reclaim.RUnlock()
		if striped {
			ol.RUnlock()
		}
		if err != nil {
			return fmt.Errorf("snapshot: read chunk %d: %w", c, err)
		}
		return nil
	}
}

// readOriginPart reads p at off of the origin device for a clone level:
// the bytes past the origin's end (a clone grown larger) read as zeros.
func (s *Store) readOriginPart(p []byte, off int64) error {
	k := max(0, min(int64(len(p)), s.geo.originSize-off))
	clear(p[k:])
	if k == 0 {
		return nil
	}
	_, err := s.origin.ReadAt(p[:k], off)
	return err
}

// resolveLocked returns where chunk c lives as levels sees it: a store
// chunk, locZero, or the origin device. One seek per level that may have
// entries for c; levels whose summary says otherwise cost a bit test.
// Where no level maps c, a chain that ends at a root branch, or at branch
// 0 past the origin's end, reads zeros.
func (s *Store) resolveLocked(levels []level, c uint64) (loc uint64, fromOrigin bool, err error) {
	return s.resolveWith(s.ix, levels, c)
}

// maxReadLoads is how many times a read resolves with no page read under
// Store.mu, loading what it missed in between, before it resolves with
// reads under the lock: a cache too small to keep what was loaded, or a
// tree that keeps changing, must not make a read retry for ever.
const maxReadLoads = 3

// notCached returns the miss of a lookup that must read no page (nil for
// any other error, and at no cost for none).
func notCached(err error) *meta.NotCachedError {
	if err == nil {
		return nil // before nc, which escapes: no allocation on a hit
	}
	var nc *meta.NotCachedError
	if !errors.As(err, &nc) {
		return nil
	}
	return nc
}

// resolveWith is resolveLocked on ix; with ix.noRead, a lookup that needs
// a page returns *meta.NotCachedError unwrapped.
func (s *Store) resolveWith(ix pagedIndex, levels []level, c uint64) (loc uint64, fromOrigin bool, err error) {
	n := len(levels)
	if n == 0 { // the chain below a root branch (readCurrent)
		return locZero, false, nil
	}
	origin := levels[n-1].br.id == 0 && c < s.chunks
	if n > 1 && !levels[0].br.chainGroups.mayHave(c) {
		levels = levels[n-1:] // no clone level has entries near c: go to the root
	}
	for i := range levels {
		l := &levels[i]
		if !l.br.groups.mayHave(c) {
			continue
		}
		var x entry
		var ok bool
		if l.e == epochLive {
			x, ok, err = ix.get(l.br.id, c, epochLive)
		} else {
			x, ok, err = ix.seek(l.br.id, c, l.e)
		}
		if err != nil {
			if ix.noRead && notCached(err) != nil {
				return 0, false, err
			}
			return 0, false, metaErr("index lookup", err)
		}
		if ok && x.loc != locInherit {
			return x.loc, false, nil
		}
	}
	if origin {
		return 0, true, nil
	}
	return locZero, false, nil
}
