package clone

import (
	"fmt"

	"github.com/blocksnap/blocksnap/blockdev"
)

// The I/O paths. Each case of dm-clone's map function is a named function
// here; the only thing they ask of the metadata is the narrow interface in
// metadata.go (test a region, mark regions hydrated).
//
// Hydrated regions stay hydrated, so a region seen hydrated needs no lock:
// its data is in the destination for good. Work that makes regions hydrated
// (a partial or whole-region write, a discard, hydrate-on-read, background
// copies) first claims the regions as a flight (c.io.flights); a second
// writer to a region in flight waits for it and then finds it hydrated (it
// joins the hydration instead of repeating it). Reads of unhydrated regions
// go to the source without waiting: until a flight completes the region's
// contents are the source's, and a read concurrent with the write that
// hydrates it may see either.
//
// User I/O never waits for a background copy's source read: a claim takes
// the regions it needs away from a background copy that has not begun to
// write them (the copy is "robbed"), and does its own source request at
// once. The copy skips robbed regions when it writes and leaves them to the
// claim. Once a copy has begun to write a chunk, its regions up to the
// chunk's end are sealed: a claim waits for the copy, which has only a
// destination write left to do.

// flight is a claim on a set of regions being made hydrated. Flights are
// reused (c.io.free); every field is guarded by c.io.mu.
type flight struct {
	// bg: a background copy, which user claims may rob of its regions
	// from sealed on.
	bg     bool
	sealed uint64
	robbed []uint64 // regions taken by user claims (bg only)
}

func errClosed(op string) error { return fmt.Errorf("clone: %s: %w", op, blockdev.ErrClosed) }

// regionStart and regionEnd bound region r (the last one may be short).
func (c *Clone) regionStart(r uint64) int64 { return int64(r) << c.shift }
func (c *Clone) regionEnd(r uint64) int64   { return min(int64(r+1)<<c.shift, c.size) }

// regionsOf returns the first and last region of [off, off+n), n > 0.
func (c *Clone) regionsOf(off, n int64) (uint64, uint64) {
	return uint64(off >> c.shift), uint64((off + n - 1) >> c.shift)
}

func (c *Clone) getBuf() *[]byte  { return c.bufs.Get().(*[]byte) }
func (c *Clone) putBuf(b *[]byte) { c.bufs.Put(b) }

// newFlight returns a reset flight. Called with c.io held.
func (c *Clone) newFlight(bg bool) *flight {
	var f *flight
	if k := len(c.io.free); k > 0 {
		f = c.io.free[k-1]
		c.io.free = c.io.free[:k-1]
	} else {
		f = &flight{}
	}
	f.bg, f.sealed, f.robbed = bg, 0, f.robbed[:0]
	return f
}

// claim claims every unhydrated region of [r0, r1] for the caller, robbing
// background copies that have not sealed them. If a region in the range is
// in a flight it cannot rob, it waits until some flight ends and tries
// again, so it never holds a claim while waiting (no deadlock between
// overlapping claims). It returns nil if every region is hydrated.
func (c *Clone) claim(r0, r1 uint64) *flight {
	c.io.Lock()
	defer c.io.Unlock()
	for c.busy(r0, r1) {
		c.io.waiters++
		c.io.cond.Wait()
		c.io.waiters--
	}
	var f *flight
	c.md.forEachUnhydrated(r0, r1, func(r uint64) {
		if f == nil {
			f = c.newFlight(false)
		}
		if bf := c.io.flights[r]; bf != nil {
			bf.robbed = append(bf.robbed, r)
		}
		c.io.flights[r] = f
	})
	return f
}

// busy reports whether a region of [r0, r1] is in a flight a claim cannot
// rob: a user claim, or a background copy that sealed it. Called with c.io
// held.
func (c *Clone) busy(r0, r1 uint64) bool {
	for r := r0; r <= r1; r++ {
		if f := c.io.flights[r]; f != nil && (!f.bg || r < f.sealed) {
			return true
		}
	}
	return false
}

// robMask says which regions of a chunk of a background copy were robbed:
// bit k for the chunk's k-th region. A chunk is at most a copy buffer,
// which is at most max(region, 1 MiB): 256 regions of 4 KiB, or one.
type robMask [4]uint64

func (m *robMask) has(k uint64) bool { return m[k/64]&(1<<(k%64)) != 0 }

// seal stops claims from robbing f of the regions below end and returns
// which regions of [r0, end) were robbed already (end-r0 <= 256).
func (c *Clone) seal(f *flight, r0, end uint64) (m robMask, any bool) {
	c.io.Lock()
	defer c.io.Unlock()
	f.sealed = max(f.sealed, end)
	for _, r := range f.robbed {
		if r >= r0 && r < end {
			m[(r-r0)/64] |= 1 << ((r - r0) % 64)
			any = true
		}
	}
	return m, any
}

