package snapshot

import (
	"errors"
	"fmt"
)

// The clone write path: redirect-on-write.
//
// A write to chunk c of clone branch b, under the clone stripe of (b, c):
//   - the live entry (b, c, live) is a store chunk that no snapshot of b
//     needs (no held epoch above the previous entry): write in place, no
//     metadata;
//   - otherwise the write goes to a new chunk: the old live entry is
//     re-keyed to the newest held epoch (a snapshot needs it) or dropped,
//     an inherited chunk a snapshot still sees gets an explicit inherit
//     entry at that epoch, and the new live entry is put. A whole-chunk
//     write never reads old data; a partial one reads the current view,
//     overlays the write and writes the chunk once.
//
// The data is written before the record is appended; the record becomes
// durable at the next commit, whose PreCommit flushes the store first.

func (s *Store) cloneStripe(b uint32, c uint64) *paddedMu {
	return &s.cloneLocks[(c+uint64(b)*0x9E3779B9)%nStripes]
}

// cloneWrite writes p (or discards) at off for n bytes of clone v.
func (s *Store) cloneWrite(v *Volume, p []byte, off, n int64, discard bool) error {
	if err := s.writable(); err != nil {
		return err
	}
	v.br.gate.RLock()
	defer v.br.gate.RUnlock()
	if err := v.notDeleted(); err != nil { // deleted while this waited for the gate
		return err
	}
	return s.cloneWriteGated(v.br, p, off, n, discard)
}

// cloneWriteGated is cloneWrite with br's gate held shared.
func (s *Store) cloneWriteGated(br *branch, p []byte, off, n int64, discard bool) error {
	for n > 0 {
		c := uint64(off / s.cs)
		in := off % s.cs
		k := min(n, s.cs-in)
		var part []byte
		if !discard {
			part, p = p[:k], p[k:]
		}
		if err := s.cloneChunk(br, c, part, in, k, discard); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// liveView is what the write path needs to know about (b, c).
type liveView struct {
	live    entry
	hasLive bool
	needAt  uint32 // the newest held epoch that sees the current live view, or 0
}

func (s *Store) liveViewOf(br *branch, c uint64) (liveView, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var v liveView
	var err error
	if v.live, v.hasLive, err = s.ix.get(br.id, c, epochLive); err != nil {
		return v, metaErr("index lookup", err)
	}
	prevE := uint32(0)
	prev, ok, err := s.ix.last(br.id, c)
	if err != nil {
		return v, metaErr("index lookup", err)
	}
	if ok {
		prevE = prev.e
	}
	if h := br.need.Load(); h > prevE {
		v.needAt = h
	}
	return v, nil
}

func (s *Store) cloneChunk(br *branch, c uint64, p []byte, in, k int64, discard bool) error {
	l := s.cloneStripe(br.id, c)
	l.Lock()
	defer l.Unlock()
	v, err := s.liveViewOf(br, c)
	if err != nil {
		return err
	}
	// A part chunk at a volume's end (the origin's last chunk, a size that
	// is not a multiple of the chunk size) is never whole: a grown volume
	// may hold data past the old end within it.
	whole := in == 0 && k == s.cs
	if v.hasLive && v.needAt == 0 {
		switch {
		case v.live.isData() && !(discard && whole):
			return s.writeInPlace(v.live.loc, p, in, k)
		case v.live.loc == locZero && discard:
			return nil
		}
	}
	sc := s.getScratch()
	defer s.putScratch(sc)
	switch {
	case v.hasLive && v.needAt != 0:
		sc.ops = append(sc.ops, op{kind: opMove, b: br.id, c: c, e: epochLive, e2: v.needAt})
	case v.hasLive:
		sc.ops = append(sc.ops, op{kind: opDel, b: br.id, c: c, e: epochLive, n: 1})
		if v.live.isData() {
			sc.frees = append(sc.frees, v.live.loc)
		}
	case v.needAt != 0:
		sc.ops = append(sc.ops, op{kind: opPut, b: br.id, c: c, e: v.needAt, n: 1, loc: locInherit})
	}
	s.readMapAhead(sc)
	if discard && whole {
		sc.ops = append(sc.ops, op{kind: opPut, b: br.id, c: c, e: epochLive, n: 1, loc: locZero})
		_, err := s.log(sc)
		return err
	}
	loc, err := s.allocOne()
	if err != nil {
		return err
	}
	if err := s.writeRedirected(br, c, v, loc, p, in, k, whole); err != nil {
		return errors.Join(err, s.alloc.release(loc))
	}
	sc.ops = append(sc.ops, op{kind: opPut, b: br.id, c: c, e: epochLive, n: 1, loc: loc})
	if _, err = s.log(sc); err != nil && s.failed.Load() == nil {
		err = errors.Join(err, s.alloc.release(loc)) // refused before it changed anything
	}
	return err
}

// writeInPlace writes p (nil: zeros) at in within store chunk loc.
func (s *Store) writeInPlace(loc uint64, p []byte, in, k int64) error {
	if p == nil {
		bp := s.getBuf()
		defer s.putBuf(bp)
		p = (*bp)[:k]
		clear(p)
	}
	if _, err := s.store.WriteAt(p, s.storeOff(loc)+in); err != nil {
		return fmt.Errorf("snapshot: clone write to store chunk %d: %w", loc, err)
	}
	return nil
}

// writeRedirected writes chunk c's new contents to the fresh store chunk
// loc: p itself for a whole-chunk write, else the current view with p (nil:
// zeros) overlaid.
func (s *Store) writeRedirected(br *branch, c uint64, v liveView, loc uint64, p []byte, in, k int64, whole bool) error {
	if whole && p != nil && int64(len(p)) == s.cs {
		if _, err := s.store.WriteAt(p, s.storeOff(loc)); err != nil {
			return fmt.Errorf("snapshot: clone write to store chunk %d: %w", loc, err)
		}
		return nil
	}
	bp := s.getBuf()
	defer s.putBuf(bp)
	buf := *bp
	if !whole {
		if err := s.readCurrent(br, c, v, buf); err != nil {
			return err
		}
	}
	if p == nil {
		clear(buf[in : in+k])
	} else {
		copy(buf[in:], p)
	}
	if _, err := s.store.WriteAt(buf, s.storeOff(loc)); err != nil {
		return fmt.Errorf("snapshot: clone write to store chunk %d: %w", loc, err)
	}
	return nil
}

// readCurrent reads the live view of clone chunk c into buf.
func (s *Store) readCurrent(br *branch, c uint64, v liveView, buf []byte) error {
	switch {
	case v.hasLive && v.live.loc == locZero:
		clear(buf)
		return nil
	case v.hasLive && v.live.isData():
		if _, err := s.store.ReadAt(buf, s.storeOff(v.live.loc)); err != nil {
			return fmt.Errorf("snapshot: read store chunk %d: %w", v.live.loc, err)
		}
		return nil
	}
	var chain [16]level // room for most chains without an allocation
	return s.readChunkPart(br.chainLevels(chain[:0]), c, buf, 0)
}
