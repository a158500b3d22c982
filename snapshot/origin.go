package snapshot

import (
	"cmp"
	"errors"
	"fmt"
)

// The origin write path.
//
// A write (or discard) to origin chunks is handled in segments of at most
// maxSegChunks chunks. The segment's origin stripes are taken shared and
// each chunk's preserved epoch compared with the newest held snapshot; if
// none needs a copy the write goes straight to the origin device under the
// shared locks (no index work). Otherwise the stripes are retaken
// exclusively and the chunks that need it are copied: each is read from the
// origin and written to a newly allocated store chunk; one record maps them
// all at the newest held epoch (one copy serves every snapshot since the
// chunk was last preserved). The copied chunks then wait in the origin
// buffer (originbuf.go), where the write lands, and the write is done: the
// next drain commits (the journal's PreCommit flushes the store before the
// record is written and flushed) and only then writes them to the origin.
// Writes to chunks already buffered update the buffer; the rest of a
// segment goes straight to the origin device. With the buffer off
// (Options.OriginBuffer < 0) the record is committed (group commit among
// concurrent writers) before the origin write goes out.

// stripeRange returns the stripe indexes of chunks [c0, c1] as at most two
// ascending runs [a0, a1] and [b0, b1] (b0 > b1 when there is no second run),
// so that locks are always taken in ascending order.
func stripeRange(c0, c1 uint64) (a0, a1, b0, b1 int) {
	if c1-c0 >= nStripes-1 {
		return 0, nStripes - 1, 1, 0
	}
	s0, s1 := int(c0%nStripes), int(c1%nStripes)
	if s0 <= s1 {
		return s0, s1, 1, 0
	}
	return 0, s1, s0, nStripes - 1
}

func (s *Store) lockOrigin(c0, c1 uint64, excl bool) {
	a0, a1, b0, b1 := stripeRange(c0, c1)
	for _, r := range [2][2]int{{a0, a1}, {b0, b1}} {
		for i := r[0]; i <= r[1]; i++ {
			if excl {
				s.originLocks[i].Lock()
			} else {
				s.originLocks[i].RLock()
			}
		}
	}
}

func (s *Store) unlockOrigin(c0, c1 uint64, excl bool) {
	a0, a1, b0, b1 := stripeRange(c0, c1)
	for _, r := range [2][2]int{{a0, a1}, {b0, b1}} {
		for i := r[0]; i <= r[1]; i++ {
			if excl {
				s.originLocks[i].Unlock()
			} else {
				s.originLocks[i].RUnlock()
			}
		}
	}
}

// originWrite writes p (or, with discard, zeros by discarding) at off for n
// bytes of the origin volume.
func (s *Store) originWrite(p []byte, off, n int64, discard bool) error {
	if err := s.writable(); err != nil {
		return err
	}
	s.b0.gate.RLock()
	defer s.b0.gate.RUnlock()
	return s.originWriteGated(p, off, n, discard)
}