// release ends f's claim on the regions of [r0, r1] it still holds. If
// ok, they become hydrated first, so that anyone who finds the claim gone
// finds them hydrated. Robbed regions belong to their robber's flight.
func (c *Clone) release(f *flight, r0, r1 uint64, ok bool) {
	c.io.Lock()
	for r := r0; r <= r1; {
		if c.io.flights[r] != f {
			r++
			continue
		}
		e := r
		for e < r1 && c.io.flights[e+1] == f {
			e++
		}
		if ok {
			c.md.markRange(r, e)
		}
		for ; r <= e; r++ {
			delete(c.io.flights, r)
		}
	}
	c.io.free = append(c.io.free, f)
	if c.io.waiters > 0 {
		c.io.cond.Broadcast()
	}
	c.io.Unlock()
	c.hyd.kick()
}

// ReadAt implements blockdev.Device.
func (c *Clone) ReadAt(p []byte, off int64) (int, error) {
	if !c.enter() {
		return 0, errClosed("read")
	}
	defer c.leave()
	if err := blockdev.CheckRange(off, int64(len(p)), c.size, c.bs); err != nil {
		return 0, fmt.Errorf("clone: read: %w", err)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if c.md.allHydrated() {
		return c.readHydrated(p, off)
	}
	n := len(p)
	end := off + int64(n)
	for off < end {
		// The run of regions sharing the first one's state.
		r := uint64(off >> c.shift)
		h := c.md.test(r)
		runEnd := c.regionEnd(r)
		for runEnd < end && c.md.test(uint64(runEnd>>c.shift)) == h {
			runEnd = c.regionEnd(uint64(runEnd >> c.shift))
		}
		runEnd = min(runEnd, end)
		part := p[:runEnd-off]
		var err error
		if h {
			_, err = c.readHydrated(part, off)
		} else {
			err = c.readUnhydrated(part, off)
		}
		if err != nil {
			return 0, err
		}
		p, off = p[len(part):], runEnd
	}
	return n, nil
}

// readHydrated: the range is in the destination.
func (c *Clone) readHydrated(p []byte, off int64) (int, error) {
	if _, err := c.dst.ReadAt(p, off); err != nil {
		return 0, fmt.Errorf("clone: read destination at %d: %w", off, err)
	}
	return len(p), nil
}

// readUnhydrated: the range (wholly unhydrated when looked at) is read from
// the source, or hydrated first with HydrateOnRead. Background hydration
// yields while user reads of the source are in progress, and the region is
// hinted to it so that regions being read hydrate early.
func (c *Clone) readUnhydrated(p []byte, off int64) error {
	r0, r1 := c.regionsOf(off, int64(len(p)))
	if c.opts.HydrateOnRead {
		return c.hydrateOnRead(p, off, r0, r1)
	}
	c.userSrc.Add(1)
	_, err := c.src.ReadAt(p, off)
	c.userSrc.Add(-1)
	c.hyd.userDone()
	c.hyd.hint(r0)
	if err != nil {
		return fmt.Errorf("clone: read source at %d: %w", off, err)
	}
	return nil
}

// hydrateOnRead hydrates the regions of [off, off+len(p)) and returns the
// requested part of them, taken from the copy on its way through.
func (c *Clone) hydrateOnRead(p []byte, off int64, r0, r1 uint64) error {
	f := c.claim(r0, r1)
	if f == nil {
		_, err := c.readHydrated(p, off)
		return err
	}
	bp := c.getBuf()
	defer c.putBuf(bp)
	var err error
	for r := r0; r <= r1 && err == nil; r++ {
		lo, hi := max(off, c.regionStart(r)), min(off+int64(len(p)), c.regionEnd(r))
		out := p[lo-off : hi-off]
		if c.md.test(r) {
			_, err = c.readHydrated(out, lo)
			continue
		}
		err = c.fillRegion(*bp, r, overlay{}, out, lo)
	}
	c.release(f, r0, r1, err == nil)
	return err
}

// overlay is user data laid over a region while it is filled from the
// source: data at off, or n zero bytes at off when data is nil.
type overlay struct {
	off  int64
	n    int64
	data []byte
}

// fillRegion copies region r from the source to the destination through
// buf, chunk by chunk, with ov laid over the source data, and copies the
// bytes of [outOff, outOff+len(out)) into out on the way. A chunk that ov
// covers entirely is not read from the source. Each destination byte is
// written once.
func (c *Clone) fillRegion(buf []byte, r uint64, ov overlay, out []byte, outOff int64) error {
	for lo, end := c.regionStart(r), c.regionEnd(r); lo < end; {
		n := min(int64(len(buf)), end-lo)
		chunk := buf[:n]
		if !(ov.off <= lo && ov.off+ov.n >= lo+n) {
			c.userSrc.Add(1)
			_, err := c.src.ReadAt(chunk, lo)
			c.userSrc.Add(-1)
			c.hyd.userDone()
			if err != nil {
				return fmt.Errorf("clone: region %d: read source at %d: %w", r, lo, err)
			}
		}
		if a, b := max(lo, ov.off), min(lo+n, ov.off+ov.n); a < b {
			if ov.data == nil {
				clear(chunk[a-lo : b-lo])
			} else {
				copy(chunk[a-lo:b-lo], ov.data[a-ov.off:b-ov.off])
			}
		}
		if _, err := c.dst.WriteAt(chunk, lo); err != nil {
			return fmt.Errorf("clone: region %d: write destination at %d: %w", r, lo, err)
		}
		if a, b := max(lo, outOff), min(lo+n, outOff+int64(len(out))); a < b {
			copy(out[a-outOff:b-outOff], chunk[a-lo:b-lo])
		}
		c.hyd.addCopied(n)
		lo += n
	}
	return nil
}

// WriteAt implements blockdev.Device.
func (c *Clone) WriteAt(p []byte, off int64) (int, error) {
	if !c.enter() {
		return 0, errClosed("write")
	}
	defer c.leave()
	if err := c.refuseChange("write"); err != nil {
		return 0, err
	}
	if err := blockdev.CheckRange(off, int64(len(p)), c.size, c.bs); err != nil {
		return 0, fmt.Errorf("clone: write: %w", err)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if err := c.write(p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *Clone) write(p []byte, off int64) error {
	r0, r1 := c.regionsOf(off, int64(len(p)))
	if c.md.allHydrated() || c.md.rangeHydrated(r0, r1) {
		return c.writeHydrated(p, off)
	}
	f := c.claim(r0, r1)
	if f == nil {
		return c.writeHydrated(p, off)
	}
	err := c.splitRegions(off, int64(len(p)), r0, r1, func(lo, hi int64, r uint64, whole bool) error {
		piece := p[lo-off : hi-off]
		switch {
		case whole:
			return c.writeWhole(piece, lo)
		case c.md.test(r):
			return c.writeHydrated(piece, lo)
		default:
			return c.writePartialUnhydrated(r, piece, lo)
		}
	})
	c.release(f, r0, r1, err == nil)
	return err
}

// splitRegions cuts [off, off+n) into its partial first region, its run of
// whole regions, and its partial last region, and calls fn for each
// non-empty piece in order; r is the region of a partial piece.
func (c *Clone) splitRegions(off, n int64, r0, r1 uint64, fn func(lo, hi int64, r uint64, whole bool) error) error {
	end := off + n
	midLo, midHi := off, end
	if off != c.regionStart(r0) || end < c.regionEnd(r0) {
		midLo = min(c.regionEnd(r0), end)
		if err := fn(off, midLo, r0, false); err != nil {
			return err
		}
	}
	if midLo < end && end != c.regionEnd(r1) {
		midHi = c.regionStart(r1)
	}
	if midLo < midHi {
		if err := fn(midLo, midHi, 0, true); err != nil {
			return err
		}
	}
	if midHi < end && midHi >= midLo {
		return fn(midHi, end, r1, false)
	}
	return nil
}

// writeHydrated: the range is hydrated; the write goes to the destination.
func (c *Clone) writeHydrated(p []byte, off int64) error {
	if _, err := c.dst.WriteAt(p, off); err != nil {
		return fmt.Errorf("clone: write destination at %d: %w", off, err)
	}
	return nil
}

// writeWhole: the write covers whole regions (claimed, or hydrated); it goes
// straight to the destination with no copy, in one call.
func (c *Clone) writeWhole(p []byte, off int64) error {
	skipped := c.unhydratedBytes(off, int64(len(p)))
	if _, err := c.dst.WriteAt(p, off); err != nil {
		return fmt.Errorf("clone: write destination at %d: %w", off, err)
	}
	c.hyd.addSkipped(skipped)
	return nil
}

// unhydratedBytes is the size of the unhydrated regions within [off,
// off+n): what a whole-region write or discard hydrates without a copy.
func (c *Clone) unhydratedBytes(off, n int64) int64 {
	r0, r1 := c.regionsOf(off, n)
	var b int64
	c.md.forEachUnhydrated(r0, r1, func(r uint64) { b += c.regionEnd(r) - c.regionStart(r) })
	return b
}

// writePartialUnhydrated: the write covers part of claimed region r: read
// the source region, overlay the write in memory, write the destination
// once.
func (c *Clone) writePartialUnhydrated(r uint64, p []byte, off int64) error {
	bp := c.getBuf()
	defer c.putBuf(bp)
	return c.fillRegion(*bp, r, overlay{off: off, n: int64(len(p)), data: p}, nil, 0)
}

// Discard implements blockdev.Device. Whole unhydrated regions become
// hydrated with no copy; the destination range is discarded (or zeroed with
// NoDiscardPassdown) so that it reads as zeros. A partial unhydrated region
// is filled from the source with zeros laid over the range, as a partial
// write of zeros would be, since the range must read as zeros afterwards.
func (c *Clone) Discard(off, n int64) error {
	if !c.enter() {
		return errClosed("discard")
	}
	defer c.leave()
	if err := c.refuseChange("discard"); err != nil {
		return err
	}
	if err := blockdev.CheckRange(off, n, c.size, c.bs); err != nil {
		return fmt.Errorf("clone: discard: %w", err)
	}
	if n == 0 {
		return nil
	}
	r0, r1 := c.regionsOf(off, n)
	f := c.claim(r0, r1)
	if f == nil {
		return c.discardDest(off, n)
	}
	err := c.splitRegions(off, n, r0, r1, func(lo, hi int64, r uint64, whole bool) error {
		switch {
		case whole:
			skipped := c.unhydratedBytes(lo, hi-lo)
			if err := c.discardDest(lo, hi-lo); err != nil {
				return err
			}
			c.hyd.addSkipped(skipped)
			return nil
		case c.md.test(r):
			return c.discardDest(lo, hi-lo)
		default:
			return c.discardPartialUnhydrated(r, lo, hi-lo)
		}
	})
	c.release(f, r0, r1, err == nil)
	return err
}

// discardDest makes a destination range read as zeros: passed down as a
// Discard, or written as zeros with NoDiscardPassdown.
func (c *Clone) discardDest(off, n int64) error {
	var err error
	if c.opts.NoDiscardPassdown {
		err = blockdev.WriteZeroes(c.dst, off, n)
	} else {
		err = discardOrZero(c.dst, off, n)
	}
	if err != nil {
		return fmt.Errorf("clone: discard destination at %d+%d: %w", off, n, err)
	}
	return nil
}

// discardOrZero discards, falling back to writing zeros where the device
// does not support discard.
func discardOrZero(d blockdev.Device, off, n int64) error {
	err := d.Discard(off, n)
	if err != nil && isNotSupported(err) {
		return blockdev.WriteZeroes(d, off, n)
	}
	return err
}

// discardPartialUnhydrated: part of claimed region r is discarded: the
// region is filled from the source with zeros over the range.
func (c *Clone) discardPartialUnhydrated(r uint64, off, n int64) error {
	bp := c.getBuf()
	defer c.putBuf(bp)
	return c.fillRegion(*bp, r, overlay{off: off, n: n}, nil, 0)
}

// Flush implements blockdev.Device: the destination is flushed, then the
// metadata committed if any region became hydrated since the last commit
// (and metadata sync is on). A Flush with nothing changed writes no
// metadata.
func (c *Clone) Flush() error {
	if !c.enter() {
		return errClosed("flush")
	}
	defer c.leave()
	return c.md.flush(c.opts.NoMetadataSync)
}

// WriteAtFUA implements blockdev.FUAWriter: a write to hydrated regions is
// passed down as a FUA write; one that hydrates regions is followed by a
// commit.
func (c *Clone) WriteAtFUA(p []byte, off int64) (int, error) {
	if !c.enter() {
		return 0, errClosed("write")
	}
	defer c.leave()
	if err := c.refuseChange("write"); err != nil {
		return 0, err
	}
	if err := blockdev.CheckRange(off, int64(len(p)), c.size, c.bs); err != nil {
		return 0, fmt.Errorf("clone: write: %w", err)
	}
	if len(p) == 0 {
		return 0, nil
	}
	r0, r1 := c.regionsOf(off, int64(len(p)))
	if c.md.rangeHydrated(r0, r1) {
		if _, err := blockdev.WriteFUA(c.dst, p, off); err != nil {
			return 0, fmt.Errorf("clone: FUA write destination at %d: %w", off, err)
		}
		return len(p), nil
	}
	if err := c.write(p, off); err != nil {
		return 0, err
	}
	if err := c.md.flush(c.opts.NoMetadataSync); err != nil {
		return 0, err
	}
	return len(p), nil
}