// originWriteGated is originWrite with branch 0's gate held shared.
func (s *Store) originWriteGated(p []byte, off, n int64, discard bool) error {
	if err := s.originWritable(); err != nil {
		return err
	}
	for n > 0 {
		c0 := uint64(off / s.cs)
		c1 := uint64((off + n - 1) / s.cs)
		if c1-c0 >= maxSegChunks {
			c1 = c0 + maxSegChunks - 1
		}
		segEnd := min(off+n, int64(c1+1)*s.cs)
		k := segEnd - off
		var seg []byte
		if !discard {
			seg = p[:k]
			p = p[k:]
		}
		if err := s.originSegment(seg, off, k, c0, c1, discard); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// needsCopy reports whether a chunk of [c0, c1] lacks a copy for epoch
// need, or may (its preserved epoch is unknown: the caller takes the
// stripes exclusively and looks it up).
func (s *Store) needsCopy(c0, c1 uint64, need uint32) bool {
	if need == 0 {
		return false
	}
	for c := c0; c <= c1; c++ {
		if p, ok := s.pres.known(c); !ok || p < need {
			return true
		}
	}
	return false
}

// originSegment writes chunks [c0, c1]. The branch gate is held shared, so
// the newest held epoch changes only through invalidation (which retries).
func (s *Store) originSegment(p []byte, off, n int64, c0, c1 uint64, discard bool) error {
	need := s.b0.need.Load()
	s.lockOrigin(c0, c1, false)
	copies := s.needsCopy(c0, c1, need)
	if !copies && !s.anyBufferedLocked(c0, c1) {
		err := s.originIO(p, off, n, discard)
		s.unlockOrigin(c0, c1, false)
		return err
	}
	s.unlockOrigin(c0, c1, false)
	if copies && s.ob.max > 0 { // about to buffer more: make room first
		if err := s.obWait(); err != nil {
			return err
		}
	}
	s.lockOrigin(c0, c1, true)
	defer s.unlockOrigin(c0, c1, true)
	invalidated, committed := false, false
	for {
		need = s.b0.need.Load()
		if need != 0 {
			if err := s.resolvePreserved(c0, c1); err != nil {
				return err
			}
		}
		if !s.needsCopy(c0, c1, need) {
			break
		}
		err := s.copyOut(c0, c1, need)
		if err == errRetry {
			invalidated = true
			continue
		}
		if !committed {
			retry, cerr := s.commitForRoom(err)
			if retry {
				committed = true // once: the tree commit may have made room
				continue
			}
			err = cmp.Or(cerr, err)
		}
		if err != nil {
			return err
		}
	}
	if invalidated {
		// The snapshots dropped to make room must be gone for good before
		// the origin changes under them.
		if err := s.commit(s.ctx); err != nil {
			return err
		}
	}
	if s.ob.max == 0 {
		return s.originIO(p, off, n, discard)
	}
	// Buffered chunks take the write; runs of the others go straight to
	// the origin device.
	return s.eachRun(off, off+n, c0, c1, func(lo, hi int64, e *obEntry) error {
		var q []byte
		if !discard {
			q = p[lo-off : hi-off]
		}
		if e == nil {
			return s.originIO(q, lo, hi-lo, discard)
		}
		s.obMergeLocked(e, q, lo-int64(e.c)*s.cs, hi-lo)
		return nil
	})
}

// errRetry: snapshots were invalidated to make room; start the copy again.
var errRetry = errors.New("snapshot: retry")

func (s *Store) originIO(p []byte, off, n int64, discard bool) error {
	if err := s.touchSamples(off, n); err != nil {
		return fmt.Errorf("snapshot: origin at %d: %w", off, err)
	}
	var err error
	if discard {
		err = s.origin.Discard(off, n)
	} else {
		_, err = s.origin.WriteAt(p, off)
	}
	if err != nil {
		return fmt.Errorf("snapshot: origin at %d: %w", off, err)
	}
	return nil
}

// copyOut preserves the chunks of [c0, c1] whose copy the epoch need lacks.
// Called with their origin stripes held exclusively. With the origin buffer
// on, each copied chunk is left buffered (its data as read, for the write
// to merge into) and the commit is left to the next drain; otherwise the
// record is committed before copyOut returns.
func (s *Store) copyOut(c0, c1 uint64, need uint32) error {
	sc := s.getScratch()
	defer s.putScratch(sc)
	var err error
	for c := c0; c <= c1 && err == nil; c++ {
		if p, ok := s.pres.known(c); ok && p >= need { // resolvePreserved made it known
			continue
		}
		var loc uint64
		loc, err = s.allocOne()
		if err != nil {
			if s.opts.NoSpace == NoSpaceInvalidate {
				if ierr := s.invalidateFor(c); ierr == nil {
					err = errRetry
				}
			}
			break
		}
		x := cowChunk{c: c, loc: loc}
		if s.ob.max > 0 {
			// A buffered chunk is never copied (every snapshot drains the
			// buffer first); if one were, the buffer holds its contents.
			if x.e = s.bufferedLocked(c); x.e == nil {
				x.e, x.fresh = s.obGet(c), true
			}
		}
		sc.cow = append(sc.cow, x)
		err = s.copyChunk(c, loc, x.e, x.fresh)
	}
	if err != nil {
		s.dropCow(sc)
		return err
	}
	if len(sc.cow) == 0 {
		return nil
	}
	// One put per run of consecutive chunks at consecutive locations.
	for i := 0; i < len(sc.cow); {
		j := i + 1
		for j < len(sc.cow) && sc.cow[j].c == sc.cow[j-1].c+1 && sc.cow[j].loc == sc.cow[j-1].loc+1 {
			j++
		}
		sc.ops = append(sc.ops, op{kind: opPut, b: 0, e: need, c: sc.cow[i].c, n: uint64(j - i), loc: sc.cow[i].loc})
		i = j
	}
	if err := s.makeLogRoom(); err != nil {
		s.dropCow(sc)
		return err
	}
	// Take mu with the record's index paths cached: no page read under it
	// (pagedindex.go).
	s.lockForOps(sc)
	if s.b0.need.Load() != need { // snapshots were invalidated meanwhile
		s.unlockOps(sc)
		s.dropCow(sc)
		return errRetry
	}
	seq, err := s.logLocked(sc)
	s.unlockOps(sc)
	if err != nil && s.failed.Load() == nil {
		s.dropCow(sc) // refused before it changed anything
		return err
	}
	if err != nil {
		// The store has failed; its allocations stay as they are.
		for i := range sc.cow {
			if x := &sc.cow[i]; x.fresh {
				s.obPut(x.e)
			}
			sc.cow[i].e = nil
		}
		return err
	}
	if s.ob.max == 0 {
		return s.commit(s.ctx)
	}
	for i := range sc.cow {
		x := &sc.cow[i]
		if x.fresh {
			s.obInsertLocked(x.e, seq)
		} else {
			x.e.seq = max(x.e.seq, seq)
		}
		x.e = nil
	}
	return nil
}

// dropCow undoes a copyOut that failed before its record: the store chunks
// are released and fresh buffer entries returned.
func (s *Store) dropCow(sc *scratch) {
	for i := range sc.cow {
		x := &sc.cow[i]
		if err := s.alloc.release(x.loc); err != nil {
			_ = s.fail(metaErr("return data chunk", err))
		}
		if x.fresh {
			s.obPut(x.e)
		}
		x.e = nil
	}
}

// allocOne allocates a data chunk. When the store is full but chunks
// freed by transactions not yet durable are held by the metadata layer,
// it commits the tree (after the commit in flight, if any), which makes
// them reusable, and tries again:
// ErrNoSpace, and the snapshots NoSpaceInvalidate deletes, are for a store
// that is really full. Called with no lock of the store held but branch
// gates and stripes (the commit takes reclaim).
func (s *Store) allocOne() (uint64, error) {
	for retried := false; ; retried = true {
		loc, ok, err := s.alloc.take()
		if err != nil {
			return 0, s.fail(metaErr("allocate data chunk", err))
		}
		if ok {
			s.lowDataCheck()
			return loc, nil
		}
		if retried || !s.alloc.hasPending() {
			s.lowDataCheck()
			return 0, fmt.Errorf("%w: %d data chunks in use", ErrNoSpace, s.alloc.space().ChunksUsed)
		}
		if err := s.treeCommit(s.ctx); err != nil {
			return 0, err
		}
	}
}

// copyChunk copies origin chunk c to store chunk loc. With e, the copy is
// made through e's buffer: read from the origin into it when fresh, else
// taken from it (the buffered contents are the chunk's current ones).
func (s *Store) copyChunk(c, loc uint64, e *obEntry, fresh bool) error {
	var buf []byte
	if e != nil {
		buf = e.data
	} else {
		bp := s.getBuf()
		defer s.putBuf(bp)
		buf = *bp
	}
	cl := s.chunkLen(c)
	if cl < s.cs {
		clear(buf[cl:])
	}
	if e == nil || fresh {
		if _, err := s.origin.ReadAt(buf[:cl], int64(c)*s.cs); err != nil {
			return fmt.Errorf("snapshot: copy-on-write read of origin chunk %d: %w", c, err)
		}
	}
	if _, err := s.store.WriteAt(buf, s.storeOff(loc)); err != nil {
		return fmt.Errorf("snapshot: copy-on-write of origin chunk %d to store chunk %d: %w", c, loc, err)
	}
	return nil
}
